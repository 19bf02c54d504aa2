"""The Router's two legs in disaggregated mode, against fake prefill and decode replicas (no engine):
what each leg is sent, one request id through both, and what happens when either fails."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from conftest import fake_replica
from test_serving import call, metric_value

from app.config import RouterConfig, ServingMode
from app.replica import ReplicaInfo, ReplicaState, Role
from app.router.handoff import decode_leg, handed_over, prefill_leg
from app.router.server import RouterServer
from app.runtime.processes import free_port

ROUTE = "/v1/completions"
BODY = {"model": "demo", "prompt": "hi", "max_tokens": 20, "min_tokens": 2, "n": 2, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0.25,
        "kv_transfer_params": {"do_remote_prefill": True, "forged": 1}}
PARAMS = {"do_remote_prefill": True, "prompt_tokens": 2, "blocks": 1}


def test_the_prefill_leg_is_the_prompt_and_one_token_asking_for_a_remote_decode():
    leg = json.loads(prefill_leg(BODY))
    assert leg == {"model": "demo", "prompt": "hi", "max_tokens": 1, "stream": False, "temperature": 0.25,
                   "kv_transfer_params": {"do_remote_decode": True}}


def test_the_decode_leg_is_the_clients_request_with_the_prefills_parameters_only():
    assert json.loads(decode_leg(BODY, PARAMS)) == {**BODY, "kv_transfer_params": PARAMS}
    assert "kv_transfer_params" not in json.loads(decode_leg(BODY, None))  # a client's own are dropped


@pytest.mark.parametrize("answer, params", [
    (json.dumps({"choices": [], "kv_transfer_params": PARAMS}).encode(), PARAMS),
    (json.dumps({"choices": []}).encode(), None),  # the connector was off
    (json.dumps({"kv_transfer_params": {"do_remote_prefill": "yes"}}).encode(), None),
    (b"not json", None),
    (b"[1, 2]", None),
])
def test_only_a_remote_prefill_request_is_handed_over(answer, params):
    assert handed_over(answer) == params


class Leg:
    """A fake replica for one leg: records what it got, answers ``answer`` with ``status``."""

    def __init__(self, answer: dict, status: int = 200) -> None:
        self.answer, self.status = answer, status
        self.bodies: list[dict] = []
        self.request_ids: list[str] = []

    async def __call__(self, request: web.Request) -> web.Response:
        self.bodies.append(json.loads(await request.read()))
        self.request_ids.append(request.headers["X-Request-Id"])
        return web.json_response(self.answer, status=self.status)


@pytest.fixture
def router():
    server = RouterServer(RouterConfig(port=0), ["demo"], ServingMode.DISAGGREGATED)
    port = server.start_in_thread()
    yield server, f"http://127.0.0.1:{port}"
    server.stop_thread()


def route_to(server: RouterServer, **replicas: tuple[Role, str]) -> None:
    server.update_replicas([ReplicaInfo(replica_id=rid, role=role, state=ReplicaState.READY, url=url)
                            for rid, (role, url) in replicas.items()])


def test_both_legs_carry_one_request_id_and_the_decode_leg_gets_the_handoff(router):
    server, url = router
    prefill = Leg({"choices": [{"text": "x"}], "kv_transfer_params": PARAMS})
    decode = Leg({"choices": [{"text": "the answer"}]})
    with fake_replica(prefill, ROUTE) as p, fake_replica(decode, ROUTE) as d:
        route_to(server, p1=(Role.PREFILL, p), d2=(Role.DECODE, d))
        status, headers, body = call(url, "POST", ROUTE, {**BODY, "stream": False}, {"X-Request-Id": "req-42"})
    assert status == 200 and json.loads(body) == {"choices": [{"text": "the answer"}]}
    assert prefill.request_ids == decode.request_ids == ["req-42"] and headers["X-Request-Id"] == "req-42"
    assert prefill.bodies[0]["max_tokens"] == 1 and prefill.bodies[0]["stream"] is False
    assert decode.bodies[0]["kv_transfer_params"] == PARAMS and decode.bodies[0]["max_tokens"] == 20
    assert metric_value(call(url, "GET", "/metrics")[2].decode(), "yrllm_router_prefill_legs_total",
                        outcome="handed_over") == 1


def test_a_prefill_error_is_the_answer_and_no_decode_leg_starts(router):
    server, url = router
    error = {"error": {"message": "prompt too long", "type": "BadRequestError", "param": None, "code": 400}}
    prefill, decode = Leg(error, status=400), Leg({"choices": []})
    with fake_replica(prefill, ROUTE) as p, fake_replica(decode, ROUTE) as d:
        route_to(server, p1=(Role.PREFILL, p), d2=(Role.DECODE, d))
        status, _, body = call(url, "POST", ROUTE, BODY)
    assert (status, json.loads(body)) == (400, error)
    assert decode.bodies == []
    assert metric_value(call(url, "GET", "/metrics")[2].decode(), "yrllm_router_prefill_legs_total",
                        outcome="failed") == 1


def test_a_pool_with_no_ready_replica_is_named_in_the_503(router):
    server, url = router
    prefill = Leg({"choices": [], "kv_transfer_params": PARAMS})
    with fake_replica(prefill, ROUTE) as p:
        route_to(server, p1=(Role.PREFILL, p))
        status, _, body = call(url, "POST", ROUTE, BODY)
    assert status == 503 and json.loads(body)["error"]["message"].startswith("No decode replica is ready")
    route_to(server)
    status, _, body = call(url, "POST", ROUTE, BODY)
    assert status == 503 and json.loads(body)["error"]["message"].startswith("No prefill replica is ready")


def test_a_decode_replica_that_cannot_be_reached_is_retried_on_another(router):
    server, url = router
    prefill = Leg({"choices": [], "kv_transfer_params": PARAMS})
    decode = Leg({"choices": [{"text": "ok"}]})
    with fake_replica(prefill, ROUTE) as p, fake_replica(decode, ROUTE) as d:
        # Ties are broken at random: enough requests that the dead replica is picked first at least once.
        route_to(server, p1=(Role.PREFILL, p), d2=(Role.DECODE, f"http://127.0.0.1:{free_port()}"),
                 d3=(Role.DECODE, d))
        statuses = [call(url, "POST", ROUTE, BODY)[0] for _ in range(12)]
    assert statuses == [200] * 12 and len(decode.bodies) == 12 and len(prefill.bodies) == 12
    assert all(body["kv_transfer_params"] == PARAMS for body in decode.bodies)


def test_signals_are_per_pool(router):
    server, _ = router
    route_to(server, p1=(Role.PREFILL, "http://127.0.0.1:1"), d2=(Role.DECODE, "http://127.0.0.1:2"),
             d3=(Role.DECODE, "http://127.0.0.1:3"))
    signals = server.signals()
    for pool in signals.values():
        assert 0 <= pool.pop("since_request_s") < 60  # no request yet: since the Router started
    assert signals == {"prefill": {"ready": 1, "in_flight": 0, "held": 0, "ttft_p50_s": None},
                       "decode": {"ready": 2, "in_flight": 0, "held": 0, "ttft_p50_s": None}}
    assert server.snapshot()["mode"] == "disaggregated"
    assert [(row["replica_id"], row["role"]) for row in server.snapshot()["replicas"]] == [
        ("d2", "decode"), ("d3", "decode"), ("p1", "prefill")]
