"""WeightCache: single-flight plans, seed failure hand-off, adoption, stats and freeing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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


def plan(cache, replica_id, identity=IDENTITY):
    return cache.plan(identity, replica_id, Path(f"/tmp/{replica_id}.json"))


def loaded(replica_id, kind, source=WeightSource.HOST, fallback=None, nbytes=1000):
    return LoadReport(replica_id=replica_id, plan=kind, source=source, bytes=nbytes, fallback_reason=fallback)


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
    tombstone = WeightKeys(IDENTITY.fingerprint, RankLayout()).abandoned
    assert HostTier(ds_worker.address).exists([tombstone]) == [True]
    assert plan(cache, "s2").kind is PlanKind.SEED
    assert cache.stats()["misses"] == 2


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


def test_forget_all_drops_entries_without_asking_the_data_system():
    cache = WeightCache("127.0.0.1:1")  # nothing listens: forget_all must not call it
    plan(cache, "s")
    cache.report(loaded("s", PlanKind.SEED, WeightSource.DISK))
    assert cache.forget_all() == 1
    assert cache.stats()["entries"] == [] and cache.stats()["retired"] == 1
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
    tier = HostTier(ds_worker.address)
    keys = WeightKeys(IDENTITY.fingerprint, RankLayout())
    model = torch.nn.Linear(8, 8)
    loader._publish(tier, keys, RankLayout(), loader._tensors(model), SimpleNamespace(dtype=torch.float32))
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
