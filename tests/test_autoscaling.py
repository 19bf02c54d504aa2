"""A burst makes the autoscaler add a replica (weights from the WeightCache); the end of the burst
removes it; no request fails. On the shared real App."""

from __future__ import annotations

import threading
import time

import pytest

from app.config import AutoscaleConfig

pytestmark = pytest.mark.engine

BURST = AutoscaleConfig(enabled=True, min_replicas=1, max_replicas=2, target_in_flight=2, quiet_period_s=3,
                        interval_s=0.5)


def ready_replicas(app) -> int:
    return sum(1 for r in app.status()["replicas"] if r["state"] == "ready")


def test_a_burst_adds_a_replica_and_its_end_removes_it_losing_nothing(app, model_name):
    import openai

    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="none", max_retries=0, timeout=300)
    hits_before = app.status()["weight_cache"]["hits"]
    failures: list[Exception] = []
    finished = []
    burst_over = threading.Event()

    def keep_streaming() -> None:
        while not burst_over.is_set():
            try:
                stream = client.completions.create(model=model_name, prompt="def f(x):", max_tokens=32,
                                                   stream=True, extra_body={"ignore_eos": True})
                finished.append([c.choices[0].finish_reason for c in stream if c.choices][-1])
            except Exception as exc:  # noqa: BLE001 - asserted on below
                failures.append(exc)

    app.autoscale(BURST)
    try:
        senders = [threading.Thread(target=keep_streaming) for _ in range(6)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 180
        while ready_replicas(app) < 2:  # the autoscaler sees 6 in flight > 2 per replica
            assert time.monotonic() < deadline, "no replica was added under pressure"
            time.sleep(0.5)
        burst_over.set()
        for sender in senders:
            sender.join(120)
        deadline = time.monotonic() + 120
        while len(app.status()["replicas"]) > 1:  # quiet for 3 s, then back to min_replicas
            assert time.monotonic() < deadline, "the replica was not removed after the burst"
            time.sleep(0.5)
    finally:
        burst_over.set()
        app.autoscale(None)
    assert failures == []
    assert finished and set(finished) == {"length"}
    reasons = [d["reason"] for d in app.status()["autoscale_decisions"]]
    assert any(r.startswith("scale up") for r in reasons) and any(r.startswith("scale down") for r in reasons)
    assert app.status()["weight_cache"]["hits"] > hits_before  # the added replica took cached weights
