#!/usr/bin/env bash
# `make compose-down`: stop and remove the deployment's containers and network.
# Data volumes are kept (the next compose-up recovers from them) unless
# MEMKV_COMPOSE_VOLUMES=remove (or `make compose-down COMPOSE_DOWN_ARGS=-v`).
# dockerd, the images and the wheelhouse are left as they are.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    echo "[compose-down] docker is not running: nothing to stop" >&2
    exit 0
fi
# shellcheck source=compose/compose.sh
source compose/compose.sh
args=(--remove-orphans)
[[ "${MEMKV_COMPOSE_VOLUMES:-keep}" == remove ]] && args+=(-v)
# --profile join: n4 too, when a join scenario started it.
"${COMPOSE[@]}" --profile join down "${args[@]}" "$@"
