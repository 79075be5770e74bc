#!/usr/bin/env bash
# A walk-through on loopback: one relay and two clinics in a temporary directory.
# 港診療所 imports the real HL7 FHIR JP eReferral Bundle and sends it to 東京第一テスト病院, which reads it
# and replies; 港診療所 reads the reply. Usage: `bash scripts/demo.sh [BUNDLE.json]`.
# Set MUSUBI_DEMO_KEEP=1 to keep the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

bundle=${1:-../shared/data/fhir-ereferral/Bundle-BundleReferralExample01.json}
[[ -f $bundle ]] || { echo "demo: the FHIR Bundle $bundle is missing" >&2; exit 1; }

echo "==> building musubi-node and musubi"
cargo build --quiet --bins -p musubi-sync-node -p musubi-facility
target_dir=${CARGO_TARGET_DIR:-target}
node="$target_dir/debug/musubi-node"
musubi="$target_dir/debug/musubi"

demo=$(mktemp -d -t musubi-demo-XXXXXX)
relay_pid=
cleanup() {
    if [[ -n $relay_pid ]]; then kill "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; fi
    if [[ ${MUSUBI_DEMO_KEEP:-} == 1 ]]; then echo "demo files kept in $demo"; else rm -rf "$demo"; fi
}
trap cleanup EXIT INT TERM

# The demo's one passphrase (a real deployment gives each device its own).
export MUSUBI_PASSPHRASE="musubi demo passphrase 結び"

say() { printf '\n==> %s\n' "$*"; }

say "starting the relay (data in $demo/relay)"
"$node" init --data "$demo/relay" --deployment demo >/dev/null
"$node" serve --data "$demo/relay" --listen /ip4/127.0.0.1/tcp/0 >"$demo/relay.out" 2>"$demo/relay.log" &
relay_pid=$!
for _ in $(seq 300); do
    grep -q '^listening on ' "$demo/relay.out" 2>/dev/null && break
    kill -0 "$relay_pid" 2>/dev/null || { cat "$demo/relay.log" >&2; exit 1; }
    sleep 0.1
done
grep '^listening on ' "$demo/relay.out" || { echo "demo: the relay did not start" >&2; exit 1; }

enrol() { # DIR NAME
    "$musubi" init --data "$1" --name "$2" >/dev/null
    local code
    code=$("$node" invite --data "$demo/relay" --name "$2" --role clinic)
    echo "$2 joins: facility $("$musubi" join --data "$1" "$code")"
}
say "enrolling two clinics"
enrol "$demo/clinic-a" 港診療所
enrol "$demo/clinic-b" 東京第一テスト病院
"$musubi" sync --data "$demo/clinic-a" --once

say "港診療所 imports $(basename "$bundle") and sends it to 東京第一テスト病院"
id=$("$musubi" referral import-fhir --data "$demo/clinic-a" --to 東京第一テスト病院 "$bundle")
echo "letter $id"

say "東京第一テスト病院 syncs and reads the letter"
"$musubi" sync --data "$demo/clinic-b" --once
"$musubi" referral show --data "$demo/clinic-b" "$id"

say "東京第一テスト病院 replies"
"$musubi" referral reply --data "$demo/clinic-b" "$id" --text "返書: ご紹介ありがとうございました。本日拝見し、精査のうえご報告いたします。"
"$musubi" sync --data "$demo/clinic-b" --once

say "港診療所 syncs and reads the reply"
"$musubi" sync --data "$demo/clinic-a" --once
"$musubi" referral show --data "$demo/clinic-a" "$id"

say "what the relay holds: ciphertext only"
"$node" facilities --data "$demo/relay"
echo "relay data: $(du -sh "$demo/relay" | cut -f1) in $(find "$demo/relay" -type f | wc -l) files"
