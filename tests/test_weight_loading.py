"""The load format's data paths (publish, the lean seed's move, map, pull, and every way they refuse)
against a real data system worker, on small torch models: no vLLM engine needed."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from app.runtime.datasystem_worker import DataSystemWorker
from app.weights import seeding
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


@contextmanager
def own_worker(shared_memory_mb: int, timeout_ms: int = 3000) -> Iterator[tuple[DataSystemWorker, HostTier]]:
    """A data system worker of the test's own (to fill, stop or restart), and a client of it."""
    worker = DataSystemWorker(shared_memory_mb)
    worker.start()
    try:
        yield worker, HostTier(worker.address, timeout_ms=timeout_ms)
    finally:
        worker.stop()


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 300))
    return model.requires_grad_(False)


def publish(tier, fingerprint: str, seed: int = 0) -> tuple[nn.Module, WeightKeys]:
    model, keys = small_model(seed), WeightKeys(fingerprint, RankLayout())
    seeding.publish_copy(tier, keys, RankLayout(), loader._tensors(model), FP32)
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
    waited = rendezvous.await_seed(tier, keys, "s1", timeout_s=30)
    publisher.join()
    assert 0.3 < waited < 10
    failed = WeightKeys("a7" * 16, RankLayout())
    tier.put([(failed.abandoned("s1"), memoryview(b"1"))])
    started = time.monotonic()
    with pytest.raises(TierError, match="seed replica s1 failed"):
        rendezvous.await_seed(tier, failed, "s1", timeout_s=30)
    assert time.monotonic() - started < 5
    with pytest.raises(TierError, match="did not publish"):  # s1's tombstone is not the next seed's
        rendezvous.await_seed(tier, failed, "s2", timeout_s=0.3)
    with pytest.raises(TierError, match="did not publish"):
        rendezvous.await_seed(tier, WeightKeys("a8" * 16, RankLayout()), "s1", timeout_s=0.3)


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
    with own_worker(128, timeout_ms=2000) as (_, tier):
        _, keys = publish(tier, "a9" * 16)
    started = time.monotonic()
    with pytest.raises(TierError):
        fetch(tier, keys, small_model(1))
    assert time.monotonic() - started < 15


def rss_anon() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon:")).split()[1]) * 1024


def test_a_seed_moves_a_05b_model_into_shared_memory_holding_its_weights_once():
    """The lean seed, on the 0.5B demo shape in bf16 (0.99 GB) through the loader's own seed path: its
    resident memory never grows by more than 0.15x the weights (about one chunk, in fact), its private
    copy is gone afterwards, and a replica maps exactly the bytes it had. On a worker of its own: the
    session's may still hold what earlier tests deleted (a worker reclaims deleted objects' memory
    after a while, REFERENCE.md), and a 0.99 GB seed once found no room there in a full run."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from app.control.demo_model import DemoShape

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**DemoShape.QWEN2_5_0_5B.config_kwargs())).to(torch.bfloat16)
    model = model.to_empty(device="cpu").requires_grad_(False)
    params = loader._tensors(model)
    for index, (_, param) in enumerate(params):
        param.fill_(index % 97)  # every page touched, as after a disk load; each tensor recognisable
    weights = sum(p.nbytes for _, p in params)
    assert weights > 0.9e9
    with own_worker(1536) as (worker, tier):
        anon_before = rss_anon()
        keys = WeightKeys("c1" * 16, RankLayout())
        plan = WeightPlan(kind=PlanKind.SEED, replica_id="r1", fingerprint=keys.fingerprint,
                          ds_address=worker.address, report_path=Path("/tmp/r1.json"))
        moved = loader._seed(model, plan, keys, RankLayout(), params, SimpleNamespace(dtype=torch.bfloat16))
        try:
            assert moved.added_bytes <= 0.15 * weights, f"the seed held {moved.added_bytes / 1e6:.0f} MB more"
            assert anon_before - rss_anon() > 0.9 * weights, "the private copy was not released"
            for index, (name, param) in enumerate(params):
                assert torch.all(param == index % 97), name
            # A replica's map checks every byte against the digests the move took.
            views = loader._fetch(tier, keys, RankLayout(), params, SimpleNamespace(dtype=torch.bfloat16),
                                  VerifyMode.FULL)
            for (name, param), view in zip(params, views):
                assert torch.equal(loader._as_tensor(view, param), param), name
        finally:
            tier.delete([keys.manifest, *keys.tensors(len(params))])
            del model, params


def linears(count: int, seed: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """``count`` weights of 24 MiB each (one batch each when batches are 24 MiB), and copies of them."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(2048, 3072, bias=False) for _ in range(count)]).requires_grad_(False)
    return model, [p.clone() for p in model.parameters()]


def assert_unchanged(params: list[tuple[str, torch.Tensor]], expected: list[torch.Tensor]) -> None:
    for (name, param), before in zip(params, expected):
        assert torch.equal(param, before), name


def test_a_failed_move_loses_no_weights_leaves_nothing_mappable_and_a_tombstone(monkeypatch):
    """The data system fills up mid-publish: the seed keeps every parameter's bytes (moved or not),
    no key of the entry is left, and replicas awaiting it are told at once."""
    monkeypatch.setattr(seeding, "_BATCH_BYTES", 24 << 20)  # one tensor per batch: it fails mid-way
    with own_worker(64) as (_, tier):
        model, expected = linears(4, seed=0)
        params, keys = loader._tensors(model), WeightKeys("c2" * 16, RankLayout())
        moved = seeding.Moved()
        with pytest.raises(TierError, match="no space|Out of memory|failed"):
            seeding.move_into(tier, keys.tensors(len(params)), params, moved)
        assert 0 < len(moved.names) < len(params), "the move should fail mid-way"
        seeding.abandon(tier, keys, len(params), "r1")
        assert_unchanged(params, expected)
        assert tier.exists([keys.manifest, *keys.tensors(len(params))]) == [False] * (len(params) + 1)
        assert tier.exists([keys.abandoned("r1")]) == [True]
        with pytest.raises(TierError):
            fetch(tier, keys, model)
        with pytest.raises(TierError, match="seed replica r1 failed"):
            rendezvous.await_seed(tier, keys, "r1", timeout_s=5)


def test_a_seeds_moved_weights_survive_a_restart_of_its_worker():
    """The seed computes on the bytes it published. If the worker dies and a fresh one takes its place,
    the client reconnects and maps the new worker's memory: the seed's parameters must keep theirs (a
    created buffer's writable view did not: it showed the new worker's bytes)."""
    with own_worker(128) as (worker, tier):
        model, expected = linears(2, seed=1)
        params, keys = loader._tensors(model), WeightKeys("c3" * 16, RankLayout())
        seeding.move_into(tier, keys.tensors(len(params)), params, seeding.Moved())
        os.kill(worker.pid, signal.SIGKILL)
        while worker.exit_code() is None:
            time.sleep(0.05)
        worker.restart()
        deadline = time.monotonic() + 20
        while True:  # the client's first calls after the restart may fail while it reconnects
            try:
                tier.put([("filler", memoryview(b"\xff" * (96 << 20)))])
                break
            except TierError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert_unchanged(params, expected)
