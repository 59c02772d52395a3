#!/usr/bin/env bash
# Build the memkv compose images on a machine without an image registry.
#
#   1. the Debian packages this needs (docker.io, docker-compose, debootstrap) when missing,
#   2. dockerd, started in the background when it is not running (log: $MEMKV_DOCKERD_LOG),
#   3. the base image memkv-base:bookworm from `debootstrap --variant=minbase` (python3,
#      python3-venv, etcd-server, etcd-client) + `docker import` -- skipped when it exists,
#   4. the wheelhouse compose/wheelhouse (memkv + its runtime dependencies, built on the host),
#   5. the memkv image (compose/Dockerfile) with BASE_IMAGE=memkv-base:bookworm; the etcd
#      service runs on the same base image (Debian's etcd). compose/.env records both.
#
# With a registry, the base images can come from it instead: MEMKV_BASE_IMAGE=python:3.11-slim
# (etcd then defaults to quay.io/coreos/etcd, override with MEMKV_ETCD_IMAGE).
#
# Environment knobs:
#   MEMKV_BASE_IMAGE     base image for the memkv image (default memkv-base:bookworm, built here)
#   MEMKV_ETCD_IMAGE     etcd image (default: the offline base image, which has Debian's etcd)
#   MEMKV_IMAGE          tag of the memkv image (default memkv:latest)
#   MEMKV_DEBIAN_MIRROR  debootstrap mirror (default http://deb.debian.org/debian)
#   MEMKV_REBUILD_BASE=1 rebuild the base image even when it exists
#   MEMKV_SKIP_APT=1     never apt-get install anything
#   MEMKV_DOCKERD_LOG    where a dockerd started here logs (default /var/log/memkv-dockerd.log)
# Writes compose/.env (BASE_IMAGE, MEMKV_ETCD_IMAGE) for later compose commands.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd -P)"
COMPOSE_DIR="$ROOT/compose"
WHEELHOUSE="$COMPOSE_DIR/wheelhouse"

OFFLINE_BASE="memkv-base:bookworm"
BASE_IMAGE="${MEMKV_BASE_IMAGE:-$OFFLINE_BASE}"
if [[ "$BASE_IMAGE" == "$OFFLINE_BASE" ]]; then
    ETCD_IMAGE="${MEMKV_ETCD_IMAGE:-$OFFLINE_BASE}"
else
    ETCD_IMAGE="${MEMKV_ETCD_IMAGE:-quay.io/coreos/etcd:v3.5.17}"
fi
MIRROR="${MEMKV_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKERD_LOG="${MEMKV_DOCKERD_LOG:-/var/log/memkv-dockerd.log}"

log() { printf '[build-offline] %s\n' "$*" >&2; }
t0=$SECONDS
step_start() { _step=$SECONDS; log "$*"; }
step_done() { log "  done in $((SECONDS - _step))s"; }

# --- 1. tools -------------------------------------------------------------------
need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v docker >/dev/null 2>&1 || need_pkgs+=(docker.io)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    need_pkgs+=(docker-compose)
fi
if [[ "$BASE_IMAGE" == "$OFFLINE_BASE" ]] && ! command -v debootstrap >/dev/null 2>&1; then
    need_pkgs+=(debootstrap)
fi
if ((${#need_pkgs[@]})); then
    mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
    if [[ "${MEMKV_SKIP_APT:-0}" == 1 || "$(id -u)" != 0 ]]; then
        log "missing: ${need_pkgs[*]} (apt-get install them as root, or unset MEMKV_SKIP_APT)"
        exit 1
    fi
    step_start "apt-get install ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >&2
    step_done
fi

# --- 2. dockerd -----------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    if [[ "$(id -u)" != 0 ]]; then
        log "dockerd is not running and only root can start it here"
        exit 1
    fi
    step_start "starting dockerd (log: $DOCKERD_LOG)"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    # setsid: dockerd outlives this script (and make); it is stopped by hand or at shutdown.
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
        log "dockerd did not come up in 60s; last lines of $DOCKERD_LOG:"
        tail -n 20 "$DOCKERD_LOG" >&2
        exit 1
    fi
    step_done
fi

# --- 3. base image ----------------------------------------------------------------
if [[ "$BASE_IMAGE" == "$OFFLINE_BASE" ]]; then
    if [[ "${MEMKV_REBUILD_BASE:-0}" != 1 ]] && docker image inspect "$OFFLINE_BASE" >/dev/null 2>&1; then
        log "base image $OFFLINE_BASE present (MEMKV_REBUILD_BASE=1 rebuilds it)"
    else
        step_start "debootstrap --variant=minbase bookworm + docker import -> $OFFLINE_BASE"
        rootfs="$(mktemp -d /var/tmp/memkv-rootfs.XXXXXX)"
        trap 'rm -rf "$rootfs"' EXIT
        # python3 + python3-venv: the venv memkv is installed into (ensurepip brings pip);
        # etcd-server + etcd-client: the etcd service of the offline deployment (etcdctl for its healthcheck).
        debootstrap --variant=minbase \
            --include=python3,python3-venv,etcd-server,etcd-client,ca-certificates \
            bookworm "$rootfs" "$MIRROR" >&2
        # Image hygiene: no package caches or lists, no host-specific files.
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/var/log/* "$rootfs"/tmp/*
        : >"$rootfs/etc/hostname"
        tar -C "$rootfs" --numeric-owner -c . | docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["/bin/bash"]' \
            --message "memkv offline base: debootstrap minbase bookworm + python3, etcd" \
            - "$OFFLINE_BASE" >&2
        rm -rf "$rootfs"
        trap - EXIT
        step_done
    fi
fi

# --- 4. wheelhouse ------------------------------------------------------------------
# Runtime dependencies only (no extras: no torch). Wheels are built/downloaded by the
# host's interpreter, which must match the image's (3.11, x86_64/aarch64 glibc): checked.
PY="${MEMKV_PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$pyver" != 3.11 ]]; then
    log "warning: host python is $pyver but the images run 3.11; set MEMKV_PYTHON=python3.11 if the build fails"
fi
step_start "wheelhouse $WHEELHOUSE (memkv + runtime deps)"
mkdir -p "$WHEELHOUSE"
rm -f "$WHEELHOUSE"/memkv-*.whl
# The dependency wheels are fetched again only when pyproject.toml changes.
deps_stamp="$WHEELHOUSE/.deps-stamp"
want="$( { cat pyproject.toml; echo "$pyver"; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$deps_stamp" && "$(cat "$deps_stamp")" == "$want" ]]; then
    "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$WHEELHOUSE" . >&2
else
    "$PY" -m pip wheel --quiet --disable-pip-version-check -w "$WHEELHOUSE" . >&2
    echo "$want" >"$deps_stamp"
fi
ls "$WHEELHOUSE"/memkv-*.whl >/dev/null
step_done

# --- 5. image build -----------------------------------------------------------------------
# One `docker build` for the image every memkv service uses (compose would build it once
# per service); `compose up` then finds it. The compose file's build: section is the same.
IMAGE="${MEMKV_IMAGE:-memkv:latest}"
step_start "docker build -t $IMAGE --build-arg BASE_IMAGE=$BASE_IMAGE compose/"
docker build -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" "$COMPOSE_DIR" >&2
# Earlier builds leave untagged images (old memkv images, the venv stage); drop those more
# than a day old, keeping recent ones as build cache.
docker image prune -f --filter label=org.memkv.image --filter until=24h >/dev/null || true
step_done
if [[ "$ETCD_IMAGE" != "$OFFLINE_BASE" ]] && ! docker image inspect "$ETCD_IMAGE" >/dev/null 2>&1; then
    step_start "docker pull $ETCD_IMAGE"
    docker pull "$ETCD_IMAGE" >&2
    step_done
fi
# compose/.env: later `docker compose` commands (up, down, the chaos runner) use the same images.
cat >"$COMPOSE_DIR/.env" <<ENV
# written by compose/build-offline.sh
BASE_IMAGE=$BASE_IMAGE
MEMKV_ETCD_IMAGE=$ETCD_IMAGE
MEMKV_IMAGE=$IMAGE
ENV
log "all done in $((SECONDS - t0))s"
