"""The App: one program that starts the runtime, the Router, the WeightCache and the engine replicas,
scales them, and tears everything down, whatever happens.

It composes the control plane: ``Scaler`` (the replicas), ``Supervisor`` (healing what dies),
``Autoscaler`` (following the traffic), ``ScaleRequestServer`` (scaling over HTTP, and waking pools at
zero when a request arrives) and ``FootprintReporter`` (what the App holds). This module is their
lifecycle, nothing more.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from app.config import AppConfig, AutoscaleConfig, RuntimeMode, ServingMode
from app.control.autoscaler import Autoscaler
from app.control.event_log import EventLog
from app.control.footprint import Footprint, FootprintReporter, app_footprint
from app.control.kv_accounting import KVAccountant
from app.control.memory_plan import MemoryPlan, plan_memory
from app.control.scale_report import ScaleReport
from app.control.scale_requests import ScaleRequestServer
from app.control.scaling import Scaler
from app.control.supervisor import Supervisor
from app.control.weight_client import WeightCacheClient
from app.engine.spec import EngineSpec
from app.engine.tensor_parallel import check_tensor_parallel, kv_splits
from app.engine.zygote_client import Zygote, ZygoteUnavailable
from app.engine.zygotes import ZYGOTES
from app.events import EventKind
from app.kv.settings import ConnectorSettings
from app.replica import Node, Role
from app.runtime.openyuanrong import Runtime
from app.weights.identity import WeightIdentity, content_digest, installed_vllm_version
from app.weights.load_report import PlanKind
from app.weights.manifest import VerifyMode

logger = logging.getLogger(__name__)


class App:
    """Elastic LLM serving on openYuanrong actors.

    >>> with App(AppConfig.load()) as app:   # starts everything, stops everything
    ...     print(app.scale(3))               # two more replicas, weights from memory

    A disaggregated App (``mode: disaggregated``) scales its pools: ``app.scale(prefill=2, decode=3)``.
    """

    def __init__(self, config: AppConfig | None = None) -> None:
        self.config = config or AppConfig.load()
        self._runtime = Runtime(self.config.runtime)
        self._router: Any = None
        self._identity: WeightIdentity | None = None  # the weights' identity; KV keys build on it too
        self._weights: WeightCacheClient | None = None  # None: weights.enabled is off
        self._scaler: Scaler | None = None
        self._scale_requests: ScaleRequestServer | None = None
        self._autoscaler: Autoscaler | None = None
        self._supervisor: Supervisor | None = None
        self._footprint_reporter: FootprintReporter | None = None
        self._kv: KVAccountant | None = None  # None: kv.enabled is off
        self._zygote: Zygote | None = None  # the zygote of this App's engines, while it holds it
        self._events: EventLog | None = None
        self._kv_splits = 1  # objects per KV block: every pool's ranks read and write whole ones
        self._log_dir = Path(tempfile.mkdtemp(prefix="yrllm-logs-"))
        self.model_dir: Path | None = None
        self.served_model_name: str | None = None
        self.memory: MemoryPlan | None = None  # local mode: what the App needs, checked at start
        self.router_port: int | None = None
        self.start_report: ScaleReport | None = None  # what start() did to reach config.replicas

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "App":
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def _start(self) -> None:
        import yr

        from actors.router import Router
        from app.control.demo_model import demo_model_dir

        self.model_dir = self.config.model or demo_model_dir(self.config.demo_cache_dir)
        self.served_model_name = self.config.served_model_name or self.model_dir.name
        sizes = {role: self.config.tensor_parallel(role) for role in self.config.mode.roles}
        for role, size in sizes.items():  # before anything starts: a size that cannot fit is an error now
            check_tensor_parallel(self.model_dir, size,
                                  field=f"{'decode' if role is Role.DECODE else 'prefill'}.tensor_parallel")
        self._kv_splits = kv_splits(self.model_dir, set(sizes.values()))
        self.memory = plan_memory(self.config, self.model_dir)  # a host too small is an error now, not an OOM
        if self.memory:
            logger.info("memory plan: %s", self.memory.summary())
        # The zygote imports vLLM (~10 s of CPU) while the data system worker and the Router start.
        self._zygote = ZYGOTES.hold(self._engine_spec("zygote", Role.MERGED), self._zygote_event)
        self._runtime.start(self.memory.shared_memory_mb if self.memory else None)
        self._router = Router.options(yr.InvokeOptions(concurrency=8)).invoke(
            self.config.router, [self.served_model_name], self.config.mode)
        self.router_port = yr.get(self._router.start.invoke())
        self._identity = WeightIdentity(
            content=content_digest(self.model_dir, self.config.demo_cache_dir / "digests.json"),
            dtype=self.config.engine.dtype, quantization=None, vllm_version=installed_vllm_version())
        if self.config.weights.enabled:
            self._weights = self._start_weight_cache(self._identity)
        events = self._events = EventLog(self._router)
        self._scaler = Scaler(self._engine_spec, self._router, self._weights, self.config.router.drain_timeout_s,
                              events, self._runtime.nodes, self.config.mode.roles)
        self._scale_requests = ScaleRequestServer(self._router, self._scaler, self._wake_to)
        self._scale_requests.start()
        try:  # vLLM is imported before start() returns, so that no scale-out waits for it
            self._zygote.wait_ready()
        except ZygoteUnavailable as exc:
            logger.warning("engine processes are spawned until the zygote is ready: %s", exc)
        self.start_report = self._scaler.scale(self.config.pools)
        if not self.start_report.ok:
            raise RuntimeError(f"the App could not start its replicas:\n{self.start_report}")
        if self.config.kv.enabled and self._runtime.ds_address:
            self._kv = KVAccountant(self.config.kv, self.config.kv_capacity_gb, self._scaler, self._router,
                                   self._runtime.ds_address)
            self._kv.start()
        if self.config.supervision.enabled:
            self._supervisor = Supervisor(self.config.supervision, self._scaler, self._runtime, self._weights,
                                          self._kv, events)
            self._supervisor.start()
        if self.config.autoscale.enabled:
            self.autoscale(self.config.autoscale)
        self._footprint_reporter = FootprintReporter(self.footprint, self._router)
        self._footprint_reporter.start()
        # From now on a request that finds no ready replica is held and wakes its pool, not refused.
        yr.get(self._router.attach.invoke(True))

    def _start_weight_cache(self, identity: WeightIdentity) -> WeightCacheClient:
        import yr

        from actors.weight_cache import WeightCache

        weights = self.config.weights
        actor = WeightCache.options(yr.InvokeOptions(concurrency=16)).invoke(
            self._runtime.ds_address, weights.tier, PlanKind(weights.cpu_mode), VerifyMode(weights.verify),
            weights.timeout_ms, self.config.engine.start_timeout_s, weights.fanout)
        return WeightCacheClient(actor, identity)

    def _engine_spec(self, replica_id: str, role: Role, node: Node | None = None) -> EngineSpec:
        spec = EngineSpec.from_config(self.config, replica_id=replica_id, model=self.model_dir,
                                      served_model_name=self.served_model_name, log_dir=self._log_dir, role=role)
        kv = self.config.kv
        if kv.enabled and self._identity is not None and self._runtime.ds_address:
            spec = spec.model_copy(update={"kv_connector": ConnectorSettings(
                ds_address=self._runtime.ds_address, fingerprint=self._identity.fingerprint,
                journal=spec.kv_journal_path, timeout_ms=kv.timeout_ms, ttl_s=kv.ttl_s, splits=self._kv_splits)})
        if node is not None:
            spec = spec.on_node(node).model_copy(update={"node_from_host": self._runtime.mode is RuntimeMode.CLUSTER})
        return spec

    def _zygote_event(self, what: str, sentence: str) -> None:
        """The zygote died or was restarted (``app.engine.zygotes``): an event like the others."""
        if self._events is not None:
            self._events.record(EventKind.ZYGOTE_DIED if what == "died" else EventKind.ZYGOTE_RESTARTED,
                                "zygote", sentence)

    def shutdown(self) -> None:
        """Stop every replica, the Router, the runtime and the data system worker. Idempotent, and
        safe to call from a failed ``start``."""
        if self._router is not None:
            try:  # first: held requests are answered now, and no request wakes what is being stopped
                import yr

                yr.get(self._router.attach.invoke(False), timeout=30)
            except Exception:  # noqa: BLE001 - shutdown goes on
                logger.exception("could not detach the Router")
        self.autoscale(None)
        if self._footprint_reporter is not None:
            self._footprint_reporter.stop()
            self._footprint_reporter = None
        if self._supervisor is not None:
            self._supervisor.stop()  # first: nothing may be healed while it is being stopped
            self._supervisor = None
        if self._scale_requests is not None:
            self._scale_requests.stop()
            self._scale_requests = None
        if self._kv is not None:
            self._kv.stop()  # before the replicas go: their last journal lines are read
            self._kv = None
        if self._scaler is not None:
            self._scaler.stop_all()
        if self._zygote is not None:
            ZYGOTES.release(self._zygote, self._zygote_event)  # the last App to hold it stops it
            self._zygote = None
        if self._weights is not None:
            _finish_actor(self._weights.actor, "clear")  # frees the cached weights in the data system
            self._weights = None
        _finish_actor(self._router, "stop")
        self._router = None
        self._scaler = None
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
        if self._weights is not None:
            status["weight_cache"] = self._weights.stats()
        if self._zygote is not None:
            status["zygote"] = self._zygote.status()
        if self._scaler is not None:
            status["footprint"] = self._measure_footprint(status.get("weight_cache")).model_dump()
        return {"url": self.url if self.router_port else None, "model": self.served_model_name,
                "model_dir": str(self.model_dir) if self.model_dir else None,
                "runtime": self._runtime.mode.value, "runtime_ready_at": self._runtime.ready_at,
                "ds_address": self._runtime.ds_address, "ds_worker_pid": self._runtime.worker_pid,
                "nodes": self._runtime.node_status(self._supervisor.cut_off() if self._supervisor else set()),
                "memory_plan": self.memory.model_dump() if self.memory else None,
                "logs": str(self._log_dir), **status}

    def set_link(self, node: str, up: bool) -> None:
        """netns nodes: cut ``node``'s link (a partition; its processes run on) or restore it. For drills."""
        if self._runtime.network is None:
            raise RuntimeError("only nodes of runtime.node_network=netns have links to cut")
        self._runtime.network.set_link(node, up)

    def footprint(self) -> Footprint:
        """What the App holds now: its processes on this host (RSS, PSS) and its bytes in the data system."""
        return self._measure_footprint(self._weights.stats() if self._weights is not None else None)

    def _measure_footprint(self, weight_cache: dict[str, Any] | None) -> Footprint:
        return app_footprint(self._runtime, self._zygote, self._scaler.infos() if self._scaler else [],
                             weight_cache, self._kv)

    # ---- scaling ---------------------------------------------------------------------------------

    def scale(self, replicas: int | None = None, *, prefill: int | None = None,
              decode: int | None = None) -> ScaleReport:
        """Set the number of replicas: ``scale(n)`` in merged mode, ``scale(prefill=n, decode=m)`` (either
        or both) in disaggregated mode. Returns when the new replicas serve (or failed) and removed
        replicas have finished their in-flight requests and stopped."""
        if self._scaler is None:
            raise RuntimeError("the App is not started")
        return self._scaler.scale(_targets(self.config.mode, replicas, prefill, decode))

    @property
    def last_wake(self) -> ScaleReport | None:
        """What the last wake-up from zero did: why a first request after zero took as long as it did."""
        return self._scaler.last_wake if self._scaler is not None else None

    def autoscale(self, config: AutoscaleConfig | None) -> None:
        """Follow the traffic with ``config`` (``enabled`` is implied), or stop following it (None).
        Manual ``scale()`` keeps working beside it."""
        if self._autoscaler is not None:
            self._autoscaler.stop()  # a scaling under way finishes first
            self._autoscaler = None
        if config is not None:
            if self._scaler is None:
                raise RuntimeError("the App is not started")
            self._autoscaler = Autoscaler(config, self._router, self._scaler)
            self._autoscaler.start()

    def _wake_to(self) -> int:
        """The replicas a pool at zero wakes up to when a request arrives: ``max(1, min_replicas)``."""
        autoscaler = self._autoscaler
        return max(1, autoscaler.config.min_replicas if autoscaler is not None else 1)


def _targets(mode: ServingMode, replicas: int | None, prefill: int | None, decode: int | None) -> dict[Role, int]:
    if mode is ServingMode.MERGED:
        if prefill is not None or decode is not None or replicas is None:
            raise ValueError("a merged App scales with scale(n); prefill= and decode= are for mode: disaggregated")
        return {Role.MERGED: replicas}
    if replicas is not None or (prefill is None and decode is None):
        raise ValueError("a disaggregated App scales with scale(prefill=n, decode=m), either or both")
    return {role: n for role, n in ((Role.PREFILL, prefill), (Role.DECODE, decode)) if n is not None}


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
