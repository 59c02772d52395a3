#!/usr/bin/env bash
# `make compose-up`: build the images offline (build-offline.sh), start the deployment,
# wait until every container is running and healthy and every node is in the slot
# map, then print `memkv status` as seen from the host.
#
#   MEMKV_COMPOSE_SKIP_BUILD=1   do not run build-offline.sh (images already built)
#   MEMKV_COMPOSE_WAIT=240       seconds to wait for healthy
#   MEMKV_ETCD_HOST_PORT=2379    the etcd members' ports on 127.0.0.1 (etcd1; etcd2 and etcd3:
#   MEMKV_ETCD2_HOST_PORT=22379  MEMKV_ETCD2/3_HOST_PORT): memkv status etcd://127.0.0.1:P1,...,P3/NAME
#   MEMKV_ETCD3_HOST_PORT=32379
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"
log() { printf '[compose-up] %s\n' "$*" >&2; }
t0=$SECONDS

if [[ "${MEMKV_COMPOSE_SKIP_BUILD:-0}" != 1 ]]; then
    bash compose/build-offline.sh
fi
# shellcheck source=compose/compose.sh
source compose/compose.sh
# compose reads compose/.env itself; export it too for the status URL below.
if [[ -f compose/.env ]]; then set -a; source compose/.env; set +a; fi

t_up=$SECONDS
log "${COMPOSE[*]} up -d"
"${COMPOSE[@]}" up -d --remove-orphans >&2

# Wait for running + healthy (what `docker compose up --wait` does; Debian's
# docker-compose 1.29 has no --wait, so it is done here for every version).
wait_s="${MEMKV_COMPOSE_WAIT:-240}"
deadline=$((SECONDS + wait_s))
while :; do
    mapfile -t ids < <("${COMPOSE[@]}" ps -q)
    states="$(docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}}' "${ids[@]}")"
    bad="$(awk '$2 != "running" || ($3 != "healthy" && $3 != "-")' <<<"$states")"
    if [[ -z "$bad" ]]; then break; fi
    if grep -qE ' (exited|dead) |unhealthy' <<<"$bad" || ((SECONDS > deadline)); then
        log "not healthy after $((SECONDS - t_up))s:"
        printf '%s\n' "$bad" >&2
        "${COMPOSE[@]}" logs --tail=30 >&2 || true
        exit 1
    fi
    sleep 2
done
log "all ${#ids[@]} containers running and healthy in $((SECONDS - t_up))s"

# Every node of the compose file registered, up, and owning slots in the slot map.
cluster="${MEMKV_CLUSTER_NAME:-memkv}"
url="etcd://127.0.0.1:${MEMKV_ETCD_HOST_PORT:-2379},127.0.0.1:${MEMKV_ETCD2_HOST_PORT:-22379},127.0.0.1:${MEMKV_ETCD3_HOST_PORT:-32379}/$cluster"
nodes="$(grep -cE '^/memkv-n[0-9]+ ' <<<"$states" || true)"  # the node containers started above
if [[ -x "$ROOT/.venv/bin/memkv" ]]; then
    status=("$ROOT/.venv/bin/memkv" status "$url")
else  # no host install: ask from inside the deployment
    status=(docker exec memkv-n1 memkv status "etcd://etcd1:2379,etcd2:2379,etcd3:2379/$cluster")
fi
while :; do
    json="$("${status[@]}" --json 2>/dev/null || true)"
    in_map="$(python3 -c '
import json, sys
try:
    st = json.loads(sys.argv[1])
except ValueError:
    st = {}
# a node counts when it is up (reachable, not fenced) and owns slots in the map
print(sum(1 for n in st.get("nodes", []) if n.get("health") == "up" and n.get("slots_primary", 0) + n.get("slots_replica", 0) > 0))
' "$json")"
    if ((in_map >= nodes)); then break; fi
    if ((SECONDS > deadline)); then
        log "only $in_map of $nodes nodes in the cluster after $((SECONDS - t_up))s"
        exit 1
    fi
    sleep 1
done
log "cluster $cluster: $nodes nodes in the slot map, $((SECONDS - t_up))s after up (total $((SECONDS - t0))s)"
"${status[@]}"
echo
echo "memkv status $url"
echo "loadgen log: docker logs -f memkv-loadgen"
