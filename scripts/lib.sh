# Sourced by the scripts beside it (not run on its own): step messages, and the Debian packages a
# script needs, collected with the need_* functions and installed by install_missing.

step() { printf '\n==> %s\n' "$*"; }

# The packages the need_* calls found missing.
missing=()

# need_cmd COMMAND PACKAGE...: the packages, unless COMMAND is on PATH.
need_cmd() { command -v "$1" >/dev/null 2>&1 || missing+=("${@:2}"); }

# need_file PATH PACKAGE: the package, unless PATH exists.
need_file() { [[ -e $1 ]] || missing+=("$2"); }

# need_pkg PACKAGE...: each package dpkg does not list as installed.
need_pkg() {
    local p
    for p; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
}

# install_missing warn|die|sudo: installs the missing packages with apt-get when run as root (with
# apt-get there); otherwise `warn` says what is missing and goes on, `die` stops, `sudo` runs apt-get
# through sudo.
install_missing() {
    ((${#missing[@]})) || return 0
    local sudo_=
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        case $1 in
            sudo) sudo_=sudo ;;
            die)
                echo "$(basename "$0"): missing ${missing[*]}: install them (apt-get install ${missing[*]})" >&2
                exit 1
                ;;
            *)
                echo "warning: missing ${missing[*]}; install them (apt-get install ${missing[*]})" >&2
                return 0
                ;;
        esac
    fi
    step "installing ${missing[*]}"
    $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
