"""The npu tier: device-memory objects through the data system's ``DsTensorClient`` (Ascend only).

NOT VERIFIED ON ASCEND HARDWARE: written against the documented contract of openyuanrong-datasystem
0.8.1 and tested here with a fake client that enforces it (tests/test_npu_tier.py):

- ``DsTensorClient(host, port, device_id).init()``;
- ``dev_mset(keys, tensors)`` publishes device tensors and returns the keys it could not set; it
  cannot overwrite (delete first with ``dev_delete``); the publisher must keep its tensors alive and
  its process running while others read;
- ``dev_mget(keys, tensors, sub_timeout_ms)`` fills preallocated device tensors device-to-device and
  returns the failed keys; source and destination must be different NPUs;
- tensors must be contiguous; at most 10,000 keys a call.

The manifest stays on the host tier (it is small and every replica reads it first).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from app.datasystem_keys import check_key
from app.weights.host_tier import TierError

MAX_KEYS_PER_CALL = 10_000

ClientFactory = Callable[[str, int, int], Any]


def _real_client(host: str, port: int, device_id: int) -> Any:
    from yr.datasystem.ds_tensor_client import DsTensorClient

    client = DsTensorClient(host, port, device_id)
    client.init()
    return client


def _batches(keys: Sequence[str], tensors: Sequence[torch.Tensor]) -> Iterable[tuple[list, list]]:
    for start in range(0, len(keys), MAX_KEYS_PER_CALL):
        yield list(keys[start:start + MAX_KEYS_PER_CALL]), list(tensors[start:start + MAX_KEYS_PER_CALL])


class NpuTier:
    name = "npu"

    def __init__(self, address: str, device_id: int, client_factory: ClientFactory = _real_client) -> None:
        host, _, port = address.rpartition(":")
        self.device_id = device_id
        try:
            self._client = client_factory(host, int(port), device_id)
        except RuntimeError as exc:
            raise TierError(f"cannot open device objects on NPU {device_id} at {address}: {exc}") from None

    def publish(self, keys: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
        """Publish device tensors; the caller keeps them alive while the entry is in use."""
        self._check(keys, tensors)
        for batch_keys, batch_tensors in _batches(keys, tensors):
            try:
                failed = self._client.dev_mset(batch_keys, batch_tensors)
            except RuntimeError as exc:
                raise TierError(f"dev_mset failed: {exc}") from None
            if failed:
                raise TierError(f"dev_mset could not set {len(failed)} keys, e.g. {failed[0]} "
                                "(an existing key cannot be overwritten)")

    def pull(self, keys: Sequence[str], tensors: Sequence[torch.Tensor], timeout_ms: int) -> None:
        """Fill preallocated device tensors, device to device."""
        self._check(keys, tensors)
        for batch_keys, batch_tensors in _batches(keys, tensors):
            try:
                failed = self._client.dev_mget(batch_keys, batch_tensors, timeout_ms)
            except RuntimeError as exc:
                raise TierError(f"dev_mget failed: {exc}") from None
            if failed:
                raise TierError(f"dev_mget could not get {len(failed)} keys, e.g. {failed[0]}")

    def delete(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), MAX_KEYS_PER_CALL):
            try:
                self._client.dev_delete(list(keys[start:start + MAX_KEYS_PER_CALL]))
            except RuntimeError as exc:
                raise TierError(f"dev_delete failed: {exc}") from None

    @staticmethod
    def _check(keys: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
        if len(keys) != len(tensors):
            raise TierError(f"{len(keys)} keys for {len(tensors)} tensors")
        for key, tensor in zip(keys, tensors):
            check_key(key)
            if not tensor.is_contiguous():
                raise TierError(f"{key}: device objects must be contiguous tensors")
