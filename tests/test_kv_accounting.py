"""The App's KV accounting against real yr actors standing in for replicas and the Router, and a real
data system worker: blocks beyond the capacity are deleted, least recently used first, and the Router
gets the totals."""

from __future__ import annotations

import pytest
import yr

from app.config import KVConfig
from app.control.kv_accounting import KVAccountant
from app.kv.ledger import KVStats
from app.kv.store import BlockStore

pytestmark = pytest.mark.usefixtures("app")  # its yr runtime (local mode): actors are threads here


@yr.instance
class FakeReplica:
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def queue(self, lines: list[dict]) -> None:
        self.lines += lines

    def kv_journal(self) -> list[dict]:
        lines, self.lines = self.lines, []
        return lines


@yr.instance
class FakeRouter:
    def __init__(self) -> None:
        self.stats: KVStats | None = None

    def record_kv(self, stats: KVStats) -> None:
        self.stats = stats

    def last(self) -> KVStats | None:
        return self.stats


class OneReplica:
    def __init__(self, actor) -> None:
        self.actor = actor

    def serving(self) -> dict:
        return {"r1": self.actor}


def test_blocks_beyond_the_capacity_are_deleted_least_recently_used_first(ds_worker):
    store = BlockStore(ds_worker.address, timeout_ms=1000, ttl_s=0)
    keys = [f"yrllm_kv_accounting_{i}" for i in range(4)]
    store.put(keys, 1000, lambda _, out: out.__setitem__(slice(None), b"\0" * len(out)))
    replica, router = FakeReplica.invoke(), FakeRouter.invoke()
    accountant = KVAccountant(KVConfig(), capacity_gb=3000 / 1e9, scaler=OneReplica(replica), router=router,
                              ds_address=ds_worker.address)
    try:
        yr.get(replica.queue.invoke([{"op": "stored", "keys": keys[:3], "bytes": 3000, "seconds": 0.01},
                                     {"op": "loaded", "keys": keys[:1], "bytes": 1000, "seconds": 0.01},
                                     {"op": "stored", "keys": keys[3:], "bytes": 1000, "seconds": 0.01}]))
        accountant.account()
        # keys[0] was loaded after keys[1] was stored: keys[1] is the least recently used.
        assert store.present_prefix(keys[1:2]) == 0
        assert [store.present_prefix([key]) for key in keys[:1] + keys[2:]] == [1, 1, 1]
        stats = yr.get(router.last.invoke())
        assert (stats.blocks_stored, stats.blocks_loaded, stats.blocks_evicted, stats.resident_bytes) == (4, 1, 1, 3000)
    finally:
        store.delete(keys)
        replica.terminate()
        router.terminate()
