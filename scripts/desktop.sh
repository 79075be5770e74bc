#!/usr/bin/env bash
# The desktop app on a fresh Debian machine: installs what it needs, builds the UI and the app,
# starts a relay on loopback with an embedded default configuration, and opens the app.
#
# First run: the app asks for the facility's name and a passphrase, then for an invite code; this
# script prints one (for the shelter みなと公民館) and keeps it in $MUSUBI_HOME/invite.txt. Once the app
# has joined, a second facility run by the CLI (港診療所) sends it a real referral letter (FHIR JP
# eReferral from ../shared/data), which appears in the app's 紹介状 inbox.
#
# Usage: `bash scripts/desktop.sh`. State lives in $MUSUBI_HOME (default ~/.local/share/musubi-demo)
# and survives restarts; delete that directory to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

# System packages: the C toolchain, WebKitGTK for Tauri, PC/SC, the Japanese font of the PDFs, Node.js.
need_cmd cc build-essential
need_cmd pkg-config pkg-config
need_pkg libwebkit2gtk-4.1-dev libgtk-3-dev librsvg2-dev libayatana-appindicator3-dev libpcsclite-dev
need_file /usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf fonts-ipaexfont-gothic
need_cmd npm nodejs npm
if [[ -z ${DISPLAY:-}${WAYLAND_DISPLAY:-} ]]; then need_cmd xvfb-run xvfb xauth; fi
install_missing sudo

step "building the UI (frontend/)"
(cd frontend && { [[ -d node_modules ]] || npm ci --no-audit --no-fund; } && npm run build --silent)

step "building the relay, the CLI and the desktop app"
cargo build --quiet --bins -p musubi-sync-node -p musubi-facility -p musubi-desktop
target_dir=${CARGO_TARGET_DIR:-target}
node="$target_dir/debug/musubi-node"
musubi="$target_dir/debug/musubi"
app="$target_dir/debug/musubi-desktop"

home=${MUSUBI_HOME:-$HOME/.local/share/musubi-demo}
mkdir -p "$home"
relay_dir="$home/relay"
authority_dir="$home/authority"
# A relay made before the deployment authority existed cannot be upgraded: start over.
if [[ -f $relay_dir/relay.key && ! -f $authority_dir/authority.pub ]]; then
    step "$home was made by an older Musubi (before the deployment authority); starting over"
    rm -rf "$home"
    mkdir -p "$home"
fi
# The embedded default: the authority's key beside the relay, unlocked with this passphrase, so the
# relay approves facilities as they join (a city keeps the authority on a USB stick instead).
export MUSUBI_AUTHORITY_PASSPHRASE=${MUSUBI_AUTHORITY_PASSPHRASE:-"musubi demo authority passphrase"}
port=${MUSUBI_RELAY_PORT:-4747}
relay_pid=
clinic_pid=
cleanup() {
    for p in $clinic_pid $relay_pid; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

if [[ ! -f $relay_dir/relay.key ]]; then
    step "creating the deployment authority and the relay (deployment 'demo') in $home"
    "$node" authority init --authority "$authority_dir" --deployment demo | tee "$home/authority.txt"
    "$node" init --data "$relay_dir" --authority "$authority_dir" >/dev/null
fi
step "starting the relay on /ip4/127.0.0.1/tcp/$port (it approves facilities as they join)"
"$node" serve --data "$relay_dir" --authority "$authority_dir" --listen "/ip4/127.0.0.1/tcp/$port" >"$home/relay.out" 2>"$home/relay.log" &
relay_pid=$!
for _ in $(seq 300); do
    grep -q '^listening on ' "$home/relay.out" 2>/dev/null && break
    kill -0 "$relay_pid" 2>/dev/null || { cat "$home/relay.log" >&2; exit 1; }
    sleep 0.1
done

# The CLI clinic that writes to the app (its own passphrase, kept beside its data).
clinic="$home/clinic"
export MUSUBI_PASSPHRASE="musubi demo clinic passphrase"
export MUSUBI_STAFF=demo MUSUBI_STAFF_PASSWORD="musubi demo staff password"
if [[ ! -f $clinic/device.age ]]; then
    "$musubi" init --data "$clinic" --name 港診療所 >/dev/null
    printf '%s\n' "$MUSUBI_STAFF_PASSWORD" | "$musubi" staff add --data "$clinic" --login demo --name "デモ 職員" --role admin >/dev/null
    "$musubi" join --data "$clinic" "$("$node" invite --data "$relay_dir" --authority "$authority_dir" --name 港診療所 --role clinic 2>/dev/null)" >/dev/null
fi

desktop="$home/desktop"
if [[ ! -f $desktop/device.age ]]; then
    "$node" invite --data "$relay_dir" --authority "$authority_dir" --name みなと公民館 --role shelter --expires 7days >"$home/invite.txt" 2>/dev/null
    step "first run: in the app, create the facility (any name, a passphrase of 8+ characters), then paste this invite code:"
    cat "$home/invite.txt"
    echo "the app shows the deployment authority's fingerprint before joining; it must read: $(sed -n 's/^authority fingerprint: //p' "$home/authority.txt")"
fi

bundle=../shared/data/fhir-ereferral/Bundle-BundleReferralExample01.json
if [[ -f $bundle && ! -f $home/referral-sent ]]; then
    ( # once the app's facility has joined, the clinic sends it a referral letter
        for _ in $(seq 1800); do
            if "$node" facilities --data "$relay_dir" 2>/dev/null | grep -q みなと公民館; then
                "$musubi" sync --data "$clinic" --once >/dev/null 2>&1 || true
                if "$musubi" referral import-fhir --data "$clinic" --to みなと公民館 "$bundle" >/dev/null 2>&1; then
                    "$musubi" sync --data "$clinic" --once >/dev/null 2>&1 && touch "$home/referral-sent"
                    break
                fi
            fi
            sleep 2
        done
    ) &
    clinic_pid=$!
fi

step "opening Musubi (data in $desktop; close the window to stop)"
export MUSUBI_DATA="$desktop"
if [[ -z ${DISPLAY:-}${WAYLAND_DISPLAY:-} ]]; then
    echo "no display: running the app under xvfb-run (use a desktop session to see the window)"
    xvfb-run -a -s "-screen 0 1280x800x24" "$app"
else
    "$app"
fi
