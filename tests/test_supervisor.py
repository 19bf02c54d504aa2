"""The Supervisor against stand-ins (no engine, no cluster): its watch on a cluster data system it does
not own (a socket stands in for the worker's port), and its backoff on replacements that keep
failing. Replica supervision and the local worker's restart are tested on the real App
(test_healing.py)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from app.config import RuntimeMode, SupervisionConfig
from app.control.scale_report import PoolChange, ReplicaReport, ScaleReport
from app.control.supervisor import Supervisor
from app.events import EventKind
from app.replica import ReplicaState, Role


@dataclass
class NoReplicas:
    """A Scaler with nothing to supervise or heal."""

    desired: dict = field(default_factory=lambda: {Role.MERGED: 0})
    short: bool = False
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
    supervisor = Supervisor(config, NoReplicas(), ClusterRuntime(f"127.0.0.1:{port}"), None, None, recorder)
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


@dataclass
class FailingScaler(NoReplicas):
    """One replica is wanted and none serves; every scale-out fails to start it."""

    desired: dict = field(default_factory=lambda: {Role.MERGED: 1})
    short: bool = True
    attempts: list[float] = field(default_factory=list)

    def scale_if_idle(self, targets: dict, on_turn) -> ScaleReport:
        self.attempts.append(time.monotonic())
        failed = ReplicaReport(replica_id=f"r{len(self.attempts)}", action="added", state=ReplicaState.FAILED,
                               error="EngineFailed: engine exited with code 1 while starting")
        return ScaleReport(pools={role: PoolChange(requested=n, before=0, after=0) for role, n in targets.items()},
                           seconds=0.0, replicas=[failed])


def test_a_replacement_that_keeps_failing_is_retried_with_doubling_backoff():
    scaler, recorder = FailingScaler(), Recorder()
    config = SupervisionConfig(interval_s=0.05, replace_backoff_max_s=2.0)
    supervisor = Supervisor(config, scaler, ClusterRuntime("127.0.0.1:1"), None, None, recorder)
    supervisor.start()
    try:
        deadline = time.monotonic() + 15
        while len(scaler.attempts) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        supervisor.stop()
    # At once, after 1 s, after 2 s more (the cap): not at every tick. The upper bounds are loose.
    gaps = [later - earlier for earlier, later in zip(scaler.attempts, scaler.attempts[1:])]
    assert len(gaps) >= 2 and 0.9 < gaps[0] < 3.0 and 1.9 < gaps[1] < 4.0, gaps
    failures = [reason for kind, _, reason in recorder.events if kind is EventKind.REPLACEMENT_FAILED]
    assert failures[0] == "r1: EngineFailed: engine exited with code 1 while starting; retrying in 1 s"
    assert failures[1].endswith("retrying in 2 s") and failures[2].endswith("retrying in 2 s")
