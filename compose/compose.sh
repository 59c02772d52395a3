# Sourced by build-offline.sh and the Makefile's compose targets: sets COMPOSE to the
# compose command for compose/docker-compose.yml, project "memkv".
# Prefers the `docker compose` plugin (v2), then a `docker-compose` binary (v2 or
# Debian's v1.29 python package, which lacks `up --wait`: see wait-healthy.sh).
_memkv_compose_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    echo "neither 'docker compose' nor 'docker-compose' found (apt-get install docker-compose)" >&2
    return 1 2>/dev/null || exit 1
fi
COMPOSE+=(-p "${MEMKV_COMPOSE_PROJECT:-memkv}" -f "$_memkv_compose_dir/docker-compose.yml")
