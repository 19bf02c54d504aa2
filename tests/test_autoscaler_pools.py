"""The autoscaler's loop in a disaggregated App, against a real yr actor standing in for the Router and
a stand-in Scaler: each pool is decided on its own signal, one scaling carries every decision, and
each decision reaches the Router with its pool and reason."""

from __future__ import annotations

import time

import pytest
import yr

from app.config import AutoscaleConfig
from app.control.autoscaler import Autoscaler
from app.replica import Role

pytestmark = pytest.mark.usefixtures("app")  # its yr runtime (local mode): actors are threads here


@yr.instance
class SignallingRouter:
    def __init__(self, signals: dict) -> None:
        self._signals = signals
        self.decisions: list[dict] = []

    def signals(self) -> dict:
        return self._signals

    def record_decision(self, decision: dict) -> None:
        self.decisions.append(decision)

    def recorded(self) -> list[dict]:
        return self.decisions


class PoolsScaler:
    roles = (Role.PREFILL, Role.DECODE)
    busy = False

    def __init__(self) -> None:
        self.scalings: list[dict] = []

    def scale_if_idle(self, targets: dict, on_turn) -> None:
        on_turn()
        self.scalings.append(dict(targets))


def test_each_pool_scales_on_its_own_signal_with_its_reason():
    # Prefill: 1 replica, 1 prompt in flight but slow first tokens. Decode: 2 replicas, 20 streams.
    router = SignallingRouter.invoke({"prefill": {"ready": 1, "in_flight": 1, "ttft_p50_s": 4.0},
                                      "decode": {"ready": 2, "in_flight": 20, "ttft_p50_s": None}})
    scaler = PoolsScaler()
    config = AutoscaleConfig(enabled=True, max_replicas=4, ttft_target_s=2.0, target_decode_streams=8,
                             interval_s=0.05)
    autoscaler = Autoscaler(config, router, scaler)
    autoscaler.start()
    try:
        deadline = time.monotonic() + 10
        while not scaler.scalings and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        autoscaler.stop()
    assert scaler.scalings[0] == {Role.PREFILL: 2, Role.DECODE: 3}
    decisions = {d["role"]: d for d in yr.get(router.recorded.invoke())[:2]}
    assert "median TTFT 4.00 s > 2 s" in decisions["prefill"]["reason"]
    assert "20 in flight > 8 per replica x 2" in decisions["decode"]["reason"]
    router.terminate()
