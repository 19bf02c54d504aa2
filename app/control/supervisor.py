"""The Supervisor: keeps the App as it was asked to be, whatever dies.

- A serving replica whose engine process exited is noticed within ``interval_s``: each tick asks every
  replica's actor for its state, which reads the process, not HTTP (``EngineHost.info``).
- A replica that is alive but does not answer ``/health`` ``health_check_failures`` times in a row (a
  hung or SIGSTOPped engine) is declared failed too. Checks run on a pool of their own, so that a
  hanging one never delays the process checks of the others.
- Either way ``Scaler.fail`` takes it out of the Router at once and kills what is left of it; then a
  replacement starts through the normal scale-out path (weights from the cache), back to the count
  last asked for. A replacement that fails is retried with exponential backoff.
- Local mode: a data system worker (a node's) that died is restarted at the same address, and the
  WeightCache forgets what died with it: the entries that node was home to (the next replica seeds
  again) and its copies of the others (the next replica there fetches again). Cluster mode: the worker is
  not ours; losing and regaining it is reported, and replicas fall back to disk while it is gone.
- Local mode with several nodes: each node's worker is probed from the driver (``NodeWatch``). A node
  that stops answering (its link cut) gets no new replica and is no source of weights; its replicas
  fail their health checks and are replaced elsewhere. When it answers again, and after any worker
  restart, the WeightCache checks every copy key by key before the node is used again.

Every event goes to the log, ``/status`` and ``/metrics`` (``EventLog``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from app.config import RuntimeMode, SupervisionConfig
from app.control.event_log import EventLog
from app.control.kv_accounting import KVAccountant
from app.control.node_watch import NodeWatch
from app.control.scaling import Scaler
from app.control.weight_client import WeightCacheClient
from app.events import EventKind
from app.replica import Node, ReplicaState
from app.runtime.openyuanrong import Runtime
from app.runtime.processes import port_open

logger = logging.getLogger(__name__)

DS_WORKER = "ds-worker"


@dataclass
class _Health:
    failures: int = 0  # failed /health checks in a row
    next_check_at: float = 0.0
    pending: Future | None = None


class Supervisor:
    """``start`` once, ``stop`` once."""

    def __init__(self, config: SupervisionConfig, scaler: Scaler, runtime: Runtime,
                 weights: WeightCacheClient | None, kv: KVAccountant | None, events: EventLog) -> None:
        self._config = config
        self._scaler = scaler
        self._runtime = runtime
        self._weights = weights
        self._kv = kv
        self._events = events
        self._health: dict[str, _Health] = {}
        self._checks = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health-check")
        self._healing: threading.Thread | None = None
        self._ds_restart: threading.Thread | None = None
        self._backoff_s = 0.0
        self._next_heal_at = 0.0
        self._ds_reachable = True
        self._next_ds_probe_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="app-supervisor", daemon=True)
        several = runtime.mode is RuntimeMode.LOCAL and len(runtime.nodes) > 1
        self._nodes = NodeWatch(runtime.nodes, config.health_check_interval_s, config.health_check_timeout_s,
                                self._node_changed) if several else None

    def start(self) -> None:
        self._thread.start()
        if self._nodes is not None:
            self._nodes.start()

    def cut_off(self) -> set[str]:
        """The nodes whose worker does not answer the driver now."""
        return self._nodes.unreachable() if self._nodes is not None else set()

    def stop(self, timeout_s: float = 600.0) -> None:
        """Returns once the loop has ended and a replacement or restart under way has finished."""
        self._stop.set()
        if self._nodes is not None:
            self._nodes.stop()
        self._thread.join(timeout=timeout_s)
        for thread in (self._healing, self._ds_restart):
            if thread is not None:
                thread.join(timeout=timeout_s)
        self._checks.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self._config.interval_s):
            try:
                self._watch_data_system()
                self._watch_replicas()
                self._heal()
            except Exception:  # noqa: BLE001 - the supervisor must outlive whatever it watches
                logger.exception("supervision tick failed")

    # ---- replicas ------------------------------------------------------------------------------------

    def _watch_replicas(self) -> None:
        import yr

        serving = self._scaler.serving()
        for gone in set(self._health) - set(serving):
            del self._health[gone]
        states = {replica_id: actor.info.invoke() for replica_id, actor in serving.items()}
        now = time.monotonic()
        for replica_id, ref in states.items():
            try:
                info = yr.get(ref, timeout=10)
            except Exception as exc:  # noqa: BLE001 - an actor that cannot answer is a dead replica
                self._scaler.fail(replica_id, f"its actor does not answer: {_last_line(exc)}")
                continue
            if info is not None and info.state is ReplicaState.FAILED:
                self._scaler.fail(replica_id, info.failure or "engine process exited")
                continue
            self._check_health(replica_id, serving[replica_id], now)

    def _check_health(self, replica_id: str, actor: Any, now: float) -> None:
        health = self._health.setdefault(replica_id, _Health(next_check_at=now))
        if health.pending is not None and health.pending.done():
            error = _last_line(health.pending.exception())
            health.pending = None
            health.failures = 0 if error is None else health.failures + 1
            if error is not None:
                logger.warning("replica %s failed health check %d/%d: %s", replica_id, health.failures,
                               self._config.health_check_failures, error)
            if health.failures >= self._config.health_check_failures:
                self._scaler.fail(replica_id, f"failed {health.failures} health checks in a row, the "
                                  f"last: {error}")
                return
        if health.pending is None and now >= health.next_check_at:
            health.next_check_at = now + self._config.health_check_interval_s
            health.pending = self._checks.submit(self._ask_health, actor)

    def _ask_health(self, actor: Any) -> None:
        import yr

        timeout_s = self._config.health_check_timeout_s
        yr.get(actor.check_health.invoke(timeout_s), timeout=timeout_s + 10)

    def _heal(self) -> None:
        if self._healing is not None and self._healing.is_alive():
            return
        if self._ds_restart is not None and self._ds_restart.is_alive():
            return  # a replacement now would seed into a worker that is not there yet
        if self._scaler.busy or not self._scaler.short or time.monotonic() < self._next_heal_at:
            return
        self._healing = threading.Thread(target=self._replace, name="app-healing", daemon=True)
        self._healing.start()

    def _replace(self) -> None:
        desired = dict(self._scaler.desired)
        try:
            report = self._scaler.scale_if_idle(desired, lambda: None)
        except Exception as exc:  # noqa: BLE001 - retried with backoff
            report, error = None, f"{type(exc).__name__}: {exc}"
        else:
            if report is None:
                return  # another scaling took the turn; the next tick looks again
            failed = [r for r in report.replicas if r.action == "added" and r.state is not ReplicaState.READY]
            error = "; ".join(f"{r.replica_id}: {r.error}" for r in failed) or None
        if report is not None:
            for added in report.replicas:
                if added.action == "added" and added.state is ReplicaState.READY:
                    weights = added.weights.summary() if added.weights else "vLLM's own loader"
                    seconds = added.seconds_since_requested().get("first_token", report.seconds)
                    self._events.record(EventKind.REPLICA_REPLACED, added.replica_id,
                                        f"serving {seconds:.2f} s after it was requested, "
                                        f"{report.replicas_after}/{sum(desired.values())} replicas ready; "
                                        f"weights: {weights}")
        if error is None:
            self._backoff_s = 0.0
            return
        self._backoff_s = min(max(1.0, 2 * self._backoff_s), self._config.replace_backoff_max_s)
        self._next_heal_at = time.monotonic() + self._backoff_s
        self._events.record(EventKind.REPLACEMENT_FAILED, "replicas",
                            f"{error}; retrying in {self._backoff_s:.0f} s")

    # ---- the data system -----------------------------------------------------------------------------

    def _watch_data_system(self) -> None:
        if self._runtime.mode is RuntimeMode.LOCAL:
            if self._ds_restart is not None and self._ds_restart.is_alive():
                return
            dead = self._runtime.dead_nodes()
            if dead:
                self._ds_restart = threading.Thread(target=self._restart_workers, args=(dead,),
                                                    name="app-ds-restart", daemon=True)
                self._ds_restart.start()
        elif time.monotonic() >= self._next_ds_probe_at:
            self._next_ds_probe_at = time.monotonic() + self._config.health_check_interval_s
            host, _, port = (self._runtime.ds_address or "").rpartition(":")
            reachable = port_open(host, int(port), timeout_s=self._config.health_check_timeout_s)
            if reachable != self._ds_reachable:
                self._ds_reachable = reachable
                self._events.record(
                    EventKind.DS_REACHABLE if reachable else EventKind.DS_UNREACHABLE, DS_WORKER,
                    f"{self._runtime.ds_address} accepts connections again" if reachable else
                    f"{self._runtime.ds_address} refuses connections; new replicas load from disk")

    def _node_changed(self, node: Node, reachable: bool, seconds: float) -> None:
        if not reachable:
            self._scaler.set_node_reachable(node.name, False)
            if self._weights is not None:
                self._weights.set_reachable(node.name, False)
            self._events.record(EventKind.NODE_UNREACHABLE, node.name,
                                f"its worker {node.ds_address} does not answer; no replica goes there and no "
                                f"weights are read from there until it is back")
            return
        # Checked before it is a source again: the data system may have lost keys meanwhile.
        dropped = self._weights.revalidate() if self._weights is not None else []
        if self._weights is not None:
            self._weights.set_reachable(node.name, True)
        self._scaler.set_node_reachable(node.name, True)
        self._events.record(EventKind.NODE_REJOINED, node.name,
                            f"its worker answers again after {seconds:.1f} s cut off; weight copies "
                            + ("dropped: " + "; ".join(dropped) if dropped else "all complete"))

    def _restart_workers(self, dead: dict[str, int]) -> None:
        for node, code in dead.items():
            self._restart_worker(node, code)

    def _restart_worker(self, node: str, code: int) -> None:
        worker = DS_WORKER if len(self._runtime.nodes) == 1 else f"{node}'s worker"
        # Forget first: no replica may be planned onto objects that are gone.
        dropped = self._weights.forget_node(node) if self._weights is not None else 0
        if self._kv is not None:
            self._kv.forget_all()
        self._events.record(EventKind.DS_WORKER_DIED, DS_WORKER,
                            f"{worker} exited with code {code}; {dropped} cached weight entries died with it "
                            f"(serving replicas keep their mapped weights)")
        try:
            seconds = self._runtime.restart_node(node)
        except Exception as exc:  # noqa: BLE001 - reported; replicas then load from disk
            self._events.record(EventKind.DS_WORKER_RESTART_FAILED, DS_WORKER,
                                f"{worker}: {exc}; new replicas there load from disk")
            return
        address = next(n.ds_address for n in self._runtime.nodes if n.name == node)
        # A fresh worker joining can cost the others keys (REFERENCE.md): check what they hold.
        dropped = self._weights.revalidate() if self._weights is not None and len(self._runtime.nodes) > 1 else []
        self._events.record(EventKind.DS_WORKER_RESTARTED, DS_WORKER,
                            f"{worker} at {address} in {seconds:.1f} s; the next replica there seeds or "
                            f"fetches again" + (f"; weight copies dropped elsewhere: {'; '.join(dropped)}"
                                                if dropped else ""))


def _last_line(error: BaseException | None) -> str | None:
    """What an actor call raised, in one line: yr hands back the remote traceback as the message, whose
    last line is the exception itself (``app.engine.host.EngineFailed: no /health answer ...``)."""
    if error is None:
        return None
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
