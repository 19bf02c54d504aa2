"""Self-healing on the shared real App: a replica whose engine server or EngineCore is killed, or that
stops answering, costs no request, leaves the Router at once, leaves no process behind and is
replaced; a killed data system worker is restarted and the cache reseeds, and serving goes on
without it meanwhile (KV blocks are computed, not loaded).

The tests run in file order from the one replica the session App starts, and end with one again.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import psutil
import pytest
from conftest import LONG_PROMPT, complete, greedy, replica_urls, still_running
from test_serving import metric_value

from app.weights.load_report import PlanKind, WeightSource

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module", autouse=True)
def back_to_one_replica(app):
    yield
    app.scale(1)  # the other test modules expect the App as the session fixture started it


def completion(app, model_name: str) -> int:
    body = json.dumps({"model": model_name, "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    request = urllib.request.Request(f"{app.url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def events(app, kind: str, subject: str | None = None) -> list[dict]:
    return [e for e in app.status()["events"] if e["kind"] == kind and subject in (None, e["subject"])]


def wait_for(predicate, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def replicas(app) -> dict[str, dict]:
    return {r["replica_id"]: r for r in app.status()["replicas"]}


def two_replicas(app) -> tuple[str, dict, list[psutil.Process]]:
    """Two ready replicas; returns the newer one (the victim): its id, its row, its processes."""
    report = app.scale(2)
    assert report.ok, str(report)
    victim = max(replicas(app), key=lambda rid: int(rid.lstrip("r")))
    row = replicas(app)[victim]
    return victim, row, [psutil.Process(row["pid"]), psutil.Process(row["core_pid"])]


def assert_replaced(app, victim: str, processes: list[psutil.Process], model_name: str) -> dict:
    (failed,) = wait_for(lambda: events(app, "replica_failed", victim), f"{victim} declared failed")
    # Out of the Router; the desired count serves again with a new replica.
    def replaced_set() -> dict[str, str] | None:
        urls = replica_urls(app)
        return urls if len(urls) == 2 and victim not in urls else None

    ready = wait_for(replaced_set, "a replacement")
    # Routed to first; its event follows once its scale-out's bookkeeping is done.
    (replaced,) = wait_for(lambda: [e for e in events(app, "replica_replaced")
                                    if e["subject"] in ready and e["at"] > failed["at"]], "the replacement's event")
    assert "weights: plan map, from host" in replaced["reason"]
    # Nothing of the failed replica is left (its EngineCore included).
    time.sleep(0.5)
    assert not [p.pid for p in processes if still_running(p)]
    assert completion(app, model_name) == 200
    return failed


def test_a_killed_engine_server_costs_no_request_and_is_replaced(app, model_name):
    victim, row, processes = two_replicas(app)
    os.kill(row["pid"], signal.SIGKILL)
    assert [completion(app, model_name) for _ in range(20)] == [200] * 20
    failed = assert_replaced(app, victim, processes, model_name)
    assert "exited with code -9" in failed["reason"]  # noticed from the process, not from HTTP
    text = urllib.request.urlopen(f"{app.url}/metrics").read().decode()
    assert metric_value(text, "yrllm_router_supervision_events_total", kind="replica_failed") >= 1
    assert metric_value(text, "yrllm_router_supervision_events_total", kind="replica_replaced") >= 1


def test_a_killed_engine_core_costs_no_request_and_is_replaced(app, model_name):
    victim, row, processes = two_replicas(app)
    os.kill(row["core_pid"], signal.SIGKILL)
    assert [completion(app, model_name) for _ in range(20)] == [200] * 20
    failed = assert_replaced(app, victim, processes, model_name)
    # Seen from /proc before its server follows it down (or, if the server is quicker, in its last line).
    assert f"EngineCore (pid {row['core_pid']}) exited" in failed["reason"]


def test_a_stopped_replica_fails_its_health_checks_and_is_replaced(app, model_name):
    victim, row, processes = two_replicas(app)
    os.killpg(row["pid"], signal.SIGSTOP)  # alive, but answers nothing
    try:
        failed = assert_replaced(app, victim, processes, model_name)
    finally:
        try:
            os.killpg(row["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    checks = app.config.supervision.health_check_failures
    timeout_s = app.config.supervision.health_check_timeout_s
    assert failed["reason"] == (f"failed {checks} health checks in a row, the last: "
                                f"app.engine.host.EngineFailed: no /health answer within {timeout_s:g} s")


def test_a_killed_data_system_worker_is_restarted_and_the_next_replica_seeds(app, model_name):
    app.scale(1)
    (url,) = replica_urls(app).values()
    tokens = greedy(url, model_name)
    worker = psutil.Process(app.status()["ds_worker_pid"])
    worker.kill()
    # KV blocks cannot be looked up or stored now: the prompt is computed, and the answer is the same
    # as on a replica that never saw it (below).
    while_down = complete(url, model_name, "# while the data system is down\n" + LONG_PROMPT)["tokens"]
    wait_for(lambda: events(app, "ds_worker_restarted"), "the worker's restart")
    (died,) = events(app, "ds_worker_died")
    assert "1 cached weight entries died with it" in died["reason"]
    status = app.status()
    assert status["ds_worker_pid"] != worker.pid and status["weight_cache"]["entries"] == []
    assert greedy(url, model_name) == tokens  # the serving replica kept its mapped weights
    seeded = app.scale(2)
    assert seeded.ok and seeded.replicas[0].weights.plan is PlanKind.SEED
    assert seeded.replicas[0].weights.fallback_reason is None  # published into the new worker
    mapped = app.scale(3)
    assert mapped.ok and mapped.replicas[0].weights.plan is PlanKind.MAP
    assert mapped.replicas[0].weights.source is WeightSource.HOST
    assert greedy(replica_urls(app)[mapped.replicas[0].replica_id], model_name) == tokens
    fresh = complete(replica_urls(app)[mapped.replicas[0].replica_id], model_name,
                     "# while the data system is down\n" + LONG_PROMPT)["tokens"]
    assert fresh == while_down
    assert wait_for(lambda: app.status()["kv"]["blocks_not_stored"] >= 3, "the blocks counted as not stored")
