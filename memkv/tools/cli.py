"""The ``memkv`` command line: ``serve``, ``status``, ``demo``, ``bench`` here; ``up``
(memkv/tools/up.py), ``tenant``/``audit``/``purge`` (memkv/tools/admin.py), ``route``
(memkv/tools/route.py) and the rebalancer's ``rebalancer``/``drain``/``throttle``
(memkv/cluster/rebalance_cli.py) add their subcommands.

This layer sits above the node, the client and the cluster and is the one place
that puts them together: ``memkv serve`` builds a node (memkv/server/node.py)
and, with ``--etcd``, gives it its cluster membership, its etcd tenant source
and its RESP forwarder as extensions (memkv/server/extension.py). Cluster and
client modules are imported only by the subcommands that need them (they pull
in etcd and gRPC, which a standalone node never loads).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from memkv.config import NodeConfig
from memkv.errors import InvalidArgument, MemKVError


def build_node(cfg: NodeConfig) -> Any:
    """A node for ``cfg``: standalone, or with its cluster membership, etcd tenants and (with a
    RESP port) RESP forwarding."""
    from memkv.events.node import EventsConfig, NodeEvents
    from memkv.server.node import Node

    extensions: list[Any] = []
    events = EventsConfig.from_config(cfg)
    if events is not None:  # [events] endpoint / --kv-events: KV events for routers (memkv/events/node.py)
        extensions.append(NodeEvents(events))
    if cfg.etcd:
        from memkv.cluster.node_member import ClusterMember
        from memkv.cluster.tenant_source import EtcdTenants

        member = ClusterMember(cfg)
        extensions += [member, EtcdTenants(cfg)]
        if cfg.resp_port is not None:
            from memkv.cluster.forwarding import ClientForwarder

            # over TLS with the cluster CA when the nodes serve TLS (memkv/cluster/identity.py)
            extensions.append(ClientForwarder(cfg, tls=lambda: member.credentials.tls))
    return Node(cfg, extensions=extensions)


def _serve(args: argparse.Namespace) -> int:
    """One node in this process (``--workers 1``, the default), or a supervisor of N worker
    processes (memkv/tools/workers.py), each of which is this command again with ``--workers 1``."""
    import trio

    from memkv.config import load_config
    from memkv.server.node import run_node
    from memkv.sizes import parse_size

    cfg = load_config(args.config)
    for flag in ("listen", "data_dir", "etcd", "cluster", "node_id", "zone", "host_id", "workers", "worker_ports",
                 "metrics_port", "resp_port", "shm_dir"):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(cfg, flag, value)
    if args.worker_addrs:
        cfg.worker_addrs = args.worker_addrs.split(",")
    for flag in ("tls_cert", "tls_key", "tls_ca"):  # [tls] cert/key/ca (memkv/server/tls.py)
        if getattr(args, flag, None):
            cfg.extra.setdefault("tls", {})[flag[4:]] = getattr(args, flag)
    if args.kv_events:
        cfg.extra.setdefault("events", {})["endpoint"] = args.kv_events
    if args.memory is not None:
        cfg.memory = parse_size(args.memory)
    if args.disk is not None:
        cfg.disk = parse_size(args.disk)
    if args.worker_memory is not None:  # SIZE (each worker) or SIZE,SIZE,... (one per worker)
        cfg.worker_memory = [parse_size(x.strip()) for x in args.worker_memory.split(",")]
    for flag in ("segment_size", "compaction_rate"):
        if getattr(args, flag, None) is not None:
            setattr(cfg, flag, parse_size(getattr(args, flag)))
    from memkv.tools.workers import run_workers, worker_count

    n = worker_count(cfg.workers)
    if n > 1:
        # the flags every worker shares; each worker's own (port, data dir, memory, ids) come from its plan
        shared = [f"--{flag.replace('_', '-')}={getattr(args, flag)}"
                  for flag in ("config", "etcd", "cluster", "zone", "shm_dir", "segment_size", "compaction_rate",
                               "tls_cert", "tls_key", "tls_ca") if getattr(args, flag, None) is not None]
        try:
            ports = [int(p) for p in cfg.worker_ports.split(",")] if cfg.worker_ports else None
        except ValueError:
            raise InvalidArgument(f"--worker-ports must be comma-separated port numbers, not "
                                  f"{cfg.worker_ports!r}") from None
        return run_workers(cfg, n, shared, ports)
    trio.run(run_node, build_node(cfg))
    return 0


def _status(args: argparse.Namespace) -> int:
    from memkv.tools.status import show_status

    return show_status(args.url, as_json=args.json)


def _demo(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        from memkv.tools.demo_vllm import run_demo_vllm

        return run_demo_vllm(json_path=args.json, nodes=args.nodes or 1)
    from memkv.tools.demo import run_demo

    return run_demo(json_path=args.json, nodes=args.nodes or 2)


def _bench(args: argparse.Namespace) -> int:
    from memkv.tools.quickbench import run_quickbench

    return run_quickbench(args.url, value_size=args.value_size, count=args.count, batch=args.batch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memkv", description="memkv: distributed context memory for LLM inference")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a storage node")
    s.add_argument("--config", help="TOML config file (namespaces, tenants, node settings)")
    s.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:7400)")
    s.add_argument("--data-dir", dest="data_dir", help="directory for the durable flash tier")
    s.add_argument("--memory", help="region size, e.g. 512MiB, 4GiB")
    s.add_argument("--disk", help="flash tier budget, e.g. 20GiB")
    s.add_argument("--segment-size", dest="segment_size", help="flash segment file size (default 64MiB)")
    s.add_argument("--compaction-rate", dest="compaction_rate",
                   help="flash compaction I/O budget per second, e.g. 32MiB (0 = unthrottled)")
    s.add_argument("--etcd", help="etcd HOST:PORT[,HOST:PORT]; omit for a standalone node")
    s.add_argument("--cluster", help="cluster name in etcd")
    s.add_argument("--node-id", dest="node_id")
    s.add_argument("--zone")
    s.add_argument("--host-id", dest="host_id",
                   help="the machine this node runs on (default the hostname): replicas go to distinct hosts")
    s.add_argument("--workers", help="worker processes (a number, or 'auto' = the cores; default 1): each with "
                   "its share of --memory, its own port (--listen's, then the next ones) and DATA_DIR/worker-I")
    s.add_argument("--worker-ports", dest="worker_ports", help="the workers' ports, comma-separated (default: "
                   "--listen's port and the ones after it)")
    s.add_argument("--worker-memory", dest="worker_memory", metavar="SIZE[,SIZE...]",
                   help="each worker's region: one size for all, or one per worker (default: --memory split evenly)")
    s.add_argument("--worker-addrs", dest="worker_addrs", help=argparse.SUPPRESS)  # set by the supervisor
    s.add_argument("--shm-dir", dest="shm_dir", help="where the region file lives (default /dev/shm)")
    s.add_argument("--metrics-port", dest="metrics_port", type=int, help="Prometheus /metrics port")
    s.add_argument("--resp-port", dest="resp_port", type=int, help="Redis-protocol (RESP) port")
    s.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate (chain): serve TLS")
    s.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    s.add_argument("--tls-ca", dest="tls_ca", help="PEM CA bundle: require client certificates it signed")
    s.add_argument("--kv-events", dest="kv_events", metavar="ENDPOINT",
                   help="publish KV events for routers in vLLM's format on this ZMQ endpoint, e.g. tcp://*:5557; "
                        "replays on the next port unless [events] replay_endpoint says otherwise "
                        "([events] endpoint, replay_endpoint, topic)")
    s.set_defaults(func=_serve)

    st = sub.add_parser("status", help="nodes, slots, bytes, hit rates, migrations")
    st.add_argument("url", help="memkv://HOST:PORT or etcd://HOST:PORT/CLUSTER")
    st.add_argument("--json", action="store_true", help="print raw JSON")
    st.set_defaults(func=_status)

    d = sub.add_parser("demo", help="start a local node/cluster and run a workload")
    d.add_argument("--json", help="also write the results as JSON to this file")
    d.add_argument("--nodes", type=int, default=None,
                   help="storage nodes: 2+ start a local cluster (etcd + nodes), 1 a standalone node "
                        "(default 2; 1 with --engine vllm)")
    d.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                   help="replicas: transformers processes (default, quick) or vLLM engine processes "
                        "(needs the vllm extra)")
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="quick put/get benchmark against a running node or cluster")
    b.add_argument("url")
    b.add_argument("--value-size", dest="value_size", default="64KiB")
    b.add_argument("--count", type=int, default=2000)
    b.add_argument("--batch", type=int, default=16)
    b.set_defaults(func=_bench)

    from memkv.cluster.rebalance_cli import add_parsers as rebalance_parsers
    from memkv.tools.admin import add_parsers as admin_parsers
    from memkv.tools.route import add_parsers as route_parsers
    from memkv.tools.up import add_parsers as up_parsers

    for add in (up_parsers, rebalance_parsers, admin_parsers, route_parsers):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MemKVError as exc:
        print(f"memkv: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
