"""What every part of the App agrees on about one replica: its role, its lifecycle, where it listens."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict


class Role(str, Enum):
    """A replica's part in serving. MERGED serves whole requests (prefill and decode in one engine, the
    original case's PREFILL_INS_NUM=1, DECODE_INS_NUM=0); PREFILL and DECODE are the two halves of a
    disaggregated pair, handing the KV cache over through the data system."""

    MERGED = "merged"
    PREFILL = "prefill"
    DECODE = "decode"


class ReplicaState(str, Enum):
    """Lifecycle of an engine replica, in order. Only READY replicas receive new requests."""

    PENDING = "pending"  # actor created, engine not started yet
    LOADING = "loading"  # engine process starting, weights loading
    READY = "ready"  # serving
    DRAINING = "draining"  # no new requests; in-flight ones finish
    STOPPED = "stopped"  # engine gone, cleanly
    FAILED = "failed"  # engine died or never became ready

    @property
    def is_terminal(self) -> bool:
        return self in (ReplicaState.STOPPED, ReplicaState.FAILED)


class ReplicaInfo(BaseModel):
    """A replica as the Router and ``/status`` see it."""

    model_config = ConfigDict(frozen=True)

    replica_id: str
    role: Role = Role.MERGED
    state: ReplicaState
    node: str | None = None  # the node (data system worker) it runs on
    url: str | None = None
    pid: int | None = None
    log: str | None = None  # the engine process's log file
    launcher: str | None = None  # how its EngineCore was started: fork or spawn
    core_pid: int | None = None  # its forked EngineCore (fork launcher)
    tensor_parallel: int = 1  # ranks of its engine
    worker_pids: list[int] = []  # tensor parallel: one worker process per rank, in rank order
    failure: str | None = None  # FAILED: why (the exit code and the engine's last log line)


class Node(BaseModel):
    """Where a replica runs, as the data system sees it: the worker its engine talks to. A cluster has
    one per host; a local App has ``runtime.local_nodes`` of them on this host."""

    model_config = ConfigDict(frozen=True)

    name: str  # node1, node2, ... in local mode; the worker's HOST:PORT in cluster mode
    ds_address: str
    address: str | None = None  # runtime.node_network=netns: its own address, where its engines listen
    netns: str | None = None  # runtime.node_network=netns: the network namespace its processes run in
