"""The host tier: tensors in the data system's shared host memory (``KVClient``).

Writes go through ``mcreate`` (the worker allocates) → copy into the buffer → ``mset_buffer`` (``create``,
then ``seal``: a caller may fill the buffers its own way, as the lean seed does); reads
are zero-copy ``get_read_only_buffers``, whose memoryviews stay valid while referenced, even after the
key is deleted. Every error of the client is a ``RuntimeError``; this module turns them into
``TierError`` with the key in question.
"""

from __future__ import annotations

import logging
from collections import namedtuple
from typing import Iterable, Sequence

from app.datasystem_keys import check_key

logger = logging.getLogger(__name__)

# mcreate accepts fewer than 2000 keys a call (REFERENCE.md).
_BATCH = 1000
# What KVClient.read takes (the SDK documents a namedtuple with these fields and exports none).
_ReadParam = namedtuple("_ReadParam", "key offset size")


def batches_by_bytes(keys: Sequence[str], sizes: Sequence[int], limit: int) -> list[tuple[list[str], int]]:
    """Keys in order, in batches of at most ``limit`` bytes (a larger value is a batch of its own), each
    with its bytes."""
    batches: list[tuple[list[str], int]] = []
    for key, size in zip(keys, sizes):
        if not batches or batches[-1][1] + size > limit:
            batches.append(([], 0))
        batch, total = batches[-1]
        batch.append(key)
        batches[-1] = (batch, total + size)
    return batches


class TierError(RuntimeError):
    """A tier could not store or serve what was asked; the caller falls back to disk."""


def _batches(items: Sequence, size: int = _BATCH) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class HostTier:
    name = "host"

    def __init__(self, address: str, timeout_ms: int = 5000) -> None:
        from yr.datasystem import KVClient

        host, _, port = address.rpartition(":")
        # A short request timeout: a stopped worker then fails a call in seconds, not in a minute.
        self._client = KVClient(host, int(port), connect_timeout_ms=timeout_ms, req_timeout_ms=timeout_ms)
        try:
            self._client.init()
        except RuntimeError as exc:
            raise TierError(f"cannot reach the data system at {address}: {exc}") from None

    def put(self, items: Sequence[tuple[str, memoryview]]) -> None:
        """Store byte views under keys. Values must be non-empty."""
        for batch in _batches(items):
            created = self.create([key for key, _ in batch], [len(data) for _, data in batch])
            for (_, view), (_, data) in zip(created, batch):
                view[:] = data
            self.seal(created)

    def create(self, keys: Sequence[str], sizes: Sequence[int]) -> list[tuple[object, memoryview]]:
        """New objects, not yet readable: each as its buffer and a writable view of its shared memory.
        Fill the views, then ``seal`` the buffers. The views stay valid (and pin the memory) after the
        seal, and after the keys are deleted."""
        keys = [check_key(key) for key in keys]
        try:
            buffers = self._client.mcreate(keys, list(sizes))
        except RuntimeError as exc:
            raise TierError(f"creating {keys[0]}.. ({len(keys)} keys, {sum(sizes) / 1e6:.0f} MB) failed: "
                            f"{exc}") from None
        return [(buffer, buffer.MutableData()) for buffer in buffers]

    def seal(self, created: Sequence[tuple[object, memoryview]]) -> None:
        """Make created objects readable by their keys."""
        try:
            self._client.mset_buffer([buffer for buffer, _ in created])
        except RuntimeError as exc:
            raise TierError(f"sealing {len(created)} objects failed: {exc}") from None

    def get(self, keys: Sequence[str], timeout_ms: int = 0) -> list[memoryview]:
        """Zero-copy read-only views of the values; raises TierError if any key is missing.

        A call, including a read across nodes, must finish within the client's request timeout, or
        ``timeout_ms`` if that is longer (measured: the larger of the two cuts a healthy read short,
        and bounds one from a dead node)."""
        views: list[memoryview] = []
        for batch in _batches(keys):
            try:
                buffers = self._client.get_read_only_buffers(list(batch), timeout_ms)
            except RuntimeError as exc:
                raise TierError(f"reading {batch[0]}.. ({len(batch)} keys) failed: {exc}") from None
            for key, buffer in zip(batch, buffers):
                if buffer is None:
                    raise TierError(f"key {key} is not in the data system")
                views.append(buffer.immutable_data())
        return views

    def read_range(self, key: str, offset: int, size: int) -> memoryview:
        """A read-only view of ``size`` bytes of a value from ``offset``: across nodes, only those
        bytes cross (measured: 64 MiB of a 272 MiB value in a quarter of the whole one's time)."""
        try:
            (buffer,) = self._client.read([_ReadParam(check_key(key), offset, size)])
        except RuntimeError as exc:
            raise TierError(f"reading {size} bytes of {key} at {offset} failed: {exc}") from None
        if buffer is None:
            raise TierError(f"key {key} is not in the data system")
        return buffer.immutable_data()

    def exists(self, keys: Sequence[str]) -> list[bool]:
        try:
            return [flag for batch in _batches(keys) for flag in self._client.exist(list(batch))]
        except RuntimeError as exc:
            raise TierError(f"checking keys failed: {exc}") from None

    def delete(self, keys: Sequence[str]) -> None:
        for batch in _batches(keys):
            try:
                failed = self._client.delete(list(batch))
            except RuntimeError as exc:
                raise TierError(f"deleting keys failed: {exc}") from None
            if failed:
                logger.warning("could not delete %d keys, e.g. %s", len(failed), failed[0])
