"""The Supervisor's cluster-mode watch on a data system it does not own (no engine, no cluster: a
socket stands in for the worker's port). Replica supervision and the local worker's restart are
tested on the real App (test_healing.py)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from app.config import RuntimeMode, SupervisionConfig
from app.control.supervisor import Supervisor
from app.events import EventKind


@dataclass
class NoReplicas:
    """A Scaler with nothing to supervise or heal."""

    desired: int = 0
    count: int = 0
    busy: bool = False

    def serving(self) -> dict:
        return {}


@dataclass
class ClusterRuntime:
    ds_address: str
    mode: RuntimeMode = RuntimeMode.CLUSTER


@dataclass
class Recorder:
    events: list[tuple[EventKind, str, str]] = field(default_factory=list)

    def record(self, kind: EventKind, subject: str, reason: str) -> None:
        self.events.append((kind, subject, reason))


def wait_for_events(recorder: Recorder, count: int, timeout_s: float = 10.0) -> list[EventKind]:
    deadline = time.monotonic() + timeout_s
    while len(recorder.events) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return [kind for kind, _, _ in recorder.events]


def test_losing_and_regaining_a_cluster_data_system_is_reported_once_each():
    worker = socket.create_server(("127.0.0.1", 0))
    port = worker.getsockname()[1]
    recorder = Recorder()
    config = SupervisionConfig(interval_s=0.05, health_check_interval_s=0.1, health_check_timeout_s=0.5)
    supervisor = Supervisor(config, NoReplicas(), ClusterRuntime(f"127.0.0.1:{port}"), None, recorder)
    supervisor.start()
    try:
        time.sleep(0.5)
        assert recorder.events == []  # reachable: nothing to say
        worker.close()
        assert wait_for_events(recorder, 1) == [EventKind.DS_UNREACHABLE]
        assert f"127.0.0.1:{port} refuses connections; new replicas load from disk" in recorder.events[0][2]
        time.sleep(0.5)
        assert len(recorder.events) == 1  # reported once, not at every probe
        worker = socket.create_server(("127.0.0.1", port))
        assert wait_for_events(recorder, 2) == [EventKind.DS_UNREACHABLE, EventKind.DS_REACHABLE]
    finally:
        supervisor.stop()
        worker.close()
