"""PrefixIndex: which replica holds which prompt prefix in its GPU cache, and what memkv can load.

Sources of claims (each one event stream, see ``zmq_feed``):

- a **replica** (an engine process) publishes vLLM's own KV events about its
  GPU cache. Only events whose ``medium`` is unset or ``GPU`` count (an
  engine's CPU-offload events describe another tier);
- a **store node** (memkv) publishes the blocks it holds, in vLLM's format,
  with ``medium`` STORAGE. Its claims are scoped by ``(model, namespace,
  tenant)`` (the stream's topic, memkv/events/wire.py): a replica counts blocks
  of its own model in the namespace its connector reads, in the shared key
  space (tenant "") and in its own tenant's -- never another tenant's.
  ``cache_salt`` scoping needs nothing more: vLLM folds the salt into the
  first block's hash, so prompts with different salts never match each other.
  A block counts while *any* node holds it: a block copied to a new owner and
  then dropped by the old one stays, the last holder's ``BlockRemoved`` (or
  its disconnect) removes it.

Hashes are kept as the 64-bit ints vLLM publishes (``wire.hash_key``). The
index is written by the feed thread and read by request handlers, under one
lock; a query is O(prompt blocks x replicas) set lookups.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from memkv.client.router.vllm_hash import BlockHasher
from memkv.events.wire import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, Scope, hash_key

DEFAULT_NAMESPACE = "shared"


@dataclass(frozen=True)
class Replica:
    """An engine replica the router may send requests to."""

    name: str
    model: str | None = None  # the model id its memkv connector uses (its store blocks' scope)
    namespace: str = DEFAULT_NAMESPACE  # the memkv namespace its connector reads
    host: str | None = None  # host id, to tell whether a store node shares its host
    block_size: int | None = None  # learned from its events when None
    tenant: str | None = None  # the memkv tenant its connector is (its own tenant-scoped blocks count too)


@dataclass(frozen=True)
class StoreNode:
    """A memkv node whose event streams the index follows."""

    name: str
    host: str | None = None


@dataclass(frozen=True)
class ReplicaAnswer:
    replica: str
    gpu_tokens: int  # leading prompt tokens in this replica's GPU cache
    store_tokens: int  # leading prompt tokens loadable from memkv by this replica
    store_nodes: tuple[str, ...]  # memkv nodes holding those blocks
    store_same_host: bool  # every one of those blocks has a holder on the replica's host
    load: int  # requests in flight to this replica


@dataclass(frozen=True)
class PrefixAnswer:
    prompt_tokens: int
    replicas: tuple[ReplicaAnswer, ...]

    def by_name(self) -> dict[str, ReplicaAnswer]:
        return {r.replica: r for r in self.replicas}


@dataclass
class _Holders:
    """Block hash -> bitmask of holder indices, plus each holder's own set (to clear it fast)."""

    owners: dict[int, int] = field(default_factory=dict)
    per_holder: dict[int, set[int]] = field(default_factory=dict)

    def add(self, holder: int, hashes: Iterable[int]) -> None:
        mine = self.per_holder.setdefault(holder, set())
        bit = 1 << holder
        for h in hashes:
            self.owners[h] = self.owners.get(h, 0) | bit
            mine.add(h)

    def remove(self, holder: int, hashes: Iterable[int]) -> None:
        mine = self.per_holder.get(holder)
        if not mine:
            return
        bit = 1 << holder
        for h in hashes:
            if h in mine:
                mine.discard(h)
                left = self.owners[h] & ~bit
                if left:
                    self.owners[h] = left
                else:
                    del self.owners[h]

    def clear(self, holder: int) -> None:
        self.remove(holder, list(self.per_holder.get(holder, ())))
        self.per_holder.pop(holder, None)


class PrefixIndex:
    """Answers, for a prompt, how much of it each replica has cached or can load from memkv."""

    def __init__(self, replicas: Sequence[Replica] = (), *, hasher: BlockHasher | None = None,
                 default_block_size: int | None = None) -> None:
        self.hasher = hasher or BlockHasher()
        self.default_block_size = default_block_size
        self._lock = threading.Lock()
        self._replicas: dict[str, Replica] = {}
        self._gpu: dict[str, set[int]] = {}
        self._block_size: dict[str, int] = {}  # learned per source
        self._load: dict[str, int] = {}
        self._nodes: dict[str, StoreNode] = {}
        self._node_index: dict[str, int] = {}
        self._free_indices: list[int] = []
        self._store: dict[Scope, _Holders] = {}  # (model, namespace, tenant) -> holders
        self._store_block_size: dict[Scope, int] = {}
        self.events_applied = 0
        for r in replicas:
            self.add_replica(r)

    # -- membership ------------------------------------------------------------------
    def add_replica(self, replica: Replica) -> None:
        with self._lock:
            self._replicas[replica.name] = replica
            self._gpu.setdefault(replica.name, set())
            self._load.setdefault(replica.name, 0)
            if replica.block_size:
                self._block_size[replica.name] = replica.block_size

    def remove_replica(self, name: str) -> None:
        with self._lock:
            self._replicas.pop(name, None)
            self._gpu.pop(name, None)
            self._load.pop(name, None)
            self._block_size.pop(name, None)

    def add_store_node(self, node: StoreNode) -> None:
        with self._lock:
            self._nodes[node.name] = node
            if node.name not in self._node_index:
                self._node_index[node.name] = (self._free_indices.pop() if self._free_indices
                                               else len(self._node_index))

    def remove_store_node(self, name: str) -> None:
        """A node that left: every claim it made is void."""
        with self._lock:
            idx = self._node_index.pop(name, None)
            self._nodes.pop(name, None)
            if idx is None:
                return
            for holders in self._store.values():
                holders.clear(idx)
            self._free_indices.append(idx)

    @property
    def replica_names(self) -> list[str]:
        with self._lock:
            return list(self._replicas)

    # -- events ----------------------------------------------------------------------
    def apply_replica_events(self, name: str, events: Iterable[KVEvent]) -> None:
        with self._lock:
            blocks = self._gpu.get(name)
            if blocks is None:
                return
            for ev in events:
                self.events_applied += 1
                if isinstance(ev, BlockStored):
                    if ev.medium not in (None, MEDIUM_GPU):
                        continue
                    self._block_size[name] = ev.block_size
                    blocks.update(hash_key(h) for h in ev.block_hashes)
                elif isinstance(ev, BlockRemoved):
                    if ev.medium not in (None, MEDIUM_GPU):
                        continue
                    blocks.difference_update(hash_key(h) for h in ev.block_hashes)
                elif isinstance(ev, AllBlocksCleared):
                    blocks.clear()

    def clear_replica(self, name: str) -> None:
        with self._lock:
            if name in self._gpu:
                self._gpu[name].clear()

    def apply_store_events(self, node: str, scope: Scope, events: Iterable[KVEvent]) -> None:
        with self._lock:
            idx = self._node_index.get(node)
            if idx is None:
                return
            holders = self._store.setdefault(scope, _Holders())
            for ev in events:
                self.events_applied += 1
                if isinstance(ev, BlockStored):
                    self._store_block_size[scope] = ev.block_size
                    holders.add(idx, (hash_key(h) for h in ev.block_hashes))
                elif isinstance(ev, BlockRemoved):
                    holders.remove(idx, (hash_key(h) for h in ev.block_hashes))
                elif isinstance(ev, AllBlocksCleared):
                    holders.clear(idx)

    def clear_store(self, node: str, scope: Scope | None = None) -> None:
        """Void ``node``'s claims in ``scope``, or in every scope (None: the node restarted or is gone)."""
        with self._lock:
            idx = self._node_index.get(node)
            if idx is None:
                return
            for sc, holders in self._store.items():
                if scope is None or sc == scope:
                    holders.clear(idx)

    # -- load ------------------------------------------------------------------------
    def begin_request(self, name: str) -> None:
        with self._lock:
            self._load[name] = self._load.get(name, 0) + 1

    def end_request(self, name: str) -> None:
        with self._lock:
            self._load[name] = max(0, self._load.get(name, 0) - 1)

    # -- queries ---------------------------------------------------------------------
    def query(self, token_ids: Sequence[int] | None = None, *, block_hashes: Sequence[int | bytes] | None = None,
              block_size: int | None = None, cache_salt: str | None = None,
              lora: tuple[str, str] | None = None) -> PrefixAnswer:
        """Per replica: leading tokens in its GPU cache, and leading tokens loadable from memkv.

        Give ``token_ids`` (hashed as vLLM does, with each source's block size)
        or precomputed ``block_hashes`` (as vLLM publishes them) with ``block_size``.
        """
        if (token_ids is None) == (block_hashes is None):
            raise ValueError("give token_ids or block_hashes")
        if block_hashes is not None and not block_size:
            raise ValueError("block_hashes need their block_size")
        chains: dict[int, list[int]] = {}

        def chain(bs: int) -> list[int]:
            if bs not in chains:
                if block_hashes is not None:
                    chains[bs] = [hash_key(h) for h in block_hashes] if bs == block_size else []
                else:
                    assert token_ids is not None
                    chains[bs] = self.hasher.chain(token_ids, bs, cache_salt=cache_salt, lora=lora)
            return chains[bs]

        prompt_tokens = len(token_ids) if token_ids is not None else len(block_hashes or ()) * (block_size or 0)
        out: list[ReplicaAnswer] = []
        with self._lock:
            names_by_index = {i: n for n, i in self._node_index.items()}
            for name, rep in self._replicas.items():
                bs = self._block_size.get(name) or block_size or self.default_block_size
                gpu = 0
                if bs:
                    blocks = self._gpu[name]
                    for h in chain(bs):
                        if h not in blocks:
                            break
                        gpu += 1
                store_blocks, nodes, same_host = 0, set(), True
                scopes = [(rep.model, rep.namespace, "")] if rep.model is not None else []
                if scopes and rep.tenant:
                    scopes.append((rep.model, rep.namespace, rep.tenant))
                owned = [self._store[sc].owners for sc in scopes if sc in self._store]
                sbs = next((self._store_block_size[sc] for sc in scopes if sc in self._store_block_size), bs)
                if owned and sbs:
                    for h in chain(sbs):
                        mask = 0
                        for owners in owned:
                            mask |= owners.get(h, 0)
                        if not mask:
                            break
                        store_blocks += 1
                        holder_names = [names_by_index[i] for i in _bits(mask) if i in names_by_index]
                        nodes.update(holder_names)
                        if not any(self._nodes[n].host is not None and self._nodes[n].host == rep.host
                                   for n in holder_names):
                            same_host = False
                out.append(ReplicaAnswer(
                    replica=name, gpu_tokens=gpu * (bs or 0), store_tokens=store_blocks * (sbs or 0),
                    store_nodes=tuple(sorted(nodes)), store_same_host=bool(store_blocks) and same_host,
                    load=self._load.get(name, 0)))
        return PrefixAnswer(prompt_tokens=prompt_tokens, replicas=tuple(out))

    # -- size (bench/router_scale.py) ---------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "replica_blocks": sum(len(s) for s in self._gpu.values()),
                "store_blocks": sum(len(h.owners) for h in self._store.values()),
                "store_nodes": len(self._nodes),
            }


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
