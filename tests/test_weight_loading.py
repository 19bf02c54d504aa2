"""The load format's data paths (publish, map, pull, and every way they refuse) against a real data
system worker, on a small torch model: no vLLM engine needed."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from app.runtime.datasystem_worker import DataSystemWorker
from app.weights.host_tier import HostTier, TierError
from app.weights.identity import RankLayout, WeightKeys
from app.weights.load_report import PlanKind
from app.weights.manifest import VerifyMode
from app.weights.plan import WeightPlan

loader = pytest.importorskip("app.weights.loader")  # imports vLLM, as in an engine
rendezvous = pytest.importorskip("app.weights.rendezvous")
FP32 = SimpleNamespace(dtype=torch.float32)


@pytest.fixture(scope="module")
def tier(ds_worker):
    return HostTier(ds_worker.address, timeout_ms=3000)


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 300))
    return model.requires_grad_(False)


def publish(tier, fingerprint: str, seed: int = 0) -> tuple[nn.Module, WeightKeys]:
    model, keys = small_model(seed), WeightKeys(fingerprint, RankLayout())
    loader._publish(tier, keys, RankLayout(), loader._tensors(model), FP32)
    return model, keys


def fetch(tier, keys, model, verify=VerifyMode.SAMPLED, config=FP32):
    return loader._fetch(tier, keys, RankLayout(), loader._tensors(model), config, verify)


def assert_bitwise_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x.view(torch.uint8) if x.dtype == torch.uint8 else x, y), name


def test_mapped_parameters_are_the_seed_bytes_without_a_copy(tier):
    seed, keys = publish(tier, "a1" * 16)
    replica, other = small_model(1), small_model(2)
    loader._map(replica, loader._tensors(replica), fetch(tier, keys, replica))
    loader._map(other, loader._tensors(other), fetch(tier, keys, other))
    assert_bitwise_equal(seed, replica)
    # Both models' parameters point at the same shared memory: one physical copy.
    for (_, a), (_, b) in zip(loader._tensors(replica), loader._tensors(other)):
        assert a.data_ptr() == b.data_ptr()
    assert replica(torch.tensor([[1, 2, 3]])).equal(seed(torch.tensor([[1, 2, 3]])))


def test_pulled_parameters_are_private_copies_of_the_seed_bytes(tier):
    seed, keys = publish(tier, "a2" * 16)
    replica, mapped = small_model(1), small_model(2)
    loader._pull(loader._tensors(replica), fetch(tier, keys, replica, VerifyMode.FULL))
    loader._map(mapped, loader._tensors(mapped), fetch(tier, keys, mapped))
    assert_bitwise_equal(seed, replica)
    for (_, pulled), (_, shared) in zip(loader._tensors(replica), loader._tensors(mapped)):
        assert pulled.data_ptr() != shared.data_ptr()


def test_a_corrupted_tensor_is_refused(tier):
    seed, keys = publish(tier, "a3" * 16)
    first = loader._tensors(seed)[0][1]
    garbage = torch.zeros_like(first).view(-1).view(torch.uint8).numpy()
    tier.put([(keys.tensor(0), memoryview(garbage))])  # same size, other bytes
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch(tier, keys, small_model(1))


def test_an_entry_of_another_dtype_or_shape_is_refused(tier):
    _, keys = publish(tier, "a4" * 16)
    with pytest.raises(ValueError, match="as torch.float32"):
        fetch(tier, keys, small_model(1), config=SimpleNamespace(dtype=torch.bfloat16))
    wider = nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 65), nn.LayerNorm(64), nn.Linear(64, 300))
    with pytest.raises(ValueError, match="does not match this model"):
        fetch(tier, keys, wider)


def test_a_missing_entry_is_a_tier_error(tier):
    with pytest.raises(TierError, match="not in the data system|Key not found"):
        fetch(tier, WeightKeys("a5" * 16, RankLayout()), small_model(1))


def test_awaiting_a_seed_returns_when_it_publishes_and_stops_when_it_fails(tier):
    keys = WeightKeys("a6" * 16, RankLayout())
    publisher = threading.Timer(0.5, lambda: publish(tier, "a6" * 16))
    publisher.start()
    waited = rendezvous.await_seed(tier, keys, timeout_s=30)
    publisher.join()
    assert 0.3 < waited < 10
    failed = WeightKeys("a7" * 16, RankLayout())
    tier.put([(failed.abandoned, memoryview(b"1"))])
    started = time.monotonic()
    with pytest.raises(TierError, match="seed replica failed"):
        rendezvous.await_seed(tier, failed, timeout_s=30)
    assert time.monotonic() - started < 5
    with pytest.raises(TierError, match="did not publish"):
        rendezvous.await_seed(tier, WeightKeys("a8" * 16, RankLayout()), timeout_s=0.3)


def test_awaiting_a_nodes_fetch_returns_when_it_lands_and_stops_when_it_fails_or_the_entry_goes(tier):
    fingerprint = "b1" * 16
    keys = publish(tier, fingerprint)[1]

    def waiting_for(fetcher: str, timeout_s: float = 30) -> WeightPlan:
        return WeightPlan(kind=PlanKind.MAP, replica_id="r9", fingerprint=fingerprint, node="node2",
                          ds_address="127.0.0.1:1", fetcher=fetcher, await_fetch_s=timeout_s,
                          report_path=Path("/tmp/r9.json"))

    landing = threading.Timer(0.5, lambda: tier.put([(keys.landed("node2", "r2"), memoryview(b"1"))]))
    landing.start()
    waited = rendezvous.await_fetch(tier, keys, waiting_for("r2"))
    landing.join()
    assert 0.3 < waited < 10
    tier.put([(keys.fetch_failed("node2", "r3"), memoryview(b"1"))])
    with pytest.raises(TierError, match="r3 could not fetch the weights onto node2$"):
        rendezvous.await_fetch(tier, keys, waiting_for("r3"))
    with pytest.raises(TierError, match="did not fetch the weights onto node2 within"):
        rendezvous.await_fetch(tier, keys, waiting_for("r4", timeout_s=0.3))
    tier.delete([keys.manifest])  # the WeightCache retired the entry
    with pytest.raises(TierError, match="and the entry was retired"):
        rendezvous.await_fetch(tier, keys, waiting_for("r4"))


def test_a_stopped_worker_fails_fast_instead_of_hanging():
    worker = DataSystemWorker(128)
    worker.start()
    try:
        tier = HostTier(worker.address, timeout_ms=2000)
        _, keys = publish(tier, "a9" * 16)
    finally:
        worker.stop()
    started = time.monotonic()
    with pytest.raises(TierError):
        fetch(tier, keys, small_model(1))
    assert time.monotonic() - started < 15
