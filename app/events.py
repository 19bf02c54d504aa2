"""What the App's supervision noticed and did, as the log, ``/status`` and ``/metrics`` show it."""

from __future__ import annotations

import time
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class EventKind(str, Enum):
    REPLICA_FAILED = "replica_failed"  # its process exited, or it failed its health checks
    REPLICA_REPLACED = "replica_replaced"  # the desired count is ready again
    REPLACEMENT_FAILED = "replacement_failed"  # a replacement did not start; retried with backoff
    DS_WORKER_DIED = "ds_worker_died"  # local mode: the App's data system worker exited
    DS_WORKER_RESTARTED = "ds_worker_restarted"
    DS_WORKER_RESTART_FAILED = "ds_worker_restart_failed"  # not retried: replicas load from disk
    DS_UNREACHABLE = "ds_unreachable"  # cluster mode: the data system stopped accepting connections
    DS_REACHABLE = "ds_reachable"  # cluster mode: it accepts them again
    NODE_UNREACHABLE = "node_unreachable"  # local nodes: a node's worker stopped answering the driver (cut off)
    NODE_REJOINED = "node_rejoined"  # it answers again; its weight copies were checked
    CACHE_ENTRY_RETIRED = "cache_entry_retired"  # a cached weight entry could not serve; next replica reseeds
    ZYGOTE_DIED = "zygote_died"  # engine processes are spawned until it is back
    ZYGOTE_RESTARTED = "zygote_restarted"  # importing again; forks resume once it is ready
    WOKEN = "woken"  # a request arrived while pools were at zero: they were scaled back up


class Event(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: EventKind
    subject: str = Field(description="A replica id, 'ds-worker', 'zygote', 'pools' or a weight fingerprint.")
    reason: str
    at: float = Field(default_factory=time.time)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.subject}: {self.reason}"
