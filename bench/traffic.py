"""Bursty traffic against the Router, with and without autoscaling.

    python -m bench.traffic [--scale 1.0] [--threads 1] [--max-replicas 2] [--spike-rps 8] [--out bench/out]

Replays a trace (idle, step up, spike, decay, idle) twice on the demo model: once with a fixed single
replica, once with the autoscaler on (1 to ``--max-replicas``). Streaming chat requests through the
official ``openai`` client. Each engine runs ``--threads`` OpenMP threads, so that on a 2-core machine
a second replica brings a second core. Records four times a second: request rate, replicas ready and
starting, requests in flight, p50/p99 time to first token, errors. Writes ``<out>/traffic.json``,
``<out>/traffic.png`` and ``<out>/traffic.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.run import conditions, host_line

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "out"
#: (seconds, requests per second): idle, step up, spike, decay, idle.
TRACE = [(10, 0.5), (20, 2.0), (25, 8.0), (20, 1.0), (75, 0.2)]
SPIKE = 2  # index of the spike in TRACE


def make_trace(spike_rps: float | None) -> list[tuple[float, float]]:
    """TRACE, with the spike's rate replaced by ``spike_rps`` if given."""
    trace = list(TRACE)
    if spike_rps is not None:
        trace[SPIKE] = (trace[SPIKE][0], spike_rps)
    return trace


@dataclass
class RequestRecord:
    sent: float
    ttft: float | None = None
    done: float | None = None
    error: str | None = None


def send(client, model: str, record: RequestRecord) -> None:
    try:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me"}],
                                                max_tokens=128, stream=True, temperature=0,
                                                extra_body={"ignore_eos": True})
        for chunk in stream:
            if record.ttft is None and chunk.choices and chunk.choices[0].delta.content:
                record.ttft = time.time() - record.sent
        record.done = time.time()
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, counted below
        record.error = f"{type(exc).__name__}: {exc}"[:200]


def sample(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/status", timeout=10) as response:
        status = json.loads(response.read())
    states = [r["state"] for r in status["replicas"]]
    return {"ready": states.count("ready"), "starting": states.count("loading") + states.count("pending"),
            "in_flight": sum(r["in_flight"] for r in status["replicas"])}


def replay(url: str, model: str, trace: list[tuple[float, float]],
           scale: float) -> tuple[list[RequestRecord], list[dict]]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    records: list[RequestRecord] = []
    samples: list[dict] = []
    stop = threading.Event()
    start = time.time()

    def sampler() -> None:
        while not stop.wait(0.25):
            try:
                samples.append({"t": round(time.time() - start, 1), **sample(url)})
            except OSError:
                continue

    threading.Thread(target=sampler, daemon=True).start()
    with ThreadPoolExecutor(max_workers=128) as pool:
        next_at = start
        for seconds, rate in trace:
            phase_end = next_at + seconds * scale
            while next_at < phase_end:
                time.sleep(max(0.0, next_at - time.time()))
                record = RequestRecord(sent=time.time())
                records.append(record)
                pool.submit(send, client, model, record)
                next_at += 1.0 / rate
    stop.set()
    for record in records:
        record.sent -= start
        record.done = None if record.done is None else record.done - start
    return records, samples


def per_second(records: list[RequestRecord], samples: list[dict]) -> list[dict]:
    rows = []
    for row in samples:
        second = row["t"]
        window = [r for r in records if second - 1 <= r.sent < second]
        ttfts = sorted(r.ttft for r in records if r.ttft is not None and second - 5 <= r.sent < second)
        rows.append({**row, "rate": len(window), "errors": sum(1 for r in window if r.error),
                     "ttft_p50": ttfts[len(ttfts) // 2] if ttfts else None,
                     "ttft_p99": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] if ttfts else None})
    return rows


def summary(name: str, records: list[RequestRecord], rows: list[dict], trace: list[tuple[float, float]],
            scale: float) -> dict:
    burst_start = sum(seconds for seconds, _ in trace[:SPIKE]) * scale
    burst_end = burst_start + trace[SPIKE][0] * scale
    burst = [r.ttft for r in records if r.ttft is not None and burst_start <= r.sent < burst_end]
    added = next((row["t"] for row in rows if row["t"] >= burst_start and row["ready"] > rows[0]["ready"]), None)
    return {"run": name, "requests": len(records), "failed": sum(1 for r in records if r.error),
            "errors": sorted({r.error for r in records if r.error})[:5],
            "capacity_added_s_after_spike": None if added is None else round(added - burst_start, 1),
            "max_ready": max(row["ready"] for row in rows),
            "burst_ttft_p50_s": round(statistics.median(burst), 3) if burst else None,
            "burst_ttft_p99_s": round(sorted(burst)[int(len(burst) * 0.99)], 3) if burst else None}


def run(autoscale: bool, trace: list[tuple[float, float]], scale: float, threads: int, max_replicas: int) -> dict:
    from app import App, AppConfig

    overrides = {"router.port": 0, "engine.dtype": "float32", "engine.max_model_len": 512, "engine.threads": threads,
                 "autoscale.enabled": autoscale, "autoscale.min_replicas": 1, "autoscale.max_replicas": max_replicas,
                 "autoscale.target_in_flight": 3, "autoscale.quiet_period_s": 10 * scale}
    with App(AppConfig.load(env={}, overrides=overrides)) as app:
        records, samples = replay(app.url, app.served_model_name, trace, scale)
        decisions = app.status()["autoscale_decisions"]
    rows = per_second(records, samples)
    name = "autoscale" if autoscale else "fixed 1 replica"
    return {"summary": summary(name, records, rows, trace, scale), "per_second": rows, "decisions": decisions,
            "requests": [asdict(r) for r in records]}


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for result, style in zip(results, ("--", "-")):
        rows, name = result["per_second"], result["summary"]["run"]
        t = [row["t"] for row in rows]
        axes[0].plot(t, [row["rate"] for row in rows], style, label=f"requests/s ({name})")
        axes[1].plot(t, [row["ready"] for row in rows], style, label=f"ready ({name})")
        axes[1].plot(t, [row["starting"] for row in rows], ":", label=f"starting ({name})")
        axes[2].plot(t, [row["ttft_p50"] for row in rows], style, label=f"TTFT p50 ({name})")
    axes[0].set_ylabel("requests/s")
    axes[1].set_ylabel("replicas")
    axes[2].set_ylabel("seconds")
    axes[2].set_xlabel("seconds since the trace started")
    for axis in axes:
        axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "traffic.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="stretch (>1) or shrink the trace in time")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per engine (engine.threads)")
    parser.add_argument("--max-replicas", type=int, default=2, help="autoscale.max_replicas")
    parser.add_argument("--spike-rps", type=float, help=f"requests/s during the spike (default {TRACE[SPIKE][1]:g})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trace = make_trace(args.spike_rps)
    host = conditions(argparse.Namespace(quick=False))
    results = [run(False, trace, args.scale, args.threads, args.max_replicas),
               run(True, trace, args.scale, args.threads, args.max_replicas)]
    (args.out / "traffic.json").write_text(json.dumps({"conditions": host, "runs": results}, indent=1))
    report(results, host, args, args.out)


def report(results: list[dict], host: dict, args: argparse.Namespace, out: Path) -> None:
    plot(results, out)
    fixed, scaled = (result["summary"] for result in results)
    lines = ["# Bursty traffic: fixed vs autoscaled", "", f"Trace (seconds, requests/s): {make_trace(args.spike_rps)}, time scale "
             f"{args.scale}. Streaming chat, 128 tokens, demo model (tiny), float32, every engine process forked from "
             f"the zygote, {args.threads} engine thread(s) per replica. Host: {host_line(host)}. Autoscaled "
             f"between 1 and {args.max_replicas} replicas. Both runs in one invocation, nothing else running.", "",
             "| run | requests | failed | first added replica ready (s after the spike began) | max ready | "
             "spike TTFT p50 s | spike TTFT p99 s |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        s = result["summary"]
        lines.append(f"| {s['run']} | {s['requests']} | {s['failed']} | {s['capacity_added_s_after_spike']} | "
                     f"{s['max_ready']} | {s['burst_ttft_p50_s']} | {s['burst_ttft_p99_s']} |")
    ratio = (fixed["burst_ttft_p99_s"] / scaled["burst_ttft_p99_s"]
             if fixed["burst_ttft_p99_s"] and scaled["burst_ttft_p99_s"] else None)
    added = scaled["capacity_added_s_after_spike"]
    lines += ["", "Targets:", "",
              f"- first added replica ready ≤ 3 s after the spike began (policy reaction included): {added} s, "
              f"**{'met' if added is not None and added <= 3 else 'MISSED'}**",
              f"- spike p99 TTFT ≥ 2x better autoscaled than fixed: "
              f"{'n/a' if ratio is None else f'{ratio:.2f}x'}, **{'met' if ratio and ratio >= 2 else 'MISSED'}**",
              f"- 0 failed requests: {fixed['failed']} fixed, {scaled['failed']} autoscaled, "
              f"**{'met' if fixed['failed'] == scaled['failed'] == 0 else 'MISSED'}**", "",
              "Conditions that decide the TTFT comparison: the Router, the benchmark's client, and every engine "
              "share "
              f"the machine's {os.cpu_count()} cores; a second replica adds an engine thread but takes CPU "
              "from all of them. The fixed replica's own spike p99 shows how far it was from saturation."]
    lines += ["", "Decisions (autoscale run):", ""]
    lines += [f"- {d['reason']} -> {d['target']} replicas" for d in results[1]["decisions"]] or ["- none"]
    (out / "traffic.md").write_text("\n".join(lines) + "\n")
    if out.resolve() == DEFAULT_OUT.resolve():  # the published run; probes elsewhere leave it alone
        from bench.report import replace_section

        replace_section(ROOT / "BENCHMARKS.md", "Bursty traffic: fixed vs autoscaled",
                        "\n".join(lines[2:]) + "\n\nGenerated by `make traffic`; plot `bench/out/traffic.png`.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
