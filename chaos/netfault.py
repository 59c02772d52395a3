"""Network faults between the processes of a local chaos cluster: delay, jitter, loss and
reordering per directed link (clients -> n2, n1 -> n3, n2 -> etcd, ...).

Everything runs inside the run's private network namespace (``python -m chaos`` re-executes
itself under ``unshare -n``), where every process talks over ``lo``. Packets are told apart
by who sent them and to which port:

- each node and etcd runs in a cgroup of its own (:mod:`chaos.cgroups`); the clients (the
  runner's load threads) are in none of them;
- when a connection starts (conntrack state NEW, in the mangle OUTPUT chain), its
  connmark records the initiator (``-m cgroup --path`` of the sending socket) and the
  acceptor (the destination port: a node's listen port, an etcd port);
- an impaired directed link A -> B is two rules: packets of A-initiated connections to B
  going in the ORIGINAL direction, and packets of B-initiated connections to A going in the
  REPLY direction, get the link's packet mark;
- marked packets go to NFQUEUE, where :mod:`chaos.nfqueue` holds each one for the link's
  delay +/- jitter, lets a ``reorder`` fraction overtake, and drops a ``loss`` fraction.

``tc qdisc ... netem`` would do the last step in the kernel; this kernel has no netem (see
:mod:`chaos.nfqueue`), so it is done in user space with the packets kept in the kernel.
Connections that existed before :meth:`NetFaults.start` carry no classification and are
never impaired: start it before any process of the run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.cgroups import ProcessGroups

CLIENTS = "clients"
ETCD = "etcd"
CHAIN, NEW_CHAIN, LINKS_CHAIN = "MEMKV-NET", "MEMKV-NET-NEW", "MEMKV-NET-LINKS"


class NetUnavailable(Exception):
    """Network faults cannot be injected here (the reason says why)."""


def iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["iptables", "-w", "-t", "mangle", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetUnavailable(f"iptables -t mangle {' '.join(args)}: {r.stderr.strip()}")
    return r


@dataclass
class LinkFault:
    mark: int
    pairs: list[tuple[str, str]]
    rules: list[list[str]]
    params: dict[str, float]

    def describe(self) -> str:
        links = ", ".join(f"{a}->{b}" for a, b in self.pairs)
        p = self.params
        return (f"{links}: delay {p['delay_ms']:.0f}±{p['jitter_ms']:.0f} ms, loss {p['loss']:.0%}, "
                f"reorder {p['reorder']:.0%}")


class NetFaults:
    """The classification rules, the NFQUEUE delayer process, and the impaired links."""

    QUEUE = 7

    def __init__(self, groups: ProcessGroups, *, seed: int = 0, log_path: Path | None = None) -> None:
        self.groups = groups
        self.seed = seed
        self.log_path = log_path
        self.ids: dict[str, int] = {CLIENTS: 0, ETCD: 63}
        self.ports: dict[str, list[int]] = {}
        self.proc: subprocess.Popen[str] | None = None
        self.faults: dict[int, LinkFault] = {}
        self._marks = itertools.count(1)
        self.started = False

    # -- members
    def member(self, name: str, ports: list[int]) -> None:
        """A process group (a node, or etcd) and the ports it accepts connections on."""
        if name not in self.ids:
            self.ids[name] = len([n for n in self.ids if n not in (CLIENTS, ETCD)]) + 1
            if self.ids[name] >= 63:
                raise NetUnavailable("more than 62 nodes")
        self.ports.setdefault(name, [])
        for p in ports:
            if p not in self.ports[name]:
                self.ports[name].append(p)
                if self.started:
                    self._classify_port(name, p)
        if self.started and name != CLIENTS:
            self._classify_group(name)

    def _classify_group(self, name: str) -> None:
        path = self.groups.net_path(name)
        if path is None:
            raise NetUnavailable("no writable cgroup v2 hierarchy (needed to tell processes apart)")
        self.groups.add(name)
        rule = ["-m", "cgroup", "--path", path, "-j", "CONNMARK", "--set-xmark", f"{self.ids[name] << 8:#x}/0xff00"]
        if iptables("-C", NEW_CHAIN, *rule, check=False).returncode != 0:
            iptables("-A", NEW_CHAIN, *rule)

    def _classify_port(self, name: str, port: int) -> None:
        iptables("-A", NEW_CHAIN, "-p", "tcp", "--dport", str(port), "-j", "CONNMARK", "--set-xmark",
                 f"{self.ids[name]:#x}/0xff")

    # -- life cycle
    def start(self) -> None:
        if self.groups.net is None:
            raise NetUnavailable("no writable cgroup v2 hierarchy (needed to tell processes apart)")
        for chain in (CHAIN, NEW_CHAIN, LINKS_CHAIN):
            iptables("-N", chain)
        iptables("-A", CHAIN, "-m", "conntrack", "--ctstate", "NEW", "-j", NEW_CHAIN)
        iptables("-A", CHAIN, "-j", LINKS_CHAIN)
        iptables("-A", CHAIN, "-m", "mark", "!", "--mark", "0", "-j", "NFQUEUE", "--queue-num", str(self.QUEUE),
                 "--queue-bypass")
        iptables("-I", "OUTPUT", "1", "-j", CHAIN)
        self.started = True
        for name, ports in self.ports.items():
            if name != CLIENTS:
                self._classify_group(name)
            for p in ports:
                self._classify_port(name, p)
        log = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "chaos.nfqueue", "--queue", str(self.QUEUE),
                                          "--seed", str(self.seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, cwd=Path(__file__).resolve().parents[1])
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith('{"ready"'):
            self.close()
            raise NetUnavailable(f"the NFQUEUE delayer did not start: {line.strip() or 'no output'}")

    def _send(self, msg: dict[str, Any]) -> str:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def stats(self) -> dict[str, int]:
        if self.proc is None or self.proc.poll() is not None:
            return {}
        return json.loads(self._send({"stats": True}) or "{}")

    def close(self) -> dict[str, int]:
        """Remove every rule, release every held packet; returns the delayer's counters."""
        for f in list(self.faults.values()):
            self.heal(f)
        if self.started:
            iptables("-D", "OUTPUT", "-j", CHAIN, check=False)
            for chain in (CHAIN, NEW_CHAIN, LINKS_CHAIN):
                iptables("-F", chain, check=False)
                iptables("-X", chain, check=False)
            self.started = False
        stats: dict[str, int] = {}
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()  # type: ignore[union-attr]
                out = self.proc.stdout.read().strip().splitlines()  # type: ignore[union-attr]
                stats = json.loads(out[-1]) if out else {}
            with contextlib.suppress(Exception):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc = None
        return stats

    # -- faults
    def impair(self, pairs: list[tuple[str, str]], *, delay_ms: float = 0.0, jitter_ms: float = 0.0,
               loss: float = 0.0, reorder: float = 0.0) -> LinkFault:
        """Impair the directed links ``pairs`` ((sender, receiver) names) until :meth:`heal`."""
        if not self.started:
            raise NetUnavailable("network faults were not started")
        mark = next(self._marks)
        params = {"delay_ms": float(delay_ms), "jitter_ms": float(jitter_ms), "loss": float(loss),
                  "reorder": float(reorder)}
        reply = self._send({"mark": mark, **params})
        if '"ok"' not in reply:
            raise NetUnavailable(f"the NFQUEUE delayer refused link {mark}: {reply}")
        rules = []
        for a, b in pairs:
            ia, ib = self.ids[a], self.ids[b]
            for conn, direction in (((ia << 8) | ib, "ORIGINAL"), ((ib << 8) | ia, "REPLY")):
                rule = ["-m", "connmark", "--mark", f"{conn:#x}/0xffff", "-m", "conntrack", "--ctdir", direction,
                        "-j", "MARK", "--set-mark", str(mark)]
                iptables("-A", LINKS_CHAIN, *rule)
                rules.append(rule)
        f = LinkFault(mark, list(pairs), rules, params)
        self.faults[mark] = f
        return f

    def heal(self, fault: LinkFault) -> None:
        for rule in fault.rules:
            iptables("-D", LINKS_CHAIN, *rule, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self._send({"mark": fault.mark})
        self.faults.pop(fault.mark, None)


def links(a: str | list[str], b: str | list[str], *, both: bool = True) -> list[tuple[str, str]]:
    """Directed pairs from every name in ``a`` to every name in ``b`` (and back with ``both``)."""
    aa = [a] if isinstance(a, str) else list(a)
    bb = [b] if isinstance(b, str) else list(b)
    out = [(x, y) for x in aa for y in bb if x != y]
    if both:
        out += [(y, x) for x, y in out]
    return out
