"""The relay of a node's copy (``app.weights.relay``) on three real data system workers in one cluster,
without engines: pipelined along a chain, a source that stops mid-way or dies is left for the one before
it, and a relay with no source left fails cleanly."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app.runtime.local_cluster import LocalCluster
from app.weights import relay as relay_module
from app.weights.host_tier import HostTier, TierError
from app.weights.identity import RankLayout, WeightKeys
from app.weights.load_report import PlanKind
from app.weights.manifest import Manifest
from app.weights.plan import WeightPlan

loader = pytest.importorskip("app.weights.loader")  # needs vLLM, like the engine that runs the relay
seeding = pytest.importorskip("app.weights.seeding")

TENSORS = 12  # of 1 MiB each in batches of 2, but the fourth of 5 MiB, relayed in three parts


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalCluster(3, 256)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(relay_module, "BATCH_BYTES", 2 << 20)


def tier(cluster, node: str) -> HostTier:
    address = next(n.ds_address for n in cluster.nodes if n.name == node)
    return HostTier(address, timeout_ms=2000)


def seeded(cluster, fingerprint: str) -> tuple[WeightKeys, list[tuple[str, torch.Tensor]], Manifest]:
    """An entry published on node1, the seed's node, under the entry's own keys."""
    keys = WeightKeys(fingerprint, RankLayout())
    params = [(f"w{i}", torch.randn(1280 if i == 3 else 256, 1024)) for i in range(TENSORS)]
    home = tier(cluster, "node1")
    seeding.publish_copy(home, keys, RankLayout(), params, SimpleNamespace(dtype=torch.float32))
    return keys, params, Manifest.model_validate_json(bytes(home.get([keys.manifest])[0]))


def relay(cluster, node: str, keys: WeightKeys, plan: WeightPlan, manifest: Manifest) -> relay_module.Relayed:
    """A relay onto ``node`` through its worker, as a replica's loader runs it."""
    return relay_module.relay(tier(cluster, node), tier(cluster, node), keys, plan, manifest)


def plan_for(node: str, sources: list[str], address: str, timeout_ms: int = 1000) -> WeightPlan:
    return WeightPlan(kind=PlanKind.MAP, replica_id=f"r-{node}", fingerprint="0" * 32, node=node, ds_address=address,
                      fetch_from=sources[0], fetch_fallbacks=sources[1:], home="node1", timeout_ms=timeout_ms,
                      report_path=Path("/nonexistent"))


def assert_copy_on(cluster, node: str, keys: WeightKeys, params) -> None:
    """``node``'s copy, read through ``node``'s own worker, holds exactly the seed's bytes."""
    views = tier(cluster, node).get(keys.on(node).tensors(len(params)))
    for (_, expected), view in zip(params, views):
        assert bytes(view) == expected.numpy().tobytes()


def test_a_chain_relays_in_step_and_the_second_new_node_reads_from_the_first(cluster):
    keys, params, manifest = seeded(cluster, "b1" * 16)
    address = {n.name: n.ds_address for n in cluster.nodes}
    results: dict[str, relay_module.Relayed] = {}

    def run(node: str, sources: list[str]) -> None:
        results[node] = relay(cluster, node, keys, plan_for(node, sources, address[node]), manifest)

    # node3 starts first: it can only go as fast as node2 seals its batches.
    threads = [threading.Thread(target=run, args=("node3", ["node2", "node1"]))]
    threads.append(threading.Thread(target=run, args=("node2", ["node1"])))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (results["node2"].source, results["node2"].failovers) == ("node1", [])
    assert (results["node3"].source, results["node3"].failovers) == ("node2", [])
    for node in ("node2", "node3"):
        assert_copy_on(cluster, node, keys, params)
        assert tier(cluster, node).exists([keys.on(node).manifest]) == [True]  # complete: its manifest is last
        assert not any(tier(cluster, node).exists([keys.on(node).chunk(3, part) for part in range(3)]))


def test_a_source_that_stops_mid_relay_is_left_for_the_one_before_it(cluster):
    keys, params, manifest = seeded(cluster, "b2" * 16)
    # node2 relayed its first two batches and the large tensor, then stopped (its engine died, its worker
    # lives on).
    seeding.publish_copy(tier(cluster, "node2"), keys.on("node2"), RankLayout(), params[:5],
                         SimpleNamespace(dtype=torch.float32))
    node3 = next(n.ds_address for n in cluster.nodes if n.name == "node3")
    relayed = relay(cluster, "node3", keys, plan_for("node3", ["node2", "node1"], node3), manifest)
    assert relayed.source == "node1"
    (failover,) = relayed.failovers
    assert failover.startswith("node2: ") and "not there within 1 s" in failover
    assert_copy_on(cluster, "node3", keys, params)


def test_a_relay_whose_sources_all_fail_says_why_and_leaves_no_partial_copy(cluster):
    keys, params, manifest = seeded(cluster, "b3" * 16)
    node3 = next(n.ds_address for n in cluster.nodes if n.name == "node3")
    plan = plan_for("node3", ["node2"], node3)  # node2 never got a copy, and node1 is not in the plan
    with pytest.raises(TierError, match=r"every source failed: node2: .*not there within 1 s"):
        relay(cluster, "node3", keys, plan, manifest)
    assert not any(tier(cluster, "node3").exists(keys.on("node3").copy_keys(TENSORS)))


@pytest.mark.parametrize("error", [TierError("creating ..: code: [Out of memory] (on purpose)"),
                                   ValueError("a bug of ours (on purpose)")], ids=["tier", "bug"])
def test_a_store_that_fails_mid_relay_stops_it_and_leaves_no_partial_copy(cluster, error):
    """The node's own worker refuses a write (full, or gone) while the next piece is being read; or the
    writer thread meets a bug of ours: the relay fails with a TierError (the loader then reads the
    disk), never hangs."""
    keys, params, manifest = seeded(cluster, ("b5" if isinstance(error, TierError) else "b6") * 16)
    node3 = next(n.ds_address for n in cluster.nodes if n.name == "node3")
    store, creates = tier(cluster, "node3"), []

    class FillsUp(HostTier):  # our own client, its fourth create refused as a full worker refuses it
        def create(self, keys, sizes):
            creates.append(keys)
            if len(creates) == 4:
                raise error
            return super().create(keys, sizes)

    full = FillsUp(node3, timeout_ms=2000)
    with pytest.raises(TierError, match="on purpose"):
        relay_module.relay(store, full, keys, plan_for("node3", ["node1"], node3), manifest)
    assert len(creates) == 4  # it stopped there
    leftovers = keys.on("node3").copy_keys(TENSORS) + [keys.on("node3").chunk(3, part) for part in range(3)]
    assert not any(store.exists(leftovers))


def test_a_source_whose_worker_is_killed_mid_chain_is_left_for_the_seeds_node(cluster):
    """Last in the module: node2's worker stays dead."""
    keys, params, manifest = seeded(cluster, "b4" * 16)
    address = {n.name: n.ds_address for n in cluster.nodes}
    relay(cluster, "node2", keys, plan_for("node2", ["node1"], address["node2"]), manifest)
    os.kill(cluster.pids()["node2"], signal.SIGKILL)
    relayed = relay(cluster, "node3", keys, plan_for("node3", ["node2", "node1"], address["node3"]), manifest)
    assert relayed.source == "node1" and relayed.failovers[0].startswith("node2: ")
    assert_copy_on(cluster, "node3", keys, params)
