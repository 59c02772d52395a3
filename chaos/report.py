"""The per-run report: a rich table in the terminal and a Markdown table (for README)."""

from __future__ import annotations

import sys
from typing import Any

COLUMNS = [("scenario", "scenario"), ("status", "status"), ("faults", "faults injected"),
           ("ops", "ops attempted / acked"), ("lost", "acked writes lost"), ("invalid", "invalid reads"),
           ("unavail", "unavailable r / w (s)"), ("converge", "converge (s)")]


def row(r: dict[str, Any]) -> dict[str, str]:
    m = r.get("metrics") or {}
    faults = "; ".join(m.get("faults", [])) or "-"
    status = r["status"]
    if status == "unsupported" and r.get("reason"):
        status = r["reason"]  # "unsupported on <target>: why"
    elif status in ("pending", "skipped", "error") and r.get("reason"):
        status = f"{status}: {r['reason']}"
    if not m:
        return {"scenario": r["scenario"], "status": status, "faults": "-", "ops": "-", "lost": "-",
                "invalid": "-", "unavail": "-", "converge": "-"}
    ttc = m.get("time_to_converge_s")
    return {
        "scenario": r["scenario"], "status": status, "faults": faults,
        "ops": f"{m['ops_attempted']} / {m['ops_acknowledged']}",
        "lost": str(m["acked_writes_lost"]), "invalid": str(m["invalid_reads"]),
        "unavail": f"{m['read_unavailable_s']:.1f} / {m['write_unavailable_s']:.1f}",
        "converge": "-" if ttc is None else f"{ttc:.1f}",
    }


def print_table(results: list[dict[str, Any]], title: str = "memkv chaos") -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dev dependency
        print(markdown_table(results))
        return
    t = Table(title=title, show_lines=False)
    for _, head in COLUMNS:
        t.add_column(head, overflow="fold")
    styles = {"passed": "green", "failed": "bold red", "error": "red", "pending": "yellow", "skipped": "yellow",
              "unsupported": "yellow"}
    for r in results:
        cells = row(r)
        t.add_row(*[cells[k] for k, _ in COLUMNS], style=styles.get(r["status"], ""))
    console = Console(width=None if sys.stdout.isatty() else 180)
    console.print(t)
    for r in results:
        for v in r.get("violations", []):
            console.print(f"[red]{r['scenario']}: {v}[/red]")


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        cells = row(r)
        lines.append("| " + " | ".join(cells[k].replace("|", "/") for k, _ in COLUMNS) + " |")
    return "\n".join(lines)
