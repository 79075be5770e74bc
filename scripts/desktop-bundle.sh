#!/usr/bin/env bash
# The desktop app's installers, built and checked on this Debian 12 machine:
#   1. `tauri build` (the npm @tauri-apps/cli of frontend/) makes the .deb and the AppImage of
#      musubi-desktop, after `npm run build` of the UI it embeds;
#   2. the .deb is installed with apt (which pulls in WebKitGTK), its /usr/bin/musubi-desktop is started
#      under Xvfb, its window must appear, and a WebDriver session takes a screenshot of its first
#      screen (ci-artifacts/screenshots/bundle-deb.png);
#   3. the AppImage unpacks itself with its own runtime, its AppRun is started the same way (the app
#      then runs on the AppImage's own GTK and WebKitGTK), its window must appear, and a screenshot is
#      taken (ci-artifacts/screenshots/bundle-appimage.png).
#
# AppImage without GitHub: Tauri downloads linuxdeploy and AppRun from GitHub unless they are in its
# tools cache. This script fills that cache (under target/tools, so CI caches it with target/) with
# installers/appimage/{linuxdeploy,AppRun}, our own scripts over Debian's ldd and mksquashfs, and with the
# AppImage runtime that the `appimage` crate on crates.io ships (fetched by cargo).
#
# Usage: `bash scripts/desktop-bundle.sh`. Idempotent; installs the Debian packages it needs (as root).
# Environment: MUSUBI_BUNDLE_PROFILE=release (default) or debug (`tauri build --debug`: faster, reuses
# the debug build of the tests); MUSUBI_BUNDLE_KEEP=1 leaves the .deb installed.
# Exits non-zero, saying why, when a bundle cannot be built, installed or started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source scripts/lib.sh
die() { printf 'desktop-bundle: %s\n' "$*" >&2; exit 1; }

profile=${MUSUBI_BUNDLE_PROFILE:-release}
[[ $profile == release || $profile == debug ]] || die "MUSUBI_BUNDLE_PROFILE must be release or debug, not $profile"
target_dir=${CARGO_TARGET_DIR:-$root/target}
[[ $target_dir == /* ]] || target_dir=$root/$target_dir
shots=$root/ci-artifacts/screenshots
mkdir -p "$shots"

# --- system packages -------------------------------------------------------------------------------
need_pkg libwebkit2gtk-4.1-dev libgtk-3-dev libsoup-3.0-dev libjavascriptcoregtk-4.1-dev librsvg2-dev \
    libayatana-appindicator3-dev
need_cmd cc build-essential
need_cmd pkg-config pkg-config
need_cmd dpkg-architecture dpkg-dev                # the gtk plugin asks it
need_cmd glib-compile-schemas libglib2.0-bin
need_cmd mksquashfs squashfs-tools                 # packs the AppImage
need_cmd file file
need_cmd Xvfb xvfb
need_cmd xauth xauth
need_cmd xwininfo x11-utils                        # the window check
need_cmd WebKitWebDriver webkit2gtk-driver         # the screenshot
need_cmd curl curl
need_cmd npm nodejs npm
install_missing die

# --- tools: tauri-driver and the AppImage tools cache ----------------------------------------------
tools=$target_dir/tools
driver=$tools/bin/tauri-driver
if [[ ! -x $driver ]]; then
    step "cargo install tauri-driver --locked --root $tools"
    cargo install tauri-driver --locked --root "$tools"
fi

# Tauri looks for its AppImage tools in $XDG_CACHE_HOME/tauri (given only to the tauri command below).
tauri_cache=$tools/cache
tauri_tools=$tauri_cache/tauri
mkdir -p "$tauri_tools"
# Tauri zeroes bytes 8-10 of the linuxdeploy it runs, so under that name goes a small ELF program
# (built here) that runs our script beside it (see installers/appimage/linuxdeploy-shim.c).
install -m 755 installers/appimage/linuxdeploy "$tauri_tools/musubi-linuxdeploy"
cc -O2 -o "$tauri_tools/linuxdeploy-07333c6-x86_64.AppImage" installers/appimage/linuxdeploy-shim.c
install -m 755 installers/appimage/AppRun "$tauri_tools/AppRun-x86_64"
# The output plugin Tauri fetches "just in case" is not used (our linuxdeploy packs the AppImage); an
# executable in its place keeps Tauri from trying the download.
printf '#!/bin/sh\necho "not used: installers/appimage/linuxdeploy packs the AppImage itself" >&2\nexit 1\n' \
    >"$tauri_tools/linuxdeploy-plugin-appimage.AppImage"
chmod 755 "$tauri_tools/linuxdeploy-plugin-appimage.AppImage"
if [[ ! -f $tauri_tools/runtime-x86_64 ]]; then
    step "fetching the AppImage runtime (crate appimage 0.4.0 on crates.io)"
    fetch=$(mktemp -d)
    mkdir -p "$fetch/src"
    printf '[package]\nname = "fetch-appimage-runtime"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nappimage = "=0.4.0"\n[workspace]\n' \
        >"$fetch/Cargo.toml"
    : >"$fetch/src/lib.rs"
    cargo fetch --quiet --manifest-path "$fetch/Cargo.toml"
    src=$(cargo metadata --quiet --format-version 1 --manifest-path "$fetch/Cargo.toml" |
        python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="appimage"))')
    runtime=$(dirname "$src")/assets/runtime-x86_64
    rm -rf "$fetch"
    [[ -f $runtime ]] || die "the appimage crate has no assets/runtime-x86_64 (looked at $runtime)"
    # An AppImage runtime is an ELF with "AI\x02" at offset 8.
    [[ $(od -An -c -j 8 -N 3 "$runtime" | tr -d ' ') == 'AI002' ]] || die "$runtime is not an AppImage type-2 runtime"
    install -m 755 "$runtime" "$tauri_tools/runtime-x86_64"
fi

# --- build ------------------------------------------------------------------------------------------
step "frontend: npm ci and npm run build (when out of date)"
(
    cd frontend
    if [[ ! -x node_modules/.bin/tauri || package-lock.json -nt node_modules/.package-lock.json ]]; then
        npm ci --no-audit --no-fund
    fi
    # A fresh dist is kept as it is: rebuilding it would make cargo rebuild the app that embeds it.
    if [[ ! -f dist/index.html ]] ||
        [[ -n $(find src public index.html package.json package-lock.json vite.config.ts svelte.config.js \
            -newer dist/index.html -print -quit 2>/dev/null) ]]; then
        npm run build
    else
        echo "dist/ is newer than the UI's sources"
    fi
)
tauri=$root/frontend/node_modules/.bin/tauri
[[ -x $tauri ]] || die "the Tauri CLI is missing: frontend/package.json must list @tauri-apps/cli"

args=(build --ci --bundles deb appimage)
[[ $profile == debug ]] && args+=(--debug)
bundle_dir=$target_dir/$profile/bundle
rm -rf "$bundle_dir/deb" "$bundle_dir/appimage"
step "tauri ${args[*]} (profile $profile)"
(cd app/desktop && XDG_CACHE_HOME=$tauri_cache "$tauri" "${args[@]}")

deb=$(find "$bundle_dir/deb" -maxdepth 1 -name '*.deb' | head -1)
appimage=$(find "$bundle_dir/appimage" -maxdepth 1 -name '*.AppImage' | head -1)
[[ -f $deb ]] || die "tauri build made no .deb in $bundle_dir/deb"
[[ -f $appimage ]] || die "tauri build made no AppImage in $bundle_dir/appimage"
printf '%s\n' "$deb" "$appimage" | xargs ls -la
dpkg-deb --info "$deb" | sed -n '/Package:/,/Description:/p'

# --- start a bundle under Xvfb: its window must appear -------------------------------------------
work=$(mktemp -d)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

Xvfb -displayfd 1 -screen 0 1280x800x24 -nolisten tcp >"$work/display" 2>"$work/xvfb.log" &
pids+=($!)
for _ in $(seq 100); do [[ -s $work/display ]] && break; sleep 0.1; done
[[ -s $work/display ]] || die "no display server: Xvfb did not start ($(cat "$work/xvfb.log"))"
export DISPLAY=:$(head -1 "$work/display")

# Starts "$@" with a fresh data dir, waits up to 60 s for a window titled Musubi, then stops it.
window_appears() {
    local name=$1; shift
    local log=$work/$name.log data=$work/$name-data pid wid=
    MUSUBI_DATA=$data MUSUBI_LAN=0 NO_AT_BRIDGE=1 "$@" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do
        wid=$(xwininfo -root -tree 2>/dev/null | grep -m1 -F '"Musubi' | awk '{print $1}') || true
        [[ -n $wid ]] && break
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "$name exited before showing a window"; }
        sleep 0.1
    done
    [[ -n $wid ]] || { kill "$pid" 2>/dev/null; cat "$log" >&2; die "$name showed no window within 60 s"; }
    echo "$name: window $wid:$(xwininfo -id "$wid" 2>/dev/null | grep -E 'Width|Height|Map State' | tr -s ' ' | tr '\n' ' ')"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# A WebDriver session against BINARY: screenshot to $shots/NAME.png, and the first screen's text.
screenshot_of() {
    local name=$1 binary=$2 port native sid
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    native=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    MUSUBI_DATA=$work/$name-shot MUSUBI_LAN=0 NO_AT_BRIDGE=1 \
        "$driver" --port "$port" --native-port "$native" >"$work/$name-driver.log" 2>&1 &
    local dpid=$!
    for _ in $(seq 100); do curl -s "http://127.0.0.1:$port/status" >/dev/null 2>&1 && break; sleep 0.1; done
    sid=$(curl -s -X POST "http://127.0.0.1:$port/session" -H 'Content-Type: application/json' \
        -d "{\"capabilities\":{\"alwaysMatch\":{\"browserName\":\"wry\",\"tauri:options\":{\"application\":\"$binary\"}}}}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["value"]["sessionId"])') ||
        { kill "$dpid"; cat "$work/$name-driver.log" >&2; die "no WebDriver session for $binary"; }
    local text=
    for _ in $(seq 300); do
        text=$(curl -s -X POST "http://127.0.0.1:$port/session/$sid/execute/sync" -H 'Content-Type: application/json' \
            -d '{"script":"return document.querySelector(\"input, button\") ? document.body.innerText : \"\"","args":[]}' |
            python3 -c 'import json,sys; print(json.load(sys.stdin).get("value") or "")' 2>/dev/null) || true
        [[ -n $text ]] && break
        sleep 0.2
    done
    curl -s "http://127.0.0.1:$port/session/$sid/screenshot" |
        python3 -c 'import base64,json,sys; open(sys.argv[1],"wb").write(base64.b64decode(json.load(sys.stdin)["value"]))' "$shots/$name.png"
    curl -s -X DELETE "http://127.0.0.1:$port/session/$sid" >/dev/null || true
    kill "$dpid" 2>/dev/null || true
    wait "$dpid" 2>/dev/null || true
    [[ -n $text ]] || die "$binary showed no interactive first screen"
    echo "$name: first screen: $(echo "$text" | head -3 | tr '\n' ' ')"
    file "$shots/$name.png"
}

# --- the .deb: install, start, screenshot ---------------------------------------------------------
package=$(dpkg-deb --field "$deb" Package)
step "apt-get install $deb (package $package)"
[[ $(id -u) -eq 0 ]] || die "installing the .deb needs root"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall --no-install-recommends "$deb" >/dev/null
installed=$(dpkg -L "$package" | grep -m1 '/bin/musubi-desktop$') || die "the package $package installs no bin/musubi-desktop"
[[ -f /usr/share/applications/Musubi.desktop ]] || dpkg -L "$package" | grep -q '\.desktop$' ||
    die "the package $package installs no .desktop file"
step "starting the installed $installed under Xvfb ($DISPLAY)"
window_appears deb "$installed"
screenshot_of bundle-deb "$installed"

# --- the AppImage: its runtime unpacks it (as with --appimage-extract-and-run, which needs no FUSE) --
step "starting $(basename "$appimage") under Xvfb"
[[ $(od -An -c -j 8 -N 3 "$appimage" | tr -d ' ') == 'AI002' ]] || die "$appimage is not a type-2 AppImage"
(cd "$work" && "$appimage" --appimage-extract >/dev/null) || die "$appimage could not unpack itself"
[[ -x $work/squashfs-root/AppRun ]] || die "$appimage holds no AppRun"
window_appears appimage "$work/squashfs-root/AppRun"
screenshot_of bundle-appimage "$work/squashfs-root/AppRun"

if [[ ${MUSUBI_BUNDLE_KEEP:-0} != 1 ]]; then
    step "removing the package $package again"
    DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq "$package" >/dev/null
fi
step "bundles OK: $deb, $appimage"
