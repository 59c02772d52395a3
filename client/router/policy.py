"""Scoring policies: which replica gets a request, given a :class:`PrefixAnswer`.

A policy is any object with ``choose(answer, candidates) -> name``; the router
front takes one (``memkv route --policy``). The default,
:class:`LongestPrefixThenLoad`, is:

1. **cost** of serving the prompt on replica *r*, in token-equivalents::

       reuse   = max(gpu_tokens, store_tokens)   # store hits count for every replica
       cost(r) = (prompt_tokens - reuse)                      # prefill computed
               + load_cost(r) * max(0, store_tokens - gpu_tokens)   # loaded from memkv

   ``load_cost`` is what loading one token costs relative to computing it:
   ``same_host_cost`` when every block has a holder on the replica's host
   (shared memory), ``remote_cost`` otherwise. The longest prefix wins, a GPU
   hit beats an equally long store hit, a same-host store hit beats a remote one;
2. **load**: among replicas within ``cost_slack`` tokens of the lowest cost, the
   fewest requests in flight wins; a replica more than ``max_load_gap`` requests
   busier than the idlest one is not chosen at all (a hot prefix must not pile
   every request onto one replica);
3. remaining ties rotate (no stickiness: equal replicas share the work).

``use_store=False`` ignores memkv's claims (routing on the engines' GPU-cache
events alone: ``memkv route --policy gpu-only``, the baseline the routing
benchmark compares against).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from memkv.client.router.index import PrefixAnswer, ReplicaAnswer


class ScoringPolicy(Protocol):
    def choose(self, answer: PrefixAnswer, candidates: Sequence[str]) -> str: ...

    def best(self, answer: PrefixAnswer, candidates: Sequence[str]) -> list[str]:
        """The candidates ``choose`` picks among now (it rotates between them), without choosing."""


@dataclass
class LongestPrefixThenLoad:
    remote_cost: float = 0.1
    same_host_cost: float = 0.05
    cost_slack: float = 0.0
    max_load_gap: int | None = 8
    use_store: bool = True
    _turn: int = field(default=0, repr=False)

    def cost(self, r: ReplicaAnswer, prompt_tokens: int) -> float:
        store = r.store_tokens if self.use_store else 0
        reuse = max(r.gpu_tokens, store)
        loaded = max(0, store - r.gpu_tokens)
        per_token = self.same_host_cost if r.store_same_host else self.remote_cost
        return (prompt_tokens - reuse) + per_token * loaded

    def best(self, answer: PrefixAnswer, candidates: Sequence[str]) -> list[str]:
        if not candidates:
            raise ValueError("no candidate replica")
        by_name = answer.by_name()
        views = [by_name.get(c) or ReplicaAnswer(c, 0, 0, (), False, 0) for c in candidates]
        if self.max_load_gap is not None:
            idlest = min(v.load for v in views)
            views = [v for v in views if v.load <= idlest + self.max_load_gap]
        costs = {v.replica: self.cost(v, answer.prompt_tokens) for v in views}
        lowest = min(costs.values())
        near = [v for v in views if costs[v.replica] <= lowest + self.cost_slack]
        least = min(v.load for v in near)
        return [v.replica for v in near if v.load == least]

    def choose(self, answer: PrefixAnswer, candidates: Sequence[str]) -> str:
        tied = self.best(answer, candidates)
        self._turn += 1
        return tied[self._turn % len(tied)]


@dataclass
class RoundRobin:
    """Ignores the answer: the baseline the benchmarks compare against."""

    _turn: int = field(default=0, repr=False)

    def best(self, answer: PrefixAnswer, candidates: Sequence[str]) -> list[str]:
        return [candidates[(self._turn + 1) % len(candidates)]]

    def choose(self, answer: PrefixAnswer, candidates: Sequence[str]) -> str:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


def make_policy(name: str, *, max_load_gap: int | None = 8) -> ScoringPolicy:
    """``memkv route --policy``: prefix (GPU and memkv), gpu-only (GPU events alone), round-robin."""
    if name == "prefix":
        return LongestPrefixThenLoad(max_load_gap=max_load_gap)
    if name == "gpu-only":
        return LongestPrefixThenLoad(max_load_gap=max_load_gap, use_store=False)
    if name == "round-robin":
        return RoundRobin()
    raise ValueError(f"unknown policy {name!r} (prefix, gpu-only, round-robin)")
