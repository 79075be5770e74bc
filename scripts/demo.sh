#!/usr/bin/env bash
# A walk-through on loopback: the deployment authority, one relay and two clinics in a temporary
# directory. The authority certifies each clinic as it joins (`serve --authority`, the embedded
# default); 港診療所 adds a second device with a device invite; 港診療所 imports the real HL7 FHIR JP
# eReferral Bundle and sends it to 東京第一テスト病院, which reads it and replies; 港診療所 reads the reply;
# both show the other's safety number. Usage: `bash scripts/demo.sh [BUNDLE.json]`.
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

# The demo's one device passphrase (a real deployment gives each device its own) and the authority's.
export MUSUBI_PASSPHRASE="musubi demo passphrase 結び"
export MUSUBI_AUTHORITY_PASSPHRASE="musubi demo authority passphrase"
# The staff member every command acts as (each device's first account, its administrator); the
# audit log (`musubi audit list`) names them.
export MUSUBI_STAFF=demo
export MUSUBI_STAFF_PASSWORD="musubi demo staff password"

say() { printf '\n==> %s\n' "$*"; }

say "creating the deployment authority (in a real deployment: on a USB stick, off the relay host)"
"$node" authority init --authority "$demo/authority" --deployment demo

say "starting the relay (data in $demo/relay; it keeps only the authority's public key)"
"$node" init --data "$demo/relay" --authority "$demo/authority" >/dev/null
"$node" serve --data "$demo/relay" --authority "$demo/authority" --listen /ip4/127.0.0.1/tcp/0 >"$demo/relay.out" 2>"$demo/relay.log" &
relay_pid=$!
for _ in $(seq 300); do
    grep -q '^listening on ' "$demo/relay.out" 2>/dev/null && break
    kill -0 "$relay_pid" 2>/dev/null || { cat "$demo/relay.log" >&2; exit 1; }
    sleep 0.1
done
grep '^listening on ' "$demo/relay.out" || { echo "demo: the relay did not start" >&2; exit 1; }

first_staff() { # DIR
    printf '%s\n' "$MUSUBI_STAFF_PASSWORD" | "$musubi" staff add --data "$1" --login "$MUSUBI_STAFF" --name "デモ 職員" --role admin >/dev/null
}
enrol() { # DIR NAME
    "$musubi" init --data "$1" --name "$2" >/dev/null
    first_staff "$1"
    local code
    code=$("$node" invite --data "$demo/relay" --authority "$demo/authority" --name "$2" --role clinic 2>/dev/null)
    echo "$2 joins: facility $("$musubi" join --data "$1" "$code" 2>/dev/null)"
}
say "enrolling two clinics (the authority approves each as it joins)"
enrol "$demo/clinic-a" 港診療所
enrol "$demo/clinic-b" 東京第一テスト病院
"$musubi" sync --data "$demo/clinic-a" --once

say "港診療所 adds its reception PC: a device invite, approved by its first device at its next sync"
code=$("$musubi" device invite --data "$demo/clinic-a" 2>/dev/null)
"$musubi" sync --data "$demo/clinic-a" --once
"$musubi" init --data "$demo/clinic-a2" --name 港診療所-受付 >/dev/null
first_staff "$demo/clinic-a2"
"$musubi" join --data "$demo/clinic-a2" "$code" --no-wait 2>/dev/null
"$musubi" sync --data "$demo/clinic-a" --once
echo "the reception PC joins: facility $("$musubi" join --data "$demo/clinic-a2" "$code" 2>/dev/null)"

say "港診療所 imports $(basename "$bundle") and sends it to 東京第一テスト病院"
id=$("$musubi" referral import-fhir --data "$demo/clinic-a" --to 東京第一テスト病院 "$bundle")
echo "letter $id"

say "東京第一テスト病院 syncs and reads the letter"
"$musubi" sync --data "$demo/clinic-b" --once
"$musubi" referral show --data "$demo/clinic-b" "$id"

say "東京第一テスト病院 replies"
"$musubi" referral reply --data "$demo/clinic-b" "$id" --text "返書: ご紹介ありがとうございました。本日拝見し、精査のうえご報告いたします。"
"$musubi" sync --data "$demo/clinic-b" --once

say "港診療所 syncs and reads the reply; so does its reception PC"
"$musubi" sync --data "$demo/clinic-a" --once
"$musubi" referral show --data "$demo/clinic-a" "$id"
"$musubi" sync --data "$demo/clinic-a2" --once
"$musubi" referral show --data "$demo/clinic-a2" "$id" | head -3

say "safety numbers: each clinic reads the other's to it by phone"
"$musubi" facilities --data "$demo/clinic-b"

say "who saw what at the hospital: its audit log (administrators only), and its check"
"$musubi" audit list --data "$demo/clinic-b"
"$musubi" audit verify --data "$demo/clinic-b"

say "what the relay holds: ciphertext only"
"$node" facilities --data "$demo/relay"
echo "relay data: $(du -sh "$demo/relay" | cut -f1) in $(find "$demo/relay" -type f | wc -l) files"
