"""Disaggregated prefill/decode against merged serving: time to first token, time per output token and
the KV handoff's transfer rate, side by side in one run, same model, same engines, same load.

    python -m bench.pd [--requests 8] [--concurrency 2] [--prompt-tokens 1024] [--output-tokens 32] [--threads 1]
                       [--ptp 1 --dtp 1]

Runs two Apps as users do (``python entrypoint.py``, each in its own process with its own data system
worker) on the 0.5B demo shape in bfloat16: MERGED with two replicas, DISAGGREGATED with one prefill
and one decode replica (two engines each; ``--ptp`` / ``--dtp`` set the disaggregated pools' tensor parallel
sizes, as the original case's PTP and DTP do). The same load goes to each Router in turns, ``--rounds``
times: ``--requests`` streamed completions, ``--concurrency`` at a time, each with a prompt of its own
(``--prompt-tokens``) and ``--output-tokens`` generated tokens (``ignore_eos``). The client measures
TTFT (request to first token) and TPOT (first to last token, per token). The handoff's rates come
from the disaggregated App's engines (``/status`` kv: stores on prefill, loads on decode).

Writes ``<out>/pd.json`` and ``<out>/pd.md``, and the BENCHMARKS.md section when ``--out`` is the default.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from app.control.demo_model import DemoShape, demo_model_dir
from bench.driver import ROOT, start_driver, status, stop_driver, wait_until_quiet
from bench.kv import memcpy_gbps, prefixes
from bench.pd_report import report_name

DEFAULT_OUT = ROOT / "bench" / "out"
ARMS = ("merged", "disaggregated")
# Two idle data system workers take about a quarter of one core between them (measured here): "quiet"
# is below that plus a margin, not below the 15% of the single-App benchmarks.
QUIET_PERCENT = 30.0


def stream(url: str, model: str, prompt: list[int], tokens: int) -> dict:
    """One streamed completion: seconds to the first token, and the arrival time of each token."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    started = time.perf_counter()
    arrivals = []
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the completion answered {response.status}: {response.read()[:300]!r}")
        for line in response:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"]:
                arrivals.append(time.perf_counter() - started)
    finally:
        conn.close()
    if len(arrivals) < 2:
        raise RuntimeError(f"the stream held {len(arrivals)} tokens, expected {tokens}")
    return {"ttft_s": arrivals[0], "tpot_s": (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1),
            "tokens": len(arrivals), "seconds": arrivals[-1]}


def load(url: str, model: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(pool.map(lambda prompt: stream(url, model, prompt, args.output_tokens), prompts))
    return {"requests": results, "wall_s": time.perf_counter() - started}


def run(args: argparse.Namespace) -> dict:
    model_dir = demo_model_dir(Path(os.environ.get("YRLLM_DEMO_CACHE_DIR", Path.home() / ".cache" / "yrllm")),
                               DemoShape.QWEN2_5_0_5B, "bfloat16")
    common = {"YRLLM_MODEL": str(model_dir), "YRLLM_ENGINE__DTYPE": "bfloat16",
              "YRLLM_ENGINE__MAX_MODEL_LEN": str(args.prompt_tokens + args.output_tokens + 64),
              "YRLLM_ENGINE__KV_CACHE_GIB": "1", "YRLLM_SUPERVISION__ENABLED": "false",
              "YRLLM_ENGINE__THREADS": str(args.threads),
              # The handoff's KV must not be evicted before its decode leg reads it.
              "YRLLM_RUNTIME__DS_SHARED_MEMORY_MB": "4096"}
    args.out.mkdir(parents=True, exist_ok=True)
    pools = {**common, "YRLLM_PREFILL__TENSOR_PARALLEL": str(args.ptp), "YRLLM_DECODE__TENSOR_PARALLEL": str(args.dtp)}
    drivers, urls = {}, {}
    try:
        drivers["merged"], urls["merged"] = start_driver(2, args.out / "pd-driver-merged.log", common)
        drivers["disaggregated"], urls["disaggregated"] = start_driver(
            2, args.out / "pd-driver-disaggregated.log", pools,
            ["--mode", "disaggregated", "--prefill-replicas", "1", "--decode-replicas", "1"])
        model = status(urls["merged"])["models"][0]
        first = next(r["url"] for r in status(urls["merged"])["replicas"] if r["state"] == "ready")
        # Prompts of their own per arm and round: no prefix is in any cache.
        prompts = prefixes(first, model, args.requests * args.rounds * len(ARMS), args.prompt_tokens)
        rounds = {arm: [] for arm in ARMS}
        for round_ in range(args.rounds):
            for index, arm in enumerate(ARMS):
                start = (round_ * len(ARMS) + index) * args.requests
                wait_until_quiet(QUIET_PERCENT)
                rounds[arm].append(load(urls[arm], model, prompts[start:start + args.requests], args))
        time.sleep(2)  # one accounting interval: /status kv then covers every request above
        kv = status(urls["disaggregated"])["kv"]
        return {"rounds": rounds, "kv": kv, "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                "concurrency": args.concurrency, "threads": args.threads,
                "ptp": args.ptp, "dtp": args.dtp,
                "memcpy_gbps": round(memcpy_gbps(args.prompt_tokens * 12_288), 2),
                "cpus": os.cpu_count(), "model": "qwen2.5-0.5b shape (demo, random weights), bfloat16"}
    finally:
        for driver in drivers.values():
            stop_driver(driver)


def summary(result: dict) -> dict[str, dict[str, float]]:
    """Per arm: medians and p90 of TTFT and TPOT over every request of every round, and throughput."""
    out = {}
    for arm, rounds in result["rounds"].items():
        requests = [r for round_ in rounds for r in round_["requests"]]
        ttft = sorted(r["ttft_s"] for r in requests)
        tpot = sorted(r["tpot_s"] for r in requests)
        tokens = sum(r["tokens"] for r in requests)
        out[arm] = {"ttft_p50_s": statistics.median(ttft), "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
                    "tpot_p50_s": statistics.median(tpot), "tpot_p90_s": tpot[int(0.9 * (len(tpot) - 1))],
                    "tokens_per_s": tokens / sum(round_["wall_s"] for round_ in rounds), "requests": len(requests)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per arm and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--output-tokens", type=int, default=32)
    # One thread per engine: each arm runs two engines on this machine's two cores, and with all cores
    # each (engine.threads 0) two busy engines oversubscribe them, which decides the result (FINDINGS.md).
    parser.add_argument("--threads", type=int, default=1, help="engine.threads of every engine (0: all cores)")
    parser.add_argument("--ptp", type=int, default=1, help="tensor parallel size of the prefill pool")
    parser.add_argument("--dtp", type=int, default=1, help="tensor parallel size of the decode pool")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = run(args)
    result["summary"] = summary(result)
    (args.out / f"{report_name(args.ptp, args.dtp)}.json").write_text(json.dumps(result, indent=1))
    from bench.pd_report import report

    report(result, args.out, publish=args.out == DEFAULT_OUT)


if __name__ == "__main__":
    main()
