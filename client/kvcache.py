"""HF transformers integration: save a prompt's KV cache block by block, load the longest cached prefix.

    conn = KVCacheConnector(client, "llama-3-8b", block_tokens=16)
    n, cache = conn.load(prompt_ids, model.config)      # (0, None) on a miss
    out = model(input_ids=prompt_ids[n:], cache=cache)  # prefill only the rest
    conn.save(prompt_ids, out.cache)                    # stores every full block

(the client API in README "Using it".) ``client`` is a ``SyncClient`` — or any object with its
``exists_many / put_many / lookup_prefix / get_many_into / get`` surface, e.g.
the Redis adapter the TTFT benchmark uses. ``AsyncKVCacheConnector`` does the
same with the trio ``Client``. What a save and a load do is written once, as
operations over the prefix-chain operations of ``client/core/chains.py``.

Block layout (version 1)
------------------------
One memkv value per block of ``B = block_tokens`` tokens, keyed by the chained
prefix hash of client/prefix.py. The value is a 64-byte header followed by the
K and V tensors of every layer for those B tokens (batch size 1)::

    header  (64 B, little-endian; struct "<4sHHBBHHHII8s8sQ", zero padded)
        magic "MKVB", version 1, header length 64,
        dtype code (1 float32, 2 float16, 3 bfloat16, 4 float64), order 0,
        n_layers, n_kv_heads, head_dim, block_tokens, block index in the chain,
        model fingerprint (xxh3-64 of the model id), key fingerprint (xxh3-64 of
        this block's key), payload length in bytes
    payload [n_layers][2 (K, V)][n_kv_heads][block_tokens][head_dim]  of dtype

so a block is ``64 + 2 * n_layers * n_kv_heads * B * head_dim * itemsize``
bytes (a 16-token block of Llama-3-8B in bf16: 2 MiB). Each layer's
``[kv_heads, B, head_dim]`` slab is exactly the slice
``cache.layers[l].keys[0, :, i*B:(i+1)*B, :]`` of a transformers cache.

On load every header is checked against what this replica expects (from its
model config and dtype): another model, dtype, number of layers, heads, head
size or block size, a block stored under another key or at another position,
or a value of the wrong length raises :class:`memkv.errors.KVLayoutMismatch`.
A foreign block is never silently loaded.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from memkv.client.core import chains
from memkv.client.core.requests import Op
from memkv.client.prefix import PrefixHasher, operations_of, token_bytes
from memkv.errors import InvalidArgument, KVLayoutMismatch

HEADER = struct.Struct("<4sHHBBHHHII8s8sQ")
HEADER_LEN = 64
MAGIC = b"MKVB"
LAYOUT_VERSION = 1
ORDER_LKHTD = 0  # [layer][k,v][head][token][dim]

_DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3, "float64": 4}
_DTYPE_NAMES = {v: k for k, v in _DTYPE_CODES.items()}


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_CODES:
        raise InvalidArgument(f"unsupported KV dtype {name} (supported: {', '.join(_DTYPE_CODES)})")
    return name


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def fingerprint(data: bytes) -> bytes:
    return xxhash.xxh3_64(data).digest()


@dataclass(frozen=True)
class KVLayout:
    """What one block holds: the shape of the KV cache of B tokens of one model."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str = "float32"

    @classmethod
    def from_config(cls, config: Any, *, block_tokens: int, dtype: Any = None) -> KVLayout:
        cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        if dtype is None:
            dtype = getattr(cfg, "dtype", None)
        if dtype is None:
            import torch

            dtype = torch.get_default_dtype()
        return cls(int(cfg.num_hidden_layers), n_kv, int(head_dim), block_tokens, _dtype_name(dtype))

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[self.dtype]

    @property
    def payload_bytes(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.block_tokens * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        return HEADER_LEN + self.payload_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.payload_bytes // self.block_tokens

    def describe(self) -> str:
        return (f"{self.n_layers} layers x {self.n_kv_heads} kv heads x {self.head_dim} head_dim, "
                f"{self.block_tokens} tokens/block, {self.dtype}")

    def header(self, *, index: int, model_fp: bytes, key: bytes) -> bytes:
        raw = HEADER.pack(MAGIC, LAYOUT_VERSION, HEADER_LEN, _DTYPE_CODES[self.dtype], ORDER_LKHTD,
                          self.n_layers, self.n_kv_heads, self.head_dim, self.block_tokens, index,
                          model_fp, fingerprint(key), self.payload_bytes)
        return raw.ljust(HEADER_LEN, b"\0")

    def check(self, header: bytes, *, index: int, model_fp: bytes, key: bytes, length: int,
              model_id: str) -> None:
        """Raise ``KVLayoutMismatch`` unless ``header`` describes exactly this layout at this place."""
        where = f"block {index} ({key[:40]!r})"
        if length < HEADER_LEN:
            raise KVLayoutMismatch(f"{where}: a {length}-byte value is not a memkv KV block")
        (magic, version, hlen, dcode, order, n_layers, n_kv, head_dim, block_tokens, idx, mfp, kfp,
         plen) = HEADER.unpack_from(header)
        if magic != MAGIC or hlen != HEADER_LEN:
            raise KVLayoutMismatch(f"{where}: not a memkv KV block (magic {magic!r})")
        if version != LAYOUT_VERSION or order != ORDER_LKHTD:
            raise KVLayoutMismatch(f"{where}: KV block layout version {version}/order {order}, "
                                   f"this client reads version {LAYOUT_VERSION}/order {ORDER_LKHTD}")
        theirs = KVLayout(n_layers, n_kv, head_dim, block_tokens, _DTYPE_NAMES.get(dcode, f"dtype#{dcode}"))
        if theirs != self:
            raise KVLayoutMismatch(f"{where} was saved with layout [{theirs.describe()}]; this replica "
                                   f"expects [{self.describe()}] for model {model_id!r}: refusing to load it")
        if mfp != model_fp:
            raise KVLayoutMismatch(f"{where} was saved for another model than {model_id!r}: refusing to load it")
        if kfp != fingerprint(key) or idx != index:
            raise KVLayoutMismatch(f"{where}: the value is block {idx} of another prefix (stored under the "
                                   "wrong key): refusing to load it")
        if plen != self.payload_bytes or length != self.block_bytes:
            raise KVLayoutMismatch(f"{where}: value of {length} bytes, header says {HEADER_LEN + plen}, "
                                   f"layout needs {self.block_bytes}")


def _cache_layers(past_key_values: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer of a transformers Cache, or of a legacy tuple of (k, v) pairs."""
    layers = getattr(past_key_values, "layers", None)
    if layers is not None:
        out = []
        for i, layer in enumerate(layers):
            if getattr(layer, "is_sliding", False):
                raise InvalidArgument(f"layer {i} is a sliding-window layer: only full-attention caches are saved")
            if getattr(layer, "keys", None) is None or getattr(layer, "values", None) is None:
                raise InvalidArgument(f"layer {i} of the cache holds no keys/values")
            out.append((layer.keys, layer.values))
        return out
    if isinstance(past_key_values, (list, tuple)):
        return [(kv[0], kv[1]) for kv in past_key_values]
    raise InvalidArgument(f"cannot read KV tensors from a {type(past_key_values).__name__}")


def build_cache(layers: list[tuple[Any, Any]], config: Any) -> Any:
    """A transformers ``DynamicCache`` holding these (keys, values) tensors, without copying them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    if len(cache.layers) != len(layers):
        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)
        return cache
    for layer, (k, v) in zip(cache.layers, layers, strict=True):
        if type(layer) is DynamicLayer:
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        else:
            layer.update(k, v)
    return cache


@dataclass
class LoadStats:
    """What the last ``load`` did (for benchmarks and demos)."""

    lookup_blocks: int = 0
    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    fetch_seconds: float = 0.0


class _ConnectorBase:
    def __init__(self, client: Any, model_id: str, *, block_tokens: int = 16, namespace: str = "shared",
                 salt: bytes | str | None = None, dtype: Any = None, hash: str = "xxh3",
                 key_format: str = "binary", world_size: int = 1, worker_id: int = 0,
                 lease: float = 30.0, ttl: float | None = None) -> None:
        self.client = client
        self.model_id = model_id
        self.block_tokens = block_tokens
        self.namespace = namespace
        self.dtype = dtype
        self.lease = lease
        self.ttl = ttl
        self.hasher = PrefixHasher(model_id, block_tokens, salt=salt, hash=hash, key_format=key_format,
                                   world_size=world_size, worker_id=worker_id,
                                   dtype=_dtype_name(dtype) if dtype is not None else "float32")
        self.model_fp = fingerprint(model_id.encode())
        self.last_load = LoadStats()

    def block_keys(self, token_ids: Any) -> list[bytes]:
        """The chain of block keys of every full block of ``token_ids``."""
        return self.hasher.block_keys(token_ids)

    def layout(self, config: Any) -> KVLayout:
        return KVLayout.from_config(config, block_tokens=self.block_tokens, dtype=self.dtype)

    # -- save: an operation (client/core/chains.py) -------------------------------------------
    def _save(self, store: Any, token_ids: Any, past_key_values: Any) -> Op:
        import torch

        layers = _cache_layers(past_key_values)
        if not layers:
            return 0
        k0 = layers[0][0]
        if k0.dim() != 4 or k0.shape[0] != 1:
            raise InvalidArgument(f"expected KV tensors [1, heads, tokens, head_dim], got {tuple(k0.shape)}")
        _, n_kv, n_cached, head_dim = k0.shape
        dtype = _dtype_name(k0.dtype)
        if self.dtype is not None and dtype != _dtype_name(self.dtype):
            raise KVLayoutMismatch(f"cache holds {dtype} tensors, connector is set to {_dtype_name(self.dtype)}")
        layout = KVLayout(len(layers), int(n_kv), int(head_dim), self.block_tokens, dtype)
        n_tokens = len(token_bytes(token_ids)) // 4
        B = self.block_tokens
        n_blocks = min(n_tokens, int(n_cached)) // B
        if n_blocks == 0:
            return 0
        keys = self.hasher.block_keys(token_ids)[:n_blocks]

        def stage(todo: list[int]) -> list[Any]:
            """The blocks not stored yet, laid out (header + KV of every layer) in one staging tensor."""
            staging = torch.empty((len(todo), layout.block_bytes), dtype=torch.uint8)
            hdr = staging[:, :HEADER_LEN].numpy()
            for row, i in enumerate(todo):
                hdr[row] = np.frombuffer(layout.header(index=i, model_fp=self.model_fp, key=keys[i]), dtype=np.uint8)
            payload = staging[:, HEADER_LEN:].view(k0.dtype).view(len(todo), layout.n_layers, 2, n_kv, B, head_dim)
            idx = torch.tensor(todo, dtype=torch.long)
            contiguous_run = todo == list(range(todo[0], todo[0] + len(todo)))
            with torch.no_grad():
                for li, (k, v) in enumerate(layers):
                    for j, t in enumerate((k, v)):
                        if tuple(t.shape[:2]) != (1, n_kv) or t.shape[3] != head_dim or t.dtype != k0.dtype:
                            raise InvalidArgument(f"layer {li} has KV shape {tuple(t.shape)} {t.dtype}, layer 0 "
                                                  f"{tuple(k0.shape)} {k0.dtype}: mixed layouts are not supported")
                        src = t[0, :, : n_blocks * B].detach().to("cpu").reshape(n_kv, n_blocks, B, head_dim)
                        src = src.permute(1, 0, 2, 3)
                        src = src[todo[0]:todo[0] + len(todo)] if contiguous_run else src.index_select(0, idx)
                        payload[:, li, j].copy_(src)
            return list(staging)

        return (yield from chains.save_chain(store, keys, stage, namespace=self.namespace, ttl=self.ttl))

    # -- load: an operation (client/core/chains.py) -------------------------------------------
    def _load(self, store: Any, token_ids: Any, config: Any, max_tokens: int | None) -> Op:
        import torch

        t0 = time.perf_counter()
        stats = LoadStats()
        self.last_load = stats
        layout = self.layout(config)
        keys = self.hasher.block_keys(token_ids)
        if max_tokens is not None:
            keys = keys[: max(0, max_tokens) // self.block_tokens]
        staging: Any = None
        t1 = t0

        def buffers(n: int) -> list[Any]:
            nonlocal staging, t1
            stats.lookup_blocks = n
            staging = torch.empty((n, layout.block_bytes), dtype=torch.uint8)
            t1 = time.perf_counter()
            return list(staging)

        try:
            _n, got = yield from chains.load_chain(store, keys, buffers, namespace=self.namespace, lease=self.lease)
        except InvalidArgument as exc:
            if "too small" not in str(exc):
                raise
            got = yield from self._explain_oversize(store, keys[:stats.lookup_blocks], layout)
        if stats.lookup_blocks == 0:
            stats.seconds = time.perf_counter() - t0
            return 0, None
        stats.fetch_seconds = time.perf_counter() - t1
        hdrs = staging[:, :HEADER_LEN].numpy()
        m = chains.first_hole(got)  # lost since the lookup (node failure, corrupt value): the run before the hole
        for i in range(m):
            layout.check(hdrs[i].tobytes(), index=i, model_fp=self.model_fp, key=keys[i], length=int(got[i]),
                         model_id=self.model_id)
        if m == 0:
            stats.seconds = time.perf_counter() - t0
            return 0, None
        B, H, D = layout.block_tokens, layout.n_kv_heads, layout.head_dim
        dtype = _torch_dtype(layout.dtype)
        payload = staging[:m, HEADER_LEN:].view(dtype).view(m, layout.n_layers, 2, H, B, D)
        layers = []
        for li in range(layout.n_layers):
            kv = []
            for j in range(2):
                t = torch.empty((1, H, m * B, D), dtype=dtype)
                t.view(H, m, B, D).copy_(payload[:, li, j].permute(1, 0, 2, 3))
                kv.append(t)
            layers.append((kv[0], kv[1]))
        cache = build_cache(layers, config)
        stats.blocks = m
        stats.bytes = m * layout.block_bytes
        stats.seconds = time.perf_counter() - t0
        return m * B, cache

    def _explain_oversize(self, store: Any, keys: list[bytes], layout: KVLayout) -> Op:
        """A stored block is larger than this layout's: read block 0's header to say why."""
        value = yield from store.get(keys[0], namespace=self.namespace)
        if value is None:
            return [None] * len(keys)
        layout.check(bytes(value[:HEADER_LEN]).ljust(HEADER_LEN, b"\0"), index=0, model_fp=self.model_fp,
                     key=keys[0], length=len(value), model_id=self.model_id)
        raise KVLayoutMismatch(f"block of {len(value)} bytes, layout needs {layout.block_bytes}")


class KVCacheConnector(_ConnectorBase):
    """Save and load transformers KV caches through a blocking client (``SyncClient``, or another
    store with its surface)."""

    def save(self, token_ids: Any, past_key_values: Any) -> int:
        """Store every full block of ``token_ids`` whose KV is in ``past_key_values``; blocks written."""
        store, run = operations_of(self.client)
        return run(self._save(store, token_ids, past_key_values))

    def load(self, token_ids: Any, config: Any, *, max_tokens: int | None = None) -> tuple[int, Any]:
        """``(n_tokens, cache)``: the longest cached prefix of ``token_ids`` (at most ``max_tokens``
        tokens) as a transformers ``DynamicCache``; ``(0, None)`` on a miss."""
        store, run = operations_of(self.client)
        return run(self._load(store, token_ids, config, max_tokens))


class AsyncKVCacheConnector(_ConnectorBase):
    """The same with the trio ``Client``: ``await conn.save(...)``, ``await conn.load(...)``.

    The tensor work (a memcpy per layer) runs in the calling task; it is short
    next to the transfer, so it is not pushed to a thread.
    """

    async def save(self, token_ids: Any, past_key_values: Any) -> int:
        return await self.client.execute(self._save(self.client.core, token_ids, past_key_values))

    async def load(self, token_ids: Any, config: Any, *, max_tokens: int | None = None) -> tuple[int, Any]:
        return await self.client.execute(self._load(self.client.core, token_ids, config, max_tokens))


# -- serving helpers (demo, benchmark, tests) --------------------------------------------------
@dataclass
class PrefillResult:
    logits: Any  # [vocab] logits of the last prompt token
    cache: Any
    cached_tokens: int  # loaded from the store
    computed_tokens: int  # prefilled here
    load_s: float
    prefill_s: float
    save_s: float = 0.0
    saved_blocks: int = 0

    @property
    def ttft_s(self) -> float:
        """Time to the first token's logits: load + prefill of the rest (saving happens after)."""
        return self.load_s + self.prefill_s


def prefill(model: Any, token_ids: Any, connector: _ConnectorBase | None = None, *, save: bool = True,
            ) -> PrefillResult:
    """Prefill ``token_ids`` for a model, loading the longest cached prefix first when a connector is given.

    At least the last prompt token is always computed (its logits give the
    first new token), so at most ``len - 1`` tokens are loaded. With ``save``
    the prompt's full blocks are stored afterwards (not counted in TTFT).
    """
    import torch

    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
    n_prompt = ids.shape[1]
    if n_prompt == 0:
        raise InvalidArgument("empty prompt")
    t0 = time.perf_counter()
    n, cache = 0, None
    if connector is not None:
        if not isinstance(connector, KVCacheConnector):
            raise InvalidArgument("prefill() drives a blocking KVCacheConnector")
        n, cache = connector.load(ids[0], model.config, max_tokens=n_prompt - 1)
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids[:, n:], cache=cache, use_cache=True, logits_to_keep=1)
    t2 = time.perf_counter()
    res = PrefillResult(out.logits[0, -1], out.cache, n, n_prompt - n, t1 - t0, t2 - t1)
    if connector is not None and save:
        res.saved_blocks = connector.save(ids[0], out.cache)
        res.save_s = time.perf_counter() - t2
    return res


def greedy_generate(model: Any, token_ids: Any, n_new: int, connector: KVCacheConnector | None = None, *,
                    save: bool = True) -> tuple[list[int], list[Any], PrefillResult]:
    """Greedy decoding of ``n_new`` tokens: (new token ids, logits of each step, the prefill's result)."""
    import torch

    pre = prefill(model, token_ids, connector, save=save)
    logits = [pre.logits]
    cache = pre.cache
    tokens: list[int] = []
    nxt = int(torch.argmax(pre.logits))
    with torch.no_grad():
        for step in range(n_new):
            tokens.append(nxt)
            if step == n_new - 1:
                break
            out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[0, -1])
            nxt = int(torch.argmax(out.logits[0, -1]))
    return tokens, logits, pre
