"""The App's account of the KV blocks in the data system: what is there, how recently it was used,
and what the replicas' connectors did (``KVStats``, behind ``/metrics`` and ``/status``).

Eviction is least recently used: storing or loading a block makes it the most recent. Beyond the
capacity the least recent blocks are handed back for deletion. The account follows the journals, so
it runs behind the engines by up to one accounting interval: the bound is soft by that much. The hard
bounds are the data system's: KV blocks are evictable objects with a TTL, and the weights are not
evictable.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

from pydantic import BaseModel, Field

from app.kv.journal import HandoffResult, KVOp


class KVStats(BaseModel):
    """Totals since the App started, over every replica."""

    lookups: int = 0  # prompts with at least one full block the engine did not hold itself
    hits: int = 0  # lookups that found at least one block
    hit_tokens: int = 0
    blocks_stored: int = 0
    bytes_stored: int = 0
    blocks_not_stored: int = 0  # data system full or gone
    blocks_loaded: int = 0
    bytes_loaded: int = 0
    blocks_load_failed: int = 0  # found but not usable (evicted meanwhile, corrupt, unreachable): recomputed
    blocks_evicted: int = 0
    lookup_seconds: float = 0.0
    store_seconds: float = 0.0
    load_seconds: float = 0.0
    resident_blocks: int = 0
    resident_bytes: int = 0
    capacity_bytes: int = 0
    # Decode requests by what they found of the prompt's KV their prefill handed over (HandoffResult;
    # load_failed counts requests among the others whose load then failed).
    handoffs: dict[str, int] = Field(default_factory=lambda: {result.value: 0 for result in HandoffResult})

    @property
    def misses(self) -> int:
        return self.lookups - self.hits


class KVLedger:
    def __init__(self, capacity_bytes: int) -> None:
        self._blocks: OrderedDict[str, int] = OrderedDict()  # key -> object size, least recent first
        self._bytes = 0  # the sum of the sizes in _blocks
        self.stats = KVStats(capacity_bytes=capacity_bytes)

    def ingest(self, lines: Iterable[dict[str, Any]]) -> None:
        stats = self.stats
        for line in lines:
            op, keys = KVOp(line["op"]), line.get("keys", [])
            if op is KVOp.LOOKUP:
                stats.lookups += 1
                stats.hits += line["blocks"] > 0
                stats.hit_tokens += line["tokens"]
                stats.lookup_seconds += line["seconds"]
            elif op is KVOp.STORED:
                stats.blocks_stored += len(keys)
                stats.bytes_stored += line["bytes"]
                stats.store_seconds += line["seconds"]
                self._touch(keys, line["bytes"] // max(len(keys), 1))
            elif op is KVOp.LOADED:
                stats.blocks_loaded += len(keys)
                stats.bytes_loaded += line["bytes"]
                stats.load_seconds += line["seconds"]
                self._touch(keys, line["bytes"] // max(len(keys), 1))
            elif op is KVOp.NOT_STORED:
                stats.blocks_not_stored += len(keys)
            elif op is KVOp.LOAD_FAILED:
                stats.blocks_load_failed += len(keys)
                self._drop(keys)  # deleted by the connector, or gone already
            elif op is KVOp.HANDOFF:
                stats.handoffs[HandoffResult(line["result"]).value] += 1
        self._count()

    def evictions(self) -> list[str]:
        """Forget the least recent blocks until the rest fit the capacity; returns their keys, to
        delete."""
        evicted = []
        while self._bytes > self.stats.capacity_bytes and self._blocks:
            key, size = self._blocks.popitem(last=False)
            self._bytes -= size
            evicted.append(key)
        self.stats.blocks_evicted += len(evicted)
        self._count()
        return evicted

    def forget_all(self) -> None:
        """The data system lost every object (its worker restarted)."""
        self._blocks.clear()
        self._bytes = 0
        self._count()

    def _touch(self, keys: list[str], size: int) -> None:
        for key in keys:
            self._bytes += size - self._blocks.get(key, 0)
            self._blocks[key] = size
            self._blocks.move_to_end(key)

    def _drop(self, keys: list[str]) -> None:
        for key in keys:
            self._bytes -= self._blocks.pop(key, 0)

    def _count(self) -> None:
        self.stats.resident_blocks = len(self._blocks)
        self.stats.resident_bytes = self._bytes
