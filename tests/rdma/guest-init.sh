#!/bin/sh
# PID 1 of the memkv Soft-RoCE test guest (see build-guest.sh, run-vm.sh).
# Sets up rdma_rxe on a veth pair, mounts the host's repository (9p, tag
# "repo") at the same absolute path as on the host (so the venv's editable
# install resolves), runs <repo>/<memkv_hook= on the kernel command line>,
# writes its exit status next to it (guest-result.txt) and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ulimit -l unlimited   # memory registration needs locked memory
ts() { cut -d' ' -f1 /proc/uptime; }
step() { echo "=== [$(ts)s] $*"; }
RC=0
step "guest up: $(uname -r), $(nproc) cpu(s)"
REPO=$(sed -n 's/.*memkv_repo=\([^ ]*\).*/\1/p' /proc/cmdline)
modprobe virtio_pci; modprobe 9pnet_virtio; modprobe 9p
mkdir -p "$REPO"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose repo "$REPO" || { echo "9p mount failed"; RC=10; }
modprobe crc32_pclmul 2>/dev/null
modprobe crc32_generic && modprobe rdma_rxe && modprobe ib_uverbs && modprobe rdma_ucm || RC=11
ip link set lo up
ip link add veth0 type veth peer name veth1
ip addr add 10.0.0.1/24 dev veth0
ip addr add 10.0.1.1/24 dev veth1
sysctl -qw net.core.netdev_max_backlog=100000
ip link set veth0 up; ip link set veth1 up
rdma link add rxe0 type rxe netdev veth0 || RC=12
step "rdma links: $(rdma link show | tr '\n' ' ')"
HOOK="$REPO/$(sed -n 's/.*memkv_hook=\([^ ]*\).*/\1/p' /proc/cmdline)"
RUNDIR=$(dirname "$HOOK")
if [ $RC -eq 0 ] && [ -f "$HOOK" ]; then
    step "running $HOOK"
    sh "$HOOK"; RC=$?
elif [ $RC -eq 0 ]; then
    echo "no hook at $HOOK"; RC=13
fi
step "done rc=$RC"
[ -d "$RUNDIR" ] && echo "$RC" > "$RUNDIR/guest-result.txt"
sync
umount "$REPO" 2>/dev/null
echo "MEMKV_RXE_EXIT=$RC"
echo o > /proc/sysrq-trigger
sleep 10
