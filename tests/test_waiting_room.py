"""Requests held while their pool has no ready replica: on a bare Router with fake replicas (no engine),
and the waiting room itself on an event loop of its own."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from conftest import fake_replica
from test_serving import assert_envelope, call, chat_body, metric_value

from app.config import RouterConfig, ServingMode
from app.replica import ReplicaInfo, ReplicaState, Role
from app.router.metrics import RouterMetrics
from app.router.openai_protocol import ApiError
from app.router.server import RouterServer
from app.router.waiting_room import WaitingRoom

ROUTE = "/v1/chat/completions"


@pytest.fixture
def router():
    servers: list[RouterServer] = []

    def start(attached: bool = True, mode: ServingMode = ServingMode.MERGED,
              **config: object) -> tuple[RouterServer, str]:
        server = RouterServer(RouterConfig(port=0, **config), ["demo"], mode)
        url = f"http://127.0.0.1:{server.start_in_thread()}"
        server.attach(attached)
        servers.append(server)
        return server, url

    yield start
    for server in servers:
        server.stop_thread()


class Answer:
    """A fake replica that answers every request and remembers their ids."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    async def __call__(self, request: web.Request) -> web.Response:
        self.request_ids.append(request.headers.get("X-Request-Id", ""))
        return web.json_response({"choices": [{"message": {"content": "hello"}}]})


def ready(url: str, replica_id: str = "r1", role: Role = Role.MERGED) -> list[ReplicaInfo]:
    return [ReplicaInfo(replica_id=replica_id, role=role, state=ReplicaState.READY, url=url)]


def in_thread(url: str, request_id: str) -> tuple[threading.Thread, dict]:
    """A request sent from a thread of its own; its (status, headers, body) lands in the dict."""
    answer: dict = {}

    def send() -> None:
        answer["status"], answer["headers"], answer["body"] = call(
            url, "POST", ROUTE, chat_body("demo"), headers={"X-Request-Id": request_id})

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, answer


def wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def held(url: str) -> int:
    _, _, raw = call(url, "GET", "/status")
    return json.loads(raw)["held_requests"]


def test_a_request_at_zero_is_held_wakes_the_app_once_and_goes_to_the_first_ready_replica(router):
    server, url = router()
    status, _, raw = call(url, "GET", "/ready")
    assert status == 200 and json.loads(raw) == {"ready": True, "ready_replicas": 0, "wakes_on_request": True}
    first, first_answer = in_thread(url, "held-1")
    second, second_answer = in_thread(url, "held-2")
    wait_for(lambda: held(url) == 2, "two held requests")
    wake = server.scale_requests.take(1.0)
    assert wake is not None and wake.verb == "wake"
    assert server.scale_requests.take(0.2) is None, "one wake-up for the pool, not one per request"
    answer = Answer()
    with fake_replica(answer, ROUTE) as replica:
        server.update_replicas(ready(replica))
        first.join(10), second.join(10)
    assert first_answer["status"] == second_answer["status"] == 200
    assert sorted(answer.request_ids) == ["held-1", "held-2"] and held(url) == 0
    metrics = call(url, "GET", "/metrics")[2].decode()
    assert metric_value(metrics, "yrllm_router_holds_total", role="merged", outcome="released") == 2
    assert metric_value(metrics, "yrllm_router_wakes_total", role="merged") == 1
    server.scale_requests.finish(wake.request_id, 200, {})  # the App answered: the next zero wakes again
    server.update_replicas([])
    third, _ = in_thread(url, "held-3")
    wake = server.scale_requests.take(5.0)
    assert wake is not None and wake.verb == "wake"
    server.attach(False)  # the App is going away: what is held is answered at once
    third.join(10)


def test_past_queue_max_the_client_gets_a_503_with_retry_after_at_once(router):
    _, url = router(queue_max=1, queue_timeout_s=30)
    thread, _ = in_thread(url, "waits")
    wait_for(lambda: held(url) == 1, "the held request")
    started = time.monotonic()
    status, headers, raw = call(url, "POST", ROUTE, chat_body("demo"))
    assert status == 503 and time.monotonic() - started < 5
    assert int(headers["Retry-After"]) > 0
    assert "router.queue_max" in assert_envelope(raw, code="queue_full", type_="service_unavailable_error")["message"]


def test_past_queue_timeout_the_client_gets_a_503_with_retry_after(router):
    _, url = router(queue_timeout_s=0.5)
    started = time.monotonic()
    status, headers, raw = call(url, "POST", ROUTE, chat_body("demo"))
    assert status == 503 and 0.5 <= time.monotonic() - started < 5
    assert int(headers["Retry-After"]) > 0
    assert "router.queue_timeout_s" in assert_envelope(raw, code="queue_timeout")["message"]
    metrics = call(url, "GET", "/metrics")[2].decode()
    assert metric_value(metrics, "yrllm_router_holds_total", role="merged", outcome="timeout") == 1


def test_a_client_that_leaves_while_held_is_not_served_and_frees_its_place(router):
    server, url = router(queue_max=1)
    body = json.dumps(chat_body("demo")).encode()
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
                     b"X-Request-Id: gone\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: held(url) == 1, "the held request")
    wait_for(lambda: held(url) == 0, "the request of a client that left to be dropped")
    answer = Answer()
    with fake_replica(answer, ROUTE) as replica:
        server.update_replicas(ready(replica))
        status, _, _ = call(url, "POST", ROUTE, chat_body("demo"), headers={"X-Request-Id": "stays"})
    assert status == 200 and answer.request_ids == ["stays"], "the request whose client left was served"
    metrics = call(url, "GET", "/metrics")[2].decode()
    assert metric_value(metrics, "yrllm_router_holds_total", role="merged", outcome="gone") == 1
    assert metric_value(metrics, "yrllm_router_requests_total", route=ROUTE, status="499") == 1
    assert metric_value(metrics, "yrllm_router_requests_total", route=ROUTE, status="503") is None


def test_a_disaggregated_request_waits_for_each_pool_in_turn(router):
    server, url = router(mode=ServingMode.DISAGGREGATED)
    prefill, decode = Answer(), Answer()
    with fake_replica(prefill, "/v1/completions") as p, fake_replica(decode, "/v1/completions") as d:
        answer: dict = {}
        thread = threading.Thread(target=lambda: answer.update(status=call(
            url, "POST", "/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": 4})[0]))
        thread.start()
        wait_for(lambda: held(url) == 1, "the held prefill leg")
        server.update_replicas(ready(p, "p1", Role.PREFILL))
        wait_for(lambda: prefill.request_ids and held(url) == 1, "the prefill leg served and the decode leg held")
        server.update_replicas(ready(p, "p1", Role.PREFILL) + ready(d, "d2", Role.DECODE))
        thread.join(10)
    assert answer["status"] == 200 and len(prefill.request_ids) == len(decode.request_ids) == 1


def test_a_router_without_an_app_refuses_at_once(router):
    _, url = router(attached=False)
    started = time.monotonic()
    status, _, raw = call(url, "POST", ROUTE, chat_body("demo"))
    assert status == 503 and time.monotonic() - started < 2
    assert_envelope(raw, code="no_replica_ready")


def test_held_requests_go_out_in_arrival_order():
    async def scenario() -> list[int]:
        room = WaitingRoom(limit=8, timeout_s=10, metrics=RouterMetrics(), wake=lambda: True)
        room.open()
        served: list[int] = []

        async def request(n: int) -> None:
            await room.wait(Role.MERGED, room.deadline())
            served.append(n)

        tasks = []
        for n in range(5):
            tasks.append(asyncio.create_task(request(n)))
            await asyncio.sleep(0)  # arrives, and is held, before the next
        assert room.held() == 5
        room.release(Role.MERGED)
        await asyncio.gather(*tasks)
        return served

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]


def test_closing_the_waiting_room_answers_every_held_request():
    async def scenario() -> list[BaseException | None]:
        room = WaitingRoom(limit=8, timeout_s=10, metrics=RouterMetrics(), wake=lambda: True)
        room.open()
        tasks = [asyncio.create_task(room.wait(Role.DECODE, room.deadline())) for _ in range(3)]
        await asyncio.sleep(0)
        room.close()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, ApiError) and o.status == 503 and o.retry_after_s for o in outcomes)
