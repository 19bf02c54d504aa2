"""The npu tier against a fake DsTensorClient that enforces the documented contract (no Ascend NPU on
this machine: the real client raises on CPU tensors). What the fake cannot prove, hardware must:
this tier is documented as unverified on Ascend."""

from __future__ import annotations

import weakref

import pytest
import torch

from app.weights.host_tier import TierError
from app.weights.npu_tier import MAX_KEYS_PER_CALL, NpuTier


class ContractBreach(AssertionError):
    """The code under test used the client in a way the documentation forbids."""


class FakeDataSystem:
    """Shared state of the fake: what is published, by which device, kept alive by whom."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[int, weakref.ref]] = {}
        self.calls: list[tuple[str, int]] = []


class FakeDsTensorClient:
    def __init__(self, system: FakeDataSystem, host: str, port: int, device_id: int) -> None:
        self.system, self.device_id = system, device_id

    def _check(self, keys, tensors) -> None:
        if len(keys) > MAX_KEYS_PER_CALL:
            raise ContractBreach(f"{len(keys)} keys in one call")
        if any(not t.is_contiguous() for t in tensors):
            raise ContractBreach("non-contiguous tensor")

    def dev_mset(self, keys, tensors):
        self._check(keys, tensors)
        self.system.calls.append(("dev_mset", len(keys)))
        failed = [k for k in keys if k in self.system.objects]  # no overwrite
        for key, tensor in zip(keys, tensors):
            if key not in failed:
                self.system.objects[key] = (self.device_id, weakref.ref(tensor))
        return failed

    def dev_mget(self, keys, tensors, sub_timeout_ms=0):
        self._check(keys, tensors)
        self.system.calls.append(("dev_mget", len(keys)))
        failed = []
        for key, tensor in zip(keys, tensors):
            if key not in self.system.objects:
                failed.append(key)
                continue
            device, source = self.system.objects[key]
            if device == self.device_id:
                raise ContractBreach("source and destination on the same NPU")
            if source() is None:
                raise ContractBreach("the publisher did not keep its tensor alive")
            tensor.copy_(source())
        return failed

    def dev_delete(self, keys):
        for key in keys:
            self.system.objects.pop(key, None)
        return []


def tier(system: FakeDataSystem, device_id: int) -> NpuTier:
    return NpuTier("127.0.0.1:1", device_id,
                   client_factory=lambda host, port, device: FakeDsTensorClient(system, host, port, device))


def test_publish_then_pull_on_another_device_copies_every_tensor():
    system = FakeDataSystem()
    published = [torch.randn(4, 4), torch.randn(7)]
    tier(system, 0).publish(["w_0", "w_1"], published)
    pulled = [torch.empty(4, 4), torch.empty(7)]
    tier(system, 1).pull(["w_0", "w_1"], pulled, timeout_ms=1000)
    assert all(torch.equal(a, b) for a, b in zip(published, pulled))


def test_large_models_are_split_into_calls_of_at_most_10000_keys():
    system = FakeDataSystem()
    count = MAX_KEYS_PER_CALL + 5
    keys = [f"k_{i}" for i in range(count)]
    published = [torch.zeros(1) for _ in keys]
    tier(system, 0).publish(keys, published)
    tier(system, 1).pull(keys, [torch.empty(1) for _ in keys], timeout_ms=1000)
    assert system.calls == [("dev_mset", MAX_KEYS_PER_CALL), ("dev_mset", 5),
                            ("dev_mget", MAX_KEYS_PER_CALL), ("dev_mget", 5)]


def test_non_contiguous_tensors_are_refused_before_the_client_sees_them():
    system = FakeDataSystem()
    with pytest.raises(TierError, match="contiguous"):
        tier(system, 0).publish(["w"], [torch.randn(4, 4).t()])
    assert system.calls == []


def test_an_existing_key_is_not_overwritten_and_says_so():
    system = FakeDataSystem()
    keep = [torch.ones(2)]
    tier(system, 0).publish(["w"], keep)
    with pytest.raises(TierError, match="cannot be overwritten"):
        tier(system, 2).publish(["w"], [torch.zeros(2)])


def test_missing_keys_and_bad_keys_are_tier_errors():
    system = FakeDataSystem()
    with pytest.raises(TierError, match="could not get"):
        tier(system, 1).pull(["absent"], [torch.empty(1)], timeout_ms=10)
    with pytest.raises(ValueError):
        tier(system, 0).publish(["bad.key"], [torch.zeros(1)])
    with pytest.raises(TierError, match="2 keys for 1 tensors"):
        tier(system, 0).publish(["a", "b"], [torch.zeros(1)])


def test_the_fake_enforces_the_contract_it_documents():
    # The fake is only worth something if it refuses what the documentation forbids.
    system = FakeDataSystem()
    tier(system, 0).publish(["w"], [torch.ones(2)])  # the published tensor is dropped at once
    with pytest.raises(ContractBreach, match="alive"):
        tier(system, 1).pull(["w"], [torch.empty(2)], timeout_ms=10)
    kept = [torch.ones(2)]
    tier(system, 0).publish(["v"], kept)
    with pytest.raises(ContractBreach, match="same NPU"):
        tier(system, 0).pull(["v"], [torch.empty(2)], timeout_ms=10)


def test_an_unreachable_worker_is_a_tier_error():
    def refuse(host, port, device):
        raise RuntimeError("code: [RPC unavailable]")

    with pytest.raises(TierError, match="cannot open device objects"):
        NpuTier("127.0.0.1:1", 0, client_factory=refuse)
