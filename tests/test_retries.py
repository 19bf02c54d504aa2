"""The Router's retry policy against fake replicas (no engine): a request whose replica failed before
any byte reached the client goes to another replica, once; a stream that already sent bytes is never
retried and ends with an error event; the client's body reaches the replica byte for byte."""

from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

import pytest
from aiohttp import web
from conftest import fake_replica
from test_serving import call, metric_value

from app.config import RouterConfig
from app.replica import ReplicaInfo, ReplicaState
from app.router.server import RouterServer
from app.runtime.processes import free_port

ROUTE = "/v1/chat/completions"
# Odd spacing and a number that json.dumps would write differently (0.10 -> 0.1): re-encoding shows.
RAW_BODY = b'{"model":"demo",  "messages": [{"role": "user", "content": "hi"}], "temperature": 0.10}'


@contextmanager
def closing_replica() -> Iterator[str]:
    """Accepts connections, reads the request, closes without a byte of answer (a replica killed
    while the request was in its socket buffer)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        server.close()


class Answering:
    """A healthy fake replica that records the bodies it got."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.json_response({"choices": [{"text": "ok"}]})


@pytest.fixture
def router():
    server = RouterServer(RouterConfig(port=0), ["demo"])
    port = server.start_in_thread()
    yield server, f"http://127.0.0.1:{port}"
    server.stop_thread()


def route_to(server: RouterServer, **urls: str) -> None:
    server.update_replicas([ReplicaInfo(replica_id=rid, state=ReplicaState.READY, url=url)
                            for rid, url in urls.items()])


def metrics(url: str) -> str:
    return call(url, "GET", "/metrics")[2].decode()


def test_an_unreachable_replica_costs_no_request(router):
    server, url = router
    healthy = Answering()
    with fake_replica(healthy) as good:
        route_to(server, dead=f"http://127.0.0.1:{free_port()}", good=good)
        statuses = [call(url, "POST", ROUTE, RAW_BODY)[0] for _ in range(20)]
    assert statuses == [200] * 20
    assert len(healthy.bodies) == 20
    retried = metric_value(metrics(url), "yrllm_router_retries_total", reason="connect")
    assert retried is not None and retried >= 1  # ties are broken at random: the dead one was picked


def test_a_replica_that_closes_before_answering_is_retried_with_the_same_bytes(router):
    server, url = router
    healthy = Answering()
    with closing_replica() as closing, fake_replica(healthy) as good:
        route_to(server, closing=closing, good=good)
        statuses = [call(url, "POST", ROUTE, RAW_BODY)[0] for _ in range(20)]
    assert statuses == [200] * 20
    assert healthy.bodies == [RAW_BODY] * 20  # forwarded as received, retries included
    retried = metric_value(metrics(url), "yrllm_router_retries_total", reason="disconnect")
    assert retried is not None and retried >= 1


def test_a_stream_cut_after_its_first_bytes_is_not_retried(router):
    server, url = router
    healthy = Answering()

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"text": "partial"}]}\n\n')
        request.transport.close()  # the replica dies mid-stream
        return response

    with fake_replica(cut) as cutting, fake_replica(healthy) as good:
        route_to(server, cutting=cutting, good=good)
        answers = [call(url, "POST", ROUTE, RAW_BODY) for _ in range(10)]
    cut_answers = [raw for status, _, raw in answers if b"partial" in raw]
    assert cut_answers, "ties are broken at random: some stream went to the cutting replica"
    for raw in cut_answers:
        last_event = raw.strip().split(b"\n\n")[-1]
        assert json.loads(last_event.removeprefix(b"data: "))["error"]["code"] == "replica_failed"
    assert len(healthy.bodies) == 10 - len(cut_answers)  # none of the cut ones was sent again
    assert metric_value(metrics(url), "yrllm_router_broken_streams_total", route=ROUTE) == len(cut_answers)
    assert metric_value(metrics(url), "yrllm_router_retries_total", reason="disconnect") is None


def test_a_retry_that_fails_too_is_a_502(router):
    server, url = router
    with closing_replica() as first, closing_replica() as second:
        route_to(server, first=first, second=second)
        status, _, raw = call(url, "POST", ROUTE, RAW_BODY)
    assert status == 502
    assert json.loads(raw)["error"]["code"] == "replica_failed"
    assert metric_value(metrics(url), "yrllm_router_retries_total", reason="disconnect") == 1
