"""What a node claims in its KV events: which stored values are engine blocks, per scope (pure).

A node announces a block hash in a scope (model, namespace, tenant) while at
least one value it holds carries that hash in its header; several can (the
pages of one block written by two tensor-parallel ranks, or by engines whose
page layouts differ, are different values with the same engine hash). So the
claim is reference-counted: ``BlockStored`` when the first such value enters
the index, ``BlockRemoved`` when the last one leaves it. A value that is not a
block (no header of memkv/protocol/block_header.py) is never tracked.

Events are vLLM's (memkv/events/wire.py): the engine's hashes as vLLM
publishes them (``as_int``: the low 64 bits as an int, vLLM's default; else
the raw bytes), the block's parent, token ids, size and LoRA name, ``medium``
STORAGE, ``locality`` REMOTE and ``ownership`` memkv (docs/architecture.md,
"KV events").
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from memkv.events.wire import (
    STORE_LOCALITY,
    STORE_MEDIUM,
    STORE_OWNERSHIP,
    BlockRemoved,
    BlockStored,
    ExternalBlockHash,
    Scope,
    external_block_hash,
)
from memkv.protocol.block_header import BlockHeader


def block_stored(header: BlockHeader, *, as_int: bool = True) -> BlockStored:
    """vLLM's ``BlockStored`` for one stored block."""
    parent = header.parent_hash
    return BlockStored(block_hashes=[external_block_hash(header.block_hash, as_int=as_int)],
                       parent_block_hash=None if parent is None else external_block_hash(parent, as_int=as_int),
                       token_ids=list(header.token_ids), block_size=header.block_size, lora_id=None,
                       medium=STORE_MEDIUM, lora_name=header.lora, locality=STORE_LOCALITY,
                       ownership=STORE_OWNERSHIP)


def block_removed(h: ExternalBlockHash) -> BlockRemoved:
    return BlockRemoved(block_hashes=[h], medium=STORE_MEDIUM, locality=STORE_LOCALITY, ownership=STORE_OWNERSHIP)


class Claims:
    """Values announced as blocks (by index key) and how many values back each claimed hash."""

    def __init__(self, *, as_int: bool = True) -> None:
        self.as_int = as_int
        self._by_value: dict[Hashable, tuple[Scope, ExternalBlockHash]] = {}
        self._count: dict[tuple[Scope, ExternalBlockHash], int] = {}

    def __len__(self) -> int:
        """Claimed (scope, hash) pairs."""
        return len(self._count)

    @property
    def values(self) -> int:
        return len(self._by_value)

    def tracks(self, key: Hashable) -> bool:
        return key in self._by_value

    def stored(self, key: Hashable, scope: Scope, header: BlockHeader) -> BlockStored | None:
        """Value ``key`` holding ``header``'s block entered the index; the event to publish, if any."""
        if key in self._by_value:
            self.dropped(key)  # (the store drops a value before indexing its replacement: not expected)
        h = external_block_hash(header.block_hash, as_int=self.as_int)
        self._by_value[key] = (scope, h)
        n = self._count.get((scope, h), 0)
        self._count[(scope, h)] = n + 1
        return block_stored(header, as_int=self.as_int) if n == 0 else None

    def dropped(self, key: Hashable) -> tuple[Scope, BlockRemoved] | None:
        """Value ``key`` left the index; (scope, event) when it held the last copy of its block here."""
        got = self._by_value.pop(key, None)
        if got is None:
            return None
        n = self._count[got] - 1
        if n:
            self._count[got] = n
            return None
        del self._count[got]
        return got[0], block_removed(got[1])

    def scopes(self) -> set[Scope]:
        return {scope for scope, _ in self._count}

    def one_value_per_block(self, scope: Scope | None = None) -> Iterator[Hashable]:
        """A value key for each claimed block (of ``scope``, or of all): what a re-announcement reads."""
        seen: set[tuple[Scope, ExternalBlockHash]] = set()
        for key, claim in list(self._by_value.items()):
            if (scope is None or claim[0] == scope) and claim not in seen:
                seen.add(claim)
                yield key
