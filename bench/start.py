"""Replica start benchmark: ``scale()`` to first token with every engine process forked from the zygote:
single replicas per shape, ``scale(3)`` right after ``App.start()`` returns, a burst of three, what a
standby refill used to cost, memory, and a plain vLLM server start of the same model for reference.

    python -m bench.start [--quick | --shapes qwen2.5-0.5b qwen2.5-1.5b] [--repeats 3]
    python -m bench.start --tensor-parallel 2 [--shapes tiny qwen2.5-0.5b]

Also measured in the same run, because first touches of memory swing with the VM's history
(../shared/REFERENCE.md): the first-touch and re-touch rates of fresh memory in a new process.
Writes its section of BENCHMARKS.md and ``bench/out/start.json``. Run it alone: timings taken beside
other work mean nothing on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from app.control.demo_model import DemoShape, demo_model_dir
from bench.driver import wait_until_quiet
from bench.report import replace_section
from bench.run import DTYPE, conditions, engine_phases, host_line, log, warm, weight_files

ROOT = Path(__file__).resolve().parent.parent
KV_CACHE_GIB = 0.25
MAX_MODEL_LEN = 512
#: Targets of the zygote issue: a mapped replica's scale() -> first token (median), a refill's CPU, a
#: replica of a burst (or right after start-up) against the single-replica time, a standby's PSS.
TARGETS_S = {DemoShape.QWEN2_5_0_5B.value: 1.5, DemoShape.QWEN2_5_1_5B.value: 2.0}
REFILL_CPU_TARGET_S = 0.2
BURST_RATIO_TARGET = 2.0
#: The shape of the burst and right-after-start rows.
BURST_SHAPE = DemoShape.QWEN2_5_0_5B


def cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds of ``process`` and its live children."""
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def family_pss(pid: int) -> int:
    """PSS of a replica: its engine server and what it forked (EngineCore, workers)."""
    process = psutil.Process(pid)
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.NoSuchProcess:
            continue
    return total


FIRST_TOUCH = """
import json, time
import numpy as np
def fill(n):
    started = time.perf_counter(); buffer = np.empty(n, np.uint8); buffer.fill(1)
    return buffer, n / (time.perf_counter() - started) / 1e9
n = 512 << 20
first, first_gbps = fill(n)
del first
again, again_gbps = fill(n)
started = time.perf_counter(); again.fill(2); touched = n / (time.perf_counter() - started) / 1e9
print(json.dumps({"first_touch_gbps": round(first_gbps, 2), "re_touch_gbps": round(again_gbps, 2),
                  "touched_gbps": round(touched, 2)}))
"""


def first_touch_rates() -> dict:
    """Filling 512 MiB of fresh memory in a new process (first touch), then another fresh 512 MiB in the
    same process (re-touch), then the touched buffer again."""
    done = subprocess.run([sys.executable, "-c", FIRST_TOUCH], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def refill_cpu(cache: Path) -> float:
    """What each refill cost before the zygote: a fresh engine process (``python -m app.engine.main``, the
    standby of the pool that the zygote replaced, today the spawn fallback) until it is prepared."""
    from app.engine.main import PREPARED
    from app.engine.spec import EngineSpec
    from app.runtime.processes import child_environment

    model = demo_model_dir(cache, BURST_SHAPE, DTYPE)
    spec = EngineSpec.from_config(app_config(model, "fork", cache), replica_id="refill", model=model,
                                  served_model_name="refill", log_dir=Path(tempfile.mkdtemp()))
    env = child_environment({**spec.environment(os.cpu_count() or 1), "PYTHONPATH": str(ROOT)})
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen([sys.executable, "-m", "app.engine.main"], stdin=subprocess.PIPE, stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
        watched = psutil.Process(process.pid)
        try:
            while process.poll() is None:
                out.seek(0)
                if PREPARED in out.read():
                    return round(cpu_seconds(watched), 2)
                time.sleep(0.05)
            raise RuntimeError(f"the engine process exited with code {process.returncode}")
        finally:
            process.kill()
            process.wait()


def app_config(model: Path, launcher: str, cache: Path, tp: int = 1, tp_workers: str = "fork"):
    from app import AppConfig

    nbytes = sum(path.stat().st_size for path in weight_files(model))
    return AppConfig.load(env={}, overrides={
        "model": str(model), "router.port": 0, "engine.dtype": DTYPE, "engine.max_model_len": MAX_MODEL_LEN,
        "engine.kv_cache_gib": KV_CACHE_GIB, "engine.launcher": launcher, "replicas": 1,
        "prefill.tensor_parallel": tp, "engine.tp_workers": tp_workers,
        "runtime.ds_shared_memory_mb": max(1024, nbytes * 2 >> 20), "demo_cache_dir": str(cache)})


def replica_phases(replica: dict, log_files: dict[str, str]) -> dict:
    """Marks (seconds since scale()) and vLLM's own phase timings for one added replica."""
    marks = replica["seconds_since_requested"]
    launch = replica.get("launch") or {}
    phases = {}
    for log_file in filter(None, (launch.get("core_log"), log_files.get(replica["replica_id"]))):
        phases.update(engine_phases(log_file))
    weights = replica.get("weights") or {}
    return {"replica_id": replica["replica_id"], "marks": marks, "origin": launch.get("origin"),
            "origin_reason": launch.get("origin_reason"), "launcher": launch.get("launcher"),
            "launch_reason": launch.get("reason"), "workers": (launch.get("workers") or {}).get("method"),
            "weights_s": weights.get("seconds"), "weights_plan": weights.get("plan"),
            "weights_source": weights.get("source"), **phases}


def scale_rows(app, replicas: int) -> list[dict]:
    """``app.scale(replicas)``; a row per added replica, with its CPU and PSS right after its first token."""
    zygote = psutil.Process(app.status()["zygote"]["pid"])
    zygote_cpu = sum(zygote.cpu_times()[:2])
    report = app.scale(replicas).to_dict()
    status = app.status()
    pids = {r["replica_id"]: r["pid"] for r in status["replicas"]}
    logs = {r["replica_id"]: r["log"] for r in status["replicas"]}
    rows = []
    for replica in (r for r in report["replicas"] if r["action"] == "added"):
        row = replica_phases(replica, logs)
        pid = pids.get(replica["replica_id"])
        row.update(error=replica["error"], cpu_s=round(cpu_seconds(psutil.Process(pid)), 2) if pid else None,
                   pss=family_pss(pid) if pid else None)
        rows.append(row)
    forks = max(1, len(rows))
    for row in rows:  # what the zygote itself spent forking them
        row["zygote_cpu_s"] = round((sum(zygote.cpu_times()[:2]) - zygote_cpu) / forks, 3)
    return rows


def launcher_run(shape: DemoShape, launcher: str, cache: Path, repeats: int, tp: int = 1,
                 tp_workers: str = "fork", burst: bool = False) -> dict:
    """One App of ``shape``: with ``burst``, ``scale(3)`` right after start() returns, then a burst of
    three beyond one replica; ``repeats`` single scale-outs from one replica to two either way."""
    from app import App

    model = demo_model_dir(cache, shape, DTYPE)
    out: dict = {"launcher": launcher, "tensor_parallel": tp, "tp_workers": tp_workers, "replicas": []}
    started = time.time()
    with App(app_config(model, launcher, cache, tp, tp_workers)) as app:
        (seed,) = app.start_report.replicas
        out["app_start_s"] = round(time.time() - started, 2)
        out["worker_ready_to_serving_s"] = round(seed.timeline["first_token"] - app.status()["runtime_ready_at"], 2)
        if burst:
            log(f"{shape.value}: scale(3) right after App.start() returned")
            out["right_after_start"] = scale_rows(app, 3)
            app.scale(1)
        for step in range(repeats):
            wait_until_quiet()
            log(f"{shape.value} / {launcher}: scale 1 -> 2 ({step + 1} of {repeats})")
            out["replicas"] += scale_rows(app, 2)
            app.scale(1)
        if burst:
            wait_until_quiet()
            log(f"{shape.value}: a burst of 3 beyond 1 replica")
            out["burst"] = scale_rows(app, 4)
            out["zygote"] = app.status()["zygote"]
    return out


def first_token(url: str, model: str, deadline: float) -> None:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise TimeoutError(f"{url} gave no first token")


def plain_vllm(shape: DemoShape, cache: Path, tp: int = 1) -> dict:
    """``python -m vllm.entrypoints.openai.api_server`` on the same model, from process start to its
    first token, as a user without this project would run it."""
    from app.runtime.processes import free_port

    model = demo_model_dir(cache, shape, DTYPE)
    warm(model)
    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    with tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False) as log_file:
        started, began = time.time(), time.monotonic()
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
             "--host", "127.0.0.1", "--dtype", DTYPE, "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
             "--kv-cache-memory-bytes", str(int(KV_CACHE_GIB * 2**30)),
             "--distributed-executor-backend", "uni" if tp == 1 else "mp", "--tensor-parallel-size", str(tp),
             "--served-model-name", "plain"], stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        process = psutil.Process(server.pid)
        try:
            first_token(f"http://127.0.0.1:{port}", "plain", began + 600)
            seconds = time.time() - started
            cpu = cpu_seconds(process)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
        return {"launcher": "plain vLLM server", "first_token_s": round(seconds, 2), "cpu_s": round(cpu, 2),
                **engine_phases(log_file.name)}


def shape_run(shape: DemoShape, cache: Path, repeats: int) -> dict:
    return {"zygote": launcher_run(shape, "fork", cache, repeats, burst=shape is BURST_SHAPE),
            "plain": plain_vllm(shape, cache)}


def tp_run(shape: DemoShape, cache: Path, repeats: int, tp: int) -> dict:
    """Tensor parallel ``tp``: workers forked from the EngineCore, workers spawned by vLLM, plain vLLM."""
    return {"forked workers": launcher_run(shape, "fork", cache, repeats, tp, "fork"),
            "spawned workers": launcher_run(shape, "fork", cache, repeats, tp, "spawn"),
            "plain": plain_vllm(shape, cache, tp)}


#: Targets of the tensor-parallel issue: TP=2 mapped replica scale() -> first token, and the ratio.
TP_TARGETS_S = {DemoShape.TINY.value: 2.5, DemoShape.QWEN2_5_0_5B.value: 3.0}
TP_TARGET_RATIO = 4.0


def summarise_tp(results: dict, tp: int) -> str:
    host = results["conditions"]
    lines = [f"Tensor parallel {tp}, {host['date']}: {host_line(host)}, {host['dtype']}, one run, nothing else running; "
             f"{results['repeats']} scale-outs per row (medians), "
             "seconds from `scale()`. Every row's replica maps its weights, rank by rank; its EngineCore is forked "
             "from the engine process, itself forked from the zygote. 'forked workers': the core forks its rank workers (`engine.tp_workers: fork`); "
             "'spawned workers': vLLM's mp executor spawns them (`engine.tp_workers: spawn`), each importing torch "
             "and vLLM again; 'plain vLLM': `vllm.entrypoints.openai.api_server --tensor-parallel-size "
             f"{tp}` from process start.", "",
             "| shape | workers | forked | weights | /health | **first token** | CPU s |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for shape, runs in results["shapes"].items():
        first = {}
        for name in ("forked workers", "spawned workers"):
            rows = runs[name]["replicas"]
            med = {mark: _median([r["marks"].get(mark) for r in rows])
                   for mark in ("core_forked", "weights_loaded", "engine_ready", "first_token")}
            first[name] = med["first_token"]
            methods = sorted({r.get("workers") or "?" for r in rows})
            lines.append(f"| {shape} | {name} ({'/'.join(methods)}) | {med['core_forked']} | {med['weights_loaded']} | "
                         f"{med['engine_ready']} | **{med['first_token']}** | "
                         f"{_median([r['cpu_s'] for r in rows])} |")
        plain = runs["plain"]
        lines.append(f"| {shape} | plain vLLM server | – | – | – | **{plain['first_token_s']}** | {plain['cpu_s']} |")
        target = TP_TARGETS_S.get(shape)
        if target and first["forked workers"] is not None:
            met = "met" if first["forked workers"] <= target else "MISSED"
            verdicts.append(f"- {shape}: first token {first['forked workers']} s after `scale()` (target ≤ {target} s): {met}")
            if met == "MISSED":  # where the time went, sample by sample
                verdicts += [f"  - sample: first token {r['marks']['first_token']:.2f} s; fork -> weights in place "
                             f"{r['marks']['weights_loaded'] - r['marks']['core_forked']:.2f} s (mapping "
                             f"{r['weights_s']} s of it), KV cache allocation and profile {r.get('kv_cache_and_warmup_s')} s, "
                             f"/health -> first token {r['marks']['first_token'] - r['marks']['engine_ready']:.2f} s"
                             for r in runs["forked workers"]["replicas"]]
        if first["forked workers"] and first["spawned workers"]:
            ratio = first["spawned workers"] / first["forked workers"]
            met = "met" if ratio >= TP_TARGET_RATIO else "MISSED"
            verdicts.append(f"- {shape}: forked workers {ratio:.1f}x faster than spawned (target ≥ {TP_TARGET_RATIO:g}x): {met}")
    return "\n".join(lines + [""] + verdicts)


# ---- report ------------------------------------------------------------------------------------------

def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def _rate(rows: list[dict], single: float | None) -> str:
    firsts = [r["marks"].get("first_token") for r in rows]
    worst = max((f for f in firsts if f is not None), default=None)
    ratio = f"{worst / single:.2f}x" if worst and single else "n/a"
    return ", ".join(f"{f:.2f}" if f is not None else "failed" for f in firsts) + f" (worst {ratio} the single)"


def summarise(results: dict) -> str:
    host = results["conditions"]
    touch = results["first_touch"]
    lines = [f"Generated by `python -m bench.start` on {host['date']} in {results['seconds']} s, alone on the "
             f"machine; raw figures in `bench/out/start.json`. Host: {host_line(host)}. Fresh memory in this run: first touch "
             f"**{touch['first_touch_gbps']} GB/s**, re-touch {touch['re_touch_gbps']} GB/s, touched "
             f"{touch['touched_gbps']} GB/s (512 MiB, a new process). Every App forks its engine processes from "
             f"one zygote; added replicas map the seed's weights. KV cache {KV_CACHE_GIB} GiB, max_model_len "
             f"{MAX_MODEL_LEN}, {DTYPE}, enforce_eager, page cache warm.", "",
             f"Single scale-outs (1 -> 2 replicas, {results['repeats']} per shape, medians), seconds since "
             "`scale()`: engine process forked from the zygote, EngineCore forked from it, weights in place, "
             "`/health`, first token; vLLM's own KV cache phase; CPU seconds of the replica's processes from "
             "their fork to the first token; the replica's PSS; a plain vLLM OpenAI server's start to its first token "
             "on the same model (and how many times longer it took).", "",
             "| shape | process forked | core forked | weights | /health | **first token** | KV cache | CPU s | "
             "PSS GiB | plain vLLM server |", "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    singles: dict[str, float | None] = {}
    for shape, runs in results["shapes"].items():
        rows = runs["zygote"]["replicas"]
        med = {mark: _median([r["marks"].get(mark) for r in rows])
               for mark in ("process_made", "core_forked", "weights_loaded", "engine_ready", "first_token")}
        singles[shape] = med["first_token"]
        pss = _median([r["pss"] for r in rows])
        plain = runs["plain"]["first_token_s"]
        faster = f" ({plain / med['first_token']:.0f}x)" if med["first_token"] else ""
        lines.append(f"| {shape} | {med['process_made']} | {med['core_forked']} | {med['weights_loaded']} | "
                     f"{med['engine_ready']} | **{med['first_token']}** | "
                     f"{_median([r.get('kv_cache_and_warmup_s') for r in rows])} | {_median([r['cpu_s'] for r in rows])} | "
                     f"{pss / 2**30:.2f} | {plain}{faster} |" if pss else f"| {shape} | failed |")
        target = TARGETS_S.get(shape)
        if target is not None and med["first_token"] is not None:
            met = med["first_token"] <= target
            verdicts.append(f"- {shape}: mapped replica's first token {med['first_token']} s (median) against "
                            f"{target} s: **{'met' if met else 'MISSED'}**"
                            + ("." if met else f". {where_the_time_went(rows)}"))
    burst_runs = results["shapes"].get(BURST_SHAPE.value, {}).get("zygote", {})
    single = singles.get(BURST_SHAPE.value)
    lines += ["", f"Bursts ({BURST_SHAPE.value}), first token of each added replica, seconds since `scale()`:", "",
              "| scaling | replicas' first tokens | every process from the zygote |", "|---|---|---|"]
    for name, key in (("`scale(3)` right after `App.start()` returned", "right_after_start"),
                      ("a burst of 3 beyond 1 replica (`scale(4)`)", "burst")):
        rows = burst_runs.get(key) or []
        forked = all(r["origin"] == "zygote" for r in rows) and bool(rows)
        lines.append(f"| {name} | {_rate(rows, single)} | {'yes' if forked else 'no'} |")
        worst = max((r["marks"].get("first_token") or float("inf") for r in rows), default=None)
        if worst is not None and single:
            met = worst <= BURST_RATIO_TARGET * single and forked
            verdicts.append(f"- {name}: the slowest replica {worst:.2f} s, {worst / single:.2f}x the single-replica "
                            f"{single} s (target ≤ {BURST_RATIO_TARGET:g}x, none waiting for an import): "
                            f"**{'met' if met else 'MISSED'}**")
    refill = results["refill_cpu_s"]
    zygote = burst_runs.get("zygote") or {}
    fork_cpu = _median([r["zygote_cpu_s"] for r in burst_runs.get("replicas", [])])
    lines += ["", "Refills and memory:", "",
              f"- Before: after each scale-out the pool refilled a standby, a fresh Python importing vLLM: "
              f"**{refill} s of CPU** (measured in this run: `python -m app.engine.main` until prepared, which is "
              "also the spawn fallback's cost). After: nothing is refilled; a fork costs the zygote "
              f"**{fork_cpu} s of CPU** per engine process.",
              f"- The zygote: RSS {zygote.get('rss_bytes', 0) / 2**30:.2f} GiB, PSS "
              f"{zygote.get('pss_bytes', 0) / 2**30:.2f} GiB with {zygote.get('processes')} processes forked from it "
              f"running (four replicas); their shared copy-on-write pages save "
              f"**{zygote.get('cow_saved_bytes', 0) / 2**30:.2f} GiB** (anonymous RSS - anonymous PSS, summed).",
              "- No standby exists any more (`engine.standby_processes` was removed): nothing idles but the zygote."]
    if fork_cpu is not None:
        verdicts.append(f"- A refill ≤ {REFILL_CPU_TARGET_S} s of CPU: before {refill} s, after none (a fork: "
                        f"{fork_cpu} s of the zygote's CPU): **{'met' if fork_cpu <= REFILL_CPU_TARGET_S else 'MISSED'}**")
    verdicts.append("- A standby's PSS ≤ 0.1 GB beyond the zygote's shared pages: **not applicable**, there are no "
                    f"standbys; the zygote's own PSS is {zygote.get('pss_bytes', 0) / 2**30:.2f} GiB.")
    verdicts.append(f"- Measured on one host type only ({host['cpu']}); the targets on the other type are unverified "
                    "by this run.")
    return "\n".join(lines + ["", "Targets:", ""] + verdicts)


def where_the_time_went(rows: list[dict]) -> str:
    mark = {name: _median([row["marks"].get(name) for row in rows]) or 0.0
            for name in ("process_made", "core_forked", "weights_loaded", "engine_ready", "first_token")}
    kv = _median([row.get("kv_cache_and_warmup_s") for row in rows]) or 0.0
    return (f"Where the time went: the process fork {mark['process_made']:.2f} s, the core's fork "
            f"{mark['core_forked'] - mark['process_made']:.2f} s (the engine's arguments parsed and checked); "
            f"from the core's fork to the weights in place {mark['weights_loaded'] - mark['core_forked']:.2f} s "
            "(vLLM's config and the handshake with the server, vLLM's Triton-override scan of every loaded module, "
            "about 0.5 s, worker and model init, the mapping); from the weights to /health "
            f"{mark['engine_ready'] - mark['weights_loaded']:.2f} s (KV cache and connector {kv:.2f} s, the "
            f"server's set-up); the first forward {mark['first_token'] - mark['engine_ready']:.2f} s. "
            "docs/FINDINGS.md (\"One zygote per node\") has one start line by line.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=[DemoShape.QWEN2_5_0_5B.value, DemoShape.QWEN2_5_1_5B.value],
                        choices=[s.value for s in DemoShape])
    parser.add_argument("--quick", action="store_true", help="the tiny and 0.5B shapes")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="> 1: the tensor-parallel rows instead "
                        "(forked against spawned workers and a plain vLLM server at that size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "yrllm")
    args = parser.parse_args()
    if args.quick:
        args.shapes = [DemoShape.TINY.value, DemoShape.QWEN2_5_0_5B.value]
    started = time.time()
    if args.tensor_parallel > 1:
        tp = args.tensor_parallel
        results = {"conditions": conditions(argparse.Namespace(quick=False)), "repeats": args.repeats,
                   "shapes": {shape: tp_run(DemoShape(shape), args.cache, args.repeats, tp) for shape in args.shapes}}
        results["seconds"] = round(time.time() - started, 1)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"start-tp{tp}.json").write_text(json.dumps(results, indent=1))
        summary = summarise_tp(results, tp)
        replace_section(ROOT / "BENCHMARKS.md", f"Replica start at tensor parallel {tp}", summary)
        print(summary)
        return
    results: dict = {"conditions": conditions(argparse.Namespace(quick=False)), "repeats": args.repeats}
    log("first touch of fresh memory")
    results["first_touch"] = first_touch_rates()
    log("a refill as it was: a fresh engine process until prepared")
    results["refill_cpu_s"] = refill_cpu(args.cache)
    results["shapes"] = {shape: shape_run(DemoShape(shape), args.cache, args.repeats) for shape in args.shapes}
    results["seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "start.json").write_text(json.dumps(results, indent=1))
    summary = summarise(results)
    replace_section(ROOT / "BENCHMARKS.md", "Replica start: every engine process from the zygote", summary)
    print(summary)


if __name__ == "__main__":
    main()
