"""The rebalancing part of ``memkv status``: migrations as rich progress bars."""

from __future__ import annotations

from typing import Any

from memkv.sizes import format_size


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
