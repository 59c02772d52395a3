"""The node's request path: every request passes the same stages, in one order, then runs.

The order, for every front end (binary protocol, RESP) and every kind of
request, is the tuple the node builds once (``Node.__init__``, from
:func:`stage_order`)::

    Authenticate   logged in where the node has tenants; revoked tenants refused   (stages.Authenticate)
    RateLimit      the tenant's token bucket                                       (stages.RateLimit)
    Route          cluster: fenced node, MOVED at the client's epoch, forwarding   (stages.Route)
    Grants         namespace grant, admin, cluster identity, writing for others    (stages.Grants)
    NoStore        DRAM-only writes: no flash record, TTL capped                   (stages.NoStore)
    InFlight       payload bytes in flight per connection and per tenant           (stages.InFlight)
    Audit          after the operation: who wrote, deleted, pinned what            (stages.Audit)
    Promote        reads of flash-only values bring them into the region first     (stages.Promote)

then the operation itself (memkv/server/operations.py, or an operation a
subsystem registered: memkv/server/extension.py). A stage that has nothing to
do for a kind of request is left out of that kind's plan when the pipeline is
built, so a GET on a standalone node without tenants passes two checks that
return at once. The pipeline is immutable: its stages, operation table and
per-kind plans are fixed at construction.

Writes take two steps so that payload bytes land straight in the region:
``begin_put`` (the stages, then room reserved), the connection receives the
payload, ``finish_put`` (commit, audit) or ``abort_put``. A put whose values are
already in hand (RESP) is ``put``. A request whose keys another node serves
(RESP in a cluster: the routing stage marks them) runs here for its local keys
and through the forwarder for the others.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from memkv.errors import InvalidArgument
from memkv.flash.tier import FlashTier
from memkv.server.extension import Forwarder, Operation
from memkv.server.operations import Operations, PutPlan, Written
from memkv.server.requests import Put, Request
from memkv.server.session import Session
from memkv.server.stages import Stage

NOT_FORWARDED = "this command is not forwarded to the node owning the key; connect to that node's RESP port"


class Plan:
    """One kind of request's path: the hooks of the stages that apply to it, and its operation."""

    __slots__ = ("checks", "dones", "releases", "run", "is_async", "writes")

    def __init__(self, op: Operation, stages: Sequence[Stage]) -> None:
        active = [s for s in stages if s.applies(op.kind, op.access)]
        self.checks: tuple[Callable[..., Any], ...] = tuple(s.check for s in active if s.check is not None)
        self.dones: tuple[Callable[..., Any], ...] = tuple(s.done for s in active if s.done is not None)
        self.releases: tuple[Callable[..., Any], ...] = tuple(s.release for s in active if s.release is not None)
        self.run = op.run
        self.is_async = inspect.iscoroutinefunction(op.run)
        self.writes = op.access.write


class Pipeline:
    __slots__ = ("stages", "operations", "plans", "engine", "forwarder", "tier", "_frozen")

    def __init__(self, stages: Sequence[Stage], operations: Mapping[str, Operation], engine: Operations, *,
                 forwarder: Forwarder | None = None, tier: FlashTier | None = None) -> None:
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.operations: Mapping[str, Operation] = MappingProxyType(dict(operations))
        self.plans: Mapping[str, Plan] = MappingProxyType({k: Plan(op, self.stages) for k, op in operations.items()})
        self.engine = engine
        self.forwarder = forwarder
        self.tier = tier
        self._frozen = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"the pipeline is fixed once built (cannot set {name!r})")
        object.__setattr__(self, name, value)

    def describe(self) -> list[str]:
        """The stage order, for docs and status: ``["authenticate", "rate limit", ...]``."""
        return [s.name for s in self.stages]

    # -- one request
    def run(self, session: Session, req: Request) -> Any:
        """Pass ``req`` through the stages and run its operation: the result, or an awaitable of it
        (a stage had to wait -- a flash promotion --, the operation is asynchronous, or keys are
        forwarded)."""
        plan = self.plans[req.kind]
        checks = plan.checks
        for check in checks:
            pending = check(session, req)
            if pending is not None:  # (rare: no enumerate on the hot path)
                return self._run_after(pending, checks[checks.index(check) + 1:], session, req, plan)
        return self._execute(session, req, plan)

    async def _run_after(self, pending: Awaitable[None], rest: tuple[Callable[..., Any], ...], session: Session,
                         req: Request, plan: Plan) -> Any:
        await pending
        for check in rest:
            more = check(session, req)
            if more is not None:
                await more
        result = self._execute(session, req, plan)
        return (await result) if inspect.isawaitable(result) else result

    def _execute(self, session: Session, req: Request, plan: Plan) -> Any:
        if req.remote is not None:
            return self._forward(session, req, plan)
        if plan.is_async:
            return self._execute_async(session, req, plan)
        tier = self.tier if plan.writes else None
        if tier is not None:
            tier.touched = 0
        result = plan.run(session, req)
        if tier is not None:
            req.durable = tier.touched  # a durable delete's tombstone: the reply waits for it
        for done in plan.dones:
            done(session, req, result)
        return result

    async def _execute_async(self, session: Session, req: Request, plan: Plan) -> Any:
        result = await plan.run(session, req)
        for done in plan.dones:
            done(session, req, result)
        return result

    async def _forward(self, session: Session, req: Request, plan: Plan) -> list[Any]:
        """Run the local keys here and the others through the forwarder; results in key order."""
        fwd = self.forwarder
        remote = req.remote or []
        kind = req.kind
        if fwd is None or kind not in ("GET", "PEEK", "DELETE"):
            raise InvalidArgument(NOT_FORWARDED)
        far = set(remote)
        out: list[Any] = [None] * len(req.keys)
        here = [i for i in range(len(req.keys)) if i not in far]
        if here:
            local = req.subset(here)
            result = self._execute(session, local, plan)
            if inspect.isawaitable(result):
                result = await result
            for i, r in zip(here, result, strict=True):
                out[i] = r
            req.durable = local.durable
        there = req.subset(remote)
        if kind == "GET":
            values = await fwd.get(session, there)  # type: ignore[arg-type]
            answers: list[Any] = [None if v is None else (memoryview(v), None) for v in values]
        elif kind == "PEEK":
            answers = list(await fwd.peek(session, there))  # type: ignore[arg-type]
        else:
            answers = list(await fwd.delete(session, there))  # type: ignore[arg-type]
        for i, r in zip(remote, answers, strict=True):
            out[i] = r
        return out

    async def durable(self, seq: int) -> None:
        """Wait until flash write ``seq`` is on disk (raises the error of its batch if it failed)."""
        if self.tier is not None and seq:
            await self.tier.log.wait(seq)

    # -- writes
    def _admit_put(self, session: Session, req: Put) -> Plan:
        plan = self.plans[req.kind]
        for check in plan.checks:  # no stage waits on a write
            check(session, req)
        return plan

    def _release(self, session: Session, req: Put, plan: Plan) -> None:
        for release in plan.releases:
            release(session, req)

    def begin_put(self, session: Session, req: Put) -> PutPlan | None:
        """The stages, then room for every value (``PutPlan.views``: where the payload goes).
        None: another node serves a key of it (a forwarding session sends its values with ``put``)."""
        plan = self._admit_put(session, req)
        if req.remote is not None:
            self._release(session, req, plan)
            return None
        try:
            return self.engine.reserve(session, req)
        except BaseException:
            self._release(session, req, plan)
            raise

    def finish_put(self, session: Session, put: PutPlan) -> list[Written]:
        """The payload has arrived: commit, audit; per value what was stored."""
        req = put.request
        plan = self.plans[req.kind]
        try:
            return self._commit(session, put, plan)
        finally:
            self._release(session, req, plan)

    def abort_put(self, session: Session, put: PutPlan) -> None:
        """The payload did not arrive (the connection died): give the room back."""
        self.engine.abort(put)
        self._release(session, put.request, self.plans[put.request.kind])

    def _commit(self, session: Session, put: PutPlan, plan: Plan) -> list[Written]:
        req = put.request
        tier = self.tier
        if tier is not None:
            tier.touched = 0
        result = self.engine.commit(put)
        if tier is not None:
            req.durable = tier.touched  # a durable write: the reply waits for its group commit
        for done in plan.dones:
            done(session, req, result)
        return result

    async def put(self, session: Session, req: Put, values: Sequence[Any]) -> list[Written]:
        """A put whose values are in hand: the stages, then stored here and/or forwarded."""
        plan = self._admit_put(session, req)
        try:
            if req.remote is None:
                return self._put_here(session, req, values, plan)
            if self.forwarder is None:
                raise InvalidArgument(NOT_FORWARDED)
            if req.cond or req.keep_ttl or req.get_old:
                raise InvalidArgument("SET NX/XX/KEEPTTL/GET on a key owned by another node is not supported")
            far = set(req.remote)
            out: list[Written] = [(None, None, None)] * len(req.keys)
            here = [i for i in range(len(req.keys)) if i not in far]
            if here:
                local = req.subset(here)
                for i, r in zip(here, self._put_here(session, local, [values[i] for i in here], plan),
                                strict=True):
                    out[i] = r
                req.durable = local.durable
            await self.forwarder.put(session, req.subset(req.remote), [values[i] for i in req.remote])
            return out
        finally:
            self._release(session, req, plan)

    def _put_here(self, session: Session, req: Put, values: Sequence[Any], plan: Plan) -> list[Written]:
        put = self.engine.reserve(session, req)
        try:
            for res, value in zip(put.reservations, values, strict=True):
                if res is not None:
                    res.view[:] = memoryview(value).cast("B")
        except BaseException:
            self.engine.abort(put)
            raise
        return self._commit(session, put, plan)


def stage_order(*, authenticate: Stage, rate_limit: Stage, route: Stage | None, grants: Stage,
                no_store: Stage, in_flight: Stage, audit: Stage | None, promote: Stage | None) -> tuple[Stage, ...]:
    """The one order of the request path (a node without a cluster, audit log or flash tier has no
    stage for it)."""
    order = (authenticate, rate_limit, route, grants, no_store, in_flight, audit, promote)
    return tuple(s for s in order if s is not None)
