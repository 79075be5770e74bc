#!/usr/bin/env bash
# The whole test suite: the UI (build, type check, Playwright), format, lints, build, then every test of
# the workspace (unit tests, the deterministic sync simulations, the scenario tests that run real relay
# and facility processes, and the real desktop app under WebDriver), then the desktop installers.
# Run from anywhere: `bash scripts/test.sh`. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh

# System packages: a C compiler (rusqlite bundles SQLite; ring/aws-lc build C) and pkg-config.
# Installed only when missing, and only when we may (root with apt-get, as on a fresh CI machine).
need_cmd cc build-essential
need_cmd pkg-config pkg-config
# The outage scenario builds network namespaces (`ip netns`, veth, bridges); it runs as root.
need_cmd ip iproute2
# The care plan PDF needs a Japanese font; its scenario test renders pages with pdftoppm.
need_file /usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf fonts-ipaexfont-gothic
need_cmd pdftoppm poppler-utils
# The shelter scenario's loopback SMTP server (tests/smtp/sink.py) runs on Debian's python3-aiosmtpd.
need_file /usr/lib/python3/dist-packages/aiosmtpd python3-aiosmtpd
# The relay's /metrics is parsed by the Prometheus project's own parser (python3-prometheus-client).
need_file /usr/lib/python3/dist-packages/prometheus_client python3-prometheus-client
# IC cards: pcsc-lite's daemon, vsmartcard's virtual reader driver (vpcd) and the library the pcsc crate
# links. The card scenarios start and stop their own `pcscd --foreground` (as root: it writes /run/pcscd).
[[ -x /usr/sbin/pcscd ]] || need_cmd pcscd pcscd
need_file /usr/lib/pcsc/drivers/serial/libifdvpcd.so vsmartcard-vpcd
pkg-config --exists libpcsclite 2>/dev/null || missing+=(libpcsclite-dev)
# The desktop app (Tauri 2 on WebKitGTK): its build libraries; the real app's end-to-end tests run it
# under Xvfb through tauri-driver and Debian's WebKitWebDriver; the UI tests use Debian's Chromium.
need_pkg libwebkit2gtk-4.1-dev libgtk-3-dev libsoup-3.0-dev libjavascriptcoregtk-4.1-dev librsvg2-dev \
    libayatana-appindicator3-dev
need_cmd WebKitWebDriver webkit2gtk-driver
need_cmd Xvfb xvfb
need_cmd xauth xauth
need_cmd chromium chromium
need_cmd file file
need_cmd npm nodejs npm
install_missing warn

# The card scenarios own pcscd; a daemon started by systemd's socket activation would be in their way
# (they fail, saying so, rather than skip).
if command -v systemctl >/dev/null 2>&1 && { systemctl is-active --quiet pcscd.socket || systemctl is-active --quiet pcscd.service; } 2>/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
        step "stopping the system pcscd (the card scenarios run their own)"
        systemctl stop pcscd.socket pcscd.service || true
    else
        echo "warning: a system pcscd runs; the card scenarios need it stopped (systemctl stop pcscd.socket pcscd.service)" >&2
    fi
fi

# The UI first: the desktop crate embeds frontend/dist when it compiles, so every cargo step needs it.
step "frontend: npm ci"
(cd frontend && npm ci --no-audit --no-fund)
step "frontend: npm run build"
(cd frontend && npm run build)
step "frontend: npm run check"
(cd frontend && npm run check)
step "frontend: playwright test (Debian's Chromium)"
(cd frontend && CI=${CI:-1} npx playwright test)

# tauri-driver, the WebDriver server of the desktop app's end-to-end tests, installed beside target/ (and
# cached with it); `cargo install` does nothing when this version is already there.
step "cargo install tauri-driver --locked --root target/tools"
cargo install tauri-driver --locked --root "${CARGO_TARGET_DIR:-target}/tools"

if cargo fmt --version >/dev/null 2>&1; then
    step "cargo fmt --check"
    cargo fmt --all -- --check
else
    echo "warning: rustfmt is not installed; skipping the format check" >&2
fi

if cargo clippy --version >/dev/null 2>&1; then
    step "cargo clippy"
    cargo clippy --workspace --all-targets -- -D warnings
else
    echo "warning: clippy is not installed; skipping lints" >&2
fi

# The scenario tests run the real binaries, so build them first (the harness refuses stale ones).
step "cargo build --workspace --bins"
cargo build --workspace --bins

step "cargo test --workspace"
cargo test --workspace

# The installers: .deb and AppImage by `tauri build`; the .deb installed, both started under Xvfb and
# captured (ci-artifacts/screenshots/bundle-*.png).
step "scripts/desktop-bundle.sh"
bash scripts/desktop-bundle.sh

# The relay's .deb (cargo-deb): installed, its hardened unit scored by `systemd-analyze security`,
# started (by systemd when it is PID 1, else its ExecStart under an sd-notify listener), backed up
# by its timer's service, purged.
step "scripts/deb-test.sh"
bash scripts/deb-test.sh
