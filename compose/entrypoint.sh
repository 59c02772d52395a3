#!/bin/sh
# memkv container entrypoint: MEMKV_* environment variables -> `memkv serve` flags.
#
#   memkv-entrypoint serve [extra flags]   a storage node configured by the environment
#   memkv-entrypoint rebalancer [flags]    `memkv rebalancer etcd://$MEMKV_ETCD/$MEMKV_CLUSTER`
#                                          (MEMKV_REBALANCER_ID, MEMKV_REBALANCE_MBPS, MEMKV_REPLICAS)
#   memkv-entrypoint loadgen [flags]       compose/loadgen.py (load generator)
#   memkv-entrypoint health                the healthcheck (compose/healthcheck.py)
#   memkv-entrypoint ANY COMMAND           runs it as is (memkv status ..., sh, python ...)
#
# Variable             flag              default
#   MEMKV_CONFIG         --config          /etc/memkv/memkv.toml (when it exists)
#   MEMKV_LISTEN         --listen          0.0.0.0:7400
#   MEMKV_DATA_DIR       --data-dir        /data
#   MEMKV_MEMORY         --memory          (config / memkv default)
#   MEMKV_DISK           --disk
#   MEMKV_SEGMENT_SIZE   --segment-size
#   MEMKV_ETCD           --etcd            (unset: standalone node)
#   MEMKV_CLUSTER        --cluster
#   MEMKV_NODE_ID        --node-id         (with MEMKV_ETCD: the container's hostname)
#   MEMKV_ZONE           --zone
#   MEMKV_SHM_DIR        --shm-dir
#   MEMKV_METRICS_PORT   --metrics-port    9400
#   MEMKV_RESP_PORT      --resp-port       6379
#   MEMKV_TLS_CERT / MEMKV_TLS_KEY / MEMKV_TLS_CA   --tls-cert / --tls-key / --tls-ca
#   MEMKV_VERBOSE=1      -v (debug logging)
# Flags given after `serve` are appended, so they win over the environment.
set -eu

cmd="${1:-serve}"
[ $# -gt 0 ] && shift

case "$cmd" in
serve)
    # Environment flags are appended after the caller's, then the caller's are rotated
    # to the end: argparse keeps the last value, so explicit flags win.
    n=$#
    config="${MEMKV_CONFIG:-/etc/memkv/memkv.toml}"
    [ -f "$config" ] || config="${MEMKV_CONFIG:-}"
    node_id="${MEMKV_NODE_ID:-}"
    if [ -z "$node_id" ] && [ -n "${MEMKV_ETCD:-}" ]; then node_id="$(uname -n)"; fi
    for pair in \
        "--config=$config" \
        "--listen=${MEMKV_LISTEN:-0.0.0.0:7400}" \
        "--data-dir=${MEMKV_DATA_DIR:-/data}" \
        "--memory=${MEMKV_MEMORY:-}" \
        "--disk=${MEMKV_DISK:-}" \
        "--segment-size=${MEMKV_SEGMENT_SIZE:-}" \
        "--etcd=${MEMKV_ETCD:-}" \
        "--cluster=${MEMKV_CLUSTER:-}" \
        "--node-id=$node_id" \
        "--zone=${MEMKV_ZONE:-}" \
        "--shm-dir=${MEMKV_SHM_DIR:-}" \
        "--metrics-port=${MEMKV_METRICS_PORT-9400}" \
        "--resp-port=${MEMKV_RESP_PORT-6379}" \
        "--tls-cert=${MEMKV_TLS_CERT:-}" \
        "--tls-key=${MEMKV_TLS_KEY:-}" \
        "--tls-ca=${MEMKV_TLS_CA:-}"; do
        case "$pair" in
        *=) ;;                       # empty value: flag not given
        *) set -- "$@" "$pair" ;;
        esac
    done
    while [ "$n" -gt 0 ]; do set -- "$@" "$1"; shift; n=$((n - 1)); done
    [ "${MEMKV_VERBOSE:-0}" = 1 ] && set -- -v serve "$@" || set -- serve "$@"
    mkdir -p "${MEMKV_DATA_DIR:-/data}"
    echo "memkv-entrypoint: memkv $*" >&2
    exec memkv "$@"
    ;;
rebalancer)
    # memkv rebalancer etcd://$MEMKV_ETCD/$MEMKV_CLUSTER: a leader-elected rebalancer candidate
    : "${MEMKV_ETCD:?MEMKV_ETCD is required for the rebalancer}"
    set -- rebalancer "etcd://$MEMKV_ETCD/${MEMKV_CLUSTER:-default}" \
        --id "${MEMKV_REBALANCER_ID:-$(uname -n)}" \
        --mbps "${MEMKV_REBALANCE_MBPS:-200}" \
        --replicas "${MEMKV_REPLICAS:-2}" "$@"
    [ "${MEMKV_VERBOSE:-0}" = 1 ] && set -- -v "$@"
    echo "memkv-entrypoint: memkv $*" >&2
    exec memkv "$@"
    ;;
loadgen)
    exec python /opt/memkv/share/loadgen.py "$@"
    ;;
health)
    exec python /opt/memkv/share/healthcheck.py "$@"
    ;;
*)
    exec "$cmd" "$@"
    ;;
esac
