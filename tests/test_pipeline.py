"""The node's request path: one pipeline of stages, built once, the same for every front end.

A node is run in this process (real sockets, a real etcd, a real flash tier on
disk) and driven through every feature -- tenants (added at runtime through etcd),
durable values, the cluster's routing, RESP, administration -- with the real
client and a real Redis client. Its dispatch (the opcode table, the operation
table, the stages and the per-kind plans) must be the very same objects, with
the same contents, afterwards; no object of the node may carry a method of its
own in place of its class's.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from memkv.client import Client
from memkv.config import NamespacePolicy, NodeConfig
from memkv.engine.store import Store
from memkv.flash.tier import FlashTier
from memkv.server.connection import Connection
from memkv.server.operations import Operations
from memkv.server.pipeline import Pipeline
from memkv.server.resp import RespConnection, RespServer
from memkv.server.stages import Stage
from memkv.server.tenants import TenantRegistry
from memkv.tools.cli import build_node

MiB = 1 << 20
STAGES = ["authenticate", "rate limit", "route", "grants", "no-store", "in flight", "audit", "flash promotion"]


def _config(tmp_path: Path, **kw: Any) -> NodeConfig:
    cfg = NodeConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "data"), memory=64 * MiB, shm_dir=str(tmp_path),
                     **kw)
    cfg.namespaces["ctx"] = NamespacePolicy("ctx", pool="session", durability="durable", overwrite=True)
    return cfg


def _dispatch(node: Any) -> dict[str, Any]:
    """Everything a request is dispatched through, by identity."""
    p = node.pipeline
    return {
        "pipeline": p, "stages": p.stages, "operations": p.operations, "plans": p.plans, "binary": node.binary,
        "each_operation": dict(p.operations), "each_binary_op": dict(node.binary),
        "each_plan": {k: (v.checks, v.dones, v.releases, v.run) for k, v in p.plans.items()},
        "tier": node.store.tier, "background": node.background, "connection": node.connection_class,
    }


CLASSES = (Pipeline, Operations, Store, FlashTier, TenantRegistry, Connection, RespConnection, RespServer,
           *Stage.__subclasses__())


def _class_methods() -> dict[type, dict[str, Any]]:
    return {cls: dict(vars(cls)) for cls in CLASSES}


def _rebound(obj: Any) -> list[str]:
    """Instance attributes that shadow a method of the object's class (a method replaced at run time)."""
    if not hasattr(obj, "__dict__"):
        return []
    return [k for k, v in vars(obj).items() if callable(getattr(type(obj), k, None)) and callable(v)]


def _node_objects(node: Any) -> list[Any]:
    objs = [node, node.store, node.flash, node.tenants, node.audit, node.hardening, node.onesided, node.resp,
            node.operations, *node.pipeline.stages]
    return [o for o in objs if o is not None]


def _same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for name, value in before.items():
        now = after[name]
        if isinstance(value, dict):
            assert value.keys() == now.keys(), name
            for k, v in value.items():
                same = all(a is b for a, b in zip(v, now[k], strict=True)) if isinstance(v, tuple) else now[k] is v
                assert same, f"{name}[{k!r}] changed"
        else:
            assert now is value, f"{name} was replaced"


async def _resp(port: int, *commands: list[bytes]) -> list[bytes]:
    """Send RESP commands, return one raw reply line (plus bulk body) per command."""
    from memkv.protocol import resp as R

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"".join(R.encode_command(*c) for c in commands))
        buf = b""
        replies: list[Any] = []
        while len(replies) < len(commands):
            data = await stream.receive_some(65536)
            assert data, "RESP connection closed"
            buf += data
            replies, pos = [], 0
            try:
                while len(replies) < len(commands):
                    value, pos = R.parse_reply(buf, pos)
                    replies.append(value)
            except Exception:  # noqa: BLE001 - incomplete: read more
                continue
        return replies


async def _wait(cond: Any, what: str, timeout: float = 60.0) -> Any:
    with trio.move_on_after(timeout):
        while True:
            v = await cond()
            if v:
                return v
            await trio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


async def test_dispatch_is_frozen_after_serving_every_feature(etcd_server: Any, tmp_path: Path) -> None:
    from memkv.client.etcd import Etcd
    from memkv.client.url import NodeAddress
    from memkv.tools.admin import admin_call

    name = f"p{uuid.uuid4().hex[:8]}"
    etcd = Etcd(etcd_server.endpoint)
    prefix = f"/memkv/{name}/tenants/"
    etcd.put(prefix + "root", json.dumps({"token": "root-secret", "grants": {"*": "admin"}}).encode())
    cfg = _config(tmp_path, etcd=etcd_server.endpoint, cluster=name, node_id="n1", resp_port=0)
    cfg.extra["cluster"] = {"replicas": 1, "lease_ttl": 2}
    node = build_node(cfg)
    before, methods = _dispatch(node), _class_methods()
    assert node.pipeline.describe() == STAGES
    url = f"etcd://{etcd_server.endpoint}/{name}"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve)

            route = next(s for s in node.pipeline.stages if s.name == "route")

            async def formed() -> bool:
                return route.routing.owners(b"k") == ("n1",)  # the cluster membership's slot map

            await _wait(formed, "the one-node cluster's slot map")
            async with await Client.connect(url, tenant="root", token="root-secret") as c:
                await c.put(b"k", b"durable value", namespace="ctx")  # flash record + group commit
                await c.put_many([(b"a", b"1"), (b"b", b"2")])
                assert await c.get(b"k", namespace="ctx") == b"durable value"
                assert await c.get_many([b"a", b"b", b"zz"]) == [b"1", b"2", None]
                assert await c.exists_many([b"a", b"zz"]) == [True, False]
                assert await c.lookup_prefix([b"a", b"b", b"zz"]) == 2
                await c.pin([b"a"])
                await c.unpin([b"a"])
                assert await c.delete(b"b")
                st = await c.stats()
                assert st["cluster"]["slots_primary"] > 0 and st["flash"]["records"] >= 1
            # a tenant added while the node runs (the etcd watch), with a rate limit and no-store
            etcd.put(prefix + "alice", json.dumps({"token": "alice-secret", "grants": {"shared": "rw", "ctx": "rw"},
                                                   "rate": 1000, "no_store": True}).encode())

            async def alice_in() -> bool:
                return node.tenants.get("alice") is not None

            await _wait(alice_in, "alice from etcd")
            async with await Client.connect(url, tenant="alice", token="alice-secret") as c:
                await c.put(b"secret", b"dram only", namespace="ctx")
                assert await c.get(b"secret", namespace="ctx") == b"dram only"
            # RESP: login, writes, reads, the keyspace, a transaction
            port = node.resp.port
            replies = await _resp(port, [b"AUTH", b"alice", b"alice-secret"], [b"SET", b"r", b"v"], [b"GET", b"r"],
                                  [b"DBSIZE"], [b"INFO", b"keyspace"], [b"MULTI"], [b"DEL", b"r"], [b"EXEC"])
            assert replies[:4] == ["OK", "OK", b"v", 2]  # shared: a, r
            keyspace = replies[4].decode() if isinstance(replies[4], bytes) else str(replies[4])
            assert "db0:keys=2," in keyspace and "db1:" not in keyspace  # alice has no grant on session
            assert replies[7] == [1]
            # administration: the audit log and a purge
            addr = NodeAddress("127.0.0.1", node.listen_port)
            recs = await trio.to_thread.run_sync(lambda: admin_call(addr, {"cmd": "audit", "k": b"r"}, admin="root",
                                                                    token="root-secret"))
            assert [r["op"] for r in recs["records"]] == ["put", "delete"]
            out = await trio.to_thread.run_sync(lambda: admin_call(addr, {"cmd": "purge", "tenant": "alice"},
                                                                   admin="root", token="root-secret"))
            assert out["values"] >= 1
            nursery.cancel_scope.cancel()
    finally:
        etcd.close()
    _same(before, _dispatch(node))
    assert _class_methods() == methods
    for obj in _node_objects(node):
        assert _rebound(obj) == [], f"{type(obj).__name__} has methods replaced at run time"


def test_dispatch_cannot_be_changed(tmp_path: Path) -> None:
    node = build_node(_config(tmp_path))
    try:
        with pytest.raises(AttributeError):
            node.pipeline.stages = ()
        with pytest.raises(TypeError):
            node.binary[1] = node.binary[2]  # type: ignore[index]
        with pytest.raises(TypeError):
            node.pipeline.operations["GET"] = node.pipeline.operations["PING"]  # type: ignore[index]
        with pytest.raises(TypeError):
            node.pipeline.plans["GET"] = node.pipeline.plans["PING"]  # type: ignore[index]
        assert isinstance(node.pipeline.stages, tuple)
    finally:
        node.store.close()
        node.flash.close()


def _plan(node: Any, kind: str) -> list[str]:
    return [check.__self__.name for check in node.pipeline.plans[kind].checks]


def test_each_kind_of_request_passes_the_stages_it_needs_in_the_one_order(tmp_path: Path) -> None:
    """A standalone node with a flash tier and an audit log: no route stage; a read visits the grants and
    the promotion stages, a write the no-store and in-flight ones, and it is audited afterwards."""
    node = build_node(_config(tmp_path))
    try:
        assert node.pipeline.describe() == [s for s in STAGES if s != "route"]
        assert _plan(node, "GET") == ["authenticate", "rate limit", "grants", "flash promotion"]
        assert _plan(node, "PUT") == ["authenticate", "rate limit", "grants", "no-store", "in flight"]
        assert [d.__self__.name for d in node.pipeline.plans["PUT"].dones] == ["audit"]
        assert [r.__self__.name for r in node.pipeline.plans["PUT"].releases] == ["in flight"]
        assert _plan(node, "DELETE") == ["authenticate", "rate limit", "grants"]
        assert _plan(node, "AUTH") == ["authenticate"]  # logging in: not rate limited, no grant
        assert _plan(node, "ADMIN") == ["authenticate", "grants"]
        assert _plan(node, "LOCATE_TOUCH") == ["authenticate", "rate limit"]  # (its tags: the grants)
        # RESP maps its commands onto the same kinds: one table for both front ends
        assert {"GET", "PEEK", "PUT", "DELETE", "EXPIRE", "TTL", "SCAN", "COUNT", "KEYSPACE", "FLUSH",
                "LOGIN"} <= set(node.pipeline.plans)
    finally:
        node.store.close()
        node.flash.close()


def test_node_code_reads_no_private_state_of_the_store() -> None:
    """Outside memkv/engine nothing touches the store's index or its private helpers."""
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for folder in ("memkv", "cluster", "client", "chaos", "bench"):
        for path in (root / folder).rglob("*.py"):
            if "engine" in path.relative_to(root).parts[:2]:
                continue
            text = path.read_text()
            for needle in ("._index", "store._lookup", "store._drop", ".store._"):
                if needle in text:
                    offenders.append(f"{path.relative_to(root)}: {needle}")
    assert offenders == []
