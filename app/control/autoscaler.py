"""The autoscaler: a thread that reads the Router's signals every interval, asks the pure policy
(``autoscale_policy``) and carries out its decisions through the Scaler."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from app.config import AutoscaleConfig
from app.control.autoscale_policy import AutoscalePolicy, Signals
from app.control.scaling import Scaler

logger = logging.getLogger(__name__)


class Autoscaler:
    """``start`` once, ``stop`` once; a stopped autoscaler is not restarted (make a new one)."""

    def __init__(self, config: AutoscaleConfig, router: Any, scaler: Scaler) -> None:
        self._config = config
        self._router = router
        self._scaler = scaler
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="app-autoscaler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 600.0) -> None:
        """Returns once the loop has ended; a scaling under way finishes first."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        """Decisions never race: none is taken while a scaling is under way (a manual one, or the
        previous decision's), because its replicas are not in the signals yet."""
        import yr

        policy = AutoscalePolicy(self._config)
        while not self._stop.wait(self._config.interval_s):
            try:
                signals = Signals(**yr.get(self._router.signals.invoke(), timeout=30))
            except Exception:  # noqa: BLE001 - the Router is going away, or busy: try again
                continue
            if self._scaler.busy:
                continue
            decision = policy.evaluate(signals, time.monotonic())
            if decision is None:
                continue

            def announce() -> None:
                logger.info("autoscaler: %s -> %d replicas (%s)", decision.reason, decision.target,
                            decision.signals.model_dump())
                yr.get(self._router.record_decision.invoke(decision.as_dict()))

            try:
                self._scaler.scale_if_idle(decision.target, announce)
            except Exception:  # noqa: BLE001 - logged; the next evaluation decides again
                logger.exception("autoscaling to %d failed", decision.target)
