"""The original case's headline on its own shape: Qwen2.5-7B (the demo builder's random weights in the
real shape, bf16, 15.2 GB) with ``PTP=2``, deployed as the original case does it (its environment
variables, ``python entrypoint.py``, then ``POST /scaleout``), beside vLLM's own loader.

    python -m bench.seedcase [--model DIR] [--no-publish]

Two runs of the App, one after the other, each with the model's files dropped from the page cache:

1. vLLM's own safetensors loader (``YRLLM_WEIGHTS__ENABLED=false``): its load per rank, the original
   case's 15.8 s step, and the host's peak memory, what vLLM needs without us.
2. The App as the original case runs it: the seed replica loads from disk and moves its weights into the
   data system; then ``POST /scaleout`` adds a replica that maps them. Its load, publish and peak memory
   per rank, the map per rank, the first token after ``/scaleout``, and the PSS of two replicas. A pull
   (the copying path) cannot fit beside two replicas on a 24 GB host: it is measured on 2 GB of rank 0's
   published tensors, in this process, and extrapolated.

Host memory is sampled from /proc/meminfo (AnonPages + Shmem, the memory nothing can evict) every
0.2 s. Writes its section of BENCHMARKS.md and ``bench/out/seedcase.json``. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from pathlib import Path

import torch

from app.control.demo_model import DemoShape, demo_model_dir
from app.host_memory import meminfo
from app.runtime.processes import free_port
from app.weights.host_tier import HostTier
from app.weights.identity import RankLayout, WeightIdentity, WeightKeys, content_digest, installed_vllm_version
from app.weights.manifest import Manifest
from bench.driver import ds_address, http_call, start_driver, stop_driver, wait_until_quiet
from bench.report import write_section
from bench.run import conditions, evict, host_line, log, weight_files

ROOT = Path(__file__).resolve().parent.parent
#: The original case's environment (its deployment block), the model and port set per run.
ORIGINAL_ENV = {"PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "0", "PTP": "2", "DTP": "0", "PDP": "1", "DDP": "0",
                "USING_PREFIX_CONNECTOR": "1", "VLLM_USE_V1": "1", "SERVER_IP": "127.0.0.1"}
#: The original case's figures (Ascend 910B, weights in NPU memory, its own write-up in ../shared/seed).
ORIGINAL = {"disk_s": 15.8, "data_system_s": 1.5}
#: Targets of the issue.
MAP_TARGET_S, MAP_RATIO_TARGET, FIRST_TOKEN_TARGET_S = 0.3, 50.0, 8.0
SEED_EXTRA_TARGET, PSS_TARGET = 0.15, 1.05
PULL_SAMPLE_BYTES = 2 << 30
#: A greedy completion both runs answer: the moved and the mapped weights must give vLLM's own tokens.
GREEDY = {"prompt": "def fibonacci(n):", "max_tokens": 4, "temperature": 0, "return_token_ids": True}


class HostMemory:
    """The peak of AnonPages + Shmem, sampled in the background since the last ``reset()``."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        fields = meminfo()
        return fields["AnonPages"] + fields["Shmem"]

    def reset(self) -> int:
        """Start a new phase; returns the memory in use now (the phase's baseline)."""
        self.peak = self.now()
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.now())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def vmstat(name: str) -> int:
    return next(int(line.split()[1]) for line in Path("/proc/vmstat").read_text().splitlines()
                if line.startswith(name + " "))


def logs_dir(driver_log: Path) -> Path:
    match = re.search(r"log (/\S+/yrllm-logs-[^/\s]+)/", driver_log.read_text())
    if not match:
        raise RuntimeError(f"no engine log folder in {driver_log}")
    return Path(match.group(1))


def greedy_tokens(url: str, model: Path) -> list[int]:
    code, body = http_call(url, "/v1/completions", {"model": model.name, **GREEDY}, timeout=300)
    if code != 200:
        raise RuntimeError(f"the completion answered {code}: {body[:300]!r}")
    return json.loads(body)["choices"][0]["token_ids"]


def vllm_load_seconds(logs: Path, replica: str) -> list[float]:
    """vLLM's own 'Loading weights took' per worker, from the engine core's log."""
    text = (logs / f"engine-core-{replica}.log").read_text()
    return [float(s) for s in re.findall(r"Loading weights took ([0-9.]+) seconds", text)]


def rank_reports(logs: Path, replica: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(logs.glob(f"load-{replica}.rank*.json"))]


def vllm_own_run(model: Path, out: Path, memory: HostMemory) -> dict:
    evict(model)
    wait_until_quiet()
    log("vLLM's own loader, PTP=2, page cache dropped")
    baseline = memory.reset()
    started = time.perf_counter()
    driver, url = start_driver(1, out / "seedcase-vllm.log", {**ORIGINAL_ENV, "MODEL_PATH": str(model),
                                                              "YRLLM_WEIGHTS__ENABLED": "false"}, flags=[])
    try:
        result = {"ready_s": round(time.perf_counter() - started, 2), "peak_bytes": memory.peak - baseline,
                  "load_s": vllm_load_seconds(logs_dir(out / "seedcase-vllm.log"), "r1"),
                  "tokens": greedy_tokens(url, model)}
    finally:
        stop_driver(driver)
    return result


def pull_sample(address: str, model: Path, cache: Path) -> dict:
    """Copy up to PULL_SAMPLE_BYTES of rank 0's published tensors into fresh tensors, as a pulling
    replica does (``loader._pull``): its rate, for the extrapolation. The entry's identity is the App's
    for this run (engine.dtype left at auto, PTP=2)."""
    identity = WeightIdentity(content=content_digest(model, cache / "digests.json"), dtype="auto",
                              quantization=None, vllm_version=installed_vllm_version(), tp_size=2)
    keys, tier = WeightKeys(identity.fingerprint, RankLayout(tp_rank=0, tp_size=2)), HostTier(address)
    manifest = Manifest.model_validate_json(bytes(tier.get([keys.manifest])[0]))
    count, total = 0, 0
    for entry in manifest.tensors:
        if total + entry.nbytes > PULL_SAMPLE_BYTES and count:
            break
        count, total = count + 1, total + entry.nbytes
    views = tier.get(keys.tensors(count))
    started = time.perf_counter()
    copies = [torch.empty(len(view), dtype=torch.uint8).copy_(torch.frombuffer(view, dtype=torch.uint8))
              for view in views]
    seconds = time.perf_counter() - started
    del copies, views
    return {"bytes": total, "seconds": round(seconds, 3), "rank_bytes": sum(e.nbytes for e in manifest.tensors),
            "rank_seconds": round(seconds * sum(e.nbytes for e in manifest.tensors) / total, 2)}


def app_run(model: Path, cache: Path, out: Path, memory: HostMemory) -> dict:
    evict(model)
    wait_until_quiet()
    log("the App as the original case runs it: PTP=2, MODEL_PATH, SERVER_PORT; page cache dropped")
    baseline, port = memory.reset(), free_port()
    started = time.perf_counter()
    driver, url = start_driver(1, out / "seedcase-app.log", {**ORIGINAL_ENV, "MODEL_PATH": str(model),
                                                             "SERVER_PORT": str(port)}, flags=[])
    try:
        result: dict = {"ready_s": round(time.perf_counter() - started, 2), "peak_bytes": memory.peak - baseline}
        logs = logs_dir(out / "seedcase-app.log")
        result["seed_ranks"] = rank_reports(logs, "r1")
        result["seed_vllm_load_s"] = vllm_load_seconds(logs, "r1")
        result["seed_tokens"] = greedy_tokens(url, model)
        wait_until_quiet()
        log("POST /scaleout")
        started = time.perf_counter()
        code, body = http_call(url, "/scaleout", {}, timeout=600)
        result["scaleout_s"] = round(time.perf_counter() - started, 3)
        result["scaleout_peak_bytes"] = memory.peak - baseline
        if code != 200:
            raise RuntimeError(f"/scaleout answered {code}: {body[:300]!r}")
        scaled = json.loads(body)
        added = next(r for r in scaled["replicas"] if r["action"] == "added")
        result["added"] = {"timeline": {mark: round(at - added["timeline"]["requested"], 3)
                                        for mark, at in sorted(added["timeline"].items(), key=lambda kv: kv[1])},
                           "ranks": added["weights"]["ranks"] or [added["weights"]]}
        wait_until_quiet()
        status = json.loads(http_call(url, "/status")[1])
        result["footprint"] = status["footprint"]
        replica_urls = {row["replica_id"]: row["url"] for row in status["replicas"]}
        result["mapped_tokens"] = greedy_tokens(replica_urls[added["replica_id"]], model)
        log("a pull of 2 GB of rank 0's tensors, for the extrapolation")
        result["pull"] = pull_sample(ds_address(driver), model, cache)
    finally:
        stop_driver(driver)
    return result


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def summarise(results: dict) -> str:
    own, app, weights = results["vllm_own"], results["app"], results["weight_bytes"]
    disk_s = max(own["load_s"])
    seeds, mapped = app["seed_ranks"], app["added"]["ranks"]
    map_s = max(rank["seconds"] for rank in mapped)
    timeline = app["added"]["timeline"]
    footprint = app["footprint"]
    replica_parts = [part for part in footprint["parts"] if re.fullmatch(r"r\d+", part["name"])]
    weights_pss = sum(part["shmem_pss_bytes"] for part in replica_parts)
    seed_extra = app["peak_bytes"] - own["peak_bytes"]
    met = {"map": map_s <= MAP_TARGET_S, "map_ratio": disk_s / map_s >= MAP_RATIO_TARGET,
           "first_token": app["scaleout_s"] <= FIRST_TOKEN_TARGET_S, "seed": seed_extra <= SEED_EXTRA_TARGET * weights,
           "pss": weights_pss <= PSS_TARGET * weights, "oom": results["oom_kills"] == 0 and not results["swap_bytes"],
           "tokens": own["tokens"] == app["seed_tokens"] == app["mapped_tokens"]}
    c = results["conditions"]
    lines = [
        f"Host: {host_line(c)}. {c['date']}. The Qwen2.5-7B shape (the demo builder's random weights, bf16, "
        f"{_gb(weights)} in {results['files']} safetensors files), `PTP=2`, deployed with the original case's "
        f"environment as it is (`PREFILL_INS_NUM=1 DECODE_INS_NUM=0 PTP=2 MODEL_PATH=... SERVER_PORT=...`; "
        f"nothing else set: 0.25 GiB of KV cache per rank, the context auto-fitted to it, 9,216 tokens), "
        f"`python entrypoint.py`, then `POST /scaleout`. The model's "
        f"files dropped from the page cache before each run; one run each, nothing else running. The "
        f"original case: Ascend, weights in NPU memory, its own write-up.", "",
        "| step | the original case (Ascend, NPU memory) | here (CPU, host shared memory) |", "|---|---|---|",
        f"| load from disk, vLLM's own safetensors loader, per rank (both ranks in parallel) | "
        f"{ORIGINAL['disk_s']} s | "
        + " / ".join(f"{s:.2f} s" for s in own["load_s"]) + " |",
        f"| a new replica takes the weights from the data system, per rank | {ORIGINAL['data_system_s']} s (pull) | "
        + " / ".join(f"{r['seconds']:.3f} s" for r in mapped) + " (map) |",
        f"| ratio, disk / data system | {ORIGINAL['disk_s'] / ORIGINAL['data_system_s']:.1f}x | "
        f"{disk_s / map_s:.0f}x |",
        f"| pull instead of map, per rank (extrapolated from {_gb(app['pull']['bytes'])} copied at "
        f"{app['pull']['bytes'] / app['pull']['seconds'] / 1e9:.2f} GB/s) | - | {app['pull']['rank_seconds']:.2f} s "
        f"({disk_s / app['pull']['rank_seconds']:.1f}x) |", "",
        "The seed replica, per rank: vLLM's load from disk (through our load format), then the move into the "
        "data system (copy in 32 MiB chunks, each chunk's private pages released at once, the parameter "
        "re-pointed at its published bytes), and the most its resident memory grew beyond what the load left:", "",
        "| rank | load from disk | publish (move) | re-point | most held beyond the load |", "|---|---|---|---|---|"]
    for rank in seeds:
        move = rank.get("seed_move") or {}
        added = move.get("resident_peak_bytes", 0) - move.get("resident_before_bytes", 0)
        lines.append(f"| {rank['rank']} | {rank['seconds']:.2f} s | {rank['publish_seconds']:.2f} s | "
                     f"{move.get('remap_seconds', 0):.3f} s | {added / 1e6:.0f} MB |")
    lines += ["", "| measure | value | target | met |", "|---|---|---|---|",
              f"| map, slowest rank | {map_s:.3f} s | ≤ {MAP_TARGET_S} s | {_met(met['map'])} |",
              f"| cold disk load / map | {disk_s / map_s:.0f}x | ≥ {MAP_RATIO_TARGET:.0f}x | "
              f"{_met(met['map_ratio'])} |",
              f"| `POST /scaleout` until it answered (the new replica ready, its first token checked) | "
              f"{app['scaleout_s']:.2f} s | ≤ {FIRST_TOKEN_TARGET_S} s | {_met(met['first_token'])} |",
              f"| host peak (AnonPages + Shmem) while the seed loads and publishes, beyond vLLM's own run's peak "
              f"({_gb(own['peak_bytes'])} vs {_gb(app['peak_bytes'])}) | {_gb(seed_extra)} = "
              f"{seed_extra / weights:.3f}x the weights | ≤ {SEED_EXTRA_TARGET}x the weights | {_met(met['seed'])} |",
              f"| the two replicas' shared memory, PSS (the weights, and vLLM's own shared-memory queues) | "
              f"{_gb(weights_pss)} = {weights_pss / weights:.3f}x one copy of the weights | "
              f"≤ {PSS_TARGET}x | {_met(met['pss'])} |",
              f"| OOM kills (/proc/vmstat oom_kill, over the benchmark), swap | {results['oom_kills']}, "
              f"{_gb(results['swap_bytes'])} of swap | none | {_met(met['oom'])} |",
              f"| greedy tokens of `{GREEDY['prompt']}` ({GREEDY['max_tokens']}): vLLM's own load, the seed (moved), "
              f"the new replica (mapped) | {own['tokens']}, {app['seed_tokens']}, {app['mapped_tokens']} | "
              f"all equal | {_met(met['tokens'])} |", "",
              "Where the time after `POST /scaleout` went (seconds since the App took the request): "
              + ", ".join(f"{mark} +{at:.2f}" for mark, at in timeline.items()) + ".", "",
              f"The whole App with two replicas: PSS {_gb(footprint['pss_bytes'])} (processes "
              f"{_gb(footprint['processes_pss_bytes'])}, the data system's shared memory "
              f"{_gb(footprint['shared_memory_bytes'])}, each page counted once); "
              + ", ".join(f"{part['name']} {_gb(part['pss_bytes'] + part['shmem_pss_bytes'])}"
                          for part in footprint["parts"]) + ".", "",
              f"Targets met: {'all' if all(met.values()) else 'not all (see the rows marked no)'}. The original "
              "case pulled device to device on Ascend (unverified here: no NPU); here a replica maps host shared "
              "memory, so the comparison is of the step, not of the hardware. Raw figures: "
              "`bench/out/seedcase.json`."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a local Qwen2.5-7B directory (default: the demo builder's)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "yrllm")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--no-publish", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or demo_model_dir(args.cache, DemoShape.QWEN2_5_7B, "bfloat16")
    from app.control.memory_plan import weight_bytes

    results: dict = {"conditions": conditions(argparse.Namespace(quick=False)), "model": str(model),
                     "weight_bytes": weight_bytes(model, "auto"), "files": len(weight_files(model))}
    oom_before, memory = vmstat("oom_kill"), HostMemory()
    try:
        results["vllm_own"] = vllm_own_run(model, args.out, memory)
        results["app"] = app_run(model, args.cache, args.out, memory)
    finally:
        memory.close()
    results["oom_kills"] = vmstat("oom_kill") - oom_before
    memory_now = meminfo()
    results["swap_bytes"] = memory_now["SwapTotal"] - memory_now["SwapFree"]
    (args.out / "seedcase.json").write_text(json.dumps(results, indent=1))
    write_section(args.out, "seedcase", "The original case's 7B", summarise(results), publish=not args.no_publish)


if __name__ == "__main__":
    main()
