"""Weights across nodes with networks of their own: one relay against the link rate, and fan-out from one
node to 2, 3 and 4, a star against the chain, over links shaped to 1 Gbit/s and unshaped.

    python -m bench.nodes [--shape qwen2.5-0.5b] [--gbps 1] [--fanouts 2,3,4] [--out bench/out] [--no-publish]

Each node is a network namespace with its own address and link (``runtime.node_network=netns``), so the
bytes of a relay cross a veth pair and a bridge, shaped with ``tc`` where a rate is given. Per link
(shaped, then unshaped), per plan (``weights.fanout`` star, then chain) and per N: an App with N nodes
and one replica (the seed, on node1) scales to N, one new replica per new node, all at once. Meanwhile
the benchmark samples, every 0.2 s, how many bytes of each node's copy are sealed in the data system.
Recorded: when the first relay began (its engine's load), when every copy was in place and when every
new replica served (``scale()`` returned: its
first token included), since ``scale()`` was called; each relay's GB/s; and that every replica answers
with the seed's greedy tokens. Needs root and iproute2. Nothing else may run meanwhile.

Writes ``<out>/nodes.json``, ``<out>/nodes.md`` and ``<out>/nodes_fanout.png``, and the BENCHMARKS.md
section unless --no-publish.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from app.control.demo_model import DemoShape, demo_model_dir
from app.runtime.node_network import check_available
from app.weights.host_tier import HostTier, TierError
from app.weights.identity import RankLayout, WeightKeys
from app.weights.manifest import Manifest
from bench.driver import http_call
from bench.nodes_report import report
from bench.run import DTYPE, conditions, log


def greedy(url: str, model: str) -> list[int]:
    code, body = http_call(url, "/v1/completions", {"model": model, "prompt": "def fibonacci(n):", "max_tokens": 16,
                                                   "temperature": 0, "return_token_ids": True})
    if code != 200:
        raise RuntimeError(f"{url} answered {code}: {body[:200]!r}")
    return json.loads(body)["choices"][0]["token_ids"]


class CopySampler:
    """Every ``interval_s``, the bytes of each node's copy sealed in the data system (its relayed keys)."""

    def __init__(self, ds_address: str, fingerprint: str, nodes: list[str], interval_s: float = 0.2) -> None:
        self._tier = HostTier(ds_address)
        keys = WeightKeys(fingerprint, RankLayout())
        manifest = Manifest.model_validate_json(bytes(self._tier.get([keys.manifest])[0]))
        self._sizes = [entry.nbytes for entry in manifest.tensors]
        self._keys = {node: keys.on(node).tensors(len(self._sizes)) for node in nodes}
        self._interval_s = interval_s
        self.samples: list[dict] = []  # {"t": seconds since start, node: bytes in place}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def total(self) -> int:
        return sum(self._sizes)

    def start(self, started: float) -> None:
        self._started = started
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        present = {node: [False] * len(names) for node, names in self._keys.items()}
        while True:  # asks only about keys not seen yet: the sampler must not load the workers it watches
            sample: dict = {"t": round(time.perf_counter() - self._started, 3)}
            for node, names in self._keys.items():
                missing = [i for i, seen in enumerate(present[node]) if not seen]
                try:
                    for i, there in zip(missing, self._tier.exists([names[i] for i in missing]) if missing else []):
                        present[node][i] = there
                except TierError:
                    pass
                sample[node] = sum(size for size, seen in zip(self._sizes, present[node]) if seen)
            self.samples.append(sample)
            if self._stop.wait(self._interval_s):
                return

    def in_place_at(self, node: str) -> float | None:
        """The first sample at which ``node``'s whole copy was sealed."""
        return next((s["t"] for s in self.samples if s.get(node) == self.total), None)


def fan_out(model: Path, cache: Path, nodes: int, fanout: str, gbps: float | None) -> dict:
    from app import App, AppConfig

    config = AppConfig.load(env={}, overrides={
        "model": str(model), "router.port": 0, "engine.dtype": DTYPE, "engine.max_model_len": 512,
        "engine.threads": 1, "runtime.local_nodes": nodes, "runtime.node_network": "netns",
        "runtime.link_gbps": gbps, "weights.fanout": fanout, "demo_cache_dir": str(cache)})
    link = f"{gbps:g} Gbit/s" if gbps else "unshaped"
    with App(config) as app:
        fingerprint = app.status()["weight_cache"]["entries"][0]["fingerprint"]
        new_nodes = [f"node{index}" for index in range(2, nodes + 1)]
        sampler = CopySampler(app.status()["ds_address"], fingerprint, new_nodes)
        log(f"{link}, {fanout}: scale from 1 replica (node1) to {nodes}, one new replica per new node")
        started, started_wall = time.perf_counter(), time.time()
        sampler.start(started)
        scaled = app.scale(nodes)
        serve_s = time.perf_counter() - started
        sampler.stop()
        status = app.status()
        tokens = {r["replica_id"]: greedy(r["url"], app.served_model_name) for r in status["replicas"]}
        seed_tokens = tokens[app.start_report.replicas[0].replica_id]
    relays = [{"replica_id": r.replica_id, "node": r.node, "source": r.weights.source.value,
               "fetched_from": r.weights.fetched_from, "failovers": r.weights.fetch_failovers,
               "relay_s": r.weights.fetch_seconds, "read_s": r.weights.fetch_read_seconds, "fallback": r.weights.fallback_reason,
               "in_place_s": sampler.in_place_at(r.node),
               "began_s": round(r.weights.finished_at - r.weights.seconds - started_wall, 3)}
              for r in scaled.replicas if r.action == "added" and r.weights is not None]
    for relay in relays:
        relay["gbps"] = round(sampler.total / relay["relay_s"] / 1e9, 4) if relay["relay_s"] else None
    in_place = [relay["in_place_s"] for relay in relays]
    return {"nodes": nodes, "fanout": fanout, "link_gbps": gbps, "ok": scaled.ok, "bytes": sampler.total,
            "copies_in_place_s": max(in_place) if in_place and None not in in_place else None,
            "relays_began_s": min((relay["began_s"] for relay in relays), default=None),
            "serving_s": round(serve_s, 3), "relays": relays, "samples": sampler.samples,
            "identical_tokens": all(t == seed_tokens for t in tokens.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default=DemoShape.QWEN2_5_0_5B.value, choices=[s.value for s in DemoShape])
    parser.add_argument("--gbps", type=float, default=1.0, help="the shaped links' rate")
    parser.add_argument("--fanouts", default="2,3,4", help="node counts to fan out to, from one")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--no-publish", action="store_true", help="do not rewrite BENCHMARKS.md's section")
    args = parser.parse_args()
    check_available()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = Path.home() / ".cache" / "yrllm"
    model = demo_model_dir(cache, DemoShape(args.shape), DTYPE)
    counts = [int(n) for n in args.fanouts.split(",")]
    result: dict = {"conditions": conditions(argparse.Namespace(quick=False)), "shape": args.shape,
                    "link_gbps": args.gbps, "runs": []}
    for gbps in (args.gbps, None):
        for fanout in ("star", "chain"):
            for nodes in counts:
                if fanout == "star" and nodes == 2:
                    continue  # one new node: the star and the chain are the same plan
                result["runs"].append(fan_out(model, cache, nodes, fanout, gbps))
                (args.out / "nodes.json").write_text(json.dumps(result, indent=2))  # what is done so far
    report(result, args.out, publish=not args.no_publish)


if __name__ == "__main__":
    main()
