"""``memkv route``: an OpenAI-compatible HTTP router in front of engine replicas.

Every request passes the same steps, in this order (``Router.handle``):

1. parse: method + path must be one of ``/v1/completions``,
   ``/v1/chat/completions`` (POST), ``/v1/models``, ``/health``, ``/metrics`` (GET);
2. prompt tokens: a completions ``prompt`` given as token ids is used as is;
   text and chat prompts are tokenized by a backend's own ``/tokenize``
   (vLLM's tokenizer and chat template, so the hashes match); if that fails the
   request is routed on load alone;
3. choose: :class:`PrefixIndex` answers per replica (GPU prefix, memkv
   prefix), the scoring policy picks one among the healthy backends;
4. proxy: the request goes to that backend unchanged, its response streams
   back chunk by chunk (SSE included), with ``x-memkv-backend`` naming it. A
   backend that refuses the connection is marked unhealthy and the request is
   retried once on the next choice. No stickiness: each request is routed on
   its own merits.

Backends are URLs ``http://HOST:PORT`` with optional query parameters saying
where their KV events are: ``events`` (default ``tcp://HOST:5557``),
``replay``, ``topic`` (vLLM's default ""), ``model``, ``namespace``, ``host``,
``name``, ``tenant``. ``--store`` names the memkv nodes whose events count
as store hits (``discovery``): ``etcd://HOST:PORT/CLUSTER`` (every node of
the cluster, followed as nodes join and leave), ``memkv://HOST:PORT`` (one
node, asked where it publishes) or its event endpoint by hand
(``tcp://HOST:PORT?node=ID&replay=...&host=H&topic=BASE``).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from memkv.client.router.discovery import EtcdStores, StoreFollower, StoreSource, parse_store
from memkv.client.router.http import HTTPError, Request, ServerConnection, proxy, request
from memkv.client.router.index import PrefixIndex, Replica
from memkv.client.router.policy import ScoringPolicy, make_policy
from memkv.client.router.zmq_feed import EventFeeds, FeedSpec

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 2.0
MEMBERSHIP_INTERVAL_S = 1.0  # how often the cluster's node list (kept current from etcd) is compared
TOKENIZE_TIMEOUT_S = 5.0


@dataclass
class Backend:
    name: str
    host: str
    port: int
    feed: FeedSpec
    replica: Replica
    healthy: bool = True


def parse_backend(url: str) -> Backend:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"backend {url!r}: expected http://HOST:PORT[?events=tcp://...&replay=...&topic=...]")
    q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    name = q.get("name", f"{parts.hostname}:{parts.port}")
    feed = FeedSpec(name, "replica", q.get("events", f"tcp://{parts.hostname}:5557"), q.get("replay"),
                    q.get("topic", ""))
    replica = Replica(name, model=q.get("model"), namespace=q.get("namespace", "shared"), host=q.get("host"),
                      block_size=int(q["block_size"]) if "block_size" in q else None, tenant=q.get("tenant"))
    return Backend(name, parts.hostname, parts.port, feed, replica)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("memkv_route_requests", "requests routed", ["backend", "path"],
                                registry=self.registry)
        self.errors = Counter("memkv_route_errors", "requests that failed", ["reason"], registry=self.registry)
        self.gpu_tokens = Counter("memkv_route_gpu_prefix_tokens", "prompt tokens cached on the chosen GPU",
                                  registry=self.registry)
        self.store_tokens = Counter("memkv_route_store_prefix_tokens",
                                    "prompt tokens loadable from memkv for the chosen replica",
                                    registry=self.registry)
        self.prompt_tokens = Counter("memkv_route_prompt_tokens", "prompt tokens routed", registry=self.registry)
        self.unrouted = Counter("memkv_route_load_only", "requests routed on load alone (no token ids)",
                                registry=self.registry)
        self.healthy = Gauge("memkv_route_backend_healthy", "1 if the backend answers /health", ["backend"],
                             registry=self.registry)


class Router:
    def __init__(self, backends: list[Backend], stores: list[StoreSource | EtcdStores], policy: ScoringPolicy,
                 index: PrefixIndex | None = None) -> None:
        if not backends:
            raise ValueError("at least one --backend is needed")
        self.backends = {b.name: b for b in backends}
        self.index = index or PrefixIndex([b.replica for b in backends])
        self.feeds = EventFeeds(self.index)
        for b in backends:
            self.feeds.add(b.feed)
        self.stores = StoreFollower(self.index, self.feeds, stores)
        self.policy = policy
        self.metrics = Metrics()

    # -- the request path ------------------------------------------------------------
    async def handle(self, conn: ServerConnection, req: Request) -> None:
        path = req.path
        if req.method == "GET" and path == "/health":
            ok = {n: b.healthy for n, b in self.backends.items()}
            await conn.respond_json(200 if any(ok.values()) else 503, {"backends": ok})
        elif req.method == "GET" and path == "/metrics":
            await conn.respond(200, generate_latest(self.metrics.registry), "text/plain; version=0.0.4")
        elif req.method == "GET" and path == "/v1/models":
            await self.forward(conn, req, self.healthy_names()[:1] or list(self.backends)[:1], None)
        elif req.method == "POST" and path == "/memkv/prefix":
            await conn.respond_json(200, self.explain(_json(req.body)))
        elif req.method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            body = _json(req.body)
            tokens = await self.prompt_tokens(path, body)
            order = self.choose(tokens, body)
            await self.forward(conn, req, order, tokens)
        else:
            raise HTTPError(404 if req.method in ("GET", "POST") else 405, f"{req.method} {path} is not routed")

    def explain(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /memkv/prefix {"prompt": [token ids], "cache_salt": ...}``: what the index knows."""
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            raise HTTPError(400, "prompt must be a list of token ids")
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        answer = self.index.query(prompt, cache_salt=salt)
        return {"prompt_tokens": answer.prompt_tokens,
                "replicas": [{"replica": r.replica, "gpu_tokens": r.gpu_tokens, "store_tokens": r.store_tokens,
                              "store_nodes": list(r.store_nodes), "store_same_host": r.store_same_host,
                              "load": r.load} for r in answer.replicas]}

    def healthy_names(self) -> list[str]:
        return [n for n, b in self.backends.items() if b.healthy]

    async def prompt_tokens(self, path: str, body: dict[str, Any]) -> list[int] | None:
        prompt = body.get("prompt")
        if path == "/v1/completions" and isinstance(prompt, list):
            if prompt and isinstance(prompt[0], list) and len(prompt) == 1:
                prompt = prompt[0]
            if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return prompt
        tok_body: dict[str, Any] = {"model": body.get("model")}
        if path == "/v1/chat/completions" and isinstance(body.get("messages"), list):
            tok_body["messages"] = body["messages"]
        elif isinstance(prompt, str):
            tok_body["prompt"] = prompt
        else:
            return None
        for name in self.healthy_names()[:1]:
            b = self.backends[name]
            try:
                status, data = await request(b.host, b.port, "POST", "/tokenize", json.dumps(tok_body).encode(),
                                             [(b"content-type", b"application/json")], timeout=TOKENIZE_TIMEOUT_S)
                if status == 200:
                    tokens = json.loads(data).get("tokens")
                    if isinstance(tokens, list):
                        return tokens
            except (OSError, trio.TooSlowError, h11.ProtocolError, ValueError):
                pass
        return None

    def choose(self, tokens: list[int] | None, body: dict[str, Any]) -> list[str]:
        """Backends to try, best first (the policy's choice, then the others)."""
        candidates = self.healthy_names() or list(self.backends)
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        if tokens is None:
            self.metrics.unrouted.inc()
            answer = self.index.query([], cache_salt=salt)
        else:
            answer = self.index.query(tokens, cache_salt=salt)
            self.metrics.prompt_tokens.inc(len(tokens))
        first = self.policy.choose(answer, candidates)
        chosen = answer.by_name().get(first)
        if chosen is not None and tokens is not None:
            self.metrics.gpu_tokens.inc(chosen.gpu_tokens)
            self.metrics.store_tokens.inc(max(chosen.gpu_tokens, chosen.store_tokens) - chosen.gpu_tokens)
        return [first] + [c for c in candidates if c != first]

    async def forward(self, conn: ServerConnection, req: Request, order: list[str], tokens: list[int] | None) -> None:
        for attempt, name in enumerate(order[:2]):
            b = self.backends[name]
            started = False

            async def on_response(resp: h11.Response, name: str = name) -> None:
                nonlocal started
                started = True
                headers = [(k, v) for k, v in resp.headers if k.lower() not in (b"connection", b"keep-alive")]
                await conn.send(h11.Response(status_code=resp.status_code,
                                             headers=headers + [(b"x-memkv-backend", name.encode())]))

            async def on_data(data: bytes) -> None:
                await conn.send(h11.Data(data=data))

            self.index.begin_request(name)
            try:
                await proxy(b.host, b.port, req.method, req.target, req.body, req.headers, on_response, on_data)
            except (OSError, h11.ProtocolError) as exc:
                if started:  # the client already has part of a response: it cannot be retried
                    self.metrics.errors.labels("backend_broke_mid_response").inc()
                    raise
                log.warning("backend %s failed: %s", name, exc)
                b.healthy = False
                self.metrics.healthy.labels(name).set(0)
                self.metrics.errors.labels("backend_unreachable").inc()
                if attempt == 0 and len(order) > 1:
                    continue
                raise HTTPError(502, f"backend {name} unreachable: {exc}") from None
            finally:
                self.index.end_request(name)
            await conn.send(h11.EndOfMessage())
            self.metrics.requests.labels(name, req.path).inc()
            return

    # -- store nodes -------------------------------------------------------------------
    async def watch_membership(self) -> None:
        while True:
            self.stores.refresh()
            await trio.sleep(MEMBERSHIP_INTERVAL_S)

    # -- background --------------------------------------------------------------------
    async def watch_health(self) -> None:
        while True:
            for b in self.backends.values():
                try:
                    status, _ = await request(b.host, b.port, "GET", "/health", timeout=HEALTH_INTERVAL_S)
                    b.healthy = status == 200
                except (OSError, trio.TooSlowError, h11.ProtocolError):
                    b.healthy = False
                self.metrics.healthy.labels(b.name).set(1 if b.healthy else 0)
            await trio.sleep(HEALTH_INTERVAL_S)

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        conn = ServerConnection(stream)
        try:
            while True:
                try:
                    req = await conn.read_request()
                    if req is None:
                        return
                    await self.handle(conn, req)
                except HTTPError as exc:
                    if conn.conn.our_state is not h11.SEND_RESPONSE:
                        return  # a response is already under way; all we can do is close
                    await conn.respond_json(exc.status, {"error": {"message": exc.message, "code": exc.status}})
                except h11.RemoteProtocolError as exc:
                    if conn.conn.our_state is h11.SEND_RESPONSE:
                        await conn.respond_json(400, {"error": {"message": str(exc), "code": 400}})
                    return
                if not conn.reusable:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            await stream.aclose()

    async def serve(self, host: str, port: int, task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        with self.feeds:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.watch_health)
                if self.stores.clusters:
                    nursery.start_soon(self.watch_membership)
                listeners = await nursery.start(partial(trio.serve_tcp, self.serve_connection, port, host=host))
                task_status.started(listeners)


def _json(body: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(body or b"{}")
    except ValueError as exc:
        raise HTTPError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return obj


def run_route(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    router = Router([parse_backend(u) for u in args.backend], [parse_store(u) for u in args.store],
                    make_policy(args.policy))
    print(f"memkv route: http://{host}:{port} -> {', '.join(router.backends)}", flush=True)
    try:
        trio.run(router.serve, host or "127.0.0.1", int(port))
    finally:
        router.stores.close()
    return 0

