"""Node configuration: namespaces with their policies, tenants, and node flags.

The TOML layout is part of the interface users write against (README). Flags given on
the command line override values from the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memkv.errors import InvalidArgument
from memkv.sizes import parse_duration, parse_size

POOLS = ("shared", "session")
EVICTION_POLICIES = ("lru", "s3fifo")


@dataclass(frozen=True)
class NamespacePolicy:
    """How a namespace stores its values.

    ``tenant_scoped`` namespaces keep one key space per tenant, so tenant A's
    ``session`` keys are invisible to tenant B even when the key bytes match.
    """

    name: str
    pool: str = "shared"
    durability: str = "memory"
    replicas: int = 1
    ttl: float | None = None
    overwrite: bool = False
    tenant_scoped: bool = False

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise InvalidArgument(f"namespace {self.name}: pool must be one of {POOLS}")
        if self.durability not in ("memory", "durable"):
            raise InvalidArgument(f"namespace {self.name}: durability must be memory|durable")
        if self.replicas < 1:
            raise InvalidArgument(f"namespace {self.name}: replicas must be >= 1")


def default_namespaces() -> dict[str, NamespacePolicy]:
    return {
        "shared": NamespacePolicy("shared", pool="shared"),
        "session": NamespacePolicy("session", pool="session", overwrite=True, tenant_scoped=True),
    }


@dataclass(frozen=True)
class PoolConfig:
    """An eviction pool: its share of the region and its eviction policy."""

    name: str
    fraction: float
    policy: str = "s3fifo"
    tenant_quota: int | None = None  # bytes per tenant, None = the whole pool


def default_pools() -> dict[str, PoolConfig]:
    return {
        "shared": PoolConfig("shared", 0.6, "s3fifo"),
        "session": PoolConfig("session", 0.4, "lru", tenant_quota=None),
    }


@dataclass(frozen=True)
class TenantConfig:
    name: str
    token: str
    grants: dict[str, str] = field(default_factory=dict)  # namespace -> "r" | "rw" | "admin"
    quota: int | None = None
    # memkv/server/tenants.py and stages.py: requests/s token bucket, its burst, DRAM-only writes
    rate: float | None = None
    burst: float | None = None
    no_store: bool = False


@dataclass
class LimitsConfig:
    """Resource limits of a node (TOML ``[limits]``; memkv/server/limits.py). 0 disables a timeout/rate."""

    max_connections: int = 4096  # per node, binary + RESP together; clamped below RLIMIT_NOFILE
    max_inflight_bytes: int = 256 * 1024**2  # per connection: queued replies + reserved-unfilled PUT payload
    tenant_inflight_bytes: int = 1024**3  # per tenant (all its connections): PUT reservations in flight
    idle_timeout: float = 0.0  # s without any request (between frames); 0 = never
    frame_timeout: float = 30.0  # s to deliver a started frame's header+meta (slowloris); also payload grace
    min_payload_rate: int = 64 * 1024  # bytes/s a PUT payload must average after the grace
    write_timeout: float = 60.0  # s a reply may make no progress (a client that stopped reading)


def _limits_from(raw: dict[str, Any]) -> LimitsConfig:
    base = LimitsConfig()
    out = {}
    for key in ("max_connections",):
        if key in raw:
            out[key] = int(raw[key])
    for key in ("max_inflight_bytes", "tenant_inflight_bytes", "min_payload_rate"):
        if key in raw:
            out[key] = parse_size(raw[key]) if isinstance(raw[key], str) else int(raw[key])
    for key in ("idle_timeout", "frame_timeout", "write_timeout"):
        if key in raw:
            v = raw[key]
            out[key] = float(parse_duration(v) or 0.0) if isinstance(v, str) else float(v)
    unknown = set(raw) - set(LimitsConfig.__dataclass_fields__)
    if unknown:
        raise InvalidArgument(f"[limits]: unknown keys {sorted(unknown)}")
    cfg = LimitsConfig(**{**base.__dict__, **out})
    if cfg.max_connections < 1 or cfg.max_inflight_bytes < 1 or cfg.tenant_inflight_bytes < 1:
        raise InvalidArgument("[limits]: max_connections and the in-flight limits must be >= 1")
    if min(cfg.idle_timeout, cfg.frame_timeout, cfg.write_timeout, cfg.min_payload_rate) < 0:
        raise InvalidArgument("[limits]: timeouts and rates must be >= 0")
    return cfg


@dataclass
class NodeConfig:
    listen: str = "127.0.0.1:7400"
    data_dir: str = ""
    memory: int = 256 * 1024**2
    disk: int = 4 * 1024**3
    shm_dir: str = "/dev/shm"
    etcd: str | None = None
    cluster: str = "default"
    node_id: str = ""
    zone: str = "z0"
    # the machine this node runs on, registered with the node (placement keeps a slot's replicas on
    # distinct hosts); "" = the hostname. ``memkv serve --workers N`` gives all N workers the same one.
    host_id: str = ""
    # worker processes of ``memkv serve`` (memkv/tools/workers.py): a count, or "auto" = the cores
    workers: str = "1"
    # their ports, comma-separated ("" = the listen port and the ones after it)
    worker_ports: str = ""
    # set by the supervisor on each worker: the addresses of all workers of this host, in order
    # (reported by STATS, so that clients and ``memkv status`` find the siblings)
    worker_addrs: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    # /metrics (Prometheus) listens only when metrics_port is set, on metrics_host (default: the host
    # of ``listen``); with metrics_token set a scrape must send "Authorization: Bearer <token>"
    metrics_host: str = ""
    metrics_token: str = ""
    resp_port: int | None = None
    # One-sided reads map the whole region, every tenant's values included: with
    # tenants configured they are off unless all tenants are trusted ([node] onesided_tenants).
    onesided_tenants: bool = False
    namespaces: dict[str, NamespacePolicy] = field(default_factory=default_namespaces)
    pools: dict[str, PoolConfig] = field(default_factory=default_pools)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # flash tier (durable namespaces; TOML table [flash])
    segment_size: int = 64 * 1024**2
    compaction_rate: int = 64 * 1024**2  # bytes/s of compaction copy I/O; 0 = unthrottled
    compaction_threshold: float = 0.5  # compact a segment once this fraction of it is dead
    snapshot_every: int = 200_000  # records written between index snapshots
    # resource limits (TOML table [limits]; memkv/server/limits.py)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # tombstones of versioned deletes (memkv/engine/store.py): kept this long, at most this many
    tombstone_retention: float = 3600.0
    max_tombstones: int = 1_000_000


def split_hostport(text: str, default_port: int = 7400) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) of a listen address; a bare host gets ``default_port``."""
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    return host.strip("[]"), int(port)


def _namespace_from(name: str, raw: dict[str, Any]) -> NamespacePolicy:
    base = default_namespaces().get(name, NamespacePolicy(name))
    return NamespacePolicy(
        name=name,
        pool=raw.get("pool", base.pool),
        durability=raw.get("durability", base.durability),
        replicas=int(raw.get("replicas", base.replicas)),
        ttl=parse_duration(raw.get("ttl", base.ttl)),
        overwrite=bool(raw.get("overwrite", base.overwrite)),
        tenant_scoped=bool(raw.get("tenant_scoped", base.tenant_scoped)),
    )


def load_config(path: str | Path | None) -> NodeConfig:
    """Read a TOML config file (or return defaults when ``path`` is None)."""
    cfg = NodeConfig()
    if path is None:
        return cfg
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"cannot read config {path}: {exc}") from exc
    node = raw.get("node", {})
    for key in ("listen", "data_dir", "etcd", "cluster", "node_id", "zone", "host_id", "workers", "worker_ports",
                "shm_dir", "metrics_host", "metrics_token"):
        if key in node:
            setattr(cfg, key, str(node[key]))
    for key in ("metrics_port", "resp_port"):
        if key in node:
            setattr(cfg, key, int(node[key]))
    if "onesided_tenants" in node:
        cfg.onesided_tenants = bool(node["onesided_tenants"])
    if "memory" in node:
        cfg.memory = parse_size(node["memory"])
    if "disk" in node:
        cfg.disk = parse_size(node["disk"])
    if "tombstone_retention" in node:
        cfg.tombstone_retention = float(parse_duration(node["tombstone_retention"]) or 0.0)
        if cfg.tombstone_retention <= 0:
            raise InvalidArgument("[node] tombstone_retention must be a positive duration")
    if "max_tombstones" in node:
        cfg.max_tombstones = int(node["max_tombstones"])
        if cfg.max_tombstones < 1:
            raise InvalidArgument("[node] max_tombstones must be >= 1")
    flash = raw.get("flash", {})
    for key in ("segment_size", "compaction_rate"):
        if key in flash:
            setattr(cfg, key, parse_size(flash[key]))
    if "compaction_threshold" in flash:
        cfg.compaction_threshold = float(flash["compaction_threshold"])
    if "snapshot_every" in flash:
        cfg.snapshot_every = int(flash["snapshot_every"])
    if isinstance(raw.get("cluster"), dict):  # [cluster]: replicas, slots, lease_ttl (memkv.cluster)
        cfg.extra["cluster"] = dict(raw["cluster"])
    for name, ns in raw.get("namespaces", {}).items():
        cfg.namespaces[name] = _namespace_from(name, ns)
    for name, pool in raw.get("pools", {}).items():
        base = cfg.pools.get(name)
        if base is None:
            raise InvalidArgument(f"unknown pool {name!r}; pools are {POOLS}")
        quota = pool.get("tenant_quota", base.tenant_quota)
        policy = pool.get("policy", base.policy)
        if policy not in EVICTION_POLICIES:
            raise InvalidArgument(f"pool {name}: policy must be one of {EVICTION_POLICIES}")
        cfg.pools[name] = PoolConfig(
            name, float(pool.get("fraction", base.fraction)), policy,
            parse_size(quota) if quota is not None else None,
        )
    for name, t in raw.get("tenants", {}).items():
        if name.startswith("__"):
            raise InvalidArgument(f"tenant name {name!r} is reserved (names starting with '__' are cluster-internal)")
        if "token" not in t:
            raise InvalidArgument(f"tenant {name}: token is required")
        quota = t.get("quota")
        cfg.tenants[name] = TenantConfig(
            name, str(t["token"]), dict(t.get("grants", {})),
            parse_size(quota) if quota is not None else None,
            float(t["rate"]) if t.get("rate") is not None else None,
            float(t["burst"]) if t.get("burst") is not None else None,
            bool(t.get("no_store", False)),
        )
    if isinstance(raw.get("limits"), dict):  # [limits] (memkv/server/limits.py)
        cfg.limits = _limits_from(raw["limits"])
    for section in ("tls", "audit", "security", "events"):  # server/tls.py, audit.py, stages.py; events/node.py
        if isinstance(raw.get(section), dict):
            cfg.extra[section] = dict(raw[section])
    return cfg
