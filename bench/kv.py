"""Prefix reuse through the data system: time to first token on a freshly scaled replica, with and
without the KV connector, side by side in one run.

    python -m bench.kv [--samples 3] [--prefix-tokens 2048] [--out bench/out]

Runs two Apps as users do (``python entrypoint.py``, each in its own process, each with its own data
system worker) on the 0.5B demo shape in bfloat16: one with ``kv.enabled`` (ON), one without (OFF).
Requests go straight to a replica, one at a time, nothing else running:

1. ON's first replica computes ``--samples`` prefixes of ``--prefix-tokens`` tokens (and stores them).
2. Both Apps scale to 2; on each new replica, per sample, in turns: OFF recomputes a new prefix, ON
   recomputes the same new prefix (a miss: looked up, computed, stored), ON answers a prefix the first
   replica stored (loaded). Each prompt is the prefix plus a short question; TTFT is the latency of a
   one-token completion.
3. No-reuse overhead on short prompts (nothing to store or load: the per-step cost of the connector):
   the new replicas alternate ON and OFF.
4. Block store and load GB/s as the engines measured them (``/status`` kv), memcpy of the same size,
   and the object granularity: one object per block of all layers against one per layer.

Writes ``<out>/kv.json`` and ``<out>/kv.md``, and the BENCHMARKS.md section when ``--out`` is the default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from app.control.demo_model import DemoShape, demo_model_dir
from app.kv.store import BlockStore
from bench.driver import ROOT, ds_address, http_call, start_driver, status, stop_driver, wait_until_quiet

DEFAULT_OUT = ROOT / "bench" / "out"
QUESTION = "\n# Question: what does the code above compute, and how fast?\n"
SHORT_PROMPT = "def parse(text):\n    return [line.split(',') for line in text.splitlines()]\n"
TARGET_SPEEDUP = 5.0
TARGET_OVERHEAD = 0.05


def _post(url: str, path: str, body: dict, timeout: float = 600) -> dict:
    code, data = http_call(url, path, body, timeout=timeout)
    if code != 200:
        raise RuntimeError(f"{path} answered {code}: {data[:300]!r}")
    return json.loads(data)


def ttft(url: str, model: str, prompt: list[int]) -> float:
    """Seconds for a one-token completion: prefill plus one token."""
    started = time.perf_counter()
    _post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    return time.perf_counter() - started


def request_seconds(url: str, model: str, prompt: str, tokens: int = 16) -> float:
    started = time.perf_counter()
    _post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                                   "ignore_eos": True})
    return time.perf_counter() - started


def tokenize(url: str, model: str, text: str) -> list[int]:
    return _post(url, "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})["tokens"]


def prefixes(url: str, model: str, count: int, length: int) -> list[list[int]]:
    """``count`` distinct prefixes of ``length`` tokens: slices of Python's own source, tokenized."""
    sources = [Path(module.__file__).read_text() for module in (json.decoder, argparse, statistics)]
    tokens = tokenize(url, model, "\n".join(sources))
    if len(tokens) < count * length:
        raise RuntimeError(f"the source text has {len(tokens)} tokens, fewer than {count} x {length}")
    return [tokens[i * length:(i + 1) * length] for i in range(count)]


def newest_replica(url: str) -> str:
    ready = [r for r in status(url)["replicas"] if r["state"] == "ready"]
    return max(ready, key=lambda r: int(r["replica_id"].lstrip("r")))["url"]


def memcpy_gbps(size: int, rounds: int = 9) -> float:
    source, target = np.ones(size, np.uint8), np.empty(size, np.uint8)
    np.copyto(target, source)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - started)
    return size / statistics.median(times) / 1e9


def granularity(ds_address: str, block_bytes: int, layers: int, blocks: int = 16, rounds: int = 7) -> dict:
    """Store and load ``blocks`` blocks as one object each (all layers) or one object per layer."""
    store = BlockStore(ds_address, timeout_ms=5000, ttl_s=0)
    results = {}
    shapes = (("per_block", blocks, block_bytes), ("per_layer", blocks * layers, block_bytes // layers))
    for name, count, size in shapes:
        payload = np.full(size, 7, np.uint8)
        target = np.empty(size, np.uint8)
        stores, loads = [], []
        for round_ in range(rounds + 1):  # the first round warms the worker's memory up
            keys = [f"yrllm_kvbench_{name}_{round_}_{i}" for i in range(count)]
            started = time.perf_counter()
            store.put(keys, size, lambda _, out: out.__setitem__(slice(None), payload.data))
            stored = time.perf_counter()
            for view in store.get(keys):
                np.copyto(target, np.frombuffer(view, np.uint8))
            loaded = time.perf_counter()
            store.delete(keys)
            if round_:
                stores.append(stored - started)
                loads.append(loaded - stored)
        total = count * size
        results[name] = {"objects": count, "object_bytes": size,
                         "store_ms": round(statistics.median(stores) * 1e3, 2),
                         "load_ms": round(statistics.median(loads) * 1e3, 2),
                         "store_gbps": round(total / statistics.median(stores) / 1e9, 2),
                         "load_gbps": round(total / statistics.median(loads) / 1e9, 2)}
    return results


def run(args: argparse.Namespace) -> dict:
    model_dir = demo_model_dir(Path(os.environ.get("YRLLM_DEMO_CACHE_DIR", Path.home() / ".cache" / "yrllm")),
                               DemoShape.QWEN2_5_0_5B, "bfloat16")
    common = {"YRLLM_MODEL": str(model_dir), "YRLLM_ENGINE__DTYPE": "bfloat16",
              "YRLLM_ENGINE__MAX_MODEL_LEN": str(args.prefix_tokens + 256), "YRLLM_ENGINE__KV_CACHE_GIB": "1",
              "YRLLM_SUPERVISION__ENABLED": "false"}
    args.out.mkdir(parents=True, exist_ok=True)
    on, on_url = start_driver(1, args.out / "kv-driver-on.log", {**common, "YRLLM_KV__ENABLED": "true"})
    off = None
    try:
        off, off_url = start_driver(1, args.out / "kv-driver-off.log", {**common, "YRLLM_KV__ENABLED": "false"})
        model = status(on_url)["models"][0]
        first = next(r["url"] for r in status(on_url)["replicas"] if r["state"] == "ready")
        samples = prefixes(first, model, 2 * args.samples, args.prefix_tokens)
        question = tokenize(first, model, QUESTION)
        stored, fresh = samples[:args.samples], samples[args.samples:]
        wait_until_quiet()
        computed_on_first = [ttft(first, model, prefix + question) for prefix in stored]
        for url in (on_url, off_url):
            _post(url, "/scaleout", {"replicas": 2})
        on_new, off_new = newest_replica(on_url), newest_replica(off_url)
        wait_until_quiet()  # the new replicas' start-up work
        rows = []
        for reused, new in zip(stored, fresh):
            rows.append({"recompute_off_s": ttft(off_new, model, new + question),
                         "recompute_on_s": ttft(on_new, model, new + question),
                         "loaded_s": ttft(on_new, model, reused + question)})
        short = {"on": [], "off": []}
        for _ in range(args.short_rounds):
            short["off"].append(request_seconds(off_new, model, SHORT_PROMPT))
            short["on"].append(request_seconds(on_new, model, SHORT_PROMPT))
        time.sleep(2)  # one accounting interval: /status kv then covers every request above
        kv = status(on_url)["kv"]
        layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        block_bytes = kv["bytes_stored"] // max(kv["blocks_stored"], 1)
        return {"prefix_tokens": args.prefix_tokens, "question_tokens": len(question), "samples": rows,
                "computed_on_first_s": computed_on_first, "short": short, "kv": kv, "block_object_bytes": block_bytes,
                "memcpy_gbps": round(memcpy_gbps(args.prefix_tokens * 12_288), 2),
                "granularity": granularity(ds_address(on), block_bytes - block_bytes % layers, layers),
                "cpus": os.cpu_count(), "model": "qwen2.5-0.5b shape (demo, random weights), bfloat16"}
    finally:
        stop_driver(on)
        if off is not None:
            stop_driver(off)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--short-rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = run(args)
    (args.out / "kv.json").write_text(json.dumps(result, indent=1))
    from bench.kv_report import report

    report(result, args.out, publish=args.out == DEFAULT_OUT)


if __name__ == "__main__":
    main()
