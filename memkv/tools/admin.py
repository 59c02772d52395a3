"""``memkv tenant add|list|revoke``, ``memkv audit``, ``memkv purge`` (docs/security.md).

URLs: ``memkv://HOST:PORT`` / ``memkvs://HOST:PORT`` (one standalone node: the
ADMIN op, tenants persisted in the node's data dir) and
``etcd://HOST:PORT/CLUSTER`` (tenants are keys ``/memkv/CLUSTER/tenants/NAME``
in etcd, watched by every node; audit and purge go to every node of the
cluster). Admin credentials: ``--admin NAME --admin-token TOKEN`` or the
environment variables ``MEMKV_ADMIN`` / ``MEMKV_ADMIN_TOKEN`` (needed once the
node has tenants: an ``admin`` grant on ``"*"``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from typing import Any

from memkv.config import GRANT_LEVELS
from memkv.errors import InvalidArgument, MemKVError
from memkv.protocol.opcodes import Op

LEVELS = GRANT_LEVELS


# -- plumbing -------------------------------------------------------------------------------
def _nodes(url: str) -> tuple[Any, list[Any]]:
    from memkv.client.url import parse_url

    parsed = parse_url(url)
    if parsed.scheme == "memkv":
        return parsed, [parsed.nodes[0]]
    from memkv.client.core.routing import ClusterRouter

    router = ClusterRouter.open(parsed)
    try:
        return parsed, list(router.all_nodes())
    finally:
        router.close()


def admin_call(node: Any, meta: dict[str, Any], *, admin: str | None, token: str | None, tls: Any = None,
               timeout: float = 120.0) -> dict[str, Any]:
    """One ADMIN request to one node (a fresh connection, authenticated when ``admin`` is given)."""
    from memkv.client.core.calls import SimpleCall
    from memkv.client.executors.blocking_connection import BlockingConnection
    from memkv.client.tls import client_context

    conn = BlockingConnection.open(node.host, node.port, tenant=admin, token=token, timeout=timeout,
                                   tls=client_context(tls))
    try:
        return conn.call(SimpleCall(Op.ADMIN, meta))
    finally:
        conn.close()


def _creds(args: argparse.Namespace) -> dict[str, Any]:
    admin = args.admin or os.environ.get("MEMKV_ADMIN") or None
    token = args.admin_token or os.environ.get("MEMKV_ADMIN_TOKEN") or None
    tls: Any = args.tls_ca or None
    if tls is None and args.url.startswith("memkvs://"):
        tls = True
    return {"admin": admin, "token": token, "tls": tls}


def _etcd(parsed: Any) -> Any:
    from memkv.client.etcd import Etcd

    return Etcd([(n.host, n.port) for n in parsed.nodes])


def _tenant_key(parsed: Any, name: str) -> str:
    return f"/memkv/{parsed.cluster}/tenants/{name}"


def _print(obj: Any, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str) if as_json else text)


# -- tenant ---------------------------------------------------------------------------------
def _tenant_spec(args: argparse.Namespace) -> dict[str, Any]:
    grants: dict[str, str] = {}
    for g in args.grant or []:
        ns, sep, level = g.partition("=")
        if not sep or level not in LEVELS or not ns:
            raise InvalidArgument(f"bad --grant {g!r}: want NAMESPACE=LEVEL with LEVEL one of {LEVELS}")
        grants[ns] = level
    spec: dict[str, Any] = {"token": args.token or secrets.token_urlsafe(32), "grants": grants}
    if args.quota:
        from memkv.sizes import parse_size

        spec["quota"] = parse_size(args.quota)
    if args.rate is not None:
        spec["rate"] = args.rate
    if args.burst is not None:
        spec["burst"] = args.burst
    if args.no_store:
        spec["no_store"] = True
    return spec


def _tenant(args: argparse.Namespace) -> int:
    from memkv.client.url import parse_url

    parsed = parse_url(args.url)
    as_json = getattr(args, "json", False)
    if parsed.scheme == "etcd":
        return _tenant_etcd(args, parsed)
    creds = _creds(args)
    node = parsed.nodes[0]
    if args.action == "add":
        spec = _tenant_spec(args)
        admin_call(node, {"cmd": "tenant.add", "name": args.name, "tenant": spec}, **creds)
        _print({"tenant": args.name, "token": spec["token"]}, as_json,
               f"tenant {args.name} added; token: {spec['token']}")
    elif args.action == "revoke":
        r = admin_call(node, {"cmd": "tenant.revoke", "name": args.name}, **creds)
        _print(r, as_json, f"tenant {args.name} revoked" + ("" if r.get("found") else " (it did not exist)"))
    else:
        r = admin_call(node, {"cmd": "tenant.list"}, **creds)
        lines = [f"{t['name']:20s} grants={t['grants']} quota={t.get('quota')} rate={t.get('rate')} "
                 f"no_store={t.get('no_store')}" for t in r["tenants"]]
        _print(r, as_json, "\n".join(lines) or "(no tenants: authentication is off)")
    return 0


def _tenant_etcd(args: argparse.Namespace, parsed: Any) -> int:
    from memkv.server.tenants import tenant_from_json

    etcd = _etcd(parsed)
    as_json = getattr(args, "json", False)
    try:
        if args.action == "add":
            spec = _tenant_spec(args)
            tenant_from_json(args.name, spec)  # validate before it reaches the nodes
            etcd.put(_tenant_key(parsed, args.name), json.dumps(spec))
            _print({"tenant": args.name, "token": spec["token"]}, as_json,
                   f"tenant {args.name} added to cluster {parsed.cluster}; token: {spec['token']}")
        elif args.action == "revoke":
            found = etcd.delete(_tenant_key(parsed, args.name))
            _print({"found": found}, as_json, f"tenant {args.name} revoked" + ("" if found else " (did not exist)"))
        else:
            kvs, _ = etcd.get_prefix(f"/memkv/{parsed.cluster}/tenants/")
            tenants = []
            for kv in kvs:
                d = json.loads(kv.value)
                d.pop("token", None)
                d["name"] = kv.key.rsplit("/", 1)[-1]
                tenants.append(d)
            lines = [f"{t['name']:20s} grants={t.get('grants')} quota={t.get('quota')} rate={t.get('rate')}"
                     for t in tenants]
            _print({"tenants": tenants}, as_json, "\n".join(lines) or "(no tenants)")
    finally:
        etcd.close()
    return 0


# -- audit ------------------------------------------------------------------------------------
def _key_arg(text: str, is_hex: bool) -> bytes:
    return bytes.fromhex(text) if is_hex else text.encode()


def _audit(args: argparse.Namespace) -> int:
    parsed, nodes = _nodes(args.url)
    creds = _creds(args)
    if args.verify:
        results = [admin_call(n, {"cmd": "audit.verify"}, **creds) for n in nodes]
        bad = [r for r in results if r["problems"]]
        _print(results, args.json, "\n".join(
            f"{r['node']}: {r['records']} records, " + ("chain OK" if not r["problems"] else
                                                        "PROBLEMS: " + "; ".join(r["problems"][:5]))
            for r in results))
        return 1 if bad else 0
    meta: dict[str, Any] = {"cmd": "audit", "limit": args.limit}
    if args.key is not None:
        meta["k"] = _key_arg(args.key, args.hex)
    if args.tenant is not None:
        meta["tenant"] = args.tenant
    if "k" not in meta and "tenant" not in meta:
        raise InvalidArgument("give --key K and/or --tenant T (or --verify)")
    records: list[dict[str, Any]] = []
    for n in nodes:
        try:
            records.extend(admin_call(n, meta, **creds)["records"])
        except MemKVError as exc:
            print(f"memkv: warning: {n}: {exc.message}", file=sys.stderr)
    records.sort(key=lambda r: (r.get("t", 0), r.get("node", ""), r.get("seq", 0)))
    lines = []
    for r in records:
        key = r.get("k") or ("sha256:" + r.get("kh", "")[:16] if r.get("kh") else "")
        extra = " ".join(f"{f}={r[f]}" for f in ("len", "cs", "gen", "model", "nostore", "values", "name")
                         if r.get(f) is not None)
        lines.append(f"{r.get('t', 0):.6f} {r.get('node', '?'):12s} {r.get('op', '?'):8s} "
                     f"tenant={r.get('tenant', '-')} ns={r.get('ns', '-')} key={key} {extra}")
    _print(records, args.json, "\n".join(lines) or "(no records)")
    return 0


# -- purge ------------------------------------------------------------------------------------
def _purge(args: argparse.Namespace) -> int:
    parsed, nodes = _nodes(args.url)
    creds = _creds(args)
    results = [admin_call(n, {"cmd": "purge", "tenant": args.tenant}, **creds) for n in nodes]
    total = {k: sum(r.get(k, 0) for r in results) for k in ("values", "bytes", "flash_records_scrubbed")}
    out = {"tenant": args.tenant, "nodes": results, **total}
    _print(out, args.json, "\n".join(
        [f"{r['node']}: {r['values']} values ({r['bytes']} bytes) removed, "
         f"{r['flash_records_scrubbed']} flash records scrubbed" for r in results]
        + [f"total: {total['values']} values, {total['bytes']} bytes, "
           f"{total['flash_records_scrubbed']} flash records scrubbed"]))
    return 0


# -- parsers ----------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", help="admin tenant to authenticate as (env MEMKV_ADMIN)")
    p.add_argument("--admin-token", dest="admin_token", help="its token (env MEMKV_ADMIN_TOKEN)")
    p.add_argument("--tls-ca", dest="tls_ca", help="CA bundle to verify the node's certificate (TLS)")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_parsers(sub: Any) -> None:
    t = sub.add_parser("tenant", help="provision tenants: add | list | revoke")
    tsub = t.add_subparsers(dest="action", required=True)
    a = tsub.add_parser("add", help="add (or replace) a tenant; prints its token")
    a.add_argument("url", help="memkv://HOST:PORT, memkvs://HOST:PORT or etcd://HOST:PORT/CLUSTER")
    a.add_argument("name")
    a.add_argument("--token", help="the tenant's token (default: a new random one)")
    a.add_argument("--grant", action="append", metavar="NS=LEVEL",
                   help="grant LEVEL (r, rw, admin) on namespace NS ('*' = every namespace); repeatable")
    a.add_argument("--quota", help="bytes per pool, e.g. 4GiB")
    a.add_argument("--rate", type=float, help="requests per second per node (token bucket)")
    a.add_argument("--burst", type=float, help="token bucket size (default: rate)")
    a.add_argument("--no-store", dest="no_store", action="store_true",
                   help="every write of this tenant is DRAM-only (never on flash, short TTL)")
    _common(a)
    ls = tsub.add_parser("list", help="list tenants (tokens are not shown)")
    ls.add_argument("url")
    _common(ls)
    rv = tsub.add_parser("revoke", help="revoke a tenant: its open sessions are refused at once")
    rv.add_argument("url")
    rv.add_argument("name")
    _common(rv)
    t.set_defaults(func=_tenant)

    au = sub.add_parser("audit", help="history of a block (or a tenant) across the cluster; --verify the chain")
    au.add_argument("url")
    au.add_argument("--key", help="the key (text; --hex for hex)")
    au.add_argument("--hex", action="store_true", help="--key is hex")
    au.add_argument("--tenant", help="records of this tenant")
    au.add_argument("--limit", type=int, default=1000)
    au.add_argument("--verify", action="store_true", help="verify every node's audit hash chain")
    _common(au)
    au.set_defaults(func=_audit)

    pu = sub.add_parser("purge", help="remove a tenant's data everywhere (region, flash, replicas)")
    pu.add_argument("url")
    pu.add_argument("--tenant", required=True)
    _common(pu)
    pu.set_defaults(func=_purge)
