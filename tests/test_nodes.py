"""Weights across nodes, for real: an App with two simulated nodes (two data system workers in one
cluster) beside the session's App.

The first replica on node2 reads the weights across from node1 once, with the weight files moved
away, and answers exactly as the seed; the next replica on node2 maps node2's copy; the source node's
death means a disk load within the plan's timeout, with the reason, and the App heals the node.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import LONG_PROMPT, complete, greedy, side_app
from test_healing import events, wait_for

from app.engine.host import EngineHost
from app.engine.spec import EngineSpec
from app.replica import Node
from app.weights.load_report import PlanKind, WeightSource
from app.weights.plan import WeightPlan

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def nodes_app(model_dir):
    yield from side_app(model_dir, "two-node", **{"runtime.local_nodes": 2})


@pytest.fixture(scope="module")
def seed_tokens(nodes_app):
    (seed,) = nodes_app.status()["replicas"]
    assert seed["node"] == "node1"
    return greedy(seed["url"], nodes_app.served_model_name)


def nodes(app) -> dict[str, Node]:
    return {n["name"]: Node(name=n["name"], ds_address=n["ds_address"]) for n in app.status()["nodes"]}


def datasystem_memory(pid: int) -> set[int]:
    """The inodes of the data system shared memory (memfd) segments mapped into ``pid``: each worker
    has its own, so they say whose memory a process reads."""
    inodes = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "memfd:datasystem" in line:
            inodes.add(int(line.split()[4]))
    return inodes


def test_the_first_replica_on_node2_fetches_the_weights_once_and_answers_like_the_seed(nodes_app, model_dir,
                                                                                       seed_tokens):
    hidden = [path.rename(path.with_suffix(".hidden")) for path in model_dir.glob("*.safetensors")]
    try:  # with the weight files gone, a replica that touched the disk could not start
        report = nodes_app.scale(4)  # three at once: one fetches onto node2, the other there awaits that copy
    finally:
        for path in hidden:
            path.rename(path.with_suffix(".safetensors"))
    assert report.ok, str(report)
    added = {r.replica_id: r for r in report.replicas if r.action == "added"}
    assert {rid: r.node for rid, r in added.items()} == {"r2": "node2", "r3": "node1", "r4": "node2"}
    # r2 and r4 start at once on node2: whichever asks the WeightCache first fetches, the other awaits that copy.
    fetched, local = sorted((added["r2"].weights, added["r4"].weights), key=lambda w: w.fetched_from is None)
    home = added["r3"].weights
    assert (fetched.plan, fetched.source, fetched.node, fetched.fetched_from) == (
        PlanKind.MAP, WeightSource.HOST, "node2", "node1")
    assert (home.node, home.fetched_from, local.node, local.fetched_from) == ("node1", None, "node2", None)
    assert all(w.source is WeightSource.HOST and w.fallback_reason is None for w in (fetched, home, local))
    assert "from host on node2 (fetched from node1)" in str(report)
    stats = nodes_app.status()["weight_cache"]
    assert stats["fetches"] == 1 and stats["bytes_fetched"] == fetched.bytes and stats["misses"] == 1
    assert stats["entries"][0]["nodes"] == {"node1": "ready", "node2": "ready"}
    for replica in nodes_app.status()["replicas"]:
        assert greedy(replica["url"], nodes_app.served_model_name) == seed_tokens, replica["replica_id"]


def test_replicas_use_only_their_own_nodes_worker_for_weights_and_kv_blocks(nodes_app):
    status = nodes_app.status()
    for replica in status["replicas"]:  # a prompt of full blocks: each engine stores them through its worker
        complete(replica["url"], nodes_app.served_model_name, f"# {replica['replica_id']}\n{LONG_PROMPT}",
                 max_tokens=1)
    wait_for(lambda: nodes_app.status()["kv"]["blocks_stored"] >= 3 * len(status["replicas"]), "the blocks stored")
    memory = {n["name"]: datasystem_memory(n["pid"]) for n in status["nodes"]}
    assert memory["node1"] and memory["node2"] and not memory["node1"] & memory["node2"]
    for replica in status["replicas"]:
        mapped = datasystem_memory(replica["core_pid"])  # the model runs in the EngineCore
        other = "node2" if replica["node"] == "node1" else "node1"
        assert mapped and mapped <= memory[replica["node"]], replica["replica_id"]
        assert not mapped & memory[other], f"{replica['replica_id']} reads {other}'s memory"


def test_the_source_nodes_death_means_disk_within_the_timeout_with_the_reason(nodes_app, model_dir, seed_tokens,
                                                                              tmp_path):
    nodes_app.scale(1)
    node = nodes(nodes_app)
    fingerprint = "5" * 32  # an entry of its own, published on node1 and never read on node2
    seed = start_engine(nodes_app, model_dir, tmp_path, "t-seed", PlanKind.SEED, fingerprint, node["node1"])
    seed.stop()  # its objects stay in node1's worker
    node1_worker = next(n["pid"] for n in nodes_app.status()["nodes"] if n["name"] == "node1")
    os.kill(node1_worker, signal.SIGKILL)
    fetcher = start_engine(nodes_app, model_dir, tmp_path, "t-fetch", PlanKind.MAP, fingerprint, node["node2"],
                           fetch_from="node1")
    try:
        report = fetcher.load_report()
        assert (report.source, report.node, report.fetched_from) == (WeightSource.DISK, "node2", None)
        assert report.fallback_reason.startswith("fetching from node1 onto node2 from the host tier failed")
        # The plan's 2 s timeout bounds the read; the data system alone would wait 60 s for node1.
        assert report.seconds < 30
        assert greedy(fetcher.spec.url, nodes_app.served_model_name) == seed_tokens
    finally:
        fetcher.stop()
    # The App restarts node1's worker and forgets the entry that lived there; r1 keeps serving.
    restarted = wait_for(lambda: events(nodes_app, "ds_worker_restarted"), "node1's restart")
    assert "node1's worker" in restarted[0]["reason"]
    assert nodes_app.status()["weight_cache"]["entries"] == []
    (replica,) = nodes_app.status()["replicas"]
    assert greedy(replica["url"], nodes_app.served_model_name) == seed_tokens


def start_engine(app, model_dir, tmp_path, replica_id, kind, fingerprint, node, fetch_from=None) -> EngineHost:
    spec = EngineSpec.from_config(app.config, replica_id=replica_id, model=model_dir,
                                  served_model_name=app.served_model_name, log_dir=tmp_path).on_node(node)
    plan = WeightPlan(kind=kind, replica_id=replica_id, fingerprint=fingerprint, node=node.name,
                      ds_address=node.ds_address, fetch_from=fetch_from, timeout_ms=2000,
                      report_path=spec.load_report_path)
    host = EngineHost(spec)
    host.start(plan)
    return host
