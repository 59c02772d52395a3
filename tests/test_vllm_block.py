"""The vLLM connector's block identity and value format (client/vllm_block.py), without vLLM.

The engine-level behaviour is in tests/test_vllm_connector.py; these check the
rules those tests rely on, one at a time: what changes a key, what a header
holds, and that every kind of foreign value is refused.
"""

from __future__ import annotations

import dataclasses

import pytest

from memkv.client.vllm_block import BlockFormat, BlockMismatch, PageLayout, block_key, read_header
from memkv.protocol.block_header import BlockHeader, read_block

CPU = PageLayout(backend="CPU_ATTN", isa="vec", dtype="float32", cache_dtype="auto", page_shape=(2, 128, 128),
                 block_dim=0, pages_per_block=1, block_tokens=128, layers=2, itemsize=4, tp=(0, 1), pp=(0, 1),
                 engine="vllm-0.32.0")
H0, H1 = b"\x01" * 32, b"\x02" * 32


def key(**over: object) -> bytes:
    args = {"model_id": "m@", "layout_fp": CPU.fingerprint, "lora": None, "salt": None, "block_hash": H1, **over}
    return block_key(**args)  # type: ignore[arg-type]


def test_key_depends_on_every_part_of_the_identity() -> None:
    base = key()
    assert key() == base and len(base) == 16
    amx = dataclasses.replace(CPU, isa="amx")  # same model on a machine whose kernel packs pages otherwise
    variants = [key(model_id="other@"), key(layout_fp=amx.fingerprint), key(lora="l@/p"), key(salt="tenant-b"),
                key(block_hash=H0)]
    assert len({base, *variants}) == 1 + len(variants)
    assert key(salt="") == base  # no salt and an empty salt are the same (vLLM hashes neither)


def test_layout_fingerprint_covers_the_page_packing() -> None:
    for change in ({"isa": "amx"}, {"dtype": "bfloat16", "itemsize": 2}, {"page_shape": (2, 128, 256)},
                   {"block_tokens": 64}, {"tp": (1, 2)}, {"engine": "vllm-0.33.0"}, {"cache_dtype": "fp8"}):
        assert dataclasses.replace(CPU, **change).fingerprint != CPU.fingerprint, change


TOKENS = list(range(70_000, 70_128))  # over 65535: ids as wide as real vocabularies


def make_value(fmt: BlockFormat, *, index: int = 1, parent: bytes | None = H0, block_hash: bytes = H1) -> bytearray:
    head = fmt.header(block_hash=block_hash, parent_hash=parent, index=index, lora="adapter", token_ids=TOKENS)
    return bytearray(head) + bytearray(range(256)) * (fmt.layout.payload_bytes // 256)


def test_header_is_self_describing_and_deterministic() -> None:
    fmt = BlockFormat(CPU, model_id="m@", hash_algo="sha256", hash_len=64)
    assert fmt.header_len % 256 == 0 and fmt.value_len == fmt.header_len + 2 * 2 * 128 * 128 * 4
    value = make_value(fmt)
    assert make_value(fmt) == value  # two writers of the same block store the same bytes
    meta = read_header(value)
    assert meta["block_hash"] == H1 and meta["parent_hash"] == H0 and meta["index"] == 1
    assert meta["hash_algo"] == "sha256" and meta["model"] == "m@" and meta["lora"] == "adapter"
    assert meta["layout"] == CPU.fingerprint and meta["layout_desc"]["isa"] == "vec"
    assert meta["pages"] == 2 and meta["page_bytes"] == CPU.page_bytes and meta["header_len"] == fmt.header_len
    assert meta["token_ids"] == TOKENS and meta["tokens"] == 128
    assert read_header(make_value(fmt, index=0, parent=None))["parent_hash"] is None
    fmt.check(value, len(value), block_hash=H1)
    # what a node reads of it to announce the block (memkv/protocol/block_header.py)
    block = read_block(memoryview(value))
    assert block == BlockHeader(H1, H0, 128, tuple(TOKENS), "m@", "adapter", "sha256", 1)
    with pytest.raises(ValueError):  # a block is always whole
        fmt.header(block_hash=H1, parent_hash=H0, index=1, lora=None, token_ids=TOKENS[:-1])


def test_node_side_reader_says_not_a_block_for_anything_else() -> None:
    fmt = BlockFormat(CPU, model_id="m@", hash_algo="sha256", hash_len=64)
    value = make_value(fmt)
    assert read_block(value[:fmt.header_len]) is not None  # the header alone is enough
    broken = [b"", b"MKVV", bytes(4096), b"MKVV" + bytes(4092), value[:fmt.header_len - 1]]
    for i in (4, 8, 12, 16, 18):  # version, header length, map length, the map, its first key
        v = bytearray(value)
        v[i:i + 4] = b"\xff\xff\xff\xff"
        broken.append(v)
    assert [read_block(b) for b in broken] == [None] * len(broken)


@pytest.mark.parametrize("case", ["missing", "short", "magic", "layout", "model", "block"])
def test_foreign_values_are_refused(case: str) -> None:
    fmt = BlockFormat(CPU, model_id="m@", hash_algo="sha256", hash_len=64)
    value, length, want = make_value(fmt), None, H1
    if case == "short":
        length = len(value) - 4
    elif case == "magic":
        value[0:4] = b"MKVB"
    elif case == "layout":  # the same tokens saved by a machine whose vLLM kernel uses AMX
        value = make_value(BlockFormat(dataclasses.replace(CPU, isa="amx"), model_id="m@", hash_algo="sha256",
                                       hash_len=64))
    elif case == "model":
        value = make_value(BlockFormat(CPU, model_id="other@", hash_algo="sha256", hash_len=64))
    elif case == "block":
        want = H0  # the value holds another block than the one asked for
    if case != "missing" and length is None:
        length = len(value)
    with pytest.raises(BlockMismatch):
        fmt.check(value, length, block_hash=want)


def test_two_engines_saving_the_same_blocks_at_once_both_succeed(memkv_node) -> None:
    """What the connector's sender relies on: with different bytes for the same keys (two machines'
    float results), the first writer of each key wins, the other gets ``KeyExists`` — which the
    connector counts and ignores — and every other block of its batch is stored."""
    import threading

    from memkv.client import SyncClient
    from memkv.errors import KeyExists

    keys = [key(block_hash=bytes([i]) * 32) for i in range(8)]
    extra = key(block_hash=b"\xee" * 32)
    outcome: dict[str, str] = {}
    start = threading.Barrier(2)

    def engine(name: str, fill: bytes, batch: list[bytes]) -> None:
        with SyncClient.connect(memkv_node.url) as c:
            start.wait()
            try:
                c.put_many([(k, fill * 4096) for k in batch], parents=[None] + batch[:-1])
                outcome[name] = "stored"
            except KeyExists:
                outcome[name] = "conflict"

    threads = [threading.Thread(target=engine, args=("a", b"A", keys)),
               threading.Thread(target=engine, args=("b", b"B", [*keys, extra]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(outcome) == {"a", "b"} and "conflict" in outcome.values()
    with SyncClient.connect(memkv_node.url) as c:
        values = c.get_many([*keys, extra])
    assert all(v in (b"A" * 4096, b"B" * 4096) for v in values[:-1])  # each key: one writer's whole value
    assert values[-1] == b"B" * 4096  # the conflicting batch's other block was stored
