# Shared by scripts/stack, scripts/test and scripts/demo: paths and the venv.
# shellcheck shell=bash

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INGESTD_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"

die() { echo "$(basename "$0"): $*" >&2; exit 1; }
say() { echo "$(basename "$0"): $*" >&2; }

# Create the venv and install ingestd with its dev extras when pyproject.toml
# changed since the last install.
ensure_venv() {
    command -v python3 >/dev/null || die "python3 not found; install Python 3.11 or newer"
    if [ ! -x "$PY" ]; then
        say "creating $VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed; on Debian: apt-get install python3-venv"
    fi
    local stamp="$VENV/.ingestd-installed"
    if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
        say "installing ingestd[dev] into $VENV"
        "$PY" -m pip install -q --upgrade pip >/dev/null
        "$PY" -m pip install -q -e "$REPO[dev]" >"$VENV/pip.log" 2>&1 || { tail -n 20 "$VENV/pip.log" >&2; die "pip install failed (log: $VENV/pip.log)"; }
        touch "$stamp"
    fi
}
