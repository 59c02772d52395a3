"""Parsing of memkv URLs: ``memkv://HOST:PORT`` and ``etcd://HOST:PORT[,HOST:PORT]/CLUSTER``."""

from __future__ import annotations

from dataclasses import dataclass

from memkv.errors import InvalidArgument


@dataclass(frozen=True)
class NodeAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ParsedURL:
    scheme: str  # "memkv" | "etcd"
    nodes: tuple[NodeAddress, ...]  # memkv: the node; etcd: the etcd endpoints
    cluster: str = ""
    tls: bool = False  # memkvs:// (client/tls.py)
    # memkv://HOST:PORT/direct: that node only, even when it is one of the workers of a ``memkv serve
    # --workers N`` (tools and tests that look at one worker; clients route to all of them)
    direct: bool = False


def _hostport(text: str, default_port: int) -> NodeAddress:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    else:
        host, _, port = text.partition(":")
        port = port or str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"bad address {text!r} (want HOST:PORT)")
    return NodeAddress(host, int(port))


def parse_url(url: str) -> ParsedURL:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidArgument(f"bad URL {url!r}: want memkv://HOST:PORT or etcd://HOST:PORT/CLUSTER")
    if scheme in ("memkv", "memkvs"):  # memkvs: memkv over TLS
        addr, _, path = rest.rstrip("/").partition("/")
        if path not in ("", "direct"):
            raise InvalidArgument(f"bad URL {url!r}: want memkv://HOST:PORT or memkv://HOST:PORT/direct")
        return ParsedURL("memkv", (_hostport(addr, 7400),), tls=scheme == "memkvs", direct=path == "direct")
    if scheme == "etcd":
        hosts, _, cluster = rest.partition("/")
        if not cluster:
            raise InvalidArgument(f"bad URL {url!r}: etcd URLs name a cluster: etcd://HOST:PORT/CLUSTER")
        return ParsedURL("etcd", tuple(_hostport(h, 2379) for h in hosts.split(",") if h), cluster)
    raise InvalidArgument(f"unknown URL scheme {scheme!r}: want memkv:// or etcd://")
