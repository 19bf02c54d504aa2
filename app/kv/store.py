"""KV blocks in the data system: the connector's only way to it.

Blocks are written evictable (``WriteMode.NONE_L2_CACHE_EVICT``) with a TTL: when the worker runs
short of memory it drops KV blocks, oldest write first, never the weights (written non-evictable);
and a block nobody accounts for any more (its writer died before the App read its journal) expires.
If only the weights are left, a write fails as "out of memory" after the client's retries (about
the request timeout, ``kv.timeout_ms``): the store then stores nothing for ``retry_s``
(``StoreFull``). A data system that cannot be reached is not an error here: the store reports
``StoreUnavailable``, the connector recomputes, and the next call after ``retry_s`` tries again (a
restarted worker comes back on the same port).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from app.datasystem_keys import check_key

logger = logging.getLogger("vllm.yrllm.kv")  # under vllm.: the engine's logging prints it

# exist and get take up to 10,000 keys; mcreate fewer than 2,000 (REFERENCE.md).
_BATCH = 1000


class StoreUnavailable(RuntimeError):
    """The data system did not answer; nothing was stored or loaded."""


class StoreFull(StoreUnavailable):
    """The data system has no room that KV may take (the weights are not evictable)."""


class BlockStore:
    def __init__(self, address: str, timeout_ms: int, ttl_s: int, retry_s: float = 5.0) -> None:
        self._address = address
        self._timeout_ms = timeout_ms
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._client = None
        self._down_until = 0.0
        self._full_until = 0.0

    def _connected(self):
        if self._client is not None:
            return self._client
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"the data system at {self._address} is down; retrying later")
        from yr.datasystem import KVClient

        host, _, port = self._address.rpartition(":")
        client = KVClient(host, int(port), connect_timeout_ms=self._timeout_ms, req_timeout_ms=self._timeout_ms)
        try:
            client.init()
        except RuntimeError as exc:
            self._failed(exc)
        self._client = client
        return client

    def _failed(self, exc: Exception) -> None:
        self._client = None
        self._down_until = time.monotonic() + self._retry_s
        logger.warning("data system at %s unavailable (%s); KV blocks are recomputed for %.0f s",
                       self._address, str(exc).splitlines()[0], self._retry_s)
        raise StoreUnavailable(str(exc)) from None

    def present_prefix(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are stored (up to the first one missing)."""
        client = self._connected()
        count = 0
        for start in range(0, len(keys), _BATCH):
            try:
                flags = client.exist(list(keys[start:start + _BATCH]))
            except RuntimeError as exc:
                self._failed(exc)
            for flag in flags:
                if not flag:
                    return count
                count += 1
        return count

    def get(self, keys: Sequence[str]) -> list[memoryview | None]:
        """Zero-copy read-only views of the blocks; None for a block that is gone (evicted)."""
        client = self._connected()
        views: list[memoryview | None] = []
        for start in range(0, len(keys), _BATCH):
            batch = list(keys[start:start + _BATCH])
            try:
                buffers = client.get_read_only_buffers(batch)
            except RuntimeError as exc:
                if "Key not found" not in str(exc):  # raised when none of the batch exists
                    self._failed(exc)
                buffers = [None] * len(batch)
            views += [None if buffer is None else buffer.immutable_data() for buffer in buffers]
        return views

    def put(self, keys: Sequence[str], size: int, fill: Callable[[int, memoryview], None]) -> None:
        """Store ``len(keys)`` objects of ``size`` bytes; ``fill(i, buffer)`` writes object i. Each
        object appears whole or not at all (a reader never sees a half-written block)."""
        from yr.datasystem import WriteMode

        if time.monotonic() < self._full_until:
            raise StoreFull("the data system was full moments ago")
        client = self._connected()
        for start in range(0, len(keys), _BATCH):
            batch = [check_key(key) for key in keys[start:start + _BATCH]]
            try:
                buffers = client.mcreate(batch, [size] * len(batch), WriteMode.NONE_L2_CACHE_EVICT, self._ttl_s)
                for offset, buffer in enumerate(buffers):
                    fill(start + offset, buffer.MutableData())
                client.mset_buffer(buffers)
            except RuntimeError as exc:
                if "Out of memory" in str(exc):
                    # Only non-evictable objects (weights) are left. The client retried for its timeout:
                    # do not make every step pay that again; loads go on meanwhile.
                    self._full_until = time.monotonic() + self._retry_s
                    raise StoreFull(str(exc).splitlines()[0]) from None
                self._failed(exc)

    def refresh(self, keys: Sequence[str]) -> None:
        """Restart the TTL of blocks that were just used. Best effort: a block that expired meanwhile
        is simply gone, and a data system that does not answer fails the next real call anyway."""
        client = self._client  # the blocks were just read through it; never reconnects, never raises
        if not self._ttl_s or client is None:
            return
        for start in range(0, len(keys), _BATCH):
            try:
                client.expire(list(keys[start:start + _BATCH]), self._ttl_s)
            except RuntimeError:
                return

    def delete(self, keys: Sequence[str]) -> None:
        client = self._connected()
        for start in range(0, len(keys), _BATCH):
            try:
                client.delete(list(keys[start:start + _BATCH]))
            except RuntimeError as exc:
                self._failed(exc)
