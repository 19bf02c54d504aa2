"""The replica set and the scalings that change it, one at a time.

Replicas come in pools, one per role: ``merged`` in merged mode, ``prefill`` and ``decode`` in
disaggregated mode. A scaling sets the size of one or more pools (``targets``); the others keep theirs.
Scale-out: per new replica, a node (the one with the fewest replicas), a ``Prefill`` or ``Decode``
actor there, a weight plan from the WeightCache for that node, the engine started with it, a first
token, then the Router routes to it. New replicas start in parallel, whatever
their role. Scale-in: the replica leaves the Router's pool, its in-flight requests finish (drain), then
it stops. Zero is a size like any other: the weights stay in the data system and the zygote stays
warm, and ``wake`` brings the pools at zero back when the Router holds a request for them. Every
scaling answers with a ``ScaleReport``. The Scaler remembers the sizes last asked for (``desired``): the
``Supervisor`` takes failed replicas out (``fail``) and scales back to them, never above zero for a
pool scaled to zero on purpose.

The module is long because scale-out, scale-in, failure and wake-up all change one replica table, under
one lock and one turn, and belong together.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from app.config import MAX_REPLICAS
from app.control.event_log import EventLog
from app.control.placement import least_loaded
from app.control.scale_report import PoolChange, ReplicaReport, ScaleReport
from app.control.weight_client import WeightCacheClient
from app.engine.spec import EngineSpec
from app.events import EventKind
from app.replica import Node, ReplicaInfo, ReplicaState, Role
from app.weights.load_report import LoadReport

logger = logging.getLogger(__name__)

# Replicas leave in this order on scale-in: those that cannot serve first, then the newest.
_SCALE_IN_ORDER = {ReplicaState.FAILED: 0, ReplicaState.PENDING: 1, ReplicaState.LOADING: 2,
                   ReplicaState.DRAINING: 3, ReplicaState.READY: 4}
# Replica ids say their role: r1 serves whole requests, p2 prefills, d3 decodes.
_ID_PREFIX = {Role.MERGED: "r", Role.PREFILL: "p", Role.DECODE: "d"}


@dataclass
class _Replica:
    replica_id: str
    actor: Any  # the Prefill or Decode actor's handle
    info: ReplicaInfo
    seq: int
    serving: bool = False  # published to the Router as ready: from now on, supervised


class Scaler:
    """Owns the replicas. ``scale`` waits for its turn; ``scale_if_idle`` does not (the autoscaler)."""

    def __init__(self, new_spec: Callable[[str, Role, Node], EngineSpec], router: Any,
                 weights: WeightCacheClient | None, drain_timeout_s: float, events: EventLog,
                 nodes: list[Node], roles: tuple[Role, ...] = (Role.MERGED,)) -> None:
        self._new_spec = new_spec  # (replica id, role, node) -> its EngineSpec
        self._nodes = nodes  # where replicas go; in cluster mode an actor's host may choose another
        self._cut_off: set[str] = set()  # nodes the driver cannot reach now: no replica goes there
        self._router = router
        self._weights = weights  # None: weights.enabled is off, vLLM's own loader
        self._drain_timeout_s = drain_timeout_s
        self._events = events
        self.roles = roles  # the pools of this App's mode
        self.desired: dict[Role, int] = dict.fromkeys(roles, 0)  # the sizes last asked for
        self.last_wake: ScaleReport | None = None  # what the last wake-up from zero did
        self._replicas: dict[str, _Replica] = {}
        self._stopping: list[threading.Thread] = []  # failed replicas being stopped
        self._seq = itertools.count(1)
        self._lock = threading.Lock()  # guards _replicas and _cut_off
        self._turn = threading.Lock()  # one scaling at a time

    def set_node_reachable(self, node: str, reachable: bool) -> None:
        """A node was cut off (no new replica goes there) or is back."""
        with self._lock:  # heard from the node watch's threads
            (self._cut_off.discard if reachable else self._cut_off.add)(node)

    def counts(self) -> dict[Role, int]:
        """Replicas per role, whatever their state."""
        with self._lock:
            roles = [r.info.role for r in self._replicas.values()]
        return {role: roles.count(role) for role in self.roles}

    @property
    def busy(self) -> bool:
        return self._turn.locked()

    @property
    def short(self) -> bool:
        """Some pool has fewer replicas than were asked for (one failed)."""
        counts = self.counts()
        return any(counts[role] < wanted for role, wanted in self.desired.items())

    def scale(self, targets: Mapping[Role, int]) -> ScaleReport:
        """Set the size of the pools in ``targets``. Returns when the new replicas serve (or failed) and
        removed replicas have finished their in-flight requests and stopped."""
        self._check(targets)
        with self._turn:
            return self._scale(targets)

    def scale_if_idle(self, targets: Mapping[Role, int], on_turn: Callable[[], None]) -> ScaleReport | None:
        """As ``scale``, unless a scaling is under way: then None at once. ``on_turn`` runs once the
        turn is taken, before anything changes."""
        self._check(targets)
        if not self._turn.acquire(blocking=False):
            return None
        try:
            on_turn()
            return self._scale(targets)
        finally:
            self._turn.release()

    def wake(self, replicas: int) -> ScaleReport | None:
        """A request waits at zero: bring every pool that was scaled to zero back to ``replicas``, after the
        scaling under way if there is one (it may be the scale to zero itself). None if no pool is at zero
        any more (an autoscaler or a manual scaling came first; a pool still being healed is the
        Supervisor's)."""
        with self._turn:
            targets = {role: replicas for role, wanted in self.desired.items() if wanted == 0}
            if not targets:
                return None
            report = self.last_wake = self._scale(targets)
        pools = ", ".join(role.value for role in targets)
        self._events.record(EventKind.WOKEN, "pools", f"a request arrived at zero: {pools} "
                            f"{report.replicas_before} -> {report.replicas_after} replicas in {report.seconds:.2f} s"
                            + ("" if report.ok else " (with errors; the Supervisor retries)"))
        return report

    def _check(self, targets: Mapping[Role, int]) -> None:
        for role, replicas in targets.items():
            if role not in self.roles:
                raise ValueError(f"this App has no {role.value} pool; its pools: {[r.value for r in self.roles]}")
            if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= MAX_REPLICAS:
                raise ValueError(f"{role.value} replicas must be an integer between 0 and {MAX_REPLICAS}, "
                                 f"got {replicas!r}")

    def infos(self) -> list[ReplicaInfo]:
        """Every replica as the Router sees it, whatever its state."""
        with self._lock:
            return [r.info for r in self._replicas.values()]

    def serving(self) -> dict[str, Any]:
        """The replicas the Router routes to: replica id -> its actor (for the Supervisor)."""
        with self._lock:
            return {r.replica_id: r.actor for r in self._replicas.values()
                    if r.serving and r.info.state is ReplicaState.READY}

    def fail(self, replica_id: str, reason: str) -> bool:
        """Take a serving replica that died or hangs out of the Router at once; whatever is left of it
        is stopped with no grace, beside, so that its replacement need not wait. False if it is not
        serving any more (scaled in meanwhile)."""
        with self._lock:
            replica = self._replicas.get(replica_id)
            if replica is None or not replica.serving or replica.info.state is not ReplicaState.READY:
                return False
            del self._replicas[replica_id]
        self._publish()
        self._events.record(EventKind.REPLICA_FAILED, replica_id, reason)
        stopping = threading.Thread(target=self._stop, args=(replica, 0.0), name=f"stop-{replica_id}", daemon=True)
        stopping.start()
        self._stopping = [thread for thread in self._stopping if thread.is_alive()] + [stopping]
        return True

    def stop_all(self) -> None:
        """Stop every replica at once, without draining (shutdown)."""
        with self._lock:
            replicas = list(self._replicas.values())
            self._replicas.clear()
        for replica in replicas:
            self._stop(replica)
        for stopping in self._stopping:
            stopping.join(timeout=120)

    def _scale(self, targets: Mapping[Role, int]) -> ScaleReport:
        self.desired.update(targets)
        started = time.time()
        before = self.counts()
        adds = [role for role, wanted in self.desired.items() for _ in range(wanted - before[role])]
        reports = []
        if adds:
            with ThreadPoolExecutor(max_workers=len(adds), thread_name_prefix="scale-out") as pool:
                with self._lock:
                    placed = [r.info.node for r in self._replicas.values()]
                    reachable = [node for node in self._nodes if node.name not in self._cut_off]
                if not reachable:
                    raise RuntimeError(f"every node is cut off ({', '.join(sorted(self._cut_off))}); "
                                       "no replica can be placed")
                reports = list(pool.map(self._add, adds, least_loaded(reachable, placed, len(adds))))
        for role, wanted in self.desired.items():
            reports += self._remove(role, before[role] - wanted)
        with self._lock:
            ready = [r.info.role for r in self._replicas.values() if r.info.state is ReplicaState.READY]
        report = ScaleReport(pools={role: PoolChange(requested=wanted, before=before[role], after=ready.count(role))
                                    for role, wanted in self.desired.items()},
                             seconds=round(time.time() - started, 3), replicas=reports)
        logger.info("%s", report)
        return report

    # ---- scale-out -----------------------------------------------------------------------------------

    def _add(self, role: Role, node: Node) -> ReplicaReport:
        import yr

        from actors.decode import Decode
        from actors.prefill import Prefill

        requested = time.time()
        seq = next(self._seq)
        replica_id = f"{_ID_PREFIX[role]}{seq}"
        spec = self._new_spec(replica_id, role, node)
        actor_class = Decode if role is Role.DECODE else Prefill
        actor = actor_class.options(yr.InvokeOptions(concurrency=4)).invoke(spec)
        replica = _Replica(replica_id, actor, ReplicaInfo(replica_id=replica_id, role=role, node=node.name,
                                                          state=ReplicaState.LOADING), seq)
        with self._lock:
            self._replicas[replica_id] = replica
        self._publish()  # visible as loading in /status; routed to once ready
        error = None
        try:
            node = yr.get(actor.node.invoke()) or node  # cluster mode: the actor's host may have its own
            plan = self._weights.plan(replica_id, node, spec.load_report_path, spec.tensor_parallel) \
                if self._weights else None
            # No yr.get timeout: in local mode it returns None instead of raising. The engine host
            # enforces engine.start_timeout_s itself.
            replica.info = yr.get(actor.start.invoke(plan))
            yr.get(actor.first_token.invoke())
        except Exception as exc:  # noqa: BLE001 - reported, and the replica is removed
            error = f"{type(exc).__name__}: {exc}"
            logger.error("replica %s failed to start: %s", replica_id, error)
        if error is None:
            replica.serving = True
            self._publish()  # routed to from now on; what follows is bookkeeping
        timeline = {"requested": requested, **_ask(actor.timeline, {})}
        launch = _ask(actor.launch_report, None)
        weights = self._settle_weights(actor, replica_id, failed=error is not None)
        if weights is not None:
            timeline["weights_loaded"] = weights.finished_at
        if error is not None:
            self._stop(replica, grace_s=5)
            with self._lock:
                self._replicas.pop(replica_id, None)
        state = ReplicaState.FAILED if error is not None else replica.info.state
        return ReplicaReport(replica_id=replica_id, role=role, node=replica.info.node, action="added", state=state,
                             timeline=timeline, launch=launch, weights=weights, error=error)

    def _settle_weights(self, actor: Any, replica_id: str, failed: bool) -> LoadReport | None:
        import yr

        try:
            report = yr.get(actor.load_report.invoke())
        except Exception:  # noqa: BLE001 - the report is informative; serving goes on without it
            logger.exception("could not collect the load report of %s", replica_id)
            report = None
        if self._weights is not None:
            retired = self._weights.settle(replica_id, report, failed)
            if retired is not None:
                self._events.record(EventKind.CACHE_ENTRY_RETIRED, self._weights.identity.fingerprint, retired)
        return report

    # ---- scale-in ------------------------------------------------------------------------------------

    def _remove(self, role: Role, count: int) -> list[ReplicaReport]:
        import yr

        if count <= 0:
            return []
        with self._lock:
            victims = sorted((r for r in self._replicas.values() if r.info.role is role),
                             key=lambda r: (_SCALE_IN_ORDER[r.info.state], -r.seq))[:count]
            for replica in victims:  # under the lock: the Supervisor fails only READY replicas
                replica.info = replica.info.model_copy(update={"state": ReplicaState.DRAINING})
        reports = []
        for replica in victims:
            requested = time.time()
            drained = yr.get(self._router.drain.invoke(replica.replica_id, self._drain_timeout_s))
            drained_at = time.time()
            self._stop(replica)
            with self._lock:
                self._replicas.pop(replica.replica_id, None)
            self._publish()
            reports.append(ReplicaReport(
                replica_id=replica.replica_id, role=role, node=replica.info.node, action="removed",
                state=ReplicaState.STOPPED,
                timeline={"requested": requested, "drained": drained_at, "stopped": time.time()},
                error=None if drained else f"in-flight requests did not finish within "
                                           f"{self._drain_timeout_s:.0f} s"))
        return reports

    def _stop(self, replica: _Replica, grace_s: float = 30.0) -> None:
        import yr

        if self._weights is not None:
            self._weights.release(replica.replica_id)
        try:
            yr.get(replica.actor.stop.invoke(grace_s), timeout=120)
        except Exception:  # noqa: BLE001 - the actor is terminated below regardless
            logger.exception("stopping replica %s failed", replica.replica_id)
        try:
            replica.actor.terminate()
        except Exception:  # noqa: BLE001
            logger.exception("terminating replica %s failed", replica.replica_id)

    def _publish(self) -> None:
        """Hand the replica table to the Router."""
        import yr

        yr.get(self._router.update_replicas.invoke(self.infos()))


def _ask(method: Any, default: Any) -> Any:
    """An informative call to a replica's actor; ``default`` if it cannot answer (it is gone)."""
    import yr

    try:
        answer = yr.get(method.invoke(), timeout=30)
    except Exception:  # noqa: BLE001 - a dead actor has nothing to tell
        return default
    return default if answer is None else answer  # local mode answers None on a timeout
