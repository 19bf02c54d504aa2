"""What the App holds: its processes' memory as the kernel counts it (RSS, and PSS, which splits shared
pages among the processes that map them) and its bytes in the data system.

It is the figure that matters at zero replicas, when the App keeps only what makes the next start
fast: the weights in the data system, the zygote, the data system workers and the driver. Measured on
demand (``App.status()``) and every ``REPORT_INTERVAL_S`` for the Router's ``/status``.

Only this host's processes are measured: in cluster mode the engines and the data system workers run
elsewhere, and the footprint has the driver alone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from pydantic import BaseModel, Field, computed_field

from app.config import RuntimeMode
from app.replica import ReplicaInfo
from app.runtime.memory import ProcessMemory, descendants, memfd_bytes

if TYPE_CHECKING:
    from app.control.kv_accounting import KVAccountant
    from app.engine.zygote_client import Zygote
    from app.runtime.openyuanrong import Runtime

logger = logging.getLogger(__name__)

#: What the data system worker names the memfd of its shared memory.
DATA_SYSTEM_MEMFD = "datasystem"
#: How often the Router's copy is refreshed: reading smaps_rollup walks page tables (milliseconds per
#: process), so not on every /status call.
REPORT_INTERVAL_S = 5.0


class ProcessGroupFootprint(BaseModel):
    """One part of the App: a process, or a replica's engine processes (server, core, workers)."""

    name: str
    pids: list[int]
    rss_bytes: int
    pss_bytes: int  # without shared memory: the data system's pages are counted once, below
    shmem_pss_bytes: int  # its share of the shared memory it maps (a replica's mapped weights)


class Footprint(BaseModel):
    """What the App holds. ``pss_bytes`` counts each page once: the processes' own (private, and their
    share of the files they map) plus the data system's shared memory, whoever maps it, or nobody (at
    zero replicas the weights stay in memory that no process maps)."""

    measured_at: float = Field(default_factory=time.time)
    replicas: int
    parts: list[ProcessGroupFootprint]
    shared_memory_bytes: int  # the data system workers' shared memory in use (this host's workers)
    weights_bytes: int  # of which cached weights, every node's copy (the WeightCache's accounting)
    kv_bytes: int  # and KV blocks (the App's KV accounting)

    @computed_field
    def processes_pss_bytes(self) -> int:
        return sum(part.pss_bytes for part in self.parts)

    @computed_field
    def pss_bytes(self) -> int:
        return self.processes_pss_bytes + self.shared_memory_bytes

    @computed_field
    def pss_beside_weights_bytes(self) -> int:
        """What the App holds beside its cached weights."""
        return max(0, self.pss_bytes - self.weights_bytes)


def measure(parts: Iterable[tuple[str, list[int]]]) -> list[ProcessGroupFootprint]:
    """``parts``: (name, pids) of each part; a pid that is gone counts nothing."""
    groups = []
    for name, pids in parts:
        memories = [m for m in map(ProcessMemory.of, pids) if m is not None]
        if memories:
            groups.append(ProcessGroupFootprint(
                name=name, pids=[m.pid for m in memories], rss_bytes=sum(m.rss for m in memories),
                pss_bytes=sum(m.pss - m.pss_shmem for m in memories),
                shmem_pss_bytes=sum(m.pss_shmem for m in memories)))
    return groups


def app_footprint(runtime: "Runtime", zygote: "Zygote | None", replicas: list[ReplicaInfo],
                  weight_cache_stats: dict[str, Any] | None, kv: "KVAccountant | None") -> Footprint:
    """The parts of an App: the driver (in local mode the Router, the WeightCache and the engine actors
    are threads of it), and in local mode its data system workers, its zygote and each replica's engine
    processes (server, core, tensor-parallel workers). ``weight_cache_stats``: ``WeightCache.stats()``,
    None without a WeightCache."""
    parts = [("driver", [os.getpid()])]
    shared_memory = 0
    if runtime.mode is RuntimeMode.LOCAL:
        workers = {node: pid for node, pid in runtime.node_pids().items() if pid}
        parts += [(f"ds_worker {node}", [pid]) for node, pid in workers.items()]
        shared_memory = sum(memfd_bytes(pid, DATA_SYSTEM_MEMFD) for pid in workers.values())
        if zygote is not None:
            parts.append(("zygote", [zygote.pid]))
        parts += [(info.replica_id, [info.pid, *descendants(info.pid)]) for info in replicas if info.pid]
    return Footprint(replicas=len(replicas), parts=measure(parts), shared_memory_bytes=shared_memory,
                     weights_bytes=cached_weight_bytes(weight_cache_stats or {}),
                     kv_bytes=kv.resident_bytes() if kv is not None else 0)


def cached_weight_bytes(weight_cache_stats: dict[str, Any]) -> int:
    """The bytes of every ready copy of every entry, from ``WeightCache.stats()``."""
    return sum(entry["bytes"] * sum(state == "ready" for state in entry["nodes"].values())
               for entry in weight_cache_stats.get("entries", []))


class FootprintReporter:
    """Hands a fresh ``Footprint`` to the Router every ``REPORT_INTERVAL_S``. ``start`` once, ``stop``
    once."""

    def __init__(self, footprint: Callable[[], Footprint], router: Any) -> None:
        self._footprint = footprint
        self._router = router
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="app-footprint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        import yr

        while True:
            try:
                yr.get(self._router.record_footprint.invoke(self._footprint().model_dump()), timeout=30)
            except Exception:  # noqa: BLE001 - informative; the next round tries again
                logger.exception("could not measure or report the App's footprint")
            if self._stop.wait(REPORT_INTERVAL_S):
                return
