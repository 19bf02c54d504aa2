"""Scale to zero and back on the shared real App: zero drains, keeps the weights and the zygote, is not
healed, holds the next request and wakes at once; the autoscaler goes to zero when idle.

The tests run in file order and build on each other: 1 replica -> 0 (while a stream runs) -> 1 (woken
by a request) -> its engine killed, a request held until the replacement serves -> 0 and back under the
autoscaler -> 1.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from conftest import PROMPT, greedy
from test_healing import events, wait_for
from test_serving import call, metric_value

from app.config import AutoscaleConfig

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module", autouse=True)
def back_to_one_replica(app):
    yield
    app.autoscale(None)
    app.scale(1)  # the other test modules expect the App as the session fixture started it


@pytest.fixture(scope="module")
def seed_tokens(app, model_name):
    return greedy(app.url, model_name)


def test_scaling_to_zero_over_http_lets_the_streams_in_flight_finish_first(app, model_name, seed_tokens):
    import openai

    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="none", max_retries=0, timeout=300)
    streaming, finished = threading.Event(), {}

    def stream() -> None:
        chunks = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=300, stream=True,
                                           temperature=0, extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True})
        texts = []
        for chunk in chunks:
            streaming.set()
            texts.append(chunk)
        # Tokens, not chunks: on busy cores vLLM may send two tokens in one chunk.
        finish = [c.choices[0].finish_reason for c in texts if c.choices and c.choices[0].finish_reason]
        finished.update(at=time.time(), finish=finish, tokens=texts[-1].usage and texts[-1].usage.completion_tokens)

    thread = threading.Thread(target=stream)
    thread.start()
    assert streaming.wait(120)
    asked_at = time.time()
    status, _, raw = call(app.url, "POST", "/scalein", {"replicas": 0})
    thread.join(120)
    assert status == 200, raw
    report = json.loads(raw)
    assert (report["replicas_before"], report["replicas_after"]) == (1, 0)
    (removed,) = report["replicas"]
    assert removed["action"] == "removed" and removed["error"] is None
    assert finished["at"] > asked_at, "the stream was over before the scale to zero: nothing was drained"
    assert finished["finish"] == ["length"] and finished["tokens"] == 300
    assert app.status()["replicas"] == []


def test_at_zero_the_app_keeps_its_weights_and_zygote_and_reports_what_it_holds(app):
    status = app.status()
    assert status["ready_replicas"] == 0 and status["zygote"]["state"] == "ready"
    (entry,) = [e for e in status["weight_cache"]["entries"] if e["state"] == "ready"]
    assert entry["bytes"] > 0 and entry["readers"] == [] and entry["nodes"] == {"node1": "ready"}
    footprint = status["footprint"]
    assert footprint["replicas"] == 0 and footprint["weights_bytes"] == entry["bytes"]
    names = [part["name"] for part in footprint["parts"]]
    assert names == ["driver", "ds_worker node1", "zygote"]
    # The weights stay in the data system's shared memory, which no process maps at zero: counted there.
    assert footprint["shared_memory_bytes"] >= entry["bytes"]
    assert footprint["processes_pss_bytes"] == sum(part["pss_bytes"] for part in footprint["parts"]) > 0
    assert footprint["pss_bytes"] == footprint["processes_pss_bytes"] + footprint["shared_memory_bytes"]
    assert footprint["pss_beside_weights_bytes"] == footprint["pss_bytes"] - entry["bytes"]
    ready_status, _, raw = call(app.url, "GET", "/ready")
    assert ready_status == 200
    assert json.loads(raw) == {"ready": True, "ready_replicas": 0, "wakes_on_request": True}
    # The Router's /status has the footprint too, as the App last measured it (every few seconds).
    routed = wait_for(lambda: (answer := json.loads(call(app.url, "GET", "/status")[2]))["footprint"]
                      and answer["footprint"]["replicas"] == 0 and answer, "the footprint at zero in /status", 15)
    assert [part["name"] for part in routed["footprint"]["parts"]] == names


def test_the_supervisor_leaves_a_pool_scaled_to_zero_at_zero(app):
    time.sleep(2.0)  # eight supervision ticks
    status = app.status()
    assert status["replicas"] == [] and not events(app, "replica_replaced")


def test_a_request_at_zero_is_held_and_answered_with_the_tokens_from_before(app, model_dir, model_name,
                                                                            seed_tokens):
    hidden = [path.rename(path.with_suffix(".hidden")) for path in model_dir.glob("*.safetensors")]
    try:  # with the weight files gone, a replica woken from disk could not start: it maps the cached copy
        assert greedy(app.url, model_name) == seed_tokens
    finally:
        for path in hidden:
            path.rename(path.with_suffix(".safetensors"))
    status = app.status()
    assert status["ready_replicas"] == 1 and len(status["replicas"]) == 1
    (woken,) = events(app, "woken")
    assert "merged 0 -> 1 replicas" in woken["reason"], woken


def test_a_request_while_the_only_replica_is_replaced_is_held_and_served(app, model_name, seed_tokens):
    (row,) = app.status()["replicas"]
    os.kill(row["pid"], signal.SIGKILL)
    wait_for(lambda: events(app, "replica_failed", row["replica_id"]), "the replica declared failed", 30)
    # Nothing is ready and the pool is not at zero: the request waits for the Supervisor's replacement.
    assert greedy(app.url, model_name) == seed_tokens
    assert events(app, "replica_replaced") and len(events(app, "woken")) == 1
    metrics = call(app.url, "GET", "/metrics")[2].decode()
    assert metric_value(metrics, "yrllm_router_holds_total", role="merged", outcome="released") >= 2
    assert metric_value(metrics, "yrllm_router_requests_total", route="/v1/completions", status="503") is None


def test_the_autoscaler_goes_to_zero_when_idle_and_a_request_brings_it_back(app, model_name, seed_tokens):
    app.autoscale(AutoscaleConfig(enabled=True, min_replicas=0, max_replicas=2, idle_s=1.0, interval_s=0.2))
    wait_for(lambda: app.status()["replicas"] == [], "the autoscaler to scale to zero", 30)
    decisions = app.status()["autoscale_decisions"]
    assert decisions[-1]["target"] == 0 and decisions[-1]["reason"].startswith("scale to zero: no request")
    assert greedy(app.url, model_name) == seed_tokens
    # Back at one: woken by the Router's wake-up, or by the autoscaler's next tick (it counts held
    # requests as load), whichever took the turn first.
    later = [d for d in app.status()["autoscale_decisions"] if d["at"] > decisions[-1]["at"]]
    assert len(events(app, "woken")) == 2 or any(d["target"] == 1 for d in later)
    app.autoscale(None)
