"""The rebalancing part of ``memkv status``: what is moving (read from etcd), shown as progress bars."""

from __future__ import annotations

import json
import time
from typing import Any

from memkv.cluster.rebalancer import drain_prefix, migrations_prefix, progress_key, under_replicated
from memkv.sizes import format_size


def migration_status(etcd: Any, cluster: str, st: Any) -> dict[str, Any]:
    """For ``memkv status``: migrations in flight (bytes, rate, ETA), under-replicated slots, progress."""
    kvs, _ = etcd.get_prefix(migrations_prefix(cluster))
    now = time.time()
    out = []
    for kv in kvs:
        try:
            rec = json.loads(kv.value)
        except ValueError:
            continue
        elapsed = max(1e-3, now - float(rec.get("started", now)))
        for mv in rec.get("moves", []):
            done, total = int(mv.get("bytes_done", 0)), int(mv.get("bytes_total", 0))
            rate = done / elapsed
            left = max(0, total - done)
            out.append({"round": rec.get("id"), "state": rec.get("state"), "src": mv.get("src"),
                        "dst": mv.get("dst"), "slots": len(mv.get("slots", [])), "bytes_done": done,
                        "bytes_total": total, "values_done": int(mv.get("values_done", 0)),
                        "rate": rate, "eta_s": (left / rate) if rate > 0 else None,
                        "done": bool(mv.get("done")), "failed": mv.get("failed"), "resumed": rec.get("resumed")})
    kv, _ = etcd.get(progress_key(cluster))
    progress = json.loads(kv.value) if kv is not None else None
    drains = sorted(k.key.rsplit("/", 1)[1] for k in etcd.get_prefix(drain_prefix(cluster))[0])
    sm = st.slotmap
    return {"migrations": out, "rebalancer": progress, "draining": drains,
            "slots_moving": len(sm.pending) if sm is not None else 0,
            "under_replicated": under_replicated(sm, set(st.nodes)) if sm is not None else 0}


def print_migrations(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = Console()
    rb = data.get("rebalancer") or {}
    line = (f"rebalancer: {rb.get('state', '-')} (leader {data.get('leader') or '-'}), "
            f"slots moving {data.get('slots_moving', 0)}, under-replicated slots {data.get('under_replicated', 0)}")
    if rb.get("moves_left"):
        line += f", moves left {rb['moves_left']}"
    if data.get("draining"):
        line += f", draining {', '.join(data['draining'])}"
    console.print(line)
    migrations = data.get("migrations") or []
    if not migrations:
        console.print("migrations: none")
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TextColumn("{task.fields[info]}"), console=console, auto_refresh=False)
    for m in migrations:
        total = max(1, m["bytes_total"])
        eta = m.get("eta_s")
        info = (f"{format_size(m['bytes_done'])} / {format_size(m['bytes_total'])}, "
                f"{format_size(int(m['rate']))}/s, ETA {f'{eta:.0f}s' if eta is not None else '-'}, "
                f"{m['values_done']:,} values" + (", resumed" if m.get("resumed") else "")
                + (f", FAILED: {m['failed']}" if m.get("failed") else ""))
        progress.add_task(f"{m['src']} -> {m['dst']} ({m['slots']} slots, {m['state']})", total=total,
                          completed=min(total, m["bytes_done"]) if not m.get("done") else total, info=info)
    progress.refresh()
    console.print(progress.get_renderable())
