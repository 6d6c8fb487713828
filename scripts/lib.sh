# Shared by scripts/stack, scripts/test and scripts/demo: paths and the venv.
# shellcheck shell=bash

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INGESTD_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"

die() { echo "$(basename "$0"): $*" >&2; exit 1; }
say() { echo "$(basename "$0"): $*" >&2; }

# Create the venv and install ingestd with its dev extras when pyproject.toml,
# requirements.lock or the C module's source changed since the last install. The
# runtime dependencies come from requirements.lock, hashes checked, as on a host.
ensure_venv() {
    command -v python3 >/dev/null || die "python3 not found; install Python 3.11 or newer"
    if [ ! -x "$PY" ]; then
        say "creating $VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed; on Debian: apt-get install python3-venv"
    fi
    local stamp="$VENV/.ingestd-installed"
    if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ] \
        || [ "$REPO/requirements.lock" -nt "$stamp" ] || [ "$REPO/ingestd/_native.c" -nt "$stamp" ]; then
        ensure_compiler
        say "installing requirements.lock and ingestd[dev] into $VENV"
        "$PY" -m pip install -q --upgrade pip >/dev/null
        { "$PY" -m pip install -q --require-hashes -r "$REPO/requirements.lock" \
            && "$PY" -m pip install -q -e "$REPO[dev]"; } >"$VENV/pip.log" 2>&1 \
            || { tail -n 20 "$VENV/pip.log" >&2; die "pip install failed (log: $VENV/pip.log)"; }
        touch "$stamp"
    fi
}

# ingestd/_native.c (the hot path in C) needs a C compiler and Python's headers. pip
# builds ingestd without it where they are missing; the tests insist on it.
ensure_compiler() {
    local include
    include="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    if command -v cc >/dev/null && [ -f "$include/Python.h" ]; then return 0; fi
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        || die "no C compiler or no $include/Python.h; install gcc and Python's headers (Debian: apt-get install gcc python3-dev)"
    say "installing gcc and Python's headers with apt-get (for ingestd/_native.c)"
    apt_install gcc
    [ -f "$include/Python.h" ] || apt_install python3-dev
    [ -f "$include/Python.h" ] || die "no $include/Python.h after apt-get install python3-dev"
}

# apt-get install, quietly; runs apt-get update once when the first try fails.
# Debian's packages try to start their service themselves where they can; the
# stack runs its own instances on its own folders.
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    } || die "apt-get install $* failed"
    return 0
}

# A command the tests run, from a Debian package (as root, installed with apt-get):
#   ensure_command COMMAND PACKAGE WHY
ensure_command() {
    local cmd=$1 package=$2 why=$3
    command -v "$cmd" >/dev/null && return 0
    [ "$(id -u)" = 0 ] || die "$cmd not found; install it with: sudo apt-get install $package"
    command -v apt-get >/dev/null || die "$cmd not found and no apt-get; install $cmd ($why)"
    say "installing $package (for $cmd: $why) with apt-get"
    apt_install --no-install-recommends "$package"
    command -v "$cmd" >/dev/null || die "apt-get installed $package but $cmd is still missing"
}

# tests/test_systemd_unit.py checks deploy/systemd/ingestd.service with
# systemd-analyze (systemd 250 or newer; also where systemd is not PID 1).
ensure_systemd_analyze() {
    ensure_command systemd-analyze systemd "checks deploy/systemd/ingestd.service"
}

# tests/test_deploy.py tests deploy/prometheus' alert rules with promtool.
ensure_promtool() {
    ensure_command promtool prometheus "tests deploy/prometheus/ingestd-alerts.yml"
}
