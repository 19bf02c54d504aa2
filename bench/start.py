"""Replica start benchmark: ``scale()`` to first token, per phase, for the fork launcher, the spawn
launcher and a plain vLLM OpenAI server start of the same model (what a user would otherwise run).

    python -m bench.start [--quick | --shapes tiny qwen2.5-0.5b qwen2.5-1.5b] [--repeats 2]

Per shape and launcher: an App seeds the first replica, then scales out ``--repeats`` times, each time
with a warm standby, and the mapped replica's timeline, vLLM's own phase timings (from its log), the
CPU seconds its processes spent between ``scale()`` and the first token, and the standby's memory are
recorded. Also: the demo App's start (data system worker ready -> first replica serving). Writes its
section of BENCHMARKS.md and ``bench/out/start.json``. Run it alone: timings taken beside other work
mean nothing on 2 cores.
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
from bench.report import replace_section
from bench.run import DTYPE, conditions, engine_phases, log, warm, weight_files

ROOT = Path(__file__).resolve().parent.parent
KV_CACHE_GIB = 0.25
MAX_MODEL_LEN = 512
#: Targets of the fast-start issue: mapped replica scale() -> first token, and the ratio to spawn.
TARGETS_S = {DemoShape.QWEN2_5_0_5B.value: 1.5, DemoShape.QWEN2_5_1_5B.value: 2.0}
TARGET_RATIO = 8.0
DEMO_SERVING_TARGET_S = 5.0


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


def standby(timeout_s: float = 300) -> psutil.Process:
    """Wait until the App's pool holds a warm standby; return it."""
    from app.engine.pool import ENGINE_POOL

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        warm_pids = ENGINE_POOL.warm_pids()
        if warm_pids:
            return psutil.Process(warm_pids[0])
        time.sleep(0.2)
    raise TimeoutError("no standby became warm")


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
    return {"marks": marks, "launcher": launch.get("launcher"), "launch_reason": launch.get("reason"),
            "workers": (launch.get("workers") or {}).get("method"),
            "preimported_modules": launch.get("preimported_modules"), "weights_s": weights.get("seconds"),
            "weights_plan": weights.get("plan"), "weights_source": weights.get("source"), **phases}


def launcher_run(shape: DemoShape, launcher: str, cache: Path, repeats: int, tp: int = 1,
                 tp_workers: str = "fork") -> dict:
    from app import App

    model = demo_model_dir(cache, shape, DTYPE)
    out: dict = {"launcher": launcher, "tensor_parallel": tp, "tp_workers": tp_workers, "replicas": []}
    started = time.time()
    with App(app_config(model, launcher, cache, tp, tp_workers)) as app:
        (seed,) = app.start_report.replicas
        out["app_start_s"] = round(time.time() - started, 2)
        out["worker_ready_to_serving_s"] = round(seed.timeline["first_token"] - app.status()["runtime_ready_at"], 2)
        out["seed"] = seed.replica_id
        for step in range(repeats):
            spare = standby()
            memory = spare.memory_full_info()
            cpu_before = cpu_seconds(spare)
            log(f"{shape.value} / {launcher}: scale to {step + 2} (standby pid {spare.pid} warm)")
            report = app.scale(step + 2).to_dict()
            (replica,) = [r for r in report["replicas"] if r["action"] == "added"]
            logs = {r["replica_id"]: r["log"] for r in app.status()["replicas"]}
            row = replica_phases(replica, logs)
            row.update(error=replica["error"], standby_rss=memory.rss, standby_pss=memory.pss,
                       cpu_s=round(cpu_seconds(spare) - cpu_before, 2) if spare.is_running() else None)
            out["replicas"].append(row)
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
    return {"fork": launcher_run(shape, "fork", cache, repeats), "spawn": launcher_run(shape, "spawn", cache, repeats),
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
    flags = ", ".join(f"{name} {'yes' if host.get(name) else 'no'}" for name in ("avx512", "avx512_bf16", "amx"))
    lines = [f"Tensor parallel {tp}, {host['date']}: {host['cpu']}, {host['cores']} cores ({flags}), "
             f"{host['ram_gib']} GiB, torch {host['torch']}, {host['dtype']}, one run, nothing else running; "
             f"{results['repeats']} scale-outs per row (medians), "
             "seconds from `scale()`. Every row's replica maps its weights, rank by rank; its EngineCore is forked "
             "from a warm standby. 'forked workers': the core forks its rank workers (`engine.tp_workers: fork`); "
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


def where_the_time_went(rows: list[dict]) -> str:
    """The fork launcher's phases, from the medians of its marks and of vLLM's own timings."""
    mark = {name: _median([row["marks"].get(name) for row in rows]) or 0.0
            for name in ("core_forked", "weights_loaded", "engine_ready", "first_token")}
    kv = _median([row.get("kv_cache_and_warmup_s") for row in rows]) or 0.0
    return (f"Where the time went: fork {mark['core_forked']:.2f} s; the core's config, worker init, model init "
            f"and weights {mark['weights_loaded'] - mark['core_forked']:.2f} s; from the weights to /health "
            f"{mark['engine_ready'] - mark['weights_loaded']:.2f} s (vLLM's weight post-processing, which "
            f"repacks the tied LM head for oneDNN, KV cache allocation {kv:.2f} s, the server's set-up); the "
            f"first forward {mark['first_token'] - mark['engine_ready']:.2f} s (faulting the shared weights into "
            "the core's page tables). See docs/FINDINGS.md.")


def summarise(results: dict) -> str:
    lines = [f"Generated by `python -m bench.start` on {results['conditions']['date']} in {results['seconds']} s, "
             "alone on the machine; raw figures in `bench/out/start.json`. Each App seeds one replica, then "
             f"scales out {results['repeats']} times, each time with a warm standby; the added replicas map "
             f"the seed's weights. KV cache {KV_CACHE_GIB} GiB (`--kv-cache-memory-bytes`), "
             f"max_model_len {MAX_MODEL_LEN}, {DTYPE}, enforce_eager, page cache warm.", "",
             "Seconds since `scale()` (medians over the repeats): standby taken, EngineCore forked, weights in "
             "place, `/health` answering, first token. vLLM's own phase timings from its log: model init, "
             "weights, KV cache with profile and warm-up. CPU: seconds of CPU the replica's processes spent "
             "from `scale()` to the first token (a standby's imports before that are not counted; the spawn "
             "launcher's EngineCore imports everything again).", "",
             "| shape | launcher | standby taken | forked | weights | /health | **first token** | model init | "
             "weights (vLLM) | KV cache | CPU s | standby RSS / PSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for shape, runs in results["shapes"].items():
        first: dict[str, float | None] = {}
        for launcher in ("fork", "spawn"):
            rows = runs[launcher]["replicas"]
            marks = [row["marks"] for row in rows]
            med = {mark: _median([m.get(mark) for m in marks]) for mark in
                   ("standby_taken", "core_forked", "weights_loaded", "engine_ready", "first_token")}
            first[launcher] = med["first_token"]
            memory = (f"{_median([r['standby_rss'] for r in rows]) / 2**30:.2f} / "
                      f"{_median([r['standby_pss'] for r in rows]) / 2**30:.2f} GiB")
            lines.append(f"| {shape} | {launcher} | {med['standby_taken']} | {med['core_forked'] or '–'} | "
                         f"{med['weights_loaded']} | {med['engine_ready']} | **{med['first_token']}** | "
                         f"{_median([r.get('model_init_s') for r in rows])} | {_median([r.get('weights_s') for r in rows])} | "
                         f"{_median([r.get('kv_cache_and_warmup_s') for r in rows])} | "
                         f"{_median([r.get('cpu_s') for r in rows])} | {memory} |")
        plain = runs["plain"]
        lines.append(f"| {shape} | plain vLLM server | – | – | – | – | **{plain['first_token_s']}** | "
                     f"{_median([plain.get('model_init_s')])} | – | {_median([plain.get('kv_cache_and_warmup_s')])} | "
                     f"{plain['cpu_s']} | – |")
        ratio = first["spawn"] / first["fork"] if first["fork"] and first["spawn"] else None
        target = TARGETS_S.get(shape)
        if target is not None and first["fork"] is not None:
            verdicts.append(f"- {shape}: mapped replica first token {first['fork']} s against a target of "
                            f"{target} s: **{'met' if first['fork'] <= target else 'MISSED'}**."
                            + ("" if first["fork"] <= target else " " + where_the_time_went(runs["fork"]["replicas"])))
        if ratio is not None:
            verdicts.append(f"- {shape}: fork {ratio:.1f}x faster than spawn (target ≥ {TARGET_RATIO:g}x): "
                            f"**{'met' if ratio >= TARGET_RATIO else 'MISSED'}**; {plain['first_token_s'] / first['fork']:.1f}x "
                            "faster than a plain vLLM server start.")
    demo = results["shapes"].get(DemoShape.TINY.value, {}).get("fork", {}).get("worker_ready_to_serving_s")
    if demo is not None:
        verdicts.append(f"- The demo App (tiny shape, fork) served its first token {demo} s after its data system "
                        f"worker was ready (target ≤ {DEMO_SERVING_TARGET_S:g} s): "
                        f"**{'met' if demo <= DEMO_SERVING_TARGET_S else 'MISSED'}**.")
    verdicts.append("- The spawn launcher here starts from a warm standby too (the server's imports are skipped), so "
                    "the fork/spawn ratio sets the EngineCore's spawn and second import (6-7 s) against the fork "
                    "launcher's whole start; the ratio to a plain vLLM server start (both imports) follows the "
                    "semicolon.")
    return "\n".join(lines + ["", "Targets:", ""] + verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=[s.value for s in DemoShape], choices=[s.value for s in DemoShape])
    parser.add_argument("--quick", action="store_true", help="tiny and 0.5B shapes only")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="> 1: the tensor-parallel rows instead "
                        "(forked against spawned workers and a plain vLLM server at that size)")
    parser.add_argument("--repeats", type=int, default=2)
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
    results: dict = {"conditions": conditions(argparse.Namespace(quick=False)), "repeats": args.repeats,
                     "shapes": {shape: shape_run(DemoShape(shape), args.cache, args.repeats) for shape in args.shapes}}
    results["seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "start.json").write_text(json.dumps(results, indent=1))
    summary = summarise(results)
    replace_section(ROOT / "BENCHMARKS.md", "Replica start: fork launcher, spawn launcher, plain vLLM", summary)
    print(summary)


if __name__ == "__main__":
    main()
