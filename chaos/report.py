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
    elif status in ("pending", "skipped", "error", "xfail", "xpass") and r.get("reason"):
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
              "xfail": "magenta", "xpass": "bold magenta",
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


def soak_lines(r: dict[str, Any]) -> list[str]:
    """A soak's verdict and figures, one line each (terminal and docs/chaos.md)."""
    m = r.get("metrics") or {}
    out = [f"soak seed {r['seed']}, {r['minutes']} min ({r.get('duration_s', 0):.0f} s in all): {r['status']}"
           + (f" -- {r['reason']}" if r.get("reason") else "")]
    for v in r.get("violations", []):
        out.append(f"  VIOLATION: {v}")
    if not m:
        return out
    a = m["availability"]

    def share(x: dict[str, Any]) -> str:
        s = x["share"]
        return "-" if s is None else f"{100 * s:.2f}% of {x['attempted']}"

    kinds = ", ".join(f"{k} {n}" for k, n in sorted(m["faults_by_kind"].items()))
    out += [
        f"  faults injected: {m['faults_injected']} ({kinds}); "
        f"at most {m['max_concurrent_faults']} at once; {m['fault_s']:.0f} s under faults, {m['quiet_s']:.0f} s quiet; "
        f"fault errors {m['fault_errors']}",
        f"  ops: {m['ops_attempted']} attempted, {m['ops_acknowledged']} acknowledged; writes acknowledged "
        f"{m['writes_acknowledged']}; deletes {m['deletes_acknowledged']}; final reads {m['final_reads']}",
        f"  acknowledged writes lost {m['acked_writes_lost']}"
        + ("" if m["acked_writes_lost_known"] is None else
           f" (+ {m['acked_writes_lost_known']} written while a replica of their slot was impaired, reported "
           f"apart: known_single_copy)")
        + f", invalid reads {m['invalid_reads']}, "
        f"resurrected "
        f"deletes {m['resurrected_deletes']}, zombie writes {m['zombie_writes']}, stale reads {m['stale_reads']} "
        f"(in quiet windows {m['stale_reads_quiet']})",
        f"  availability reads / writes: all {share(a['all']['reads'])} / {share(a['all']['writes'])}; under faults "
        f"{share(a['under_faults']['reads'])} / {share(a['under_faults']['writes'])}; quiet "
        f"{share(a['quiet']['reads'])} / {share(a['quiet']['writes'])}",
        f"  longest unavailability reads / writes {m['read_unavailable_s']:.1f} / {m['write_unavailable_s']:.1f} s "
        f"(quiet reads {m['quiet_read_unavailable_s']:.1f} s); read latency p50 {m['read_latency_s']['p50']} s, "
        f"p99 {m['read_latency_s']['p99']} s, max {m['read_latency_s']['max']} s; converged "
        f"{m['time_to_converge_s']} s after the last heal",
    ]
    return out


def print_soak(r: dict[str, Any]) -> None:
    for line in soak_lines(r):
        print(line)
    for e in r.get("fault_errors", [])[:20]:
        print(f"  fault error: {e}")
