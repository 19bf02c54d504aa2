"""The partition drill of ``make chaos``, where this host can make network namespaces (root, iproute2).

An App with three nodes, each a network namespace (``runtime.node_network=netns``) with one replica,
serves ``--clients`` streaming clients. node2's link is cut (``ip link set <its veth> down``, from the
driver's namespace) for ``CUT_S`` seconds, then restored; once the App says the node rejoined, a
scale-out by one (``POST /scaleout``) goes to node2, the node with the fewest replicas. Measured: the
requests failed before streaming and mid-stream; when the cut was seen, node2's replica failed and
the desired count was ready again; from the heal until the node rejoined (its weight copies checked)
and until a replica on node2 served again.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from pathlib import Path

from app.runtime.node_network import NodeNetwork
from bench.chaos import Outcome, stream_once
from bench.driver import http_call, start_driver, status, stop_driver

CUT_S = 30.0
NODE = "node2"
SUBNET = "10.213.60.0/24"


def first_event(url: str, kind: str, after: float, timeout_s: float = 120.0) -> tuple[dict | None, float]:
    """The first ``kind`` event since ``after``, and the seconds ``/status`` went unanswered meanwhile
    (its 10 s timeout each time: once, after a heal, the driver answered nothing for longer)."""
    deadline, unanswered = time.monotonic() + timeout_s, 0.0
    while time.monotonic() < deadline:
        asked = time.monotonic()
        try:
            events = status(url)["events"]
        except OSError:  # a timeout, or a refused connection
            unanswered += time.monotonic() - asked
            continue
        found = [e for e in events if e["kind"] == kind and e["at"] >= after]
        if found:
            return found[0], round(unanswered, 1)
        time.sleep(0.1)
    return None, round(unanswered, 1)


def partition_drill(clients: int, tokens: int, log: Path) -> dict:
    env = {"YRLLM_ENGINE__THREADS": "1", "YRLLM_ENGINE__DTYPE": "float32", "YRLLM_ENGINE__MAX_MODEL_LEN": "512",
           "YRLLM_RUNTIME__LOCAL_NODES": "3", "YRLLM_RUNTIME__NODE_NETWORK": "netns",
           "YRLLM_RUNTIME__NODE_SUBNET": SUBNET}
    driver, url = start_driver(3, log, env)
    try:
        model = status(url)["models"][0]
        # The App's node network as the App named it (after its pid), to cut a link from out here.
        network = NodeNetwork(3, SUBNET, owner_pid=driver.pid)
        outcomes: list[Outcome] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                outcome = Outcome(started=time.time())
                outcomes.append(outcome)
                stream_once(url, model, tokens, outcome)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(10)
        cut_at = time.time()
        network.set_link(NODE, False)
        try:
            time.sleep(CUT_S)
        finally:
            network.set_link(NODE, True)
        healed_at = time.time()
        rejoined, unanswered_s = first_event(url, "node_rejoined", healed_at)
        scaled_out = None
        if rejoined is not None:
            code, body = http_call(url, "/scaleout", {"replicas": 4}, timeout=300)
            scaled_out = {"code": code, "at": time.time(), "body": json.loads(body) if code == 200 else body[:300]}
        time.sleep(5)
        stop.set()
        for thread in threads:
            thread.join(150)
        events = status(url)["events"]
        replicas = status(url)["replicas"]
    finally:
        stop_driver(driver)
    return {**judge(cut_at, healed_at, rejoined, scaled_out, events, replicas, outcomes),
            "status_unanswered_after_heal_s": unanswered_s}


def judge(cut_at: float, healed_at: float, rejoined: dict | None, scaled_out: dict | None, events: list[dict],
          replicas: list[dict], outcomes: list[Outcome]) -> dict:
    def after(kind: str, at: float) -> dict | None:
        return next((e for e in events if e["kind"] == kind and e["at"] >= at), None)

    def since(event: dict | None, at: float) -> float | None:
        return None if event is None else round(event["at"] - at, 2)

    hit = [o for o in outcomes if (o.ended or o.started) >= cut_at]
    on_node = [r["replica_id"] for r in replicas if r["node"] == NODE and r["state"] == "ready"]
    return {"cut_s": CUT_S, "requests": len(hit),
            "failed_before_stream": sum(1 for o in hit if o.failure and not o.mid_stream),
            "failed_mid_stream": sum(1 for o in hit if o.failure and o.mid_stream),
            "failures": sorted({o.failure for o in hit if o.failure})[:10],
            "cut_seen_s": since(after("node_unreachable", cut_at), cut_at),
            "replica_failed_s": since(after("replica_failed", cut_at), cut_at),
            "replaced_s": since(after("replica_replaced", cut_at), cut_at),
            "rejoined_after_heal_s": since(rejoined, healed_at), "rejoin_reason": rejoined and rejoined["reason"],
            "serving_again_after_heal_s": None if not scaled_out or scaled_out["code"] != 200
            else round(scaled_out["at"] - healed_at, 2),
            "scale_out": scaled_out, "replicas_on_node_after": on_node,
            "outcomes": [asdict(o) for o in hit]}


def partition_table(result: dict) -> list[str]:
    return [f"**Partition** (three nodes in network namespaces, one replica each; {NODE}'s link cut for "
            f"{result['cut_s']:.0f} s under the same load, then restored; after the App saw it rejoin, "
            f"`POST /scaleout` by one, which places the new replica on {NODE}):", "",
            "| requests | failed before streaming | failed mid-stream | cut seen after s | its replica failed after s "
            "| replaced elsewhere after s | heal → rejoined s | heal → a replica on it serving s |",
            "|---|---|---|---|---|---|---|---|",
            f"| {result['requests']} | {result['failed_before_stream']} | {result['failed_mid_stream']} | "
            f"{result['cut_seen_s']} | {result['replica_failed_s']} | {result['replaced_s']} | "
            f"{result['rejoined_after_heal_s']} | {result['serving_again_after_heal_s']} |", "",
            f"On rejoin: {result['rejoin_reason']}. Ready replicas on {NODE} at the end: "
            f"{', '.join(result['replicas_on_node_after']) or 'none'}. The Router's `/status` went unanswered for "
            f"{result.get('status_unanswered_after_heal_s', 'n/a')} s between the heal and the rejoin.", ""]
