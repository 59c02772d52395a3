"""``memkv demo``: start a local node and run a KV-cache style workload.

It plays an inference replica: conversations are chains of KV blocks; turn 1
saves its blocks, turn 2 asks ``lookup_prefix`` how much of its prompt is
cached, fetches those blocks with ``get_many_into`` and saves only the new
tail. The output says what was stored, found and how fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any


def _chain(conversation: int, n_blocks: int) -> list[bytes]:
    keys, prev = [], b""
    for i in range(n_blocks):
        prev = hashlib.blake2b(prev + f"conv{conversation}-block{i}".encode(), digest_size=16).digest()
        keys.append(prev)
    return keys


def run_demo(json_path: str | None = None, nodes: int = 1) -> int:
    from rich.console import Console
    from rich.table import Table

    from memkv.client import SyncClient
    from memkv.localproc import start_node
    from memkv.status import node_table

    console = Console()
    block = 256 * 1024  # one 16-token block of a 7B model's KV cache is ~8 MiB; keep the demo light
    conversations, turn1_blocks, turn2_blocks = 8, 12, 16
    console.print(f"[bold]memkv demo[/bold]: starting a storage node ({os.cpu_count()} CPUs here)")
    node = start_node(memory="512MiB")
    results: dict[str, Any] = {"url": node.url}
    try:
        with SyncClient.connect(node.url) as client:
            console.print(f"node is up at {node.url}")
            payload = [os.urandom(block) for _ in range(turn2_blocks)]
            t0 = time.perf_counter()
            for conv in range(conversations):
                keys = _chain(conv, turn1_blocks)
                client.put_many(list(zip(keys, payload[:turn1_blocks], strict=True)),
                                parents=[None, *keys[:-1]])
            t_save = time.perf_counter() - t0
            saved = conversations * turn1_blocks * block

            table = Table(title="turn 2 of each conversation, on 'another replica'")
            for col in ("conversation", "prompt blocks", "cached (lookup_prefix)", "loaded", "load ms", "saved new"):
                table.add_column(col, justify="right")
            bufs = [bytearray(block) for _ in range(turn2_blocks)]
            loaded_total, t_load = 0, 0.0
            for conv in range(conversations):
                keys = _chain(conv, turn2_blocks)
                t1 = time.perf_counter()
                n = client.lookup_prefix(keys, lease=10.0)
                got = client.get_many_into(keys[:n], bufs[:n])
                dt = time.perf_counter() - t1
                t_load += dt
                ok = all(g == block for g in got) and all(bufs[i] == payload[i] for i in range(n))
                loaded_total += n * block
                client.put_many(list(zip(keys[n:], payload[n:turn2_blocks], strict=True)),
                                parents=keys[n - 1:turn2_blocks - 1] if n else None)
                table.add_row(str(conv), str(turn2_blocks), str(n), "ok" if ok else "MISMATCH",
                              f"{dt * 1e3:.2f}", str(turn2_blocks - n))
                if not ok:
                    raise SystemExit("demo: loaded bytes differ from what was saved")
            console.print(table)
            console.print(f"saved {saved / 2**20:.0f} MiB in {t_save * 1e3:.0f} ms "
                          f"({saved / t_save / 1e9:.2f} GB/s); loaded {loaded_total / 2**20:.0f} MiB in "
                          f"{t_load * 1e3:.0f} ms ({loaded_total / t_load / 1e9:.2f} GB/s)")
            st = client.stats()
            console.print(node_table("node stats", st))
            results.update(saved_bytes=saved, save_s=t_save, loaded_bytes=loaded_total, load_s=t_load,
                           stats=st)
    finally:
        node.stop()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
    console.print("[green]demo finished[/green]")
    return 0
