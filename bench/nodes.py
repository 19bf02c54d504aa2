"""Weights across nodes: the first fetch onto a new node against memcpy and a cold disk read, the second
replica's map on that node, and a fan-out from one node to three.

    python -m bench.nodes [--shape qwen2.5-1.5b] [--out bench/out] [--no-publish]

The nodes are simulated: data system workers in one cluster on this machine (``LocalCluster``, as
``runtime.local_nodes`` starts them), so the bytes cross loopback, not a network. In one run:

1. **The weight plane**, each load in a fresh vLLM process (``bench.load_once``): vLLM's safetensors
   loader on a cold page cache; then on a two-node cluster our seed on node1, the first replica on
   node2 (fetch, then map) and the second replica on node2 (map). Twice, side by side: workers as the
   App starts them, and pre-faulted (``runtime.ds_populate``). Beside them, memcpy into touched and
   into fresh pages.
2. **Fan-out, end to end**: an App with three nodes and one replica scales to three; r2 and r3 fetch
   onto node2 and node3 at the same time. Its replicas must answer with the seed's greedy tokens.

Writes ``<out>/nodes.json`` and ``<out>/nodes.md``, and the BENCHMARKS.md section unless --no-publish.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from app.control.demo_model import DemoShape, demo_model_dir
from app.replica import Node
from app.runtime.local_cluster import LocalCluster
from app.weights.load_report import LoadReport, PlanKind
from app.weights.plan import LOAD_FORMAT, WeightPlan
from bench.driver import http_call
from bench.nodes_report import report
from bench.run import DTYPE, evict, load_once, log, memcpy_gbps, warm, weight_files


def fresh_memcpy_gbps(nbytes: int = 1 << 30) -> float:
    """Copy into pages never touched before: what a worker receiving a fetch pays without pre-faulting."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        dst = torch.empty(nbytes, dtype=torch.uint8)
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
        del dst
    return nbytes / best / 1e9


def load(model: Path, kind: PlanKind, fingerprint: str, node: Node, scratch: Path,
         fetch_from: str | None = None) -> dict:
    """One of our loads in a fresh vLLM process; its LoadReport's figures."""
    replica_id = f"bench-{kind.value}-{node.name}-{time.monotonic_ns()}"
    plan = WeightPlan(kind=kind, replica_id=replica_id, fingerprint=fingerprint, node=node.name,
                      ds_address=node.ds_address, fetch_from=fetch_from, report_path=scratch / f"{replica_id}.json")
    result = load_once(model, LOAD_FORMAT, plan.model_dump(mode="json"))
    if plan.report_path.exists():
        loaded = LoadReport.model_validate_json(plan.report_path.read_text())
        result.update(weights_s=loaded.seconds, publish_s=loaded.publish_seconds, source=loaded.source.value,
                      node=loaded.node, fetched_from=loaded.fetched_from, fallback=loaded.fallback_reason,
                      gbps=round(loaded.gbps, 3))
    return result


def weight_plane(model: Path, nbytes: int, populate: bool, scratch: Path) -> dict:
    fingerprint = hashlib.sha256(f"bench-nodes-{populate}-{time.time()}".encode()).hexdigest()[:32]
    cluster = LocalCluster(2, max(1024, (nbytes * 3 // 2) >> 20), populate=populate)
    arm = "pre-faulted" if populate else "default"
    log(f"{arm} workers: starting a two-node cluster")
    started = time.perf_counter()
    node1, node2 = cluster.start(timeout_s=120)
    rows: dict = {"workers_start_s": round(time.perf_counter() - started, 2),
                  "worker_start_s": cluster.start_seconds}
    try:
        warm(model)
        log(f"{arm} workers: seed on node1 (disk, then publish)")
        rows["seed"] = load(model, PlanKind.SEED, fingerprint, node1, scratch)
        log(f"{arm} workers: first replica on node2 (fetch from node1, then map)")
        rows["fetch"] = load(model, PlanKind.MAP, fingerprint, node2, scratch, fetch_from="node1")
        log(f"{arm} workers: second replica on node2 (map)")
        rows["map"] = load(model, PlanKind.MAP, fingerprint, node2, scratch)
        log(f"{arm} workers: a replica on node1, the seed's node (map), for comparison")
        rows["map_home"] = load(model, PlanKind.MAP, fingerprint, node1, scratch)
    finally:
        cluster.stop()
    return rows


def greedy(url: str, model: str) -> list[int]:
    code, body = http_call(url, "/v1/completions", {"model": model, "prompt": "def fibonacci(n):", "max_tokens": 16,
                                                   "temperature": 0, "return_token_ids": True})
    if code != 200:
        raise RuntimeError(f"{url} answered {code}: {body[:200]!r}")
    return json.loads(body)["choices"][0]["token_ids"]


def fan_out(model: Path, nbytes: int, cache: Path) -> dict:
    from app import App, AppConfig

    config = AppConfig.load(env={}, overrides={
        "model": str(model), "router.port": 0, "engine.dtype": DTYPE, "engine.max_model_len": 512,
        "engine.threads": 1, "runtime.local_nodes": 3,
        "runtime.ds_shared_memory_mb": max(1024, nbytes * 3 // 2 >> 20), "demo_cache_dir": str(cache)})
    with App(config) as app:
        # Both new replicas fork from the zygote at once: their fetches overlap.
        log("fan-out: scale from 1 replica (node1) to 3 (node2 and node3 fetch at once)")
        scaled = app.scale(3)
        status = app.status()
        tokens = {r["replica_id"]: greedy(r["url"], app.served_model_name) for r in status["replicas"]}
        seed_tokens = tokens[app.start_report.replicas[0].replica_id]
        data = scaled.to_dict()
        requested = min(r.timeline["requested"] for r in scaled.replicas)
        for replica, source in zip(data["replicas"], scaled.replicas):
            if source.weights is not None:  # when its fetch began and ended, in seconds since scale()
                replica["fetch_began_s"] = round(source.weights.finished_at - source.weights.seconds - requested, 2)
                replica["fetch_ended_s"] = round(source.weights.finished_at - requested, 2)
        began = [r["fetch_began_s"] for r in data["replicas"] if "fetch_began_s" in r]
        ended = [r["fetch_ended_s"] for r in data["replicas"] if "fetch_ended_s" in r]
        return {"scale_s": scaled.seconds, "ok": scaled.ok, "replicas": data["replicas"],
                "copies_s": round(max(ended) - min(began), 3) if began else None,
                "fetches": status["weight_cache"]["fetches"],
                "identical_tokens": all(t == seed_tokens for t in tokens.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=DemoShape.QWEN2_5_1_5B.value, choices=[s.value for s in DemoShape])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--no-publish", action="store_true", help="do not rewrite BENCHMARKS.md's section")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = Path.home() / ".cache" / "yrllm"
    model = demo_model_dir(cache, DemoShape(args.shape), DTYPE)
    nbytes = sum(path.stat().st_size for path in weight_files(model))
    result: dict = {"model": f"{args.shape} shape (demo, random weights), {DTYPE}", "weight_bytes": nbytes,
                    "cpus": os.cpu_count(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                    "memcpy_gbps": round(memcpy_gbps(), 2), "fresh_memcpy_gbps": round(fresh_memcpy_gbps(), 2)}
    with tempfile.TemporaryDirectory(prefix="yrllm-bench-nodes-") as scratch:
        evict(model)
        log("vLLM safetensors, cold page cache")
        result["cold_disk"] = load_once(model, "safetensors")
        if result["cold_disk"].get("weights_s"):
            result["cold_disk"]["gbps"] = round(nbytes / result["cold_disk"]["weights_s"] / 1e9, 3)
        result["arms"] = {"default": weight_plane(model, nbytes, False, Path(scratch)),
                          "populate": weight_plane(model, nbytes, True, Path(scratch))}
    result["fan_out"] = fan_out(model, nbytes, cache)
    (args.out / "nodes.json").write_text(json.dumps(result, indent=2))
    report(result, args.out, publish=not args.no_publish)


if __name__ == "__main__":
    main()
