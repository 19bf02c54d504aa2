"""When to add and remove replicas: a pure policy over live signals, so it can be tested on synthetic
sequences and reasoned about without engines.

Up fast: the first evaluation that shows pressure (too many requests in flight or held per replica, or
slow first tokens) scales up, to as many replicas as the load needs at once. Down promptly but calmly:
only after the load has fitted in fewer replicas for a whole quiet period, one replica at a time, and
never below one that way. Zero (``min_replicas: 0``) comes only from idleness: no request at all for
``idle_s``. Replicas still starting count as capacity, so a burst is not answered twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel

from app.config import AutoscaleConfig
from app.replica import Role


class Signals(BaseModel):
    """What the Router saw at one evaluation."""

    ready: int
    starting: int = 0
    in_flight: int
    held: int = 0  # requests waiting for a ready replica (the pool is at zero, or every replica starts)
    since_request_s: float | None = None  # since the last request arrived (or the Router started)
    ttft_p50_s: float | None = None


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str
    signals: Signals
    role: Role = Role.MERGED  # the pool it scales

    def as_dict(self) -> dict[str, object]:
        return {"role": self.role.value, "target": self.target, "reason": self.reason,
                "signals": self.signals.model_dump()}


class AutoscalePolicy:
    """Stateful only in the quiet-period clock; ``evaluate`` is called once per interval."""

    def __init__(self, config: AutoscaleConfig, role: Role = Role.MERGED) -> None:
        self.config = config
        self.role = role
        self._calm_since: float | None = None  # since when fewer replicas would have sufficed

    def evaluate(self, signals: Signals, now: float) -> Decision | None:
        config = self.config
        current = signals.ready + signals.starting
        load = signals.in_flight + signals.held
        load_text = f"{signals.in_flight} in flight" + (f" + {signals.held} held" if signals.held else "")
        needed = math.ceil(load / config.target_in_flight)
        slow = (config.ttft_target_s is not None and signals.ttft_p50_s is not None
                and signals.ttft_p50_s > config.ttft_target_s and signals.in_flight > 0)
        idle = (config.min_replicas == 0 and load == 0 and signals.since_request_s is not None
                and signals.since_request_s >= config.idle_s)
        if idle and current > 0:
            self._calm_since = None
            return Decision(0, f"scale to zero: no request for {signals.since_request_s:.0f} s "
                            f"(idle_s {config.idle_s:g})", signals, self.role)
        if current < config.min_replicas:
            self._calm_since = None
            return Decision(config.min_replicas, f"below min_replicas ({config.min_replicas})", signals, self.role)
        if current > config.max_replicas:
            self._calm_since = None
            return Decision(config.max_replicas, f"above max_replicas ({config.max_replicas})", signals, self.role)
        if needed > current or (slow and signals.starting == 0):
            self._calm_since = None
            target = min(config.max_replicas, max(needed, current + 1))
            if target == current:
                return None  # pressure, but already at max_replicas
            why = (f"{load_text} > {config.target_in_flight:g} per replica x {current}"
                   if needed > current else
                   f"median TTFT {signals.ttft_p50_s:.2f} s > {config.ttft_target_s:g} s")
            return Decision(target, f"scale up: {why}", signals, self.role)
        if signals.starting or max(needed, config.min_replicas, 1) >= current:
            self._calm_since = None  # load needs every replica (or one is still coming up); zero is for idleness
            return None
        if self._calm_since is None:
            self._calm_since = now
        if now - self._calm_since < config.quiet_period_s:
            return None
        self._calm_since = None  # the next step down waits a full quiet period again
        return Decision(current - 1, f"scale down: {load_text} fit in {current - 1} "
                        f"replicas for {config.quiet_period_s:g} s", signals, self.role)
