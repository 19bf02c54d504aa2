"""Weights across nodes, for real: an App with three simulated nodes (three data system workers in one
cluster) beside the session's App. Where this process may make network namespaces (root, iproute2)
each node is one, with its own address and link (runtime.node_network=netns); elsewhere the nodes share
loopback and the tests of links and namespaces are skipped.

The new nodes relay the weights along a chain, with the weight files moved away, and every replica
answers exactly as the seed; a later replica on a node maps that node's copy; a cut node's replicas are
replaced elsewhere and the node serves again once healed; the source node's death means a disk load
within the plan's timeout, with the reason, and the App heals the node.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import LONG_PROMPT, complete, greedy, side_app
from test_healing import events, wait_for

from app.engine.host import EngineHost
from app.engine.spec import EngineSpec
from app.replica import Node
from app.runtime.node_network import NodeNetwork, NodeNetworkError, check_available
from app.weights.load_report import PlanKind, WeightSource
from app.weights.plan import WeightPlan

pytestmark = pytest.mark.engine


def _netns_refusal() -> str | None:
    try:
        check_available()
    except NodeNetworkError as exc:
        return str(exc)
    return None


NETNS_REFUSAL = _netns_refusal()
needs_netns = pytest.mark.skipif(NETNS_REFUSAL is not None, reason=f"nodes on loopback: {NETNS_REFUSAL}")


@pytest.fixture(scope="module")
def nodes_app(model_dir):
    network = {} if NETNS_REFUSAL else {"runtime.node_network": "netns", "runtime.node_subnet": "10.213.40.0/24"}
    yield from side_app(model_dir, "three-node", **{"runtime.local_nodes": 3, **network})
    assert not own_namespaces(), "the App left network namespaces behind"


@pytest.fixture(scope="module")
def seed_tokens(nodes_app):
    (seed,) = nodes_app.status()["replicas"]
    assert seed["node"] == "node1"
    return greedy(seed["url"], nodes_app.served_model_name)


def own_namespaces() -> list[str]:
    prefix = f"{NodeNetwork.PREFIX}{os.getpid()}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout if not NETNS_REFUSAL else ""
    return [line.split()[0] for line in listed.splitlines() if line.startswith(prefix)]


def nodes(app) -> dict[str, Node]:
    return {n["name"]: Node.model_validate({k: v for k, v in n.items() if k in Node.model_fields})
            for n in app.status()["nodes"]}


def datasystem_memory(pid: int) -> set[int]:
    """The inodes of the data system shared memory (memfd) segments mapped into ``pid``: each worker
    has its own, so they say whose memory a process reads."""
    inodes = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "memfd:datasystem" in line:
            inodes.add(int(line.split()[4]))
    return inodes


def test_new_nodes_relay_the_weights_along_a_chain_and_answer_like_the_seed(nodes_app, model_dir, seed_tokens):
    hidden = [path.rename(path.with_suffix(".hidden")) for path in model_dir.glob("*.safetensors")]
    try:  # with the weight files gone, a replica that touched the disk could not start
        report = nodes_app.scale(5)  # four at once: node2 and node3 relay, node2's second awaits its copy
    finally:
        for path in hidden:
            path.rename(path.with_suffix(".safetensors"))
    assert report.ok, str(report)
    added = {r.replica_id: r for r in report.replicas if r.action == "added"}
    assert {rid: r.node for rid, r in added.items()} == {"r2": "node2", "r3": "node3", "r4": "node1", "r5": "node2"}
    assert all(r.weights.source is WeightSource.HOST and r.weights.fallback_reason is None for r in added.values())
    # Whichever of node2 and node3 asked first relays from node1; the other relays from it, not from node1.
    relays = sorted((r.weights for r in added.values() if r.weights.fetched_from), key=lambda w: w.fetched_from != "node1")
    assert [w.fetched_from for w in relays] == ["node1", relays[0].node] and {w.node for w in relays} == {"node2", "node3"}
    assert all(w.fetch_failovers == [] and w.fetch_seconds for w in relays)
    # r2 and r5 start at once on node2: whichever asks first relays, the other maps that copy after it.
    local = added["r5"].weights if added["r5"].weights.fetched_from is None else added["r2"].weights
    assert (local.node, local.fetched_from, added["r4"].weights.fetched_from) == ("node2", None, None)
    stats = nodes_app.status()["weight_cache"]
    assert stats["fetches"] == 2 and stats["misses"] == 1
    assert stats["entries"][0]["nodes"] == {"node1": "ready", "node2": "ready", "node3": "ready"}
    for replica in nodes_app.status()["replicas"]:
        assert greedy(replica["url"], nodes_app.served_model_name) == seed_tokens, replica["replica_id"]


@needs_netns
def test_each_nodes_worker_and_engines_run_in_its_namespace_at_its_address(nodes_app):
    status = nodes_app.status()
    namespace = {n["name"]: os.stat(f"/var/run/netns/{n['netns']}").st_ino for n in status["nodes"]}
    assert len(set(namespace.values())) == 3 and os.stat("/proc/self/ns/net").st_ino not in namespace.values()
    for node in status["nodes"]:
        assert node["ds_address"].startswith(node["address"] + ":") and node["reachable"]
        assert os.stat(f"/proc/{node['pid']}/ns/net").st_ino == namespace[node["name"]], node["name"]
    by_node = {n["name"]: n for n in status["nodes"]}
    for replica in status["replicas"]:
        assert replica["url"].startswith(f"http://{by_node[replica['node']]['address']}:")  # the Router goes there
        for pid in (replica["pid"], replica["core_pid"]):
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == namespace[replica["node"]], replica["replica_id"]


def test_replicas_use_only_their_own_nodes_worker_for_weights_and_kv_blocks(nodes_app):
    status = nodes_app.status()
    for replica in status["replicas"]:  # a prompt of full blocks: each engine stores them through its worker
        complete(replica["url"], nodes_app.served_model_name, f"# {replica['replica_id']}\n{LONG_PROMPT}",
                 max_tokens=1)
    wait_for(lambda: nodes_app.status()["kv"]["blocks_stored"] >= 3 * len(status["replicas"]), "the blocks stored")
    memory = {n["name"]: datasystem_memory(n["pid"]) for n in status["nodes"]}
    assert all(memory.values()) and not memory["node1"] & memory["node2"] and not memory["node2"] & memory["node3"]
    for replica in status["replicas"]:
        mapped = datasystem_memory(replica["core_pid"])  # the model runs in the EngineCore
        assert mapped and mapped <= memory[replica["node"]], replica["replica_id"]
        for other in set(memory) - {replica["node"]}:
            assert not mapped & memory[other], f"{replica['replica_id']} reads {other}'s memory"


@needs_netns
def test_a_cut_node_is_left_out_and_serves_again_once_healed(nodes_app, seed_tokens):
    nodes_app.scale(3)  # one replica per node
    assert sorted(r["node"] for r in nodes_app.status()["replicas"]) == ["node1", "node2", "node3"]
    nodes_app.set_link("node2", False)
    try:
        cut = wait_for(lambda: events(nodes_app, "node_unreachable"), "node2 seen as cut off")
        assert cut[0]["subject"] == "node2"
        wait_for(lambda: events(nodes_app, "replica_replaced"), "node2's replica replaced elsewhere", timeout_s=90)
        status = nodes_app.status()
        assert [n["reachable"] for n in status["nodes"]] == [True, False, True]
        assert sorted(r["node"] for r in status["replicas"] if r["state"] == "ready") in (
            ["node1", "node1", "node3"], ["node1", "node3", "node3"])
    finally:
        nodes_app.set_link("node2", True)
    rejoined = wait_for(lambda: events(nodes_app, "node_rejoined"), "node2 back", timeout_s=60)
    assert rejoined[0]["subject"] == "node2" and "weight copies" in rejoined[0]["reason"]
    report = nodes_app.scale(4)  # the node with the fewest replicas: node2 again
    assert report.ok, str(report)
    (back,) = [r for r in report.replicas if r.action == "added"]
    assert back.node == "node2" and back.weights.source is WeightSource.HOST
    assert greedy(nodes_app.status()["url"], nodes_app.served_model_name) == seed_tokens
    for replica in nodes_app.status()["replicas"]:
        assert greedy(replica["url"], nodes_app.served_model_name) == seed_tokens, replica["replica_id"]


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
