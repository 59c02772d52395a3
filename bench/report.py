"""Turning samples into the report: medians, memkv/peer ratios, targets, JSON, plot and table."""

from __future__ import annotations

import json
import statistics
import sys
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.workload import Sample

KiB, MiB = 1 << 10, 1 << 20
METRICS = ("gbps", "ops_s", "p50_us", "p99_us", "mean_us")
# memkv op -> the Redis op it is compared with
COMPARE = {"put": "put", "get": "get", "get_into": "get", "get_many": "get_many", "get_many_into": "get_many"}
BASELINE = "redis"

Result = dict[str, Any]


def fmt_size(n: int) -> str:
    if n % MiB == 0:
        return f"{n // MiB}MiB"
    if n % KiB == 0:
        return f"{n // KiB}KiB"
    return f"{n}B"


def op_label(op: str, batch: int) -> str:
    return f"{op}[{batch}]" if batch > 1 else op


# --- aggregation -------------------------------------------------------------------------


def summarize(samples: list[Sample]) -> list[Result]:
    """Group repeats of the same measurement; the median of each metric over good repeats."""
    groups: dict[tuple[str, str, int, int, int], list[Sample]] = defaultdict(list)
    for s in samples:
        groups[(s.peer, s.op, s.size, s.batch, s.clients)].append(s)
    out = []
    for (peer, op, size, batch, clients), runs in groups.items():
        good = [r for r in runs if r.error is None and r.misses == 0 and r.ops > 0]
        median = {m: statistics.median(getattr(r, m) for r in good) for m in METRICS} if good else None
        out.append(
            {
                "peer": peer,
                "op": op,
                "size": size,
                "batch": batch,
                "clients": clients,
                "median": median,
                "runs": [asdict(r) for r in runs],
                "errors": [r.error for r in runs if r.error] + [f"{r.misses} misses" for r in runs if r.misses],
            }
        )
    return out


def find(results: list[Result], peer: str, op: str, size: int, clients: int) -> Result | None:
    for r in results:
        if (r["peer"], r["op"], r["size"], r["clients"]) == (peer, op, size, clients) and r["median"]:
            return r
    return None


def compute_ratios(
    results: list[Result], base: str = BASELINE, same_op: bool = False, peers: tuple[str, ...] = ()
) -> list[Result]:
    """For every measurement of another peer (of ``peers`` if given) with a counterpart on
    ``base``: GB/s ratio and latency ratios. The counterpart is Redis' equivalent command, or the
    same operation (``same_op``: memkv against an earlier commit of itself)."""
    out = []
    for r in results:
        if r["peer"] == base or (peers and r["peer"] not in peers) or not r["median"] or r["op"] not in COMPARE:
            continue
        base_r = find(results, base, r["op"] if same_op else COMPARE[r["op"]], r["size"], r["clients"])
        if base_r is None:
            continue
        m, b = r["median"], base_r["median"]
        out.append(
            {
                "peer": r["peer"],
                "op": r["op"],
                "vs": f"{base}:{base_r['op']}",
                "size": r["size"],
                "batch": r["batch"],
                "clients": r["clients"],
                "gbps_ratio": m["gbps"] / b["gbps"] if b["gbps"] else None,
                "p50_ratio": m["p50_us"] / b["p50_us"] if b["p50_us"] else None,
                "p99_ratio": m["p99_us"] / b["p99_us"] if b["p99_us"] else None,
            }
        )
    return out


def best_of(results: list[Result], peer: str, ops: tuple[str, ...], size: int, clients: int, key: str) -> Result | None:
    """The best of several memkv ways to do the same read (``get`` vs ``get_into``)."""
    cands = [r for op in ops if (r := find(results, peer, op, size, clients))]
    if not cands:
        return None
    lower_is_better = key.endswith("_us")
    return (min if lower_is_better else max)(cands, key=lambda r: r["median"][key])


def evaluate_targets(results: list[Result], limits: dict[str, Any], peer: str = "memkv") -> list[Result]:
    """The single-node targets (lead's list); ``passed`` is None when a side was not measured."""
    targets: list[Result] = []

    def add(name: str, desc: str, value: float | None, threshold: float, higher: bool, basis: str) -> None:
        passed = None if value is None else (value >= threshold if higher else value <= threshold)
        targets.append(
            {
                "name": name,
                "description": desc,
                "value": value,
                "threshold": threshold,
                "higher_is_better": higher,
                "basis": basis,
                "passed": passed,
            }
        )

    def ratio(ops: tuple[str, ...], base_op: str, size: int, clients: int, key: str) -> tuple[float | None, str]:
        m = best_of(results, peer, ops, size, clients, key)
        b = find(results, BASELINE, base_op, size, clients)
        if m is None or b is None or not b["median"][key]:
            return None, f"{peer} {'|'.join(ops)} vs {BASELINE} {base_op}: not measured"
        return m["median"][key] / b["median"][key], f"{peer} {m['op']} vs {BASELINE} {base_op}"

    for size in (1 * MiB, 4 * MiB):
        for clients in (1, 8):
            v, basis = ratio(("get", "get_into"), "get", size, clients, "gbps")
            add(
                f"get_{fmt_size(size)}_c{clients}_vs_redis",
                f"GET {fmt_size(size)} GB/s, {clients} client(s), >= 1.5x Redis",
                v,
                1.5,
                True,
                basis,
            )

    m = best_of(results, peer, ("get", "get_into"), 4 * MiB, 1, "gbps")
    tcp = (limits.get("tcp_stream") or {}).get("gbps")
    add(
        "get_4MiB_vs_loopback_tcp",
        "GET 4MiB GB/s (1 client) >= 70% of raw Python loopback TCP",
        m["median"]["gbps"] / tcp if m and tcp else None,
        0.70,
        True,
        f"{peer} {m['op'] if m else '?'} vs limits.tcp_stream",
    )

    for clients in (1, 8):
        v, basis = ratio(("get_many", "get_many_into"), "get_many", 64 * KiB, clients, "gbps")
        add(
            f"get_many16_64KiB_c{clients}_vs_mget",
            f"batched GET 16x64KiB GB/s, {clients} client(s), >= 2x Redis MGET",
            v,
            2.0,
            True,
            basis,
        )

    v, basis = ratio(("get", "get_into"), "get", 4 * KiB, 1, "p50_us")
    add("get_4KiB_p50_vs_redis", "p50 latency of GET 4KiB (1 client) <= 1.2x Redis", v, 1.2, False, basis)

    # issue 18: reads that never wake the node (shm through the client-readable index) and TCP,
    # against the peers and the machine's limits
    def versus(p: str, base: str, size: int, key: str) -> tuple[float | None, str]:
        m = best_of(results, p, ("get", "get_into"), size, 1, key)
        b = best_of(results, base, ("get", "get_into"), size, 1, key)
        if m is None or b is None or not b["median"][key]:
            return None, f"{p} vs {base} GET {fmt_size(size)}: not measured"
        return m["median"][key] / b["median"][key], f"{p} {m['op']} vs {base} {b['op']}"

    shm = "memkv-auto"
    m = best_of(results, shm, ("get", "get_into"), 1 * MiB, 1, "gbps")
    copy = (limits.get("memcpy") or {}).get("gbps")
    add("shm_get_1MiB_vs_memcpy", "shm GET 1MiB GB/s (1 client) >= 60% of a cold memcpy",
        m["median"]["gbps"] / copy if m and copy else None, 0.60, True,
        f"{shm} {m['op'] if m else '?'} vs limits.memcpy")
    v, basis = versus(shm, "lmcache_server", 1 * MiB, "gbps")
    add("shm_get_1MiB_vs_lmcache", "shm GET 1MiB GB/s (1 client) >= 2x lmcache_server", v, 2.0, True, basis)
    m = best_of(results, shm, ("get", "get_into"), 4 * KiB, 1, "p50_us")
    add("shm_get_4KiB_p50_us", "shm GET 4KiB p50 (1 client) <= 20 us", m["median"]["p50_us"] if m else None,
        20.0, False, f"{shm} {m['op'] if m else '?'} p50 in us")
    for size in (1 * MiB, 4 * MiB):
        v, basis = versus(peer, "lmcache_server", size, "gbps")
        add(f"tcp_get_{fmt_size(size)}_vs_lmcache", f"TCP GET {fmt_size(size)} GB/s (1 client) >= 1.2x lmcache_server",
            v, 1.2, True, basis)
    v, basis = versus(peer, BASELINE, 4 * KiB, "p50_us")
    add("tcp_get_4KiB_p50_vs_redis", "TCP GET 4KiB p50 (1 client) <= Redis's", v, 1.0, False, basis)
    return targets


# --- output ----------------------------------------------------------------------------------


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")


def write_results(doc: dict[str, Any], outdir: Path, name: str,
                  plot: Callable[[dict[str, Any], Path], None]) -> tuple[Path, Path]:
    """A benchmark's result files, ``OUTDIR/NAME.json`` and ``OUTDIR/NAME.png`` (drawn by ``plot``).
    The JSON is written first, so a plot that fails loses no measurement: its error is added to
    the document's ``errors`` and the JSON written again."""
    json_path, png_path = outdir / f"{name}.json", outdir / f"{name}.png"
    write_json(doc, json_path)
    try:
        plot(doc, png_path)
    except Exception:
        doc.setdefault("errors", []).append("plot: " + traceback.format_exc())
        write_json(doc, json_path)
    return json_path, png_path


def plot_png(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: list[Result] = doc["results"]
    limits: dict[str, Any] = doc.get("limits") or {}
    sizes = sorted({r["size"] for r in results})
    peers = sorted({r["peer"] for r in results}, key=lambda p: (p != BASELINE, p))
    colors = {p: f"C{i}" for i, p in enumerate(peers)}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    panels = [
        (axes[0], ("get", "get_into"), "gbps", "single-key GET throughput", "GB/s"),
        (axes[1], ("get_many", "get_many_into"), "gbps", "batched GET (16 keys) throughput", "GB/s"),
        (axes[2], ("get", "get_into", "put"), "p50_us", "latency p50 (solid) / p99 (dotted), 1 client", "µs"),
    ]
    for ax, ops, key, title, unit in panels:
        for peer in peers:
            for op in ops:
                for clients, style in ((1, "-"), (8, "--")):
                    if key.endswith("_us") and clients != 1:
                        continue
                    pts = [(s, r) for s in sizes if (r := find(results, peer, op, s, clients))]
                    if not pts:
                        continue
                    xs = [s for s, _ in pts]
                    marker = {"get": "o", "get_into": "s", "get_many": "o", "get_many_into": "s", "put": "^"}[op]
                    label = f"{peer} {op}" + ("" if key.endswith("_us") else f" c={clients}")
                    ax.plot(
                        xs,
                        [r["median"][key] for _, r in pts],
                        style,
                        marker=marker,
                        color=colors[peer],
                        label=label,
                        alpha=0.9 if op != "put" else 0.5,
                    )
                    if key == "p50_us":
                        ax.plot(
                            xs,
                            [r["median"]["p99_us"] for _, r in pts],
                            ":",
                            marker=marker,
                            color=colors[peer],
                            alpha=0.5,
                        )
        if unit == "GB/s":
            for name, style in (("memcpy", "k-."), ("tcp_stream", "k:"), ("tcp_pingpong", "k--")):
                if name in limits:
                    ax.axhline(limits[name]["gbps"], linestyle=style[1:], color="k", linewidth=1, alpha=0.6)
                    ax.annotate(
                        f"{name} {limits[name]['gbps']:.2f}",
                        (sizes[0] if sizes else 1, limits[name]["gbps"]),
                        fontsize=7,
                        va="bottom",
                    )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [fmt_size(s) for s in sizes])
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("value size")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = doc.get("machine", {})
    fig.suptitle(
        f"memkv single node vs Redis — {m.get('cpu', '?')}, {m.get('cpus_usable', '?')} CPUs"
        f"{' (quick)' if doc.get('quick') else ''}",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    results: list[Result] = doc["results"]
    limits = doc.get("limits") or {}
    if limits:
        t = Table(title="machine limits")
        t.add_column("what")
        t.add_column("GB/s", justify="right")
        t.add_column("how")
        for name, res in limits.items():
            t.add_row(name, f"{res['gbps']:.2f}", str(res.get("what", "")))
        console.print(t)

    peers = sorted({r["peer"] for r in results}, key=lambda p: (p != BASELINE, p))
    others = [p for p in peers if p != BASELINE]
    t = Table(title="single node: median of repeats (GB/s, p50/p99 µs); ratio = peer / redis")
    for col in ("size", "op", "c"):
        t.add_column(col)
    for p in peers:
        t.add_column(f"{p} GB/s", justify="right")
        t.add_column(f"{p} p50/p99", justify="right")
    for p in others:
        t.add_column(f"{p}/redis GB/s", justify="right")
        t.add_column(f"{p}/redis p50", justify="right")
    ratios = {(r["peer"], r["op"], r["size"], r["clients"]): r for r in doc.get("ratios", [])}
    keys = sorted(
        {(r["size"], r["op"], r["batch"], r["clients"]) for r in results},
        key=lambda k: (k[0], list(COMPARE).index(k[1]) if k[1] in COMPARE else 99, k[3]),
    )
    for size, op, batch, clients in keys:
        row = [fmt_size(size), op_label(op, batch), str(clients)]
        for p in peers:
            r = next(
                (r for r in results if (r["peer"], r["op"], r["size"], r["clients"]) == (p, op, size, clients)),
                None,
            )
            if r is None:
                row += ["", ""]
            elif not r["median"]:
                row += ["[red]error[/red]", ""]
            else:
                m = r["median"]
                row += [f"{m['gbps']:.3f}", f"{m['p50_us']:.0f}/{m['p99_us']:.0f}"]
        for p in others:
            q = ratios.get((p, op, size, clients))
            row += [_ratio_cell(q and q["gbps_ratio"], True), _ratio_cell(q and q["p50_ratio"], False)]
        t.add_row(*row)
    console.print(t)

    if doc.get("vs_baseline"):
        t = Table(title="the working tree against an earlier commit, same run (ratio = memkv / memkv@REV)")
        for col in ("size", "op", "c", "vs", "GB/s ratio", "p50 ratio", "p99 ratio"):
            t.add_column(col)
        for q in doc["vs_baseline"]:
            t.add_row(fmt_size(q["size"]), op_label(q["op"], q["batch"]), str(q["clients"]), q["vs"],
                      _ratio_cell(q["gbps_ratio"], True), _ratio_cell(q["p50_ratio"], False),
                      _ratio_cell(q["p99_ratio"], False))  # fmt: skip
        console.print(t)

    if doc.get("targets"):
        quick = " (--quick: indicative only, few ops per measurement)" if doc.get("quick") else ""
        t = Table(title=f"targets{quick}")
        for col in ("target", "value", "threshold", "result", "basis"):
            t.add_column(col)
        for g in doc["targets"]:
            res = {True: "[green]PASS[/green]", False: "[red]FAIL[/red]", None: "[yellow]n/a[/yellow]"}[g["passed"]]
            val = "" if g["value"] is None else f"{g['value']:.2f}"
            op = ">=" if g["higher_is_better"] else "<="
            t.add_row(g["description"], val, f"{op} {g['threshold']}", res, g["basis"])
        console.print(t)
    for err in doc.get("errors", []):
        console.print(f"[red]error:[/red] {err}")


def _ratio_cell(v: float | None, higher_is_better: bool) -> str:
    if v is None:
        return ""
    good = v >= 1 if higher_is_better else v <= 1
    return f"[{'green' if good else 'red'}]{v:.2f}x[/]"
