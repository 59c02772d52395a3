"""Scale of KV events and of the router's index, with a synthetic event generator.

    python -m bench.router_scale [--blocks 1000000] [--repeats 3]

For clusters of 10, 100 and 1000 memkv nodes holding ``--blocks`` blocks
(each block on 2 nodes, chains of 32 blocks, block size 16), measures:

- index memory (tracemalloc, bytes per block and MiB per 1M blocks) of a
  ``PrefixIndex`` that follows every node;
- apply rate: decoded KV-event batches applied to the index (blocks/s), i.e.
  how many stored/removed blocks per second one router thread can follow;
- publish rate: batches encoded by a node's ``EventStream`` (blocks/s), and
  the wire bytes per block, so a cluster's event bandwidth is
  ``blocks stored per second x bytes per block``;
- query time (hashing included) for a 4k-token prompt whose 256 blocks the
  store holds, against the full index, and the hashing alone.

Medians over ``--repeats`` runs; JSON and PNG in bench/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
import tracemalloc
from pathlib import Path

from memkv.client.router import BlockHasher, PrefixIndex, Replica, StoreNode
from memkv.events.stream import EventStream
from memkv.events.wire import MEDIUM_STORAGE, BlockStored, decode_batch

RESULTS = Path(__file__).resolve().parent / "results"
CHAIN, BLOCK_SIZE, REPLICAS = 32, 16, 2
SCOPE = ("m", "shared", "")  # (model, namespace, tenant): one shared scope


def synthetic_batches(nodes: int, blocks: int, seed: int = 0) -> tuple[dict[str, list[bytes]], int]:
    """Per node, encoded batches (one chain's blocks each) as a node's EventStream publishes them."""
    rng = random.Random(seed)
    streams = {f"n{i}": EventStream("kv@n@m@shared", buffer_batches=1, buffer_bytes=1 << 30) for i in range(nodes)}
    out: dict[str, list[bytes]] = {name: [] for name in streams}
    names = list(streams)
    wire = 0
    for _ in range(blocks // CHAIN):
        hashes = [rng.getrandbits(64) for _ in range(CHAIN)]
        for holder in rng.sample(names, REPLICAS):
            ev = BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=BLOCK_SIZE,
                             lora_id=None, medium=MEDIUM_STORAGE, lora_name=None, locality="REMOTE",
                             ownership="memkv")
            _, payload = streams[holder].add([ev])
            out[holder].append(payload)
            wire += len(payload)
    return out, wire


def run(nodes: int, blocks: int) -> dict[str, float]:
    t0 = time.perf_counter()
    batches, wire = synthetic_batches(nodes, blocks)
    publish_s = time.perf_counter() - t0
    n_events = blocks // CHAIN * CHAIN * REPLICAS
    gc.collect()
    tracemalloc.start()
    index = PrefixIndex([Replica("r0", model="m")], default_block_size=BLOCK_SIZE)
    for i in range(nodes):
        index.add_store_node(StoreNode(f"n{i}"))
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    t0 = time.perf_counter()
    for name, payloads in batches.items():
        for p in payloads:
            index.apply_store_events(name, SCOPE, decode_batch(p).events)
    apply_s = time.perf_counter() - t0
    del batches
    mem = _index_bytes(nodes, blocks) - base
    # the query walks a prompt as far as the store holds it: one whose 256 blocks are all held (on 2 nodes)
    tokens = list(range(4096))
    hasher = BlockHasher()
    t0 = time.perf_counter()
    chain = hasher.chain(tokens, BLOCK_SIZE)
    hash_ms = (time.perf_counter() - t0) * 1000
    held = BlockStored(block_hashes=chain, parent_block_hash=None, token_ids=[], block_size=BLOCK_SIZE,
                       lora_id=None, medium=MEDIUM_STORAGE, lora_name=None, locality="REMOTE", ownership="memkv")
    for name in ("n0", f"n{nodes - 1}"):
        index.apply_store_events(name, SCOPE, [held])
    t0 = time.perf_counter()
    for _ in range(20):
        answer = index.query(tokens)
    query_ms = (time.perf_counter() - t0) / 20 * 1000
    assert answer.by_name()["r0"].store_tokens == len(tokens), "the held prompt is not found whole"
    return {"nodes": nodes, "blocks": blocks, "block_replicas": n_events,
            "index_bytes_per_block": mem / (blocks // CHAIN * CHAIN),
            "index_mib_per_1m_blocks": mem / (blocks // CHAIN * CHAIN) * 1e6 / 2**20,
            "apply_blocks_per_s": n_events / apply_s, "publish_blocks_per_s": n_events / publish_s,
            "wire_bytes_per_block": wire / n_events, "query_ms_4k_tokens": query_ms,
            "hash_ms_4k_tokens": hash_ms}


def _index_bytes(nodes: int, blocks: int) -> int:
    batches, _ = synthetic_batches(nodes, blocks)
    decoded = {n: [decode_batch(p).events for p in ps] for n, ps in batches.items()}
    del batches
    gc.collect()
    tracemalloc.start()
    index = PrefixIndex([Replica("r0", model="m")], default_block_size=BLOCK_SIZE)
    for i in range(nodes):
        index.add_store_node(StoreNode(f"n{i}"))
    for name, evs in decoded.items():
        for e in evs:
            index.apply_store_events(name, SCOPE, e)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del index
    return size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default bench/results)")
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    args = ap.parse_args()
    rows = []
    for nodes in args.nodes:
        runs = [run(nodes, args.blocks) for _ in range(args.repeats)]
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"command": f"python -m bench.router_scale --blocks {args.blocks} --repeats {args.repeats}",
           "chain_blocks": CHAIN, "block_size": BLOCK_SIZE, "replicas_per_block": REPLICAS, "rows": rows}
    (args.out / "router_scale.json").write_text(json.dumps(out, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["nodes"] for r in rows]
    a.bar([str(x) for x in xs], [r["index_mib_per_1m_blocks"] for r in rows])
    a.set_xlabel("memkv nodes")
    a.set_ylabel("router index MiB per 1M blocks (2 replicas each)")
    b.bar([str(x) for x in xs], [r["apply_blocks_per_s"] / 1e6 for r in rows], label="apply (router)")
    b.set_xlabel("memkv nodes")
    b.set_ylabel("million block events / s (one thread)")
    fig.suptitle("KV-event index scale (synthetic generator)")
    fig.tight_layout()
    fig.savefig(args.out / "router_scale.png", dpi=100)


if __name__ == "__main__":
    main()
