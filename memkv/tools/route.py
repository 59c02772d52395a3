"""``memkv route``: the OpenAI-compatible, prefix-aware router in front of engine replicas.

The router itself is the library ``memkv.client.router`` (``front.py``); this module
only declares the subcommand and its flags, and imports the router when it runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def _route(args: argparse.Namespace) -> int:
    from memkv.client.router.front import run_route

    return run_route(args)


def add_parsers(sub: Any) -> None:
    r = sub.add_parser("route", help="OpenAI-compatible prefix-aware router in front of engine replicas")
    r.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT to serve HTTP on")
    r.add_argument("--backend", action="append", default=[], required=True,
                   help="http://HOST:PORT of an engine replica [?events=tcp://H:P&replay=tcp://H:P&topic=T"
                        "&model=M&namespace=NS&tenant=T&host=H&name=N&block_size=B]")
    r.add_argument("--store", action="append", default=[],
                   help="memkv nodes whose KV events count as store hits: etcd://HOST:PORT/CLUSTER "
                        "(nodes discovered), memkv://HOST:PORT (one node), or a node's event endpoint "
                        "tcp://HOST:PORT?node=ID[&replay=...&host=H&topic=BASE]")
    r.add_argument("--policy", choices=["prefix", "round-robin", "gpu-only"], default="prefix",
                   help="prefix: longest prefix (GPU, then memkv at its load cost), then load; "
                        "gpu-only: the same on GPU-cache events alone; round-robin")
    r.set_defaults(func=_route)
