"""The harsher faults (issue 19 item 3): network quality, clock skew, slow disk, memory
pressure, etcd member loss. Each scenario injects and heals its faults while the load runs;
besides the history checker's invariants it checks, with ``ctx.expect``, the behaviour
memkv promises under that fault (docs/chaos.md, "What memkv promises under each fault").

How each fault is made (local target, :class:`chaos.targets.LocalTarget`):
- network: :mod:`chaos.netfault` (iptables marks per directed link + NFQUEUE delayer);
- clocks and fsync: the fault shim preloaded into every node (:mod:`chaos.faultshim`);
- memory: the node's memory cgroup, limited, plus a hog process in the same group;
- etcd: three members, one killed with SIGKILL.
"""

from __future__ import annotations

import time
from typing import Any

from chaos.checker import deleted_meanwhile, first_deletes
from chaos.ctx import Ctx, open_probe, probe_get
from chaos.history import Op, crc
from chaos.load import BLOCKS_NS, SESSION_NS, make_value
from chaos.netfault import CLIENTS, ETCD, links
from chaos.targets import Unsupported
from chaos.worker import ProcessWorker
from memkv.client import SyncClient
from memkv.client.cluster_map import key_slot


def errors_between(ctx: Ctx, t0: float, t1: float, error: str, op: str = "put") -> int:
    """Load ops of kind ``op`` issued in [t0, t1) that failed with ``error`` (class name)."""
    return sum(1 for o in list(ctx.rec.history.ops)
               if o.phase == "load" and o.op == op and t0 <= o.t0 < t1 and o.error == error)


def acked_between(ctx: Ctx, t0: float, t1: float, op: str = "put") -> int:
    return sum(1 for o in list(ctx.rec.history.ops) if o.phase == "load" and o.op == op and t0 <= o.t0 < t1 and o.acked)


def watch_registered(ctx: Ctx, nodes: set[str], seconds: float) -> tuple[int, int]:
    """Poll the cluster state for ``seconds``: (polls where one of ``nodes`` was not registered,
    polls that answered). etcd errors of the runner's own client are not counted."""
    missing = answered = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            st = ctx.target.state()
        except Exception:  # noqa: BLE001 - etcd blip seen by the runner itself
            time.sleep(0.2)
            continue
        answered += 1
        if not nodes <= set(st.nodes):
            missing += 1
        time.sleep(0.2)
    return missing, answered


# -- network quality
def net_slow_clients(ctx: Ctx) -> None:
    """Delay, jitter and reordering, then packet loss, between the clients and one node (both ways)."""
    v, t, p = ctx.victim, ctx.target, ctx.p
    hold = float(p.get("hold_s", 6.0))
    h = t.net_impair(links(CLIENTS, v), delay_ms=p.get("delay_ms", 80), jitter_ms=p.get("jitter_ms", 60),
                     reorder=p.get("reorder", 0.2))
    ctx.fault(h.describe())
    ctx.sleep(hold)
    t.net_heal(h)
    h = t.net_impair(links(CLIENTS, v), delay_ms=5, jitter_ms=5, loss=p.get("loss", 0.1))
    ctx.fault(h.describe())
    ctx.sleep(hold)
    t.net_heal(h)
    ctx.heal(f"clients<->{v} healed")
    ctx.info(f"delayer: {t.net.stats() if t.net is not None else {}}")


def net_flaky_nodes(ctx: Ctx) -> None:
    """Lossy, jittery, reordering links between every pair of nodes and to etcd while one node
    is lost (slots re-replicated over those links) and comes back."""
    t, p = ctx.target, ctx.p
    nodes = sorted(t.nodes)
    victim = str(p.get("kill", nodes[-1]))
    between = t.net_impair(links(nodes, nodes, both=False), delay_ms=p.get("delay_ms", 40),
                           jitter_ms=p.get("jitter_ms", 30), loss=p.get("loss", 0.03), reorder=p.get("reorder", 0.1))
    ctx.fault(between.describe())
    to_etcd = t.net_impair(links(nodes, ETCD), delay_ms=p.get("etcd_delay_ms", 30), jitter_ms=20,
                           loss=p.get("etcd_loss", 0.02))
    ctx.fault(to_etcd.describe())
    ctx.sleep(2.0)
    t.kill(victim)
    ctx.fault(f"kill -9 {victim}")
    ctx.wait_gone(victim)
    ctx.wait_converged()  # re-replicated over the impaired links
    ctx.info(f"{victim}'s slots re-replicated over the impaired links")
    t.start(victim)
    ctx.heal(f"restart {victim}")
    ctx.wait_member(victim)
    ctx.wait_converged()  # and copied back to it
    t.net_heal(between)
    t.net_heal(to_etcd)
    ctx.heal("links healed")
    ctx.info(f"delayer: {t.net.stats() if t.net is not None else {}}")


# -- clocks
def clock_skew_node(ctx: Ctx) -> None:
    """One node's wall clock 3 min ahead, then 7 min behind: writes are accepted while its clock
    is within 5 min of the writers', refused with a typed error beyond; its etcd lease holds."""
    v, t, p = ctx.victim, ctx.target, ctx.p
    hold = float(p.get("hold_s", 5.0))
    ahead, behind = float(p.get("ahead_s", 180)), float(p.get("behind_s", -420))
    t.clock_skew(v, ahead)
    t_ahead = ctx.fault(f"{v} clock {ahead:+.0f} s")
    missing_a, polls_a = watch_registered(ctx, {v}, hold)
    t.clock_skew(v, behind)
    t_behind = ctx.fault(f"{v} clock {behind:+.0f} s")
    missing_b, polls_b = watch_registered(ctx, {v}, hold)
    t.clock_skew(v, 0)
    t_heal = ctx.heal(f"{v} clock back")
    ctx.sleep(1.0)
    refused_ahead = errors_between(ctx, t_ahead, t_behind, "InvalidArgument")
    refused_behind = errors_between(ctx, t_behind + 0.3, t_heal, "InvalidArgument")  # shim re-reads in <= 0.1 s
    ctx.info(f"writes acknowledged / refused (InvalidArgument): ahead {acked_between(ctx, t_ahead, t_behind)} / "
             f"{refused_ahead}, behind {acked_between(ctx, t_behind, t_heal)} / {refused_behind}")
    ctx.expect(refused_ahead == 0, f"no write refused while {v} is ahead ({refused_ahead})")
    if behind < -300:
        ctx.expect(refused_behind > 0, f"writes replicated on {v} refused while it is >5 min behind "
                                       f"({refused_behind} refused)")
    ctx.expect(missing_a + missing_b == 0, f"{v} kept its etcd lease while skewed (missing in "
                                           f"{missing_a + missing_b} of {polls_a + polls_b} polls)")


# -- disks
def slow_fsync(ctx: Ctx) -> None:
    """One node's fsyncs take 300 ms, then 2 s (past the client timeout); then it is killed -9 with
    writes waiting on fsync, and restarted: nothing acknowledged is lost."""
    v, t, p = ctx.victim, ctx.target, ctx.p
    hold = float(p.get("hold_s", 5.0))
    t.slow_fsync(v, float(p.get("slow_ms", 300)))
    t1 = ctx.fault(f"{v} fsync +{p.get('slow_ms', 300)} ms")
    ctx.sleep(hold)
    t.slow_fsync(v, float(p.get("stall_ms", 2000)))
    t2 = ctx.fault(f"{v} fsync +{p.get('stall_ms', 2000)} ms")
    ctx.sleep(hold)
    t.kill(v)
    t3 = ctx.fault(f"kill -9 {v} with writes waiting on fsync")
    t.slow_fsync(v, 0)
    ctx.sleep(float(p.get("down_s", 1.0)))
    t.start(v)
    ctx.heal(f"restart {v}, fsync normal")
    limit = float(p["timeout"])
    gave_up = sum(1 for o in list(ctx.rec.history.ops) if o.phase == "load" and o.op == "put" and o.acked
                  and t2 <= o.t0 < t3 and o.t1 - o.t0 >= limit)
    ctx.info(f"writes acknowledged: slow {acked_between(ctx, t1, t2)}, stalled {acked_between(ctx, t2, t3)}, of "
             f"which {gave_up} only after the client's {limit:.1f} s timeout on {v} (relayed to it by the other "
             f"replica: acks = all)")


# -- memory
def _acked_keys_on(ctx: Ctx, node_id: str, before: float) -> list[tuple[str, int]]:
    """(key, crc) of write-once keys acknowledged before ``before`` whose slot lists ``node_id``."""
    sm = ctx.target.state().slotmap
    out = []
    for o in list(ctx.rec.history.ops):
        if o.op == "put" and o.acked and o.ns == BLOCKS_NS and o.phase == "load" and o.t1 < before:
            if node_id in sm.table[key_slot(o.key.encode(), sm.slots)]:
                out.append((o.key, o.crc))
    return out


def oom_kill(ctx: Ctx) -> None:
    """A memory limit on one node's cgroup and a process pressing on it: the kernel OOM-kills the
    node; it restarts and serves every durable value it had acknowledged, from its own disk."""
    v, t, p = ctx.victim, ctx.target, ctx.p
    usage = t.memory_usage(v)
    headroom = int(p.get("headroom_mib", 16)) << 20
    t.memory_limit(v, usage + headroom)
    ctx.fault(f"{v} memory limit {(usage + headroom) >> 20} MiB (using {usage >> 20} MiB)")
    hog = t.memory_hog(v, int(p.get("hog_mib", 96)))
    t_hog = ctx.fault(f"memory hog in {v}'s cgroup")
    deadline = time.monotonic() + float(p.get("oom_timeout_s", 30))
    while t.running(v) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = not t.running(v)
    t_dead = ctx.rec.now()
    rc = t.nodes[v].proc.returncode if killed else None
    ooms = t.oom_kills(v)
    t.end_hog(hog)
    t.memory_limit(v, None)
    ctx.expect(killed and ooms >= 1, f"the kernel OOM-killed {v} (exit {rc}, oom_kill count {ooms}, "
                                     f"{t_dead - t_hog:.1f} s after the hog started)")
    if not killed:
        t.kill(v)
    ctx.fault(f"{v} OOM-killed" if killed else f"{v} not OOM-killed: kill -9")
    # writes acknowledged before the pressure began: the node had them on disk (a write racing the kill may
    # have been acknowledged by the other replica alone, the killed one skipped as dead)
    expected = _acked_keys_on(ctx, v, t_hog)
    t.start(v)
    ctx.heal(f"restart {v} without the limit")
    with open_probe(ctx, v, epoch=None, timeout=5.0) as c:
        ops: list[Op] = [probe_get(ctx, c, key) for key, _ in expected]
    gone = first_deletes(list(ctx.rec.history.ops))  # (the load's deletes: a miss of a deleted key is no loss)
    bad = [o for o, (_, want) in zip(ops, expected, strict=True)
           if not (o.acked and o.crc == want) and not deleted_meanwhile(o, gone)]
    ctx.expect(not bad and bool(expected), f"{v} served all {len(expected)} durable values it had acknowledged "
                                           f"before the OOM kill from its own disk ({len(bad)} not)")


# -- etcd
def etcd_member_kill(ctx: Ctx) -> None:
    """A 3-member etcd: kill -9 the raft leader, later a follower (each down for several lease
    TTLs, then restarted): nodes keep their leases through the surviving members."""
    t, p = ctx.target, ctx.p
    if len(getattr(t, "etcd_members", ())) < 3:
        raise Unsupported("needs a 3-member etcd (etcd_members=3)")
    hold = float(p.get("hold_s", ctx.ttl * 3))
    nodes = set(t.alive())
    total_missing = total_polls = 0
    killed: list[int] = []
    for role in ("leader", "follower"):
        leader = t.etcd_leader()
        if leader is None:
            raise RuntimeError("no etcd leader found")
        members = len(t.etcd_members)
        victim = leader if role == "leader" else next(
            i for i in range(members) if i != leader and i not in killed)  # a member not killed before
        name = t.etcd_member_name(victim)
        t.etcd_member_kill(victim)
        killed.append(victim)
        ctx.fault(f"kill -9 etcd member {name} ({role})")
        missing, polls = watch_registered(ctx, nodes, hold)
        total_missing += missing
        total_polls += polls
        t.etcd_member_start(victim)
        ctx.heal(f"restart etcd member {name}")
        ctx.sleep(2.0)
    ctx.expect(total_missing == 0, f"every node stayed registered while one etcd member was down "
                                   f"(missing in {total_missing} of {total_polls} polls)")



def clock_skew_client(ctx: Ctx) -> None:
    """A client process whose clock is 3 min, then 7 min ahead: its writes are accepted within
    5 min of the nodes' clocks and refused (typed) beyond. Last writer wins by version: a blind
    overwrite by a correct client just after it loses; one made after reading the key wins (HLC)."""
    t, p = ctx.target, ctx.p
    hold = float(p.get("hold_s", 5.0))
    ahead, far = float(p.get("ahead_s", 180)), float(p.get("far_s", 420))
    env, clock = t.client_faults("skewed")
    clock.skew(ahead)
    url = t.url
    common = ["--url", url, "--timeout", str(p["timeout"]), "--value-size", str(p["value_size"])]
    skewed = ProcessWorker(ctx.rec, ["load", *common, "--wid", "50", "--run-id", f"skew{ctx.rec.start:.0f}",
                                     "--rate", str(p.get("skewed_rate", 20))], env=env)
    try:
        t_a = ctx.fault(f"a client (own process, own keys) with its clock {ahead:+.0f} s")
        ctx.sleep(hold)
        clock.skew(far)
        t_far = ctx.fault(f"that client's clock {far:+.0f} s")
        ctx.sleep(hold)
        clock.skew(ahead)
        t_back = ctx.info(f"that client's clock {ahead:+.0f} s again")
        ctx.sleep(1.0)
    finally:
        err = skewed.stop()
    mine = [o for o in skewed.ops if o.op == "put"]
    acked_a = sum(o.acked for o in mine if t_a <= o.t0 < t_far)
    refused_far = sum(o.error == "InvalidArgument" for o in mine if t_far + 0.3 <= o.t0 < t_back)
    acked_far = sum(o.acked for o in mine if t_far + 0.3 <= o.t0 < t_back)
    ctx.expect(acked_a > 0 and all(o.acked for o in mine if t_a <= o.t0 < t_far),
               f"every write of the client {ahead:+.0f} s ahead acknowledged ({acked_a})"
               + ("" if mine else f"; worker stderr: {err}"))
    ctx.expect(refused_far > 0 and acked_far == 0, f"every write of the client {far:+.0f} s ahead refused with "
                                                   f"InvalidArgument ({refused_far} refused, {acked_far} acked)")
    # last writer wins by version (HLC): a blind overwrite loses, one made after reading wins
    key = f"skew/{ctx.rec.start:.0f}/k"

    def put_skewed(tag: str) -> None:
        w = ProcessWorker(ctx.rec, ["put", *common, "--ns", SESSION_NS, "--key", key, "--tag", tag], env=env)
        w.stop()

    def current() -> int | None:
        with SyncClient.connect(url, transport="tcp", timeout=5.0) as c:
            got = c.get(key, namespace=SESSION_NS)
        return None if got is None else crc(got)

    put_skewed("skewed-1")
    blind = make_value(key, "correct-blind", 256)
    with SyncClient.connect(url, transport="tcp", timeout=5.0) as c:
        t0 = ctx.rec.now()
        c.put(key, blind, namespace=SESSION_NS)
        ctx.rec.add(Op("put", key, t0, ctx.rec.now(), True, "ok", crc(blind), SESSION_NS, phase="probe"))
    after_blind = current()
    ctx.expect(after_blind == crc(make_value(key, "skewed-1", int(p["value_size"]))),
               "a blind overwrite by a correct client, just after the skewed client's write, loses to it "
               "(last writer by version)")
    read_then = make_value(key, "correct-after-read", 256)
    with SyncClient.connect(url, transport="tcp", timeout=5.0) as c:
        c.get(key, namespace=SESSION_NS)  # the reply's version moves this process's clock past it
        t0 = ctx.rec.now()
        c.put(key, read_then, namespace=SESSION_NS)
        ctx.rec.add(Op("put", key, t0, ctx.rec.now(), True, "ok", crc(read_then), SESSION_NS, phase="probe"))
    ctx.expect(current() == crc(read_then), "an overwrite by a correct client after it read the key wins (HLC)")
    ctx.heal("skewed client stopped")


def keys_on(ctx: Ctx, sm: Any, owners: set[str], tag: str, count: int) -> list[str]:
    """``count`` fresh keys whose slot's replicas are exactly ``owners``."""
    keys: list[str] = []
    for i in range(200_000):
        k = f"{tag}/{ctx.rec.start:.0f}/{i}"
        if set(sm.table[key_slot(k.encode(), sm.slots)]) == owners:
            keys.append(k)
            if len(keys) >= count:
                break
    return keys


def put_recorded(ctx: Ctx, keys: list[str], tag: str) -> list[tuple[str, bytes]]:
    """Durable writes of ``keys`` by a cluster client of the scenario's own (worker -1), recorded in the
    history (so the read-back checks them); the acknowledged ones, with their values."""
    acked = []
    with SyncClient.connect(ctx.target.url, transport="tcp", timeout=float(ctx.p["timeout"])) as c:
        for k in keys:
            value = make_value(k, tag, 256)
            t0 = ctx.rec.now()
            try:
                c.put(k, value, namespace=BLOCKS_NS)
                ctx.rec.add(Op("put", k, t0, ctx.rec.now(), True, "ok", crc(value), BLOCKS_NS, worker=-1))
                acked.append((k, value))
            except Exception as exc:  # noqa: BLE001 - recorded as an unacknowledged write
                ctx.rec.add(Op("put", k, t0, ctx.rec.now(), False, "error", crc(value), BLOCKS_NS,
                               type(exc).__name__, worker=-1))
    return acked


def lost_single_copy(ctx: Ctx) -> None:
    """An acknowledged durable write survives the loss of any one node, even when it was made while
    a replica was cut off: first the clients only are cut from one replica (every packet lost both
    ways; it keeps its etcd lease and its links to the other nodes), so writes to its slots reach it
    relayed by the other owner; then its port is cut for everyone (clients and nodes; lease kept),
    so no write to its slots may be acknowledged. The other owner is then lost with its disk
    (kill -9, data directory removed) past its lease, its slots are re-replicated from the replica
    that was cut off, and it comes back empty: every acknowledged write must still be there."""
    t, p = ctx.target, ctx.p
    cut, holder = ctx.victim, str(p.get("holder", "n3"))
    sm = t.state().slotmap
    keys = keys_on(ctx, sm, {cut, holder}, "single", int(p.get("keys", 10)))
    h = t.net_impair(links(CLIENTS, cut), loss=1.0)
    ctx.fault(f"clients <-> {cut}: every packet lost ({cut} keeps its lease and its links to the nodes)")
    relayed = put_recorded(ctx, keys, "single")
    t.net_heal(h)
    ctx.heal(f"clients <-> {cut} healed")
    ctx.info(f"{len(relayed)} of {len(keys)} writes to slots on {{{cut}, {holder}}} acknowledged while the clients "
             f"could not reach {cut}")
    ctx.expect(len(relayed) == len(keys), f"{len(relayed)} of {len(keys)} writes acknowledged while only the clients "
                                          f"were cut from {cut} (each must reach it relayed by {holder})")
    alone = keys_on(ctx, sm, {cut, holder}, "alone", int(p.get("keys_cut", 5)))
    h = t.partition_clients(cut)  # its port: clients and nodes alike
    ctx.fault(f"partition everyone -> {cut} ({cut} keeps its lease)")
    acked = put_recorded(ctx, alone, "alone")
    t.heal(h)
    ctx.heal(f"heal everyone -> {cut}")
    ctx.info(f"{len(acked)} of {len(alone)} writes to slots on {{{cut}, {holder}}} acknowledged while nobody could "
             f"reach {cut} (each needs it: NotEnoughReplicas)")
    t.kill(holder)
    t.wipe(holder)
    ctx.fault(f"kill -9 {holder}, its data directory removed")
    ctx.wait_gone(holder)
    ctx.wait_converged()
    t.start(holder)
    ctx.heal(f"restart {holder} on an empty disk")
    ctx.wait_member(holder)


def rereplicate_flash_only(ctx: Ctx) -> None:
    """Small regions (most durable values only on flash), kill -9 one node past its lease: its
    slots are re-replicated from copies that must be read in from flash, then copied back."""
    v = ctx.victim
    ctx.target.kill(v)
    ctx.fault(f"kill -9 {v} (values mostly on flash: region {ctx.p['memory']})")
    ctx.sleep(float(ctx.p.get("down_s", ctx.ttl + 2)))
    ctx.target.start(v)
    ctx.heal(f"restart {v}")



def both_replicas_crash(ctx: Ctx) -> None:
    """kill -9 both replicas of a set of slots at once; restart one, read back at once the durable
    writes acknowledged on those slots before the crash (the other still down), then restart the
    other. Their values are on both disks: the slots must wait for their owners and be served by
    the first one back, not be handed to nodes holding none of them (docs/chaos.md, finding 6)."""
    t, p = ctx.target, ctx.p
    a, b = ctx.victim, str(p.get("second", "n3"))
    sm = t.state().slotmap
    acked = put_recorded(ctx, keys_on(ctx, sm, {a, b}, "both", int(p.get("keys", 40))), "both")
    t.kill(a)
    t.kill(b)
    ctx.fault(f"kill -9 {a} and {b} ({sum(1 for row in sm.table if set(row) == {a, b})} slots had both replicas "
              f"on them; {len(acked)} durable writes to those slots acknowledged just before)")
    ctx.wait(lambda st: a not in st.nodes and b not in st.nodes, ctx.ttl * 4 + 20, f"{a} and {b} unregistered")
    ctx.sleep(float(p.get("down_s", 1.0)))
    t.start(a)
    ctx.heal(f"restart {a}")
    ctx.wait(lambda st: a in st.nodes, 60.0, f"{a} registered again")
    served = 0
    with SyncClient.connect(t.url, transport="tcp", timeout=float(p["timeout"])) as c:
        for k, value in acked:
            try:
                served += c.get(k, namespace=BLOCKS_NS) == value
            except Exception:  # noqa: BLE001 - counted as not served
                pass
    ctx.expect(served == len(acked), f"{served} of {len(acked)} values acknowledged on {{{a}, {b}}} served as soon as "
                                     f"{a} was back ({b} still down)")
    t.start(b)
    ctx.heal(f"restart {b}")
    ctx.wait_member(a)
    ctx.wait_member(b)
