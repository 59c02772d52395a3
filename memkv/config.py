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
GRANT_LEVELS = ("r", "rw", "w", "admin")  # what a tenant may do in a namespace


# -- typed reading of the TOML values: a value of the wrong type or shape is an InvalidArgument that
# names the section and key, never a TypeError/ValueError from deep inside the node
def _where(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def _table(raw: Any, section: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"[{section}] must be a table, not {type(raw).__name__} {raw!r:.60}")
    return raw


def _int(raw: dict[str, Any], key: str, section: str) -> int:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgument(f"{_where(section, key)} must be an integer, not {v!r:.60}")
    return v


def _float(raw: dict[str, Any], key: str, section: str) -> float:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:  # NaN is no number either
        raise InvalidArgument(f"{_where(section, key)} must be a number, not {v!r:.60}")
    return float(v)


def _bool(raw: dict[str, Any], key: str, section: str) -> bool:
    v = raw[key]
    if not isinstance(v, bool):
        raise InvalidArgument(f"{_where(section, key)} must be true or false, not {v!r:.60}")
    return v


def _str(raw: dict[str, Any], key: str, section: str) -> str:
    v = raw[key]
    if not isinstance(v, str):
        raise InvalidArgument(f"{_where(section, key)} must be a string, not {v!r:.60}")
    return v


def _size(raw: dict[str, Any], key: str, section: str) -> int:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise InvalidArgument(f"{_where(section, key)} must be a size like \"512MiB\" or an integer, not {v!r:.60}")
    try:
        n = parse_size(v)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{_where(section, key)}: {exc.message}") from None
    if n < 0:
        raise InvalidArgument(f"{_where(section, key)} must not be negative ({v!r})")
    return n


def _duration(raw: dict[str, Any], key: str, section: str) -> float | None:
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or v != v:
        raise InvalidArgument(f"{_where(section, key)} must be a duration like \"30s\" or a number, not {v!r:.60}")
    try:
        return parse_duration(v)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{_where(section, key)}: {exc.message}") from None


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
    # when a cluster write is acknowledged: "all" -- stored on every owner of its slot that holds a
    # live etcd lease (relayed through another owner where the client cannot reach one), so it survives
    # the loss of any one node; "one" -- stored on at least one owner, those that fail are skipped.
    # "" (unset): "all" for a durable namespace, "one" for a memory one (a lost cached value is a miss)
    acks: str = ""

    def __post_init__(self) -> None:
        if not self.acks:
            object.__setattr__(self, "acks", "all" if self.durability == "durable" else "one")
        if self.acks not in ("all", "one"):
            raise InvalidArgument(f"namespace {self.name}: acks must be all|one")
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


def tenant_from_table(name: str, t: Any, section: str) -> TenantConfig:
    """One tenant from a ``[tenants.NAME]`` table, a ``tenants.json`` entry or an etcd record.

    The one reader of a tenant for all three, so each refuses the same things with the same
    typed error (fuzzing found ``quota = [1]`` a TypeError in the etcd path and
    ``no_store = "false"`` silently true in both).
    """
    if name.startswith("__"):  # memkv/protocol/auth.py: the cluster-internal identity
        raise InvalidArgument(f"tenant name {name!r} is reserved (names starting with '__' are cluster-internal)")
    t = _table(t, section)
    if "token" not in t or not _str(t, "token", section):
        raise InvalidArgument(f"tenant {name}: a non-empty token is required")
    grants = _table(t.get("grants") or {}, f"{section}.grants")
    for ns_name in grants:
        if _str(grants, ns_name, f"{section}.grants") not in GRANT_LEVELS:
            raise InvalidArgument(f"tenant {name}: grants must map namespace -> one of {GRANT_LEVELS}")
    limits = {}
    for key in ("rate", "burst"):
        if t.get(key) is not None:
            v = limits[key] = _float(t, key, section)
            if not 0 < v < float("inf"):
                raise InvalidArgument(f"{_where(section, key)} must be a positive number, not {v!r}")
    return TenantConfig(
        name, t["token"], dict(grants),
        _size(t, "quota", section) if t.get("quota") is not None else None,
        limits.get("rate"), limits.get("burst"),
        _bool(t, "no_store", section) if "no_store" in t else False,
    )


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
    out: dict[str, Any] = {}
    for key in ("max_connections",):
        if key in raw:
            out[key] = _int(raw, key, "limits")
    for key in ("max_inflight_bytes", "tenant_inflight_bytes", "min_payload_rate"):
        if key in raw:
            out[key] = _size(raw, key, "limits")
    for key in ("idle_timeout", "frame_timeout", "write_timeout"):
        if key in raw:
            v = raw[key]
            out[key] = float(_duration(raw, key, "limits") or 0.0) if isinstance(v, str) else _float(raw, key, "limits")
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
    # their region sizes in bytes: [] = ``memory`` split evenly, [S] = S each, [S0, S1, ...] = one per worker
    worker_memory: list[int] = field(default_factory=list)
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
    # Standalone nodes serve plain-TCP GETs that the client-readable index answers on a thread of
    # the connection (memkv/server/hot_reads.py). Off by default: it makes a lone GET stream faster
    # but small GETs and PUTs that run alongside slower (GIL; docs/benchmarks.md).
    tcp_hot_reads: bool = False
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


def _namespace_from(name: str, raw: Any) -> NamespacePolicy:
    section = f"namespaces.{name}"
    raw = _table(raw, section)
    base = default_namespaces().get(name, NamespacePolicy(name))
    return NamespacePolicy(
        name=name,
        pool=_str(raw, "pool", section) if "pool" in raw else base.pool,
        durability=_str(raw, "durability", section) if "durability" in raw else base.durability,
        replicas=_int(raw, "replicas", section) if "replicas" in raw else base.replicas,
        ttl=_duration(raw, "ttl", section) if "ttl" in raw else base.ttl,
        overwrite=_bool(raw, "overwrite", section) if "overwrite" in raw else base.overwrite,
        tenant_scoped=_bool(raw, "tenant_scoped", section) if "tenant_scoped" in raw else base.tenant_scoped,
        acks=_str(raw, "acks", section) if "acks" in raw else "",
    )


def load_config(path: str | Path | None) -> NodeConfig:
    """Read a TOML config file (or return defaults when ``path`` is None)."""
    cfg = NodeConfig()
    if path is None:
        return cfg
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:  # TOML files are UTF-8
        raise InvalidArgument(f"cannot read config {path}: {exc}") from exc
    node = _table(raw.get("node", {}), "node")
    for key in ("listen", "data_dir", "etcd", "cluster", "node_id", "zone", "host_id", "shm_dir", "metrics_host",
                "metrics_token"):
        if key in node:
            setattr(cfg, key, _str(node, key, "node"))
    if "workers" in node:  # a count, or "auto" (checked by memkv/tools/workers.py)
        v = node["workers"]
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise InvalidArgument(f"{_where('node', 'workers')} must be a number or \"auto\", not {v!r:.60}")
        cfg.workers = str(v)
    if "worker_ports" in node:  # [7400, 7401] or "7400,7401"
        v = node["worker_ports"]
        if isinstance(v, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in v):
            cfg.worker_ports = ",".join(map(str, v))
        else:
            cfg.worker_ports = _str(node, "worker_ports", "node")
    if "worker_memory" in node:  # "1GiB" (each worker) or ["1GiB", "3GiB"] (one per worker)
        v = node["worker_memory"]
        items = v if isinstance(v, list) else [v]
        cfg.worker_memory = [_size({"worker_memory": x}, "worker_memory", "node") for x in items]
    for key in ("metrics_port", "resp_port"):
        if key in node:
            setattr(cfg, key, _int(node, key, "node"))
    if "onesided_tenants" in node:
        cfg.onesided_tenants = _bool(node, "onesided_tenants", "node")
    if "tcp_hot_reads" in node:
        cfg.tcp_hot_reads = _bool(node, "tcp_hot_reads", "node")
    if "memory" in node:
        cfg.memory = _size(node, "memory", "node")
    if "disk" in node:
        cfg.disk = _size(node, "disk", "node")
    if "tombstone_retention" in node:
        cfg.tombstone_retention = float(_duration(node, "tombstone_retention", "node") or 0.0)
        if cfg.tombstone_retention <= 0:
            raise InvalidArgument("[node] tombstone_retention must be a positive duration")
    if "max_tombstones" in node:
        cfg.max_tombstones = _int(node, "max_tombstones", "node")
        if cfg.max_tombstones < 1:
            raise InvalidArgument("[node] max_tombstones must be >= 1")
    flash = _table(raw.get("flash", {}), "flash")
    for key in ("segment_size", "compaction_rate"):
        if key in flash:
            setattr(cfg, key, _size(flash, key, "flash"))
    if "compaction_threshold" in flash:
        cfg.compaction_threshold = _float(flash, "compaction_threshold", "flash")
    if "snapshot_every" in flash:
        cfg.snapshot_every = _int(flash, "snapshot_every", "flash")
    if "cluster" in raw:  # [cluster]: replicas, slots, lease_ttl (memkv.cluster)
        cfg.extra["cluster"] = dict(_table(raw["cluster"], "cluster"))
    for name, ns in _table(raw.get("namespaces", {}), "namespaces").items():
        cfg.namespaces[name] = _namespace_from(name, ns)
    for name, pool in _table(raw.get("pools", {}), "pools").items():
        base = cfg.pools.get(name)
        if base is None:
            raise InvalidArgument(f"unknown pool {name!r}; pools are {POOLS}")
        section = f"pools.{name}"
        pool = _table(pool, section)
        quota = _size(pool, "tenant_quota", section) if "tenant_quota" in pool else base.tenant_quota
        policy = _str(pool, "policy", section) if "policy" in pool else base.policy
        if policy not in EVICTION_POLICIES:
            raise InvalidArgument(f"pool {name}: policy must be one of {EVICTION_POLICIES}")
        fraction = _float(pool, "fraction", section) if "fraction" in pool else base.fraction
        cfg.pools[name] = PoolConfig(name, fraction, policy, quota)
    for name, t in _table(raw.get("tenants", {}), "tenants").items():
        cfg.tenants[name] = tenant_from_table(name, t, f"tenants.{name}")
    if "limits" in raw:  # [limits] (memkv/server/limits.py)
        cfg.limits = _limits_from(_table(raw["limits"], "limits"))
    for section in ("tls", "audit", "security", "events"):  # server/tls.py, audit.py, stages.py; events/node.py
        if section in raw:
            cfg.extra[section] = dict(_table(raw[section], section))
    return cfg
