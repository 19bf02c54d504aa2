"""The host tier: tensors in the data system's shared host memory (``KVClient``).

Writes go through ``mcreate`` (the worker allocates) → copy into the buffer → ``mset_buffer``; reads
are zero-copy ``get_read_only_buffers``, whose memoryviews stay valid while referenced, even after the
key is deleted. Every error of the client is a ``RuntimeError``; this module turns them into
``TierError`` with the key in question.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

from app.datasystem_keys import check_key

logger = logging.getLogger(__name__)

# mcreate accepts fewer than 2000 keys a call (REFERENCE.md).
_BATCH = 1000


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
            keys = [check_key(key) for key, _ in batch]
            try:
                buffers = self._client.mcreate(keys, [len(data) for _, data in batch])
                for buffer, (_, data) in zip(buffers, batch):
                    buffer.MutableData()[:] = data
                self._client.mset_buffer(buffers)
            except RuntimeError as exc:
                raise TierError(f"storing {keys[0]}.. ({len(keys)} keys) failed: {exc}") from None

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
