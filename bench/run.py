"""Scale-out benchmark: weight loading against vLLM's own loaders, end-to-end scale-out, memory.

    python -m bench.run [--quick] [--out bench/out]

Writes BENCHMARKS.md (tables, targets met or not), ``<out>/results.json`` (every raw figure) and PNG
plots. Everything is measured in this one run on this machine; conditions are written beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from app.control.demo_model import DemoShape, demo_model_dir
from app.runtime.datasystem_worker import DataSystemWorker
from app.weights.load_report import LoadReport, PlanKind
from app.weights.plan import LOAD_FORMAT, WeightPlan

ROOT = Path(__file__).resolve().parent.parent
DTYPE = "bfloat16"  # the checkpoints' dtype: weight bytes as real Qwen2.5 checkpoints have them
PEERS = ["fastsafetensors", "runai_streamer", "sharded_state", "tensorizer", "instanttensor"]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- measurements ------------------------------------------------------------------------------------

def memcpy_gbps(nbytes: int = 1 << 30) -> float:
    """Copy between two already-touched buffers: this machine's memory bandwidth ceiling."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def evict(model: Path) -> None:
    """Drop the model's files from the page cache (posix_fadvise DONTNEED; no root-wide drop)."""
    for path in weight_files(model):
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def warm(model: Path) -> None:
    for path in weight_files(model):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def load_once(model: Path, load_format: str, extra: dict | None = None, timeout_s: int = 600) -> dict:
    args = json.dumps({"model": str(model), "dtype": DTYPE, "load_format": load_format, "extra": extra})
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "bench.load_once", args], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][7:]) if lines else {"error": f"no result (exit {done.returncode}): "
                                                               f"{done.stderr.strip()[-300:]}"}
    took = re.findall(r"Loading weights took ([0-9.]+) seconds", done.stdout + done.stderr)
    if took:
        result["weights_s"] = float(took[-1])
    result["process_s"] = round(time.perf_counter() - started, 2)
    return result


def ours(model: Path, kind: PlanKind, fingerprint: str, ds_address: str, scratch: Path) -> dict:
    report_path = scratch / f"{fingerprint}-{kind.value}.json"
    plan = WeightPlan(kind=kind, replica_id=f"bench-{kind.value}", fingerprint=fingerprint,
                      ds_address=ds_address, report_path=report_path)
    result = load_once(model, LOAD_FORMAT, plan.model_dump(mode="json"))
    if report_path.exists():
        report = LoadReport.model_validate_json(report_path.read_text())
        result.update(weights_s=report.seconds, publish_s=report.publish_seconds,
                      fallback=report.fallback_reason, source=report.source.value)
    return result


def loaders(shape: DemoShape, cache: Path, ds_address: str, scratch: Path) -> dict:
    model = demo_model_dir(cache, shape, DTYPE)
    nbytes = sum(path.stat().st_size for path in weight_files(model))
    fingerprint = hashlib.sha256(f"bench-{shape.value}-{time.time()}".encode()).hexdigest()[:32]
    rows: dict[str, dict] = {}
    evict(model)
    log(f"{shape.value}: safetensors, cold page cache")
    rows["vllm safetensors (cold)"] = load_once(model, "safetensors")
    warm(model)
    log(f"{shape.value}: safetensors, warm page cache")
    rows["vllm safetensors (warm)"] = load_once(model, "safetensors")
    for peer in PEERS:
        warm(model)
        log(f"{shape.value}: {peer} (warm)")
        rows[f"vllm {peer} (warm)"] = load_once(model, peer)
    warm(model)
    log(f"{shape.value}: ours, seed (disk + publish)")
    rows["ours: seed (disk, then publish)"] = ours(model, PlanKind.SEED, fingerprint, ds_address, scratch)
    log(f"{shape.value}: ours, map")
    rows["ours: map (host tier)"] = ours(model, PlanKind.MAP, fingerprint, ds_address, scratch)
    log(f"{shape.value}: ours, pull")
    rows["ours: pull (host tier, copy)"] = ours(model, PlanKind.PULL, fingerprint, ds_address, scratch)
    for row in rows.values():
        if row.get("weights_s"):
            row["gbps"] = round(nbytes / row["weights_s"] / 1e9, 3)
    return {"model": str(model), "weight_bytes": nbytes, "rows": rows}


def shared_memory_pss(pid: int) -> int:
    """PSS of the data system's shared memory (the memfd the worker maps into its clients)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
            inside = "memfd:datasystem" in line
        elif inside and line.startswith("Pss:"):
            total += int(line.split()[1]) * 1024
    return total


def memory(pids: list[int], worker_pid: int) -> dict:
    """RSS and PSS of the replicas (with their EngineCore), and the weights' PSS across replicas and
    the data system worker (together: the physical memory of the shared weights)."""
    pss = rss = 0
    weights = shared_memory_pss(worker_pid)
    for pid in pids:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            info = proc.memory_full_info()
            pss, rss = pss + info.pss, rss + info.rss
            weights += shared_memory_pss(proc.pid)
    return {"replicas": len(pids), "pss": pss, "rss": rss, "weights_pss": weights}


def engine_phases(log_file: str) -> dict:
    """vLLM's own timings from an engine's log: weights, and KV cache allocation with profiling and
    warm-up."""
    text = Path(log_file).read_text(errors="replace")
    phases = {}
    for name, pattern in (("kv_cache_and_warmup_s", r"init engine \(profile, create kv cache, warmup model\) "
                                                    r"took ([0-9.]+)"),
                          ("model_init_s", r"Initializing model took ([0-9.]+)")):
        found = re.findall(pattern, text)
        if found:
            phases[name] = float(found[-1])
    return phases


def scale_out(shape: DemoShape, cache: Path, cpu_mode: str, steps: tuple[int, ...]) -> dict:
    from app import App, AppConfig

    model = demo_model_dir(cache, shape, DTYPE)
    nbytes = sum(path.stat().st_size for path in weight_files(model))
    config = AppConfig.load(env={}, overrides={"model": str(model), "router.port": 0, "engine.dtype": DTYPE,
                                               "engine.max_model_len": 512, "replicas": 0, "weights.verify": "sampled",
                                               "weights.cpu_mode": cpu_mode,
                                               "runtime.ds_shared_memory_mb": max(1024, nbytes * 2 >> 20),
                                               "demo_cache_dir": str(cache)})
    out: dict = {"model": str(model), "weight_bytes": nbytes, "cpu_mode": cpu_mode, "memory": [], "reports": []}
    with App(config) as app:
        for replicas in steps:
            log(f"end-to-end ({cpu_mode}): scale to {replicas}")
            report = app.scale(replicas)
            status = app.status()
            logs = {r["replica_id"]: r["log"] for r in status["replicas"]}
            data = report.to_dict()
            for replica in data["replicas"]:
                core_log = (replica.get("launch") or {}).get("core_log")  # the forked EngineCore logs apart
                replica["engine_phases"] = {**engine_phases(logs[replica["replica_id"]]),
                                            **(engine_phases(core_log) if core_log else {})}
            out["reports"].append(data)
            out["memory"].append(memory([r["pid"] for r in status["replicas"]], status["ds_worker_pid"]))
    return out


# ---- report ------------------------------------------------------------------------------------------

def host_line(host: dict) -> str:
    """The host as benchmarks print it beside their figures (hosts of this machine kind differ)."""
    flags = ", ".join(f"{name} {'yes' if host.get(name) else 'no'}" for name in ("avx512", "avx512_bf16", "amx"))
    return f"{host['cpu']}, {host['cores']} cores ({flags}), {host['ram_gib']} GiB, torch {host['torch']}"


def conditions(args: argparse.Namespace) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu,
            "cores": os.cpu_count(), "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags, "ram_gib": round(psutil.virtual_memory().total / 2**30),
            "dtype": DTYPE, "python": platform.python_version(), "torch": torch.__version__,
            "quick": args.quick, "page_cache": "cold = posix_fadvise(DONTNEED) on the model files before the "
            "run; warm = every file read once before the run",
            "data_system": "local datasystem_worker, shared memory sized to the model, no populate",
            "engine": "vLLM LLM() in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), enforce_eager, 2 threads"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny and 0.5B shapes only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "yrllm")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = [DemoShape.TINY, DemoShape.QWEN2_5_0_5B]
    if not args.quick:
        shapes.append(DemoShape.QWEN2_5_1_5B)
    started = time.time()
    results: dict = {"conditions": conditions(args)}
    log("memcpy bandwidth")
    results["memcpy_gbps"] = round(memcpy_gbps(), 2)
    worker = DataSystemWorker(8192)
    worker.start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            results["loaders"] = {shape.value: loaders(shape, args.cache, worker.address, Path(scratch))
                                  for shape in shapes}
    finally:
        worker.stop()
    results["scale_out"] = scale_out(DemoShape.QWEN2_5_0_5B, args.cache, "map", (1, 2, 3))
    results["scale_out_pull"] = scale_out(DemoShape.QWEN2_5_0_5B, args.cache, "pull", (1, 2))
    results["seconds"] = round(time.time() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    from bench.report import write_report

    write_report(results, ROOT / "BENCHMARKS.md", args.out)
    log(f"done in {results['seconds']} s: BENCHMARKS.md, {args.out}/results.json, plots in {args.out}")


if __name__ == "__main__":
    main()
