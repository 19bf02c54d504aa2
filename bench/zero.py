"""Scale to zero and back: the client's time to first token of a streaming request that arrives at zero
replicas, beside the same request on the App while it kept one idle replica; a burst of 8 concurrent
requests arriving at zero; and the memory the App holds at zero against one idle replica.

    python -m bench.zero [--shapes tiny qwen2.5-0.5b] [--repeats 3]

Each request at zero is held by the Router, which wakes the pool at once; the App forks a replica from
its zygote, which maps the weights the data system kept. Writes its section of BENCHMARKS.md and
``bench/out/zero.json``. Run it alone: timings taken beside other work mean nothing on 2 cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from app.control.demo_model import DemoShape, demo_model_dir
from bench.driver import wait_until_quiet
from bench.report import write_section
from bench.run import DTYPE, conditions, host_line, log, weight_files

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def fibonacci(n):"
#: Targets of the scale-to-zero issue: the first token from zero (client-measured, median), and the
#: memory the App holds at zero beside the data system's weights.
TTFT_TARGETS_S = {DemoShape.TINY.value: 1.5, DemoShape.QWEN2_5_0_5B.value: 2.0}
FOOTPRINT_TARGET_BYTES = 1e9
BURST = 8


def stream(url: str, model: str, max_tokens: int = 16) -> dict:
    """One streaming completion, measured by the client: status, time to the first token's chunk, total."""
    parts = urlsplit(url)
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    started, sent_at = time.perf_counter(), time.time()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return {"status": response.status, "error": response.read().decode()[:300]}
        ttft, chunks = None, 0
        for line in response:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                ttft = ttft if ttft is not None else time.perf_counter() - started
                chunks += 1
        return {"status": 200, "ttft_s": round(ttft or 0.0, 3), "total_s": round(time.perf_counter() - started, 3),
                "chunks": chunks, "sent_at": sent_at}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": None, "error": repr(exc)}
    finally:
        connection.close()


def burst(url: str, model: str, size: int) -> list[dict]:
    """``size`` streaming requests sent at the same moment."""
    results: list[dict] = [{} for _ in range(size)]
    barrier = threading.Barrier(size)

    def one(index: int) -> None:
        barrier.wait()
        results[index] = stream(url, model)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def footprint(app) -> dict:
    measured = app.footprint().model_dump()
    return {**{key: value for key, value in measured.items() if key != "parts"},
            "parts": {part["name"]: part["pss_bytes"] for part in measured["parts"]}}


def wake_marks(app, sent_at: float) -> dict:
    """Seconds since the request was sent, per milestone of the replica its wake-up added (``requested``:
    when the App began the wake-up)."""
    report = app.last_wake
    added = [r for r in report.replicas if r.action == "added"] if report is not None else []
    if not added:
        return {}
    return {mark: round(at - sent_at, 3) for mark, at in sorted(added[0].timeline.items(), key=lambda item: item[1])}


def shape_run(shape: DemoShape, cache: Path, repeats: int) -> dict:
    from app import App, AppConfig

    model = demo_model_dir(cache, shape, DTYPE)
    nbytes = sum(path.stat().st_size for path in weight_files(model))
    config = AppConfig.load(env={}, overrides={
        "model": str(model), "router.port": 0, "engine.dtype": DTYPE, "engine.max_model_len": 512,
        "engine.kv_cache_gib": 0.25, "replicas": 1, "runtime.ds_shared_memory_mb": max(1024, nbytes * 2 >> 20),
        "demo_cache_dir": str(cache)})
    out: dict = {"weight_bytes": nbytes, "idle": [], "from_zero": []}
    with App(config) as app:
        name = app.served_model_name
        stream(app.url, name)  # the replica's first forward is not part of the comparison
        for step in range(repeats):
            wait_until_quiet()
            log(f"{shape.value}: a request on the idle replica ({step + 1} of {repeats})")
            out["idle"].append(stream(app.url, name))
        out["footprint_idle"] = footprint(app)
        for step in range(repeats):
            app.scale(0)
            wait_until_quiet()
            if step == 0:
                out["footprint_zero"] = footprint(app)
            log(f"{shape.value}: a request at zero ({step + 1} of {repeats})")
            row = stream(app.url, name)
            row["wake"] = wake_marks(app, row.get("sent_at", 0.0))
            out["from_zero"].append(row)
        app.scale(0)
        wait_until_quiet()
        log(f"{shape.value}: a burst of {BURST} at zero")
        out["burst"] = burst(app.url, name, BURST)
        out["burst_wake"] = wake_marks(app, min(r.get("sent_at", 0.0) for r in out["burst"]))
        out["replicas_after_burst"] = app.status()["ready_replicas"]
    return out


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def summarise(results: dict) -> str:
    lines = [f"Host: {host_line(results['conditions'])}. {results['conditions']['date']}, dtype {DTYPE}, one run, "
             f"nothing else running; page cache warm (the weights come from the data system, not the disk). "
             f"Client-measured streaming time to first token (16 tokens, greedy, `{PROMPT}`), median of "
             f"{results['repeats']}; a request at zero is held by the Router, which wakes the pool at once.", "",
             "| shape | TTFT, one idle replica | TTFT from zero | target | met | burst of 8 at zero: served, "
             "TTFT min / median / max |", "|---|---|---|---|---|---|"]
    met_all = []
    for shape, data in results["shapes"].items():
        idle = _median([r["ttft_s"] for r in data["idle"] if r.get("status") == 200])
        zero = _median([r["ttft_s"] for r in data["from_zero"] if r.get("status") == 200])
        target = TTFT_TARGETS_S.get(shape)
        met = zero is not None and target is not None and zero <= target
        served = [r for r in data["burst"] if r.get("status") == 200]
        ttfts = sorted(r["ttft_s"] for r in served)
        met_all.append(met and len(served) == BURST)
        lines.append(f"| {shape} | {idle:.3f} s | {zero:.3f} s | ≤ {target} s | {'yes' if met else '**no**'} | "
                     f"{len(served)}/{BURST} ({BURST - len(served)} failed), "
                     + (f"{ttfts[0]:.2f} / {statistics.median(ttfts):.2f} / {ttfts[-1]:.2f} s |" if ttfts else "- |"))
    lines += ["", "Where the time from zero went (seconds since the client sent the request, medians of the "
              "repeats: the App takes up the Router's wake-up, forks the engine process from the zygote, which "
              "forks its core; vLLM sets up and the weights are mapped; the engine is ready; the App's own "
              "first-token check; then the held request goes to the replica and its first token comes back):",
              "", "| shape | wake-up taken | process made | core forked | weights mapped | engine ready | "
              "App's first-token check | client's first token |", "|---|---|---|---|---|---|---|---|"]
    for shape, data in results["shapes"].items():
        rows = [r for r in data["from_zero"] if r.get("wake")]
        cells = [_median([r["wake"][m] for r in rows if m in r["wake"]]) for m in
                 ("requested", "process_made", "core_forked", "weights_loaded", "engine_ready", "first_token")]
        cells.append(_median([r["ttft_s"] for r in rows]))
        lines.append(f"| {shape} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    lines += ["", "Memory the App holds: its processes' PSS without shared memory (the driver, with the Router "
              "and WeightCache actors; the data system worker; the zygote; the replicas), plus the data system's "
              "shared memory in use, whoever maps it (at zero nobody does: the weights stay in memory no process "
              "maps). Each page is counted once.", "",
              "| shape | one idle replica | at zero | at zero beside the cached weights | target | met | weights in "
              "the data system |", "|---|---|---|---|---|---|---|"]
    for shape, data in results["shapes"].items():
        idle, zero = data["footprint_idle"], data["footprint_zero"]
        met = zero["pss_beside_weights_bytes"] <= FOOTPRINT_TARGET_BYTES
        met_all.append(met)
        lines.append(f"| {shape} | {_gb(idle['pss_bytes'])} | {_gb(zero['pss_bytes'])} | "
                     f"{_gb(zero['pss_beside_weights_bytes'])} | ≤ {_gb(FOOTPRINT_TARGET_BYTES)} | "
                     f"{'yes' if met else '**no**'} | {_gb(zero['weights_bytes'])} |")
        parts = ", ".join([f"{name} {_gb(pss)}" for name, pss in zero["parts"].items()]
                          + [f"shared memory {_gb(zero['shared_memory_bytes'])}"])
        lines.append(f"| | | | ({parts}) | | | |")
    lines += ["", "Where the memory at zero goes: the zygote holds vLLM and torch imported and frozen (what makes "
              "the start from zero one fork); the driver holds Python, the Router and the yr SDK, which imports "
              "torch in every process that uses actors (`yr/ds_tensor_client_manager.py:28`, probing for "
              "torch_npu; about 0.2 GB RSS of its own); the data system worker its own heap (about 500 threads "
              "at its default settings); and the data system allocates about 1.2x the weights' bytes (per-object "
              "rounding, shared memory beyond the weights in the table). docs/FINDINGS.md, \"Scale to zero\", "
              "has the breakdown.",
              "", f"Targets met: {'all' if all(met_all) else 'not all (see the rows marked no)'}. Raw figures: "
              "`bench/out/zero.json`."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=[DemoShape.TINY.value, DemoShape.QWEN2_5_0_5B.value],
                        choices=[s.value for s in DemoShape])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "yrllm")
    parser.add_argument("--no-publish", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args()
    results: dict = {"conditions": conditions(argparse.Namespace(quick=False)), "repeats": args.repeats,
                     "shapes": {shape: shape_run(DemoShape(shape), args.cache, args.repeats) for shape in args.shapes}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero.json").write_text(json.dumps(results, indent=1))
    write_section(args.out, "zero", "Scale to zero and back", summarise(results), publish=not args.no_publish)


if __name__ == "__main__":
    main()
