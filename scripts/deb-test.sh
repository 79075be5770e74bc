#!/usr/bin/env bash
# The relay's Debian package (musubi-node), built, installed and started on this Debian 12 machine:
#   1. `cargo build --release` of musubi-node, then cargo-deb (pinned, installed under target/tools)
#      packages it with sync-node/debian/ (units, conffile, maintainer scripts);
#   2. apt installs the .deb; the system user, the directories, files and conffile are checked, and
#      that nothing was enabled or started;
#   3. `systemd-analyze verify` checks the units and `systemd-analyze security --offline=yes` prints
#      their exposure level (fails above MUSUBI_DEB_EXPOSURE_MAX, default 2.0);
#   4. an authority is made and the relay initialised as the musubi-node user, then the relay runs
#      through its unit: with systemd as PID 1, by systemctl; otherwise the unit's ExecStart (its
#      user, umask, environment and conffile) under a small sd-notify listener. It must send READY=1
#      within 30 s, answer /readyz on the admin listener, send WATCHDOG=1, log JSON lines, and on
#      SIGTERM send STOPPING=1 and exit 0. The backup unit runs once and must write a backup.
#      (Without systemd the sandboxing is not applied; step 3 scores it.)
#   5. purge removes the user and keeps the data.
# Prints what it measured: exposure levels, time to READY=1, watchdog interval, backup size.
#
# Usage (as root, on a machine with no relay in /var/lib/musubi-node): `bash scripts/deb-test.sh`.
# Environment: MUSUBI_DEB=FILE tests that .deb instead of building one; MUSUBI_DEB_KEEP=1 leaves it
# installed and the test relay initialised.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source scripts/lib.sh
die() { printf 'deb-test: %s\n' "$*" >&2; exit 1; }

# cargo-deb 3.8.0 (crates.io's newest in late 2026): rust-version 1.85, so Rust 1.95 builds it; it
# installs units to usr/lib/systemd/system and takes per-unit systemd-units entries.
cargo_deb_version=3.8.0
data=/var/lib/musubi-node
backups=/var/backups/musubi-node
etc=/etc/musubi-node
exposure_max=${MUSUBI_DEB_EXPOSURE_MAX:-2.0}
target_dir=${CARGO_TARGET_DIR:-$root/target}
[[ $target_dir == /* ]] || target_dir=$root/$target_dir

[[ $(id -u) -eq 0 ]] || die "run as root: it installs and purges a package and creates a system user"
[[ ! -e $data/node.db ]] || die "$data already holds a relay; run this on a machine without one (after a failed run: apt-get purge musubi-node; rm -rf $data $backups)"

# --- system packages -------------------------------------------------------------------------------
need_cmd systemd-analyze systemd
need_cmd python3 python3
need_cmd adduser adduser
need_cmd pgrep procps
[[ -d /run/systemd/system ]] && need_cmd curl curl
if [[ -z ${MUSUBI_DEB:-} ]]; then
    need_cmd cc build-essential                   # cargo install, and the release build
    need_cmd strip binutils                       # cargo-deb strips the binary
    need_cmd dpkg-shlibdeps dpkg-dev              # cargo-deb's `$auto` dependencies
fi
install_missing die

work=$(mktemp -d /tmp/musubi-deb-test.XXXXXX)
chmod 0755 "$work"
cleanup() {
    if [[ -d /run/systemd/system ]]; then
        systemctl stop musubi-node.service musubi-node-backup.service >/dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# --- 1. build ---------------------------------------------------------------------------------------
if [[ -n ${MUSUBI_DEB:-} ]]; then
    deb=$(realpath "$MUSUBI_DEB")
else
    grep -q '^\[package\.metadata\.deb\]' sync-node/Cargo.toml \
        || die "sync-node/Cargo.toml has no [package.metadata.deb] table"
    step "cargo build --release -p musubi-sync-node --bin musubi-node"
    cargo build --release -p musubi-sync-node --bin musubi-node
    step "cargo install cargo-deb $cargo_deb_version --locked --root $target_dir/tools"
    cargo install cargo-deb --version "=$cargo_deb_version" --locked --root "$target_dir/tools"
    step "cargo-deb -p musubi-sync-node --no-build"
    rm -f "$target_dir"/debian/musubi-node_*.deb
    "$target_dir/tools/bin/cargo-deb" -p musubi-sync-node --no-build
    debs=("$target_dir"/debian/musubi-node_*.deb)
    [[ ${#debs[@]} -eq 1 && -f ${debs[0]} ]] || die "expected one target/debian/musubi-node_*.deb, found: ${debs[*]}"
    deb=${debs[0]}
fi
step "package $(basename "$deb")"
dpkg-deb -f "$deb" Package Version Depends
dpkg-deb -c "$deb" | awk '{print $1, $6}'
[[ $(dpkg-deb -f "$deb" Package) == musubi-node ]] || die "the package is not named musubi-node"
[[ $(dpkg-deb -f "$deb" Depends) == *adduser* ]] || die "the package does not depend on adduser"
dpkg-deb -e "$deb" "$work/control"
grep -q 'adduser --system' "$work/control/postinst" || die "the postinst is not sync-node/debian/postinst"
grep -q 'deluser --system' "$work/control/postrm" || die "the postrm is not sync-node/debian/postrm"
! grep -l '#DEBHELPER#' "$work"/control/p* || die "#DEBHELPER# left in a maintainer script"
grep -q 'deb-systemd-invoke' "$work/control/postinst" || die "cargo-deb added no systemd handling to the postinst"

# --- 2. install --------------------------------------------------------------------------------------
if dpkg-query -W -f='${Status}' musubi-node 2>/dev/null | grep -q 'install ok installed'; then
    step "purging the musubi-node installed before"
    apt-get purge -y -qq musubi-node
fi
step "apt-get install $deb"
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb"; then
    echo "apt-get failed; trying dpkg -i" >&2
    dpkg -i "$deb" || DEBIAN_FRONTEND=noninteractive apt-get install -f -y -qq
fi
dpkg-query -W -f='${Status}\n' musubi-node | grep -q 'install ok installed' || die "musubi-node is not installed"

step "checking the user, directories and files"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd musubi-node) || die "no user musubi-node"
getent group musubi-node >/dev/null || die "no group musubi-node"
((uid < 1000)) || die "musubi-node (uid $uid) is not a system user"
[[ $home == "$data" ]] || die "musubi-node's home is $home, not $data"
[[ $shell == */nologin || $shell == /bin/false ]] || die "musubi-node has a login shell ($shell)"
for d in "$data" "$backups"; do
    got=$(stat -c '%U:%G %a' "$d")
    [[ $got == "musubi-node:musubi-node 700" ]] || die "$d is $got, expected musubi-node:musubi-node 700"
done
[[ -x /usr/bin/musubi-node ]] || die "no /usr/bin/musubi-node"
[[ $(dpkg-query -W -f='${Conffiles}' musubi-node) == *" $etc/musubi-node.env "* ]] \
    || die "$etc/musubi-node.env is not a conffile"
unit_dir=$(dirname "$(dpkg -L musubi-node | grep -E '/systemd/system/musubi-node\.service$')")
for u in musubi-node.service musubi-node-backup.service musubi-node-backup.timer; do
    [[ -f $unit_dir/$u ]] || die "no $unit_dir/$u"
done
echo "user musubi-node uid $uid gid $gid; units in $unit_dir; $(/usr/bin/musubi-node --version)"
[[ ! -e /etc/systemd/system/multi-user.target.wants/musubi-node.service ]] || die "musubi-node.service was enabled at install"
[[ ! -e /etc/systemd/system/timers.target.wants/musubi-node-backup.timer ]] || die "the backup timer was enabled at install"
! pgrep -u musubi-node >/dev/null || die "something runs as musubi-node right after install"

# --- 3. systemd-analyze ------------------------------------------------------------------------------
step "systemd-analyze verify"
systemd-analyze verify "$unit_dir"/musubi-node.service "$unit_dir"/musubi-node-backup.service \
    "$unit_dir"/musubi-node-backup.timer
step "systemd-analyze security --offline=yes"
threshold=$(awk -v m="$exposure_max" 'BEGIN { printf "%d", m * 10 }')
measured=()
for u in musubi-node.service musubi-node-backup.service; do
    out=$(systemd-analyze security --offline=yes --threshold="$threshold" "$unit_dir/$u" 2>&1) \
        || { printf '%s\n' "$out" | grep -v '^✓'; die "$u: exposure above $exposure_max"; }
    printf '%s\n' "$out" | grep '^✗' || true
    level=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    measured+=("exposure $u: $level")
    echo "exposure $u: $level (of 10; at most $exposure_max allowed)"
done

# --- 4. initialise and run ---------------------------------------------------------------------------
step "authority init and relay init (as musubi-node)"
export MUSUBI_WEAK_KDF_FOR_TESTS=1 MUSUBI_AUTHORITY_PASSPHRASE=deb-test-authority-passphrase
musubi-node authority init --authority "$work/authority" --deployment test --scrypt-log-n 10
# The relay reads only authority.pub; the user cannot read the authority's own directory.
install -d -m 0755 "$work/pub"
install -m 0644 "$work/authority/authority.pub" "$work/pub/"
runuser -u musubi-node -- musubi-node init --data "$data" --authority "$work/pub"
[[ $(stat -c %U "$data/node.db") == musubi-node ]] || die "$data/node.db is not owned by musubi-node"
printf 'deb-test-backup-passphrase\n' >"$etc/backup-passphrase"
chown root:musubi-node "$etc/backup-passphrase"
chmod 0640 "$etc/backup-passphrase"
admin=$(sed -n 's/^MUSUBI_NODE_OPTS=.*--admin[ =]\([^ "]*\).*/\1/p' "$etc/musubi-node.env")
probe=()
[[ -n $admin ]] && probe=(--probe "http://$admin/readyz")

find "$backups" -type f | sort >"$work/backups-before"
if [[ -d /run/systemd/system ]]; then
    step "systemctl start musubi-node (systemd is PID 1)"
    systemctl daemon-reload
    timeout 60 systemctl start musubi-node.service \
        || { journalctl -u musubi-node -n 50 --no-pager; die "musubi-node.service did not start"; }
    prop() { systemctl show -P "$1" musubi-node.service; }
    ready_us=$(($(prop ActiveEnterTimestampMonotonic) - $(prop ExecMainStartTimestampMonotonic)))
    measured+=("musubi-node.service: READY=1 after $(awk -v u="$ready_us" 'BEGIN { printf "%.2f", u / 1e6 }') s")
    if [[ -n $admin ]]; then
        code=$(curl -sS -o /dev/null -w '%{http_code}' --retry 5 --retry-connrefused --retry-delay 1 "http://$admin/readyz") || true
        [[ $code == 200 ]] || die "http://$admin/readyz answered ${code:-nothing}"
        echo "http://$admin/readyz 200"
    fi
    wd=$(prop WatchdogTimestampMonotonic)
    for _ in $(seq 40); do [[ $(prop WatchdogTimestampMonotonic) != "$wd" ]] && break; sleep 0.5; done
    [[ $(prop WatchdogTimestampMonotonic) != "$wd" ]] || die "no WATCHDOG=1 within 20 s (WatchdogSec=30)"
    measured+=("musubi-node.service: WATCHDOG=1 seen within 20 s (WatchdogSec=30)")
    systemctl stop musubi-node.service
    [[ $(prop Result) == success && $(prop ExecMainStatus) == 0 ]] \
        || die "musubi-node.service stopped with result $(prop Result), status $(prop ExecMainStatus)"
    echo "stopped: result success, exit status 0"
    journalctl -u musubi-node -o cat --no-pager | grep -q '^{' || die "no JSON line in the relay's journal (--log-format json)"
    step "systemctl start musubi-node-backup"
    systemctl start musubi-node-backup.service \
        || { journalctl -u musubi-node-backup -n 50 --no-pager; die "the backup unit failed"; }
else
    step "no systemd as PID 1: running the units' ExecStart under an sd-notify listener"
    cat >"$work/unit_run.py" <<'PY'
"""Runs a unit's ExecStart as systemd would (User=, Group=, UMask=, Environment=, EnvironmentFile=,
$VAR and ${VAR}); for Type=notify, listens on NOTIFY_SOCKET: READY=1 within --ready-timeout, from the
main process (NotifyAccess=main), then probes, a WATCHDOG=1, SIGTERM, STOPPING=1 and exit 0."""
import argparse, json, os, pwd, re, shlex, signal, socket, struct, subprocess, sys, tempfile, time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--unit", required=True)
ap.add_argument("--ready-timeout", type=float, default=30)
ap.add_argument("--watchdog-usec", type=int, default=4_000_000, help="shorter than the unit's, to see pings soon")
ap.add_argument("--probe", action="append", default=[])
ap.add_argument("--log", required=True)
a = ap.parse_args()
name = os.path.basename(a.unit)

proc = None

def fail(msg):
    if proc and proc.poll() is None:
        proc.kill()
    print(f"{name}: {msg}", file=sys.stderr)
    try:
        print("--- last log lines ---\n" + "".join(open(a.log).readlines()[-30:]), file=sys.stderr)
    except OSError:
        pass
    sys.exit(1)

unit, section = {}, None
for line in open(a.unit):
    line = line.strip()
    if not line or line[0] in "#;":
        continue
    if line.startswith("["):
        section = line.strip("[]")
        continue
    k, _, v = line.partition("=")
    unit.setdefault((section, k.strip()), []).append(v.strip())
get = lambda s, k, d=None: unit.get((s, k), [d])[-1]

for p in unit.get(("Unit", "ConditionPathExists"), []):
    if not os.path.exists(p):
        fail(f"ConditionPathExists={p} does not hold: systemd would skip the unit")
user = pwd.getpwnam(get("Service", "User"))
env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "LANG": "C.UTF-8", "HOME": user.pw_dir,
       "USER": user.pw_name, "LOGNAME": user.pw_name, "SHELL": user.pw_shell}
for v in unit.get(("Service", "Environment"), []):
    for kv in shlex.split(v):
        k, _, val = kv.partition("=")
        env[k] = val
for f in unit.get(("Service", "EnvironmentFile"), []):
    optional, f = f.startswith("-"), f.lstrip("-")
    if not os.path.exists(f):
        if optional:
            continue
        fail(f"EnvironmentFile={f} is missing")
    for line in open(f):
        line = line.strip()
        if line and line[0] not in "#;" and "=" in line:
            k, _, val = line.partition("=")
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'":
                val = val[1:-1]
            env[k.strip()] = val
argv = []
for tok in shlex.split(get("Service", "ExecStart").lstrip("-@+!:")):
    m = re.fullmatch(r"\$(\w+)", tok)
    if m:
        argv += env.get(m.group(1), "").split()
    else:
        argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), tok))
print(f"{name}: {shlex.join(argv)}")
notify = get("Service", "Type", "simple") == "notify"
if notify:
    sock_dir = tempfile.mkdtemp()
    os.chmod(sock_dir, 0o711)
    path = os.path.join(sock_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    env["NOTIFY_SOCKET"] = path
    env["WATCHDOG_USEC"] = str(a.watchdog_usec)
log = open(a.log, "wb")
t0 = time.monotonic()
proc = subprocess.Popen(argv, env=env, user=user.pw_uid, group=get("Service", "Group"), extra_groups=[],
                        umask=int(get("Service", "UMask", "0022"), 8), cwd="/",
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
if not notify:
    try:
        code = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        fail("did not finish within 600 s")
    if code != 0:
        fail(f"exited with status {code}")
    print(f"{name}: exit 0 after {time.monotonic() - t0:.2f} s")
    sys.exit(0)

def receive(until, want):
    """Notifications until `want` is among them or `until` passes; None on timeout or exit."""
    while time.monotonic() < until:
        sock.settimeout(max(0.05, min(0.2, until - time.monotonic())))
        try:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            if proc.poll() is not None:
                return None
            continue
        pid = next((struct.unpack("3i", d)[0] for lvl, typ, d in anc
                    if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), None)
        fields = dict(l.split("=", 1) for l in data.decode().splitlines() if "=" in l)
        if pid != proc.pid:
            fail(f"{fields} came from PID {pid}, not the main process {proc.pid}: NotifyAccess=main drops it")
        if "STATUS" in fields:
            print(f"{name}: STATUS={fields['STATUS']}")
        if fields.get(want[0]) == want[1]:
            return time.monotonic()
    return None

ready = receive(t0 + a.ready_timeout, ("READY", "1"))
if ready is None:
    fail(f"no READY=1 within {a.ready_timeout:.0f} s" + (f" (exited {proc.returncode})" if proc.returncode is not None else ""))
print(f"{name}: READY=1 after {ready - t0:.2f} s")
for url in a.probe:
    deadline, status = time.monotonic() + 5, None
    while status != 200 and time.monotonic() < deadline:
        try:
            status = urllib.request.urlopen(url, timeout=2).status
        except Exception as e:
            status = str(e)
            time.sleep(0.2)
    if status != 200:
        fail(f"{url}: {status}")
    print(f"{name}: {url} 200")
first = receive(time.monotonic() + a.watchdog_usec / 1e6, ("WATCHDOG", "1"))
second = first and receive(time.monotonic() + a.watchdog_usec / 1e6, ("WATCHDOG", "1"))
if not second:
    fail(f"no two WATCHDOG=1 within WATCHDOG_USEC={a.watchdog_usec} each")
print(f"{name}: WATCHDOG=1 every {second - first:.2f} s (WATCHDOG_USEC={a.watchdog_usec})")
term = time.monotonic()
proc.send_signal(signal.SIGTERM)
stopping = receive(term + 30, ("STOPPING", "1"))
try:
    code = proc.wait(timeout=max(0.1, term + 30 - time.monotonic()))
except subprocess.TimeoutExpired:
    fail("still running 30 s after SIGTERM (TimeoutStopSec)")
if stopping is None:
    fail("no STOPPING=1 after SIGTERM")
if code != 0:
    fail(f"exited with status {code} after SIGTERM")
print(f"{name}: STOPPING=1 after {stopping - term:.2f} s, exit 0 after {time.monotonic() - term:.2f} s")
log.close()
lines = [l for l in open(a.log, errors="replace") if l.startswith("{")]
try:
    for l in lines:
        json.loads(l)
except ValueError:
    fail(f"a log line is not JSON: {l.strip()}")
if not lines:
    fail("no JSON log line (--log-format json)")
print(f"{name}: {len(lines)} JSON log lines")
PY
    python3 "$work/unit_run.py" --unit "$unit_dir/musubi-node.service" --log "$work/relay.log" "${probe[@]}" \
        | tee "$work/relay.out"
    python3 "$work/unit_run.py" --unit "$unit_dir/musubi-node-backup.service" --log "$work/backup.log"
    mapfile -t -O "${#measured[@]}" measured < <(grep -E 'READY=1 after|WATCHDOG=1 every|STOPPING=1 after' "$work/relay.out")
fi
new_backups=$(find "$backups" -type f | sort | comm -13 "$work/backups-before" -)
[[ -n $new_backups ]] || die "the backup unit wrote nothing in $backups"
while read -r b; do
    got=$(stat -c '%U %a' "$b")
    [[ $got == "musubi-node 600" ]] || die "$b is $got, expected musubi-node 600"
    measured+=("backup $(basename "$b"): $(stat -c %s "$b") bytes")
done <<<"$new_backups"

# --- 5. purge -----------------------------------------------------------------------------------------
if [[ ${MUSUBI_DEB_KEEP:-} == 1 ]]; then
    step "kept installed (MUSUBI_DEB_KEEP=1)"
else
    step "apt-get purge musubi-node"
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq musubi-node
    ! getent passwd musubi-node >/dev/null || die "purge left the user musubi-node"
    [[ -e $data/node.db ]] || die "purge deleted $data"
    [[ $(stat -c %U "$data/node.db") == root ]] || die "purge left $data/node.db owned by uid $(stat -c %u "$data/node.db")"
    rm -rf "$data" "$backups" "$etc"
fi

step "measured"
printf '%s\n' "${measured[@]}"
