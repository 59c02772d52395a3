"""``make fuzz``: the atheris harnesses (coverage-guided, libFuzzer) against real inputs, each for
a fixed time, then the hypothesis fuzz tests with larger example counts. Prints one line per
harness (executions, coverage, crashes) and exits non-zero on any crash.

    .venv/bin/python tests/fuzz/run.py [--seconds 120] [--seed 1] [--only resp,config,tenants,recovery]

- resp:     RESP bytes, parsed by memkv.protocol.resp and sent to a live node (atheris_resp.py)
- config:   TOML bytes through memkv.config.load_config (atheris_config.py)
- recovery: edits to a segment file a real node wrote, then memkv.flash.recovery (atheris_recovery.py)
- tenants:  tenants.json bytes through a node's tenant table (atheris_tenants.py)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # conftest is imported one way: as `conftest`

from conftest import NodeProc, free_port, wait_for_port  # noqa: E402

from memkv.protocol import resp as R  # noqa: E402

RESP_SEEDS = [R.encode_command("SET", "k", "v"), R.encode_command("GET", "k"),
              R.encode_command("MSET", "a", "1", "b", "2"), R.encode_command("SET", "k", "v", "EX", "10", "NX", "GET"),
              b"PING\r\n", R.encode_command("HELLO", "3"),
              R.encode_command("MULTI") + R.encode_command("SET", "x", "1") + R.encode_command("EXEC"),
              R.encode_command("SCAN", "0", "MATCH", "*", "COUNT", "10"), R.encode_command("CLIENT", "SETNAME", "n")]


def _pristine_segment(work: Path) -> Path:
    """A segment file written by a real node (several records, overwrites, deletes)."""
    import random

    from memkv.client import SyncClient

    cfg = work / "memkv.toml"
    cfg.write_text('[namespaces.d]\ndurability = "durable"\noverwrite = true\n[flash]\nsegment_size = "256KiB"\n')
    node = NodeProc(["--config", str(cfg), "--memory", "32MiB"], work)
    node.start()
    rnd = random.Random(3)
    with SyncClient.connect(node.url, timeout=30) as c:
        for i in range(120):
            c.put(f"f/{i}".encode(), rnd.randbytes(rnd.choice([10, 300, 2000])), namespace="d")
        for i in range(0, 120, 7):
            c.put(f"f/{i}".encode(), rnd.randbytes(50), namespace="d")
        for i in range(0, 120, 11):
            c.delete(f"f/{i}".encode(), namespace="d")
    node.stop()
    return sorted((node.data_dir / "flash").glob("seg-*.log"))[0]


def _run(name: str, cmd: list[str], corpus: Path, seconds: int, seed: int) -> dict[str, object]:
    t0 = time.monotonic()
    crashes = corpus.parent / f"crashes-{name}"
    crashes.mkdir(exist_ok=True)
    p = subprocess.run([*cmd, f"-max_total_time={seconds}", f"-seed={seed}", "-max_len=4096", "-timeout=30",
                        f"-artifact_prefix={crashes}/", str(corpus)], capture_output=True, text=True,
                       timeout=seconds + 300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out = p.stdout + p.stderr
    runs = re.findall(r"Done (\d+) runs in (\d+) second", out)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    crashed = p.returncode != 0
    return {"harness": name, "runs": int(runs[-1][0]) if runs else None, "seconds": round(time.monotonic() - t0),
            "cov": int(cov[-1][0]) if cov else None, "ft": int(cov[-1][1]) if cov else None,
            "corpus": len(list(corpus.iterdir())), "crash": crashed, "tail": out[-3000:] if crashed else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=120, help="per atheris harness")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default="resp,config,tenants,recovery")
    ap.add_argument("--no-hypothesis", action="store_true", help="skip the long hypothesis runs")
    args = ap.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="memkv-fuzz-"))
    results = []
    node = None
    try:
        if "resp" in only:
            corpus = work / "corpus-resp"
            corpus.mkdir()
            for i, s in enumerate(RESP_SEEDS):
                (corpus / f"seed{i}").write_bytes(s)
            port = free_port()
            (work / "resp").mkdir()
            node = NodeProc(["--resp-port", str(port)], work / "resp")
            node.start()
            wait_for_port("127.0.0.1", port, 15, alive=lambda: node.running)
            results.append(_run("resp", [sys.executable, str(HERE / "atheris_resp.py"), "127.0.0.1", str(port)],
                                corpus, args.seconds, args.seed))
            alive = node.running
            log = node.output()
            results[-1]["node_alive"] = alive
            results[-1]["node_tracebacks"] = log.count("Traceback")
            if not alive or "Traceback" in log:
                results[-1]["crash"] = True
                results[-1]["tail"] = log[-3000:]
        if "config" in only:
            corpus = work / "corpus-config"
            corpus.mkdir()
            for i, f in enumerate([ROOT / "compose" / "memkv.toml"]):
                (corpus / f"seed{i}").write_bytes(f.read_bytes())
            from chaos.load import NODE_CONFIG

            (corpus / "seed-chaos").write_text(NODE_CONFIG.format(replicas=2, lease_ttl=2))
            (corpus / "seed-tenants").write_text('[tenants.a]\ntoken = "t"\ngrants = { shared = "rw" }\n'
                                                 'quota = "1GiB"\n[limits]\nidle_timeout = "30s"\n'
                                                 '[pools.shared]\nfraction = 0.5\n')
            results.append(_run("config", [sys.executable, str(HERE / "atheris_config.py")], corpus, args.seconds,
                                args.seed))
        if "tenants" in only:
            corpus = work / "corpus-tenants"
            corpus.mkdir()
            (corpus / "seed0").write_text('{"tenants": {"alice": {"token": "t", "grants": {"session": "rw"}, '
                                          '"quota": "1MiB", "rate": 5.0, "no_store": false}}, "revoked": ["bob"]}')
            results.append(_run("tenants", [sys.executable, str(HERE / "atheris_tenants.py")], corpus, args.seconds,
                                args.seed))
        if "recovery" in only:
            (work / "writer").mkdir()
            seg = _pristine_segment(work / "writer")
            corpus = work / "corpus-recovery"
            corpus.mkdir()
            (corpus / "seed0").write_bytes(bytes(range(64)))
            results.append(_run("recovery", [sys.executable, str(HERE / "atheris_recovery.py"), str(seg)], corpus,
                                args.seconds, args.seed))
    finally:
        if node is not None:
            node.kill()
        shutil.rmtree(work, ignore_errors=True)
    rc = 0
    for r in results:
        print(f"atheris {r['harness']:9s} runs {r['runs']}  {r['seconds']} s  cov {r['cov']}  ft {r['ft']}  "
              f"corpus {r['corpus']}  {'CRASH' if r['crash'] else 'no crash'}"
              + (f"  (node alive {r['node_alive']}, tracebacks {r['node_tracebacks']})" if "node_alive" in r else ""))
        if r["crash"]:
            print(r["tail"])
            rc = 1
    if not args.no_hypothesis:
        env = dict(os.environ, MEMKV_FUZZ_SERVE_EXAMPLES="150", MEMKV_FUZZ_RECOVERY_EXAMPLES="300",
                   MEMKV_FUZZ_RESP_EXAMPLES="3000", MEMKV_FUZZ_TENANT_EXAMPLES="5000")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "--timeout=3600", "tests/test_fuzz_resp.py",
                            "tests/test_fuzz_config.py", "tests/test_fuzz_recovery.py",
                            "tests/test_fuzz_tenants.py"], cwd=ROOT, env=env)
        print(f"hypothesis fuzz tests (longer): exit {p.returncode} in {time.monotonic() - t0:.0f} s")
        rc = rc or p.returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
