"""One vLLM engine process, driven line by line: what the vLLM tests, ``memkv demo --engine vllm``
and the vLLM benchmark start (each start is a fresh engine: no state but what memkv holds).

    python -m memkv.vllm_engine make-model DIR [--layers 2 --hidden 256 ...]
    python -m memkv.vllm_engine serve --model DIR [--kv-url URL [--extra JSON] | --kv-config JSON] [--block-size 128]

``make-model`` writes a Llama-architecture checkpoint with seeded random
weights (transformers ``LlamaConfig`` + ``save_pretrained``; nothing is
downloaded). The same arguments always give the same weights.

``serve`` starts ``vllm.LLM`` (CPU build: float32, eager, no tokenizer; with
``--kv-url`` the memkv connector is configured through ``kv_transfer_config``
exactly as a user would) and then answers one JSON command per stdin line with
one stdout line ``MEMKV-ENGINE {json}`` (vLLM's own logs go to stderr):

    {"op": "generate", "prompt": [ids], "max_tokens": 8, "logprobs": 1, "cache_salt": null}
        -> {"tokens": [...], "logprobs": [...], "num_cached_tokens": n, "ttft_s": t, "e2e_s": t}
    {"op": "reset_prefix_cache"}   -> {"ok": true}     (drops vLLM's local prefix cache)
    {"op": "metrics"}              -> {"metrics": {"vllm:...": value}}   (counters, gauges, histogram _sum/_count)
    {"op": "exit"}

The first line is ``MEMKV-ENGINE {"ready": true, "startup_s": ...}``.
Token prompts, greedy sampling and ``ignore_eos`` make every run reproducible.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

MARK = "MEMKV-ENGINE "
CONNECTOR_MODULE = "memkv.client.vllm"


def kv_transfer_config(url: str, **extra: Any) -> dict[str, Any]:
    """The ``--kv-transfer-config`` of a vLLM that uses memkv (docs/engines.md)."""
    return {"kv_connector": "MemKVConnector", "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both", "kv_connector_extra_config": {"url": url, **extra}}


# -- the model ----------------------------------------------------------------------------------
def make_model(path: str | Path, *, layers: int = 2, hidden: int = 256, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 512, vocab: int = 2048, max_positions: int = 8192, seed: int = 0,
               init_std: float = 0.02) -> Path:
    """A Llama checkpoint with seeded random weights at ``path`` (kept if it is already there)."""
    path = Path(path)
    spec = dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                vocab=vocab, max_positions=max_positions, seed=seed, init_std=init_std)
    stamp = path / "memkv-model.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, initializer_range=init_std,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    stamp.write_text(json.dumps(spec))
    return path


# -- the engine ---------------------------------------------------------------------------------
def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _metrics(llm: Any) -> dict[str, float]:
    from vllm.v1.metrics.reader import Counter, Gauge, Histogram

    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if isinstance(m, (Counter, Gauge)):
            out[m.name] = out.get(m.name, 0.0) + float(m.value)
        elif isinstance(m, Histogram):
            out[m.name + "_sum"] = out.get(m.name + "_sum", 0.0) + float(m.sum)
            out[m.name + "_count"] = out.get(m.name + "_count", 0.0) + float(m.count)
    return out


def _generate(llm: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt: dict[str, Any] = {"prompt_token_ids": [int(t) for t in cmd["prompt"]]}
    if cmd.get("cache_salt"):
        prompt["cache_salt"] = str(cmd["cache_salt"])
    n_logprobs = int(cmd.get("logprobs", 1))
    params = SamplingParams(temperature=0.0, max_tokens=int(cmd.get("max_tokens", 8)), ignore_eos=True,
                            detokenize=False, logprobs=n_logprobs if n_logprobs > 0 else None, seed=0)
    t0 = time.perf_counter()
    (out,) = llm.generate([TokensPrompt(**prompt)], params, use_tqdm=False)
    e2e = time.perf_counter() - t0
    comp = out.outputs[0]
    logprobs = []
    for tok, lp in zip(comp.token_ids, comp.logprobs or [], strict=False):
        logprobs.append(float(lp[tok].logprob))
    ttft = None
    if out.metrics is not None and getattr(out.metrics, "first_token_latency", 0.0):
        ttft = float(out.metrics.first_token_latency)
    return {"tokens": list(comp.token_ids), "logprobs": logprobs, "num_cached_tokens": out.num_cached_tokens,
            "ttft_s": ttft, "e2e_s": e2e, "n_prompt": len(prompt["prompt_token_ids"])}


def serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.perf_counter()
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if args.kv_url:
        extra = json.loads(args.extra) if args.extra else {}
        kwargs["kv_transfer_config"] = kv_transfer_config(args.kv_url, **extra)
    elif args.kv_config:  # any other connector (vLLM's ExampleConnector, LMCache, ...), for comparisons
        kwargs["kv_transfer_config"] = json.loads(args.kv_config)
    llm = LLM(model=args.model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              max_model_len=args.max_model_len, block_size=args.block_size, seed=0,
              disable_log_stats=False, **kwargs)
    _reply({"ready": True, "startup_s": time.perf_counter() - t0, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.get("op")
        try:
            if op == "generate":
                _reply(_generate(llm, cmd))
            elif op == "reset_prefix_cache":
                _reply({"ok": bool(llm.reset_prefix_cache())})
            elif op == "metrics":
                _reply({"metrics": _metrics(llm)})
            elif op == "exit":
                _reply({"ok": True})
                break
            else:
                _reply({"error": f"unknown op {op!r}"})
        except Exception as exc:  # reported to the driver, which fails the test or the demo with it
            _reply({"error": f"{type(exc).__name__}: {exc}"})
    return 0


# -- driving an engine process (tests, demo, benchmark) -------------------------------------------
def vllm_python(root: str | Path | None = None) -> Path:
    """The interpreter that has vLLM: ``$MEMKV_VLLM_PYTHON``, else the checkout's ``.venv-vllm``
    (scripts/engine-venv.sh vllm), else this one (``pip install memkv[vllm]`` in one environment)."""
    env = os.environ.get("MEMKV_VLLM_PYTHON")
    if env:
        return Path(env)
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    venv = root / ".venv-vllm" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def run_make_model(python: str | Path, path: str | Path, *, timeout: float = 300, **spec: Any) -> Path:
    """``make-model`` in the interpreter that has vLLM's transformers (it writes what that vLLM reads)."""
    args = [str(python), "-m", "memkv.vllm_engine", "make-model", str(path)]
    for k, v in spec.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    subprocess.run(args, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Path(path)


class EngineError(RuntimeError):
    """The engine process failed, answered with an error, or did not answer in time."""


class EngineProcess:
    """``python -m memkv.vllm_engine serve ...`` as a child process, one command at a time.

    vLLM's output goes to ``log_path``. With ``lock_path`` the process holds an
    exclusive ``flock`` on that file for its whole life, so engines started by
    different programs on one small machine run one after another.
    """

    def __init__(self, model: str | Path, *, python: str | Path | None = None, kv_url: str | None = None,
                 extra: dict[str, Any] | None = None, kv_config: dict[str, Any] | None = None,
                 log_path: str | Path | None = None,
                 lock_path: str | Path | None = None, env: dict[str, str] | None = None,
                 block_size: int = 128, max_model_len: int = 4096) -> None:
        self.args = [str(python or vllm_python()), "-m", "memkv.vllm_engine", "serve", "--model", str(model),
                     "--block-size", str(block_size), "--max-model-len", str(max_model_len)]
        if kv_url:
            self.args += ["--kv-url", kv_url]
            if extra:
                self.args += ["--extra", json.dumps(extra)]
        elif kv_config:
            self.args += ["--kv-config", json.dumps(kv_config)]
        self.log_path = Path(log_path) if log_path else None
        self.lock_path = lock_path
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock_file: IO[bytes] | None = None
        self._log: IO[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 240.0, lock_timeout: float = 1800.0) -> EngineProcess:
        """Start and wait until the engine is ready (``timeout``), after waiting at most ``lock_timeout``
        for the lock (other heavy jobs of the machine)."""
        deadline = time.monotonic() + lock_timeout
        if self.lock_path:
            self._lock_file = open(self.lock_path, "ab")  # noqa: SIM115 (held until close())
            while True:
                try:
                    fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EngineError(f"{self.lock_path} stayed locked for {lock_timeout:.0f}s") from None
                    time.sleep(0.5)
        deadline = time.monotonic() + timeout
        self._log = open(self.log_path, "a") if self.log_path else None  # noqa: SIM115
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log or subprocess.DEVNULL, text=True, env=env, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready = self._reply(max(1.0, deadline - time.monotonic()), "start")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self._replies.put(json.loads(line[len(MARK):]))
            elif self._log is not None:
                self._log.write(line)
        self._replies.put(None)  # end of output: the process exited

    def _reply(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise EngineError(f"vLLM engine: no answer to {what} within {timeout:.0f}s "
                              f"(log: {self.log_path})") from None
        if reply is None:
            code = self.proc.wait() if self.proc is not None else None
            raise EngineError(f"vLLM engine exited (code {code}) during {what} (log: {self.log_path})")
        if "error" in reply:
            raise EngineError(f"vLLM engine: {reply['error']} (during {what})")
        return reply

    def request(self, cmd: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout, str(cmd.get("op")))

    def generate(self, prompt: list[int], *, max_tokens: int = 8, logprobs: int = 1, cache_salt: str | None = None,
                 timeout: float = 120.0) -> dict[str, Any]:
        return self.request({"op": "generate", "prompt": prompt, "max_tokens": max_tokens, "logprobs": logprobs,
                             "cache_salt": cache_salt}, timeout)

    def metrics(self) -> dict[str, float]:
        return self.request({"op": "metrics"})["metrics"]

    def close(self, timeout: float = 60.0) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.request({"op": "exit"}, timeout=10)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        if self._reader is not None:
            self._reader.join(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None
        return code

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memkv.vllm_engine", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model", help="write a seeded random Llama checkpoint")
    m.add_argument("path")
    for name, default in (("layers", 2), ("hidden", 256), ("heads", 4), ("kv-heads", 2), ("intermediate", 512),
                          ("vocab", 2048), ("max-positions", 8192), ("seed", 0)):
        m.add_argument(f"--{name}", type=int, default=default)
    m.add_argument("--init-std", type=float, default=0.02)
    s = sub.add_parser("serve", help="run one vLLM engine, commands on stdin")
    s.add_argument("--model", required=True)
    s.add_argument("--kv-url", help="memkv URL: configure the memkv connector (else no connector)")
    s.add_argument("--extra", help="more kv_connector_extra_config entries, as JSON")
    s.add_argument("--kv-config", help="without --kv-url: a whole kv_transfer_config, as JSON")
    s.add_argument("--block-size", type=int, default=128)
    s.add_argument("--max-model-len", type=int, default=4096)
    args = p.parse_args(argv)
    if args.cmd == "make-model":
        path = make_model(args.path, layers=args.layers, hidden=args.hidden, heads=args.heads,
                          kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                          max_positions=args.max_positions, seed=args.seed, init_std=args.init_std)
        print(path)
        return 0
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
