#!/bin/bash
# `make test-rdma`: the RDMA transport suite, for real, under Soft-RoCE in a qemu VM.
#
#   1. tests/rdma/build-guest.sh builds (first time, ~2 min) or reuses the guest
#      image in ${MEMKV_RXE_CACHE:-~/.cache/memkv-rxe};
#   2. the repository is shared into the guest (9p, read-write) at the same
#      absolute path, so the host's .venv (cp311 wheels, editable install)
#      works with the guest's Debian python3 + python3-pyverbs;
#   3. the guest runs the transport conformance suite with transport=rdma
#      (tests/test_transports.py -k rdma), the standalone routing to
#      `memkv serve --workers N` over RDMA (tests/test_workers.py -k rdma) and the RDMA part of
#      bench/transports.py, then powers off;
#   4. results: the guest's output, .cache/rxe-run-<id>/pytest.txt, junit.xml,
#      rdma-bench.json; exit status = the guest suite's.
#
# Where it cannot run (no qemu and no way to install it, no Debian archive for
# the first build, not root) it prints "SKIP: <reason>" and exits 0, or 3 when
# MEMKV_RDMA_REQUIRED=1. Env: ACCEL=tcg|kvm (tcg: a stock kernel does not boot
# under KVM on every host), VM_TIMEOUT (s, default 420), PYTEST_K (default rdma).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd -P)
CACHE=${MEMKV_RXE_CACHE:-$HOME/.cache/memkv-rxe}
ACCEL=${ACCEL:-tcg}
VM_TIMEOUT=${VM_TIMEOUT:-420}
PYTEST_K=${PYTEST_K:-rdma}
t0=$(date +%s)
skip() {
    echo "SKIP: RDMA VM suite: $*" >&2
    [ "${MEMKV_RDMA_REQUIRED:-0}" = 1 ] && exit 3
    exit 0
}

[ -x "$REPO/.venv/bin/python" ] || skip "no .venv in $REPO (run make install)"
PYV=$("$REPO/.venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$PYV" = 3.11 ] || skip "the guest has Python 3.11; this .venv is $PYV"
SITE="$REPO/.venv/lib/python3.11/site-packages"

bash "$HERE/build-guest.sh"; rc=$?
[ $rc -eq 3 ] && skip "cannot build the guest image (see the lines above)"
[ $rc -eq 0 ] || { echo "FAIL: guest image build failed (rc=$rc)" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not installed"
tb=$(date +%s)

RUN="$REPO/.cache/rxe-run-$$"
rm -rf "$RUN"; mkdir -p "$RUN"
R=${RUN#"$REPO"/}
cat > "$RUN/guest-hook.sh" <<HOOK
set -u
cd "$REPO"
# the host venv's packages (pure Python + cp311 wheels) after the guest's own (pyverbs)
echo "import site; site.addsitedir('$SITE')" > /usr/lib/python3/dist-packages/zz-memkv-venv.pth
export PYTHONDONTWRITEBYTECODE=1 MEMKV_RDMA_DEVICE=rxe0 MEMKV_IN_RXE_GUEST=1 MEMKV_NODE_START_TIMEOUT=120 PYTHONUNBUFFERED=1
python3 -c 'import pyverbs.device as d, memkv; print("guest: pyverbs devices", [x.name for x in d.get_device_list()])'
timeout $((VM_TIMEOUT - 120)) python3 -m pytest -p no:cacheprovider -q -ra --timeout=240 -k "$PYTEST_K" \
    --junitxml="$R/junit.xml" tests/test_transports.py tests/test_workers.py 2>&1 | tee "$R/pytest.txt"
rc=\$?
[ -f "$R/junit.xml" ] || rc=1
timeout 150 python3 -m bench.transports --rdma-only --json "$R/rdma-bench.json" 2>&1 | tail -5
exit \$rc
HOOK

if [ "$ACCEL" = kvm ]; then ACC=(-accel kvm -cpu host); else ACC=(-accel tcg,thread=multi -cpu max); fi
echo "[rdma-vm] booting the Soft-RoCE guest ($ACCEL), share $REPO, run dir $R" >&2
timeout "$VM_TIMEOUT" qemu-system-x86_64 "${ACC[@]}" -m 2048 -smp 2 -nographic -no-reboot -nic none \
    -kernel "$CACHE/vmlinuz" -initrd "$CACHE/rootfs.cpio" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init memkv_repo=$REPO memkv_hook=$R/guest-hook.sh" \
    -virtfs "local,path=$REPO,mount_tag=repo,security_model=none,id=repo" 2>&1 | tee "$RUN/vm.log"
te=$(date +%s)
res=$(cat "$RUN/guest-result.txt" 2>/dev/null || echo missing)
echo "[rdma-vm] build/cache $((tb - t0))s, vm $((te - tb))s, total $((te - t0))s; guest result: $res; logs in $R" >&2
if [ "$res" = missing ]; then
    grep -aq "MEMKV_RXE_EXIT=" "$RUN/vm.log" || { echo "FAIL: the guest did not finish (timeout ${VM_TIMEOUT}s?)" >&2; exit 1; }
    echo "FAIL: no result from the guest" >&2; exit 1
fi
[ "$res" = 0 ] || { echo "FAIL: RDMA suite failed in the guest (rc=$res)" >&2; exit 1; }
grep -aE "passed|failed" "$RUN/pytest.txt" | tail -1 | sed 's/^/[rdma-vm] /' >&2
exit 0
