"""Registers ``memkv route`` with the CLI; the router itself (``front``) is imported only when it runs."""

from __future__ import annotations

import argparse
from typing import Any

from memkv.cli import EXTRA_PARSERS


def _run(args: argparse.Namespace) -> int:
    from memkv.client.router.front import run_route

    return run_route(args)


def add_parser(sub: Any) -> None:
    r = sub.add_parser("route", help="OpenAI-compatible prefix-aware router in front of engine replicas")
    r.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT to serve HTTP on")
    r.add_argument("--backend", action="append", default=[], required=True,
                   help="http://HOST:PORT of an engine replica [?events=tcp://H:P&replay=tcp://H:P&topic=T"
                        "&model=M&namespace=NS&host=H&name=N&block_size=B]")
    r.add_argument("--store", action="append", default=[],
                   help="a memkv node's KV-event endpoint: tcp://HOST:PORT?node=ID[&replay=...&host=H&topic=BASE]")
    r.add_argument("--policy", choices=["prefix", "round-robin"], default="prefix",
                   help="prefix: longest prefix (GPU, then memkv at its load cost), then load; round-robin")
    r.set_defaults(func=_run)


EXTRA_PARSERS.append(add_parser)
