"""WeightCache: single-flight plans (per identity, and per node), seed failure hand-off, adoption, stats
and freeing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.replica import Node
from app.weights.cache import WeightCache
from app.weights.host_tier import HostTier
from app.weights.identity import RankLayout, WeightIdentity, WeightKeys
from app.weights.load_report import LoadReport, PlanKind, WeightSource

IDENTITY = WeightIdentity(content="e" * 64, dtype="float32", quantization=None, vllm_version="0.32.0")


@pytest.fixture
def cache(ds_worker):
    cache = WeightCache(ds_worker.address, await_seed_s=60)
    yield cache
    cache.clear()


NODE1, NODE2 = Node(name="node1", ds_address="127.0.0.1:7001"), Node(name="node2", ds_address="127.0.0.1:7002")
NODE3, NODE4 = Node(name="node3", ds_address="127.0.0.1:7003"), Node(name="node4", ds_address="127.0.0.1:7004")


def plan(cache, replica_id, identity=IDENTITY, node=NODE1):
    return cache.plan(identity, replica_id, node, Path(f"/tmp/{replica_id}.json"))


def loaded(replica_id, kind, source=WeightSource.HOST, fallback=None, nbytes=1000, node="node1", fetched_from=None):
    return LoadReport(replica_id=replica_id, plan=kind, source=source, bytes=nbytes, fallback_reason=fallback,
                      node=node, fetched_from=fetched_from)


def test_concurrent_plans_for_an_empty_cache_make_exactly_one_seed(cache):
    with ThreadPoolExecutor(8) as pool:
        plans = list(pool.map(lambda i: plan(cache, f"r{i}"), range(8)))
    seeds = [p for p in plans if p.kind is PlanKind.SEED]
    assert len(seeds) == 1
    followers = [p for p in plans if p.kind is not PlanKind.SEED]
    assert all(p.kind is PlanKind.MAP and p.await_seed_s == 60 for p in followers)
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 7


def test_after_the_seed_reports_new_replicas_map_without_waiting(cache):
    seed = plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK, nbytes=4096))
    follower = plan(cache, "f")
    assert (follower.kind, follower.await_seed_s) == (PlanKind.MAP, 0)
    assert follower.fingerprint == seed.fingerprint == IDENTITY.fingerprint
    cache.report(loaded("f", PlanKind.MAP, nbytes=4096))
    entry = cache.stats()["entries"][0]
    assert entry["state"] == "ready" and entry["readers"] == ["f", "s"] and entry["bytes"] == 4096
    assert cache.stats()["bytes_served"] == 4096


def test_a_failed_seed_hands_over_to_the_next_plan_and_tells_its_followers(cache, ds_worker):
    plan(cache, "s1")
    plan(cache, "waiting")
    cache.abandon("s1")  # the seed's engine never came up
    tombstone = WeightKeys(IDENTITY.fingerprint, RankLayout()).abandoned("s1")
    assert HostTier(ds_worker.address).exists([tombstone]) == [True]
    assert plan(cache, "s2").kind is PlanKind.SEED
    assert cache.stats()["misses"] == 2
    # The new seed's followers wait for it, not for the old seed's tombstone.
    assert plan(cache, "waiting2").seed_replica == "s2"


def test_a_seed_that_could_not_publish_is_not_trusted(cache):
    plan(cache, "s1")
    cache.report(loaded("s1", PlanKind.SEED, WeightSource.DISK, fallback="publishing failed: Out of memory"))
    assert plan(cache, "s2").kind is PlanKind.SEED


def test_the_cache_outlives_the_seed_replica(cache):
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    cache.release("s")  # the seed replica is scaled in
    assert plan(cache, "later").kind is PlanKind.MAP


def test_an_entry_that_could_not_serve_is_retired_and_the_next_replica_seeds(cache):
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    plan(cache, "f1")
    plan(cache, "f2")  # planned on the same entry, still loading when f1 reports
    reason = cache.report(loaded("f1", PlanKind.MAP, WeightSource.DISK, fallback="checksum mismatch"))
    assert reason == "f1 could not use it: checksum mismatch"
    assert cache.stats()["fallbacks"] == 1 and cache.stats()["retired"] == 1
    assert cache.stats()["bytes_served"] == 0 and cache.stats()["entries"] == []
    assert plan(cache, "s2").kind is PlanKind.SEED
    # f2's fallback concerns the retired entry, not the new seed's: nothing more is retired.
    assert cache.report(loaded("f2", PlanKind.MAP, WeightSource.DISK, fallback="key missing")) is None
    assert [e["seed_replica"] for e in cache.stats()["entries"]] == ["s2"]
    cache.report(loaded("s2", PlanKind.SEED, WeightSource.DISK))
    assert plan(cache, "f3").kind is PlanKind.MAP


def test_a_follower_of_a_failed_seed_retires_nothing(cache):
    plan(cache, "s")
    plan(cache, "f")  # awaits the seed
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK, fallback="publishing failed"))
    assert cache.report(loaded("f", PlanKind.MAP, WeightSource.DISK, fallback="the seed failed")) is None
    assert cache.stats()["fallbacks"] == 1 and cache.stats()["retired"] == 0


def test_forget_node_drops_the_entries_it_was_home_to_without_asking_the_data_system():
    cache = WeightCache("127.0.0.1:1")  # nothing listens: forget_node must not call it
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    assert cache.forget_node("node2") == 0  # holds no copy: nothing changes
    assert cache.forget_node("node1") == 1
    assert cache.stats()["entries"] == [] and cache.stats()["retired"] == 1
    assert plan(cache, "s2").kind is PlanKind.SEED


def test_the_first_replica_on_another_node_fetches_and_later_ones_map_its_copy(cache):
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    first = plan(cache, "f1", node=NODE2)
    assert (first.kind, first.node, first.ds_address, first.fetch_from) == (PlanKind.MAP, "node2",
                                                                              NODE2.ds_address, "node1")
    assert (first.await_seed_s, first.await_fetch_s) == (0, 0)
    waiting = plan(cache, "f2", node=NODE2)  # planned while f1 fetches: single-flight per node
    assert (waiting.fetch_from, waiting.fetcher, waiting.await_fetch_s) == (None, "f1", 60)
    cache.report(loaded("f1", PlanKind.MAP, node="node2", fetched_from="node1", nbytes=4096))
    later = plan(cache, "f3", node=NODE2)
    assert (later.fetch_from, later.fetcher, later.await_fetch_s) == (None, None, 0)
    home = plan(cache, "f4")
    assert (home.node, home.fetch_from, home.fetcher) == ("node1", None, None)
    stats = cache.stats()
    assert stats["fetches"] == 1 and stats["bytes_fetched"] == 4096
    assert stats["entries"][0]["nodes"] == {"node1": "ready", "node2": "ready"} and stats["entries"][0]["home"] == "node1"


def test_a_replica_planned_onto_a_new_node_while_the_seed_loads_awaits_the_seed_then_fetches(cache):
    plan(cache, "s")
    first = plan(cache, "f1", node=NODE2)
    assert (first.fetch_from, first.await_seed_s, first.await_fetch_s) == ("node1", 60, 0)
    second = plan(cache, "f2", node=NODE2)
    assert (second.fetch_from, second.await_seed_s, second.fetcher) == (None, 60, "f1")


def test_a_failed_fetch_retires_the_entry_and_a_fetcher_that_never_reported_is_marked(cache, ds_worker):
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    plan(cache, "f1", node=NODE2)
    plan(cache, "f2", node=NODE2)
    cache.abandon("f1")  # its engine never came up: whoever awaits its fetch must stop waiting
    marker = WeightKeys(IDENTITY.fingerprint, RankLayout()).fetch_failed("node2", "f1")
    assert HostTier(ds_worker.address).exists([marker]) == [True]
    assert plan(cache, "f3", node=NODE2).fetch_from == "node1"  # node2 fetches again
    reason = cache.report(loaded("f3", PlanKind.MAP, WeightSource.DISK, node="node2",
                                 fallback="fetching from node1 onto node2 failed: RPC_RECV_TIMEOUT"))
    assert reason == "f3 could not use it: fetching from node1 onto node2 failed: RPC_RECV_TIMEOUT"
    assert cache.stats()["entries"] == [] and cache.stats()["fetches"] == 0
    assert HostTier(ds_worker.address).exists([marker]) == [False]  # the retired entry's markers are freed


def test_a_dead_node_loses_its_copies_and_fetches_again(cache):
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    plan(cache, "f1", node=NODE2)
    cache.report(loaded("f1", PlanKind.MAP, node="node2", fetched_from="node1"))
    assert cache.forget_node("node2") == 0  # not its home: the entry stays
    assert plan(cache, "f2", node=NODE2).fetch_from == "node1"


def test_nodes_that_need_the_weights_at_once_relay_along_a_chain_not_from_the_seeds_node(cache):
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    plans = [plan(cache, f"f{i}", node=node) for i, node in enumerate((NODE2, NODE3, NODE4), start=2)]
    # Each new node reads from the one before it; if that one fails, from the ones before it in turn.
    assert [(p.fetch_from, p.fetch_fallbacks, p.home_node) for p in plans] == [
        ("node1", [], "node1"), ("node2", ["node1"], "node1"), ("node3", ["node2", "node1"], "node1")]
    assert cache.stats()["entries"][0]["sources"] == {"node2": "node1", "node3": "node2", "node4": "node3"}


def test_a_star_reads_every_copy_from_the_seeds_node(ds_worker):
    star = WeightCache(ds_worker.address, fanout="star")
    plan(star, "s")
    star.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    plans = [plan(star, f"f{i}", node=node) for i, node in enumerate((NODE2, NODE3, NODE4), start=2)]
    assert [(p.fetch_from, p.fetch_fallbacks) for p in plans] == [("node1", [])] * 3
    with pytest.raises(ValueError, match="fanout"):
        WeightCache(ds_worker.address, fanout="tree")


def test_a_node_after_the_others_are_done_reads_from_the_last_one_done(cache):
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    plan(cache, "f2", node=NODE2)
    cache.report(loaded("f2", PlanKind.MAP, node="node2", fetched_from="node1"))
    later = plan(cache, "f3", node=NODE3)
    assert (later.fetch_from, later.fetch_fallbacks) == ("node2", ["node1"])
    # node2 now feeds node3: one more node at the same time joins the chain behind node3.
    joined = plan(cache, "f4", node=NODE4)
    assert (joined.fetch_from, joined.fetch_fallbacks) == ("node3", ["node2", "node1"])


def test_a_cut_off_node_is_no_source_and_with_every_copy_cut_off_a_replica_loads_from_disk(cache):
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    plan(cache, "f2", node=NODE2)
    cache.report(loaded("f2", PlanKind.MAP, node="node2", fetched_from="node1"))
    cache.set_reachable("node2", False)
    around = plan(cache, "f3", node=NODE3)
    assert (around.fetch_from, around.fetch_fallbacks) == ("node1", [])
    cache.abandon("f3")  # its engine failed: node3 holds no copy
    cache.set_reachable("node1", False)
    stranded = plan(cache, "f4", node=NODE4)
    assert stranded.kind is PlanKind.DISK and "unreachable" in stranded.reason
    assert cache.report(loaded("f4", PlanKind.DISK, WeightSource.DISK, node="node4")) is None
    assert cache.stats()["entries"] and cache.stats()["hits"] == 2  # the disk plan neither hit nor retired it
    cache.set_reachable("node2", True)
    assert plan(cache, "f5", node=NODE4).fetch_from == "node2"


def test_revalidate_drops_a_copy_with_missing_keys_and_an_entry_whose_home_copy_lost_keys(cache, ds_worker):
    from types import SimpleNamespace

    import torch

    loader = pytest.importorskip("app.weights.loader")
    seeding = pytest.importorskip("app.weights.seeding")
    tier, keys = HostTier(ds_worker.address), WeightKeys(IDENTITY.fingerprint, RankLayout())
    tensors = loader._tensors(torch.nn.Linear(8, 8))
    for copy in (keys, keys.on("node2"), keys.on("node3")):  # the seed's copy and two relayed ones
        seeding.publish_copy(tier, copy, RankLayout(), tensors, SimpleNamespace(dtype=torch.float32))
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    for replica, node in (("f2", NODE2), ("f3", NODE3)):
        plan(cache, replica, node=node)
        cache.report(loaded(replica, PlanKind.MAP, node=node.name, fetched_from="node1"))
    assert cache.revalidate() == []
    tier.delete([keys.on("node3").tensor(1)])  # a key lost, as after a worker restart (REFERENCE.md)
    (dropped,) = cache.revalidate()
    assert dropped.endswith("on node3: 1 keys missing, dropped")
    assert cache.stats()["entries"][0]["nodes"] == {"node1": "ready", "node2": "ready"}
    assert not any(tier.exists(keys.on("node3").copy_keys(2)))  # what was left of it is freed
    assert plan(cache, "f4", node=NODE3).fetch_from == "node2"  # relayed again
    tier.delete([keys.tensor(0)])
    (dropped,) = cache.revalidate()
    assert "on node1: 1 keys missing, its entry retired" in dropped and cache.stats()["entries"] == []
    assert not any(tier.exists(keys.on("node2").copy_keys(2) + keys.copy_keys(2)))
    assert plan(cache, "s2").kind is PlanKind.SEED


def test_different_identities_get_different_entries(cache):
    other = IDENTITY.model_copy(update={"dtype": "bfloat16"})
    assert plan(cache, "a").kind is PlanKind.SEED
    assert plan(cache, "b", other).kind is PlanKind.SEED


def test_pull_mode_and_bad_modes(ds_worker):
    cache = WeightCache(ds_worker.address, cpu_mode=PlanKind.PULL)
    plan(cache, "s")
    assert plan(cache, "f").kind is PlanKind.PULL
    with pytest.raises(ValueError):
        WeightCache(ds_worker.address, cpu_mode=PlanKind.SEED)


def test_retire_frees_the_data_system_objects(cache, ds_worker):
    from types import SimpleNamespace

    import torch

    loader = pytest.importorskip("app.weights.loader")
    seeding = pytest.importorskip("app.weights.seeding")
    tier = HostTier(ds_worker.address)
    keys = WeightKeys(IDENTITY.fingerprint, RankLayout())
    model = torch.nn.Linear(8, 8)
    seeding.publish_copy(tier, keys, RankLayout(), loader._tensors(model), SimpleNamespace(dtype=torch.float32))
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    everything = [keys.manifest, *keys.tensors(2)]
    assert all(tier.exists(everything))
    assert cache.retire(IDENTITY.fingerprint)
    assert not any(tier.exists(everything))
    assert cache.stats()["entries"] == []


def test_the_npu_tier_is_always_pulled(ds_worker):
    cache = WeightCache(ds_worker.address, tier="npu")
    plan(cache, "s")
    follower = plan(cache, "f")
    assert (follower.kind, follower.tier) == (PlanKind.PULL, "npu")
    cache.report(loaded("f", PlanKind.PULL, WeightSource.NPU, nbytes=2048))
    assert cache.stats()["bytes_served"] == 2048 and cache.stats()["fallbacks"] == 0


def test_a_replicas_report_sums_up_its_ranks_worst_source_slowest_seconds_and_each_ranks_reason():
    def rank(index: int, source: WeightSource, seconds: float, reason: str | None = None) -> LoadReport:
        return LoadReport(replica_id="r2", rank=index, plan=PlanKind.MAP, source=source, node="node1",
                          parameters=30, bytes=1000, seconds=seconds, fallback_reason=reason, finished_at=seconds)

    mapped = LoadReport.of_ranks([rank(1, WeightSource.HOST, 0.2), rank(0, WeightSource.HOST, 0.1)])
    assert (mapped.source, mapped.seconds, mapped.bytes, mapped.parameters) == (WeightSource.HOST, 0.2, 2000, 60)
    assert [r.rank for r in mapped.ranks] == [0, 1] and mapped.rank is None and mapped.fallback_reason is None
    # One rank fell back: the replica's source is disk, and only that rank's reason is given.
    mixed = LoadReport.of_ranks([rank(0, WeightSource.HOST, 0.1), rank(1, WeightSource.DISK, 2.5, "missing key")])
    assert mixed.source is WeightSource.DISK and mixed.seconds == 2.5
    assert mixed.fallback_reason == "rank 1: missing key" and mixed.ranks[0].source is WeightSource.HOST
    single = LoadReport.of_ranks([rank(0, WeightSource.HOST, 0.1)])
    assert single.ranks == [] and single.bytes == 1000  # one rank: the replica's report is that rank's
