"""The autoscaler: a thread that reads the Router's signals every interval, asks the pure policy
(``autoscale_policy``) of each pool and carries out their decisions through the Scaler, in one scaling.

Each pool follows its own signal: merged and prefill replicas the requests in flight on them
(``target_in_flight``; for prefill that is the prompts queueing) and the TTFT, decode replicas the
streams in flight on them (``target_decode_streams``)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from app.config import AutoscaleConfig
from app.control.autoscale_policy import AutoscalePolicy, Signals
from app.control.scaling import Scaler
from app.replica import Role

logger = logging.getLogger(__name__)


class Autoscaler:
    """``start`` once, ``stop`` once; a stopped autoscaler is not restarted (make a new one)."""

    def __init__(self, config: AutoscaleConfig, router: Any, scaler: Scaler) -> None:
        self.config = config
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

        policies = {role: AutoscalePolicy(pool_config(self.config, role), role) for role in self._scaler.roles}
        while not self._stop.wait(self.config.interval_s):
            try:
                signals = yr.get(self._router.signals.invoke(), timeout=30)
            except Exception:  # noqa: BLE001 - the Router is going away, or busy: try again
                continue
            if self._scaler.busy:
                continue
            now = time.monotonic()
            decisions = [decision for role, policy in policies.items()
                         if (decision := policy.evaluate(Signals(**signals[role.value]), now)) is not None]
            if not decisions:
                continue

            def announce() -> None:
                for decision in decisions:
                    logger.info("autoscaler: %s: %s -> %d replicas (%s)", decision.role.value, decision.reason,
                                decision.target, decision.signals.model_dump())
                    yr.get(self._router.record_decision.invoke(decision.as_dict()))

            targets = {decision.role: decision.target for decision in decisions}
            try:
                self._scaler.scale_if_idle(targets, announce)
            except Exception:  # noqa: BLE001 - logged; the next evaluation decides again
                logger.exception("autoscaling to %s failed", targets)


def pool_config(config: AutoscaleConfig, role: Role) -> AutoscaleConfig:
    """The knobs of one pool's policy: decode replicas aim at ``target_decode_streams`` and have no TTFT
    of their own (the first token comes from the prefill leg)."""
    if role is not Role.DECODE:
        return config
    return config.model_copy(update={"target_in_flight": config.target_decode_streams, "ttft_target_s": None})
