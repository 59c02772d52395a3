#!/usr/bin/env bash
# Idempotent set-up of a development / CI machine (Debian 12, run as root):
#   1. Debian packages the tests and benchmarks start (etcd, redis, memcached),
#   2. .venv (python3 -m venv) if missing,
#   3. pip install -e '.[test,bench]' into it, skipped when nothing changed.
# A second run with an unchanged pyproject.toml takes well under a second.
#
# Environment knobs:
#   PYTHON=python3.11      interpreter used to create .venv (default: python3)
#   MEMKV_EXTRAS=test,bench,ml extras to install (default: test,bench,ml; ml = CPU torch + transformers
#                           for client/kvcache.py, its tests, `memkv demo` and bench/ttft.py)
#   MEMKV_SKIP_APT=1       never touch apt (e.g. not root, packages managed elsewhere)
#   MEMKV_FORCE=1          reinstall even when the stamp says nothing changed
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"

PYTHON="${PYTHON:-python3}"
EXTRAS="${MEMKV_EXTRAS:-test,bench,ml}"
VENV="$ROOT/.venv"
STAMP="$VENV/.memkv-bootstrap.stamp"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# --- 1. Debian packages --------------------------------------------------------
# package -> why
#   etcd-server   : cluster tests and `memkv up` (etcd v3 API)
#   redis-server  : the peer in bench/ and RESP-compat tests
#   redis-tools   : redis-cli and redis-benchmark (RESP front end tests, bench/resp.py)
#   memcached     : a second peer for benchmarks
#   python3-venv  : `python3 -m venv` with Debian's own python3
#   build-essential: wheels without a binary for this platform; the chaos fault shim (chaos/shim/)
#   iptables      : chaos partitions and network faults, inside the runner's own network namespace
APT_PACKAGES=(etcd-server redis-server redis-tools memcached python3-venv build-essential iptables)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    log "Debian packages present"
elif [[ "${MEMKV_SKIP_APT:-0}" == 1 ]]; then
    log "MEMKV_SKIP_APT=1: not installing missing Debian packages: ${missing[*]}"
else
    SUDO=()
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            log "missing Debian packages (${missing[*]}) and not root; rerun as root or set MEMKV_SKIP_APT=1"
            exit 1
        fi
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- 2. virtual environment ----------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        log "$PYTHON is missing or older than 3.11; set PYTHON=/path/to/python3.11+"
        exit 1
    fi
    log "creating $VENV with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
fi

# --- 3. the package itself (editable) -------------------------------------------
# The stamp records what was installed: pyproject.toml, extras, checkout path
# (an editable install points at the path) and the venv's interpreter.
want="$( {
    cat pyproject.toml
    echo "extras=$EXTRAS"
    echo "root=$ROOT"
    "$VENV/bin/python" -c 'import sys; print(sys.version)'
} | sha256sum | cut -d' ' -f1)"

if [[ "${MEMKV_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
    && [[ -x "$VENV/bin/memkv" ]]; then
    log "venv up to date ($VENV)"
    exit 0
fi

log "pip install -e '.[$EXTRAS]' into $VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
# Fail here, not in the first test, when the layout is broken.
(cd / && "$VENV/bin/python" -c 'import memkv, memkv.client, memkv.cluster')
echo "$want" >"$STAMP"
log "done"
