"""The serving path end to end, as users see it: the official OpenAI client (and raw HTTP where the
client hides things) against the Router of one real App, plus a bare Router for the failure answers
that a healthy App never gives (no replica ready, replica unreachable) and for the scaling endpoints'
access rules.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from urllib.parse import urlsplit

import openai
import pytest
from conftest import fake_replica

from app.config import RouterConfig
from app.replica import ReplicaInfo, ReplicaState
from app.router.server import RouterServer
from app.runtime.processes import free_port

ENVELOPE_FIELDS = {"message", "type", "param", "code"}


# ---- helpers -------------------------------------------------------------------------------------

def call(base_url: str, method: str, path: str, body: bytes | dict | None = None,
         headers: dict[str, str] | None = None, timeout: float = 120):
    """One plain HTTP request: (status, headers, body bytes). For what the OpenAI client hides."""
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body,
                     headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def assert_envelope(raw: bytes, *, code: str | None = None, type_: str | None = None) -> dict:
    error = json.loads(raw)["error"]
    assert set(error) == ENVELOPE_FIELDS
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    if type_ is not None:
        assert error["type"] == type_
    return error


def replica_status(app) -> dict:
    status, _, raw = call(app.url, "GET", "/status")
    assert status == 200
    replicas = json.loads(raw)["replicas"]
    assert len(replicas) == 1
    return replicas[0]


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text page, or None if it is not there."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def chat_body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say hello."}], **extra}


# ---- the OpenAI API through the Router -------------------------------------------------------------

@pytest.mark.engine
def test_completion(client, model_name):
    completion = client.completions.create(model=model_name, prompt="def fib(n):", max_tokens=8,
                                           temperature=0)
    assert completion.object == "text_completion"
    assert completion.model == model_name
    assert completion.choices and isinstance(completion.choices[0].text, str)
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


@pytest.mark.engine
def test_logprobs(client, model_name):
    """vLLM torch.compiles the sampler's logprob ranking on first use, which needs the engine to have
    this environment (a C++ compiler on PATH), not only the spec's variables."""
    completion = client.completions.create(model=model_name, prompt="def fib(n):", max_tokens=4, temperature=0,
                                           logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 4 and all(value <= 0 for value in logprobs.token_logprobs)
    assert all(len(top) >= 1 for top in logprobs.top_logprobs)


@pytest.mark.engine
def test_chat_completion(client, model_name):
    chat = client.chat.completions.create(model=model_name, max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "Say hello."}])
    assert chat.object == "chat.completion"
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert chat.usage is not None and chat.usage.prompt_tokens > 0
    assert 0 < chat.usage.completion_tokens <= 8


@pytest.mark.engine
def test_streaming_chat_with_usage(client, model_name):
    stream = client.chat.completions.create(
        model=model_name, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count to ten."}])
    chunks = list(stream)
    assert len(chunks) >= 3
    assert len({chunk.id for chunk in chunks}) == 1, "every chunk belongs to the same completion"
    # In order: the role first, then content, then one finish_reason, then usage alone, last.
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    finishes = [i for i, c in enumerate(content_chunks) if c.choices[0].finish_reason is not None]
    assert finishes == [len(content_chunks) - 1], "finish_reason only on the last content chunk"
    assert content_chunks[-1].choices[0].finish_reason in ("length", "stop")
    *before, last = chunks
    assert not last.choices and last.usage is not None
    assert all(c.usage is None for c in before), "usage only in the final chunk"
    generated = sum(1 for c in content_chunks if c.choices[0].delta.content)
    assert last.usage.prompt_tokens > 0
    assert 0 < last.usage.completion_tokens <= 8
    # vLLM sends one chunk per token, except tokens that do not yet decode to whole characters.
    assert generated <= last.usage.completion_tokens
    if content_chunks[-1].choices[0].finish_reason == "length":
        assert last.usage.completion_tokens == 8


@pytest.mark.engine
def test_raw_stream_is_server_sent_events_ending_with_done(app, model_name):
    status, headers, raw = call(app.url, "POST", "/v1/chat/completions",
                                chat_body(model_name, max_tokens=8, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert payloads[-1]["usage"]["completion_tokens"] > 0
    assert text.count("[DONE]") == 1


@pytest.mark.engine
def test_unknown_model_is_a_404_in_openai_envelope(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", max_tokens=1,
                                       messages=[{"role": "user", "content": "hi"}])
    error = info.value
    assert error.status_code == 404
    assert error.code == "model_not_found" and error.param == "model" and error.type == "not_found_error"
    assert "no-such-model" in error.message
    assert_envelope(error.response.content, code="model_not_found", type_="not_found_error")


@pytest.mark.engine
def test_malformed_json_is_a_400_in_openai_envelope(app):
    status, _, raw = call(app.url, "POST", "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert status == 400
    error = assert_envelope(raw, code="invalid_request", type_="invalid_request_error")
    assert "JSON" in error["message"]


@pytest.mark.engine
def test_engine_validation_errors_pass_through(client, model_name):
    # The Router checks only what it needs; vLLM's own 400 reaches the client unchanged.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt="hi", max_tokens=100_000)


@pytest.mark.engine
def test_request_id_is_echoed_or_generated(app, model_name):
    body = {"model": model_name, "prompt": "hi", "max_tokens": 1}
    status, headers, _ = call(app.url, "POST", "/v1/completions", body,
                              headers={"X-Request-Id": "test-request-42"})
    assert status == 200
    assert headers["X-Request-Id"] == "test-request-42"
    status, headers, _ = call(app.url, "POST", "/v1/completions", body)
    assert status == 200
    assert headers["X-Request-Id"], "a request id is generated when the client sends none"
    status, again, _ = call(app.url, "POST", "/v1/completions", body)
    assert again["X-Request-Id"] != headers["X-Request-Id"]


# ---- health, readiness, metrics, status -----------------------------------------------------------

@pytest.mark.engine
def test_health_and_ready(app):
    status, _, raw = call(app.url, "GET", "/health")
    assert status == 200 and json.loads(raw) == {"status": "ok"}
    status, _, raw = call(app.url, "GET", "/ready")
    assert status == 200
    ready = json.loads(raw)
    assert ready["ready"] is True and ready["ready_replicas"] >= 1


@pytest.mark.engine
def test_models_lists_the_served_model(client, model_name):
    assert [m.id for m in client.models.list()] == [model_name]


@pytest.mark.engine
def test_metrics(app, client, model_name):
    client.completions.create(model=model_name, prompt="hi", max_tokens=1)
    status, headers, raw = call(app.url, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = raw.decode()
    assert metric_value(text, "yrllm_router_requests_total", route="/v1/completions", status="200") >= 1
    assert "# TYPE yrllm_router_request_duration_seconds histogram" in text
    assert metric_value(text, "yrllm_router_request_duration_seconds_count", route="/v1/completions") >= 1
    assert metric_value(text, "yrllm_router_request_duration_seconds_bucket", route="/v1/completions",
                        le="+Inf") >= 1
    assert "# TYPE yrllm_router_in_flight_requests gauge" in text
    replica_id = replica_status(app)["replica_id"]
    assert metric_value(text, "yrllm_router_in_flight_requests", replica=replica_id) == 0
    assert metric_value(text, "yrllm_router_replicas", state="ready") == 1


@pytest.mark.engine
def test_status_lists_the_ready_replica(app):
    replica = replica_status(app)
    assert replica["state"] == "ready"
    assert replica["url"].startswith("http://")
    assert replica["pid"] == app.test_pids[f"engine {replica['replica_id']}"]
    assert replica["in_flight"] == 0
    status = app.status()
    assert status["ready_replicas"] == 1 and status["model"] == app.served_model_name
    assert status["ds_worker_pid"] == app.test_pids["ds_worker"]


@pytest.mark.engine
def test_invalid_scaling_requests_are_answered_by_the_app(app):
    # These travel HTTP -> Router -> mailbox -> App and back, and change nothing.
    status, _, raw = call(app.url, "POST", "/scaleout", {"replicas": "many"})
    assert status == 400
    assert assert_envelope(raw, code="invalid_replicas")["param"] == "replicas"
    status, _, raw = call(app.url, "POST", "/scalein", {"replicas": 5})
    assert status == 400
    assert_envelope(raw, code="invalid_replicas")
    status, _, raw = call(app.url, "POST", "/scaleout", b"[1]")
    assert status == 400
    assert_envelope(raw, code="invalid_request")
    assert replica_status(app)["state"] == "ready"


# ---- a client that goes away -----------------------------------------------------------------------

@pytest.mark.engine
def test_client_disconnect_cancels_the_upstream_request(app, model_name):
    replica = replica_status(app)
    engine_metrics = lambda: call(replica["url"], "GET", "/metrics")[2].decode()  # noqa: E731
    generated_before = metric_value(engine_metrics(), "vllm:generation_tokens_total")
    assert generated_before is not None

    max_tokens = 400  # ignore_eos: all of them unless the request is aborted
    body = json.dumps(chat_body(model_name, max_tokens=max_tokens, temperature=0, stream=True,
                                ignore_eos=True)).encode()
    parts = urlsplit(app.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\n"
                     b"Content-Type: application/json\r\nX-Request-Id: test-disconnect\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data: ") < 2:
            data = sock.recv(65536)
            assert data, f"the stream ended early: {received!r}"
            received += data
        assert received.startswith(b"HTTP/1.1 200")
        assert replica_status(app)["in_flight"] == 1
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    deadline = time.monotonic() + 10
    while replica_status(app)["in_flight"] != 0:
        assert time.monotonic() < deadline, "the Router still proxies a request whose client has gone"
        time.sleep(0.05)
    while metric_value(engine_metrics(), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the engine still runs a request whose client has gone"
        time.sleep(0.05)
    # The engine aborted the request rather than generating all its tokens for nobody.
    generated = metric_value(engine_metrics(), "vllm:generation_tokens_total") - generated_before
    assert generated < max_tokens, f"the engine generated all {max_tokens} tokens for nobody"


# ---- a bare Router: the answers a healthy App never gives -------------------------------------------

@pytest.fixture
def bare_router():
    servers: list[RouterServer] = []

    def start(config: RouterConfig | None = None) -> tuple[RouterServer, str]:
        server = RouterServer(config or RouterConfig(port=0), ["demo"])
        port = server.start_in_thread()
        servers.append(server)
        return server, f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop_thread()


def test_no_ready_replica_is_a_503_with_retry_after(bare_router):
    _, url = bare_router()
    status, headers, raw = call(url, "POST", "/v1/chat/completions", chat_body("demo"))
    assert status == 503
    assert int(headers["Retry-After"]) > 0
    assert_envelope(raw, code="no_replica_ready", type_="service_unavailable_error")
    status, _, raw = call(url, "GET", "/ready")
    assert status == 503 and json.loads(raw) == {"ready": False, "ready_replicas": 0, "wakes_on_request": False}
    # The OpenAI client sees it as a 503 too (max_retries=0, or it would honour Retry-After).
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503 and info.value.code == "no_replica_ready"


def test_unreachable_replica_is_a_502(bare_router):
    server, url = bare_router()
    server.update_replicas([ReplicaInfo(replica_id="x", state=ReplicaState.READY,
                                        url=f"http://127.0.0.1:{free_port()}")])
    status, headers, raw = call(url, "POST", "/v1/chat/completions", chat_body("demo"),
                                headers={"X-Request-Id": "r-502"})
    assert status == 502
    assert_envelope(raw, code="replica_failed", type_="upstream_error")
    # The failed request is no longer counted as in flight.
    assert server.snapshot()["replicas"][0]["in_flight"] == 0
    status, _, raw = call(url, "GET", "/metrics")
    assert metric_value(raw.decode(), "yrllm_router_requests_total", route="/v1/chat/completions",
                        status="502") == 1


def _answer_one_scale_request(server: RouterServer, taken: list) -> threading.Thread:
    def run() -> None:
        request = server.scale_requests.take(5)
        taken.append(request)
        if request is not None:
            server.scale_requests.finish(request.request_id, 200, {"ok": True})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_scaleout_from_loopback_needs_no_token(bare_router):
    server, url = bare_router()
    taken: list = []
    thread = _answer_one_scale_request(server, taken)
    status, _, raw = call(url, "POST", "/scaleout", {"replicas": 2})
    thread.join(5)
    assert status == 200 and json.loads(raw) == {"ok": True}
    assert taken[0].verb == "scaleout" and taken[0].body == {"replicas": 2}
    # An empty body is allowed too: one more replica.
    thread = _answer_one_scale_request(server, taken)
    status, _, _ = call(url, "POST", "/scalein", b"")
    thread.join(5)
    assert status == 200 and taken[1].verb == "scalein" and taken[1].body == {}


def test_scaling_with_an_admin_token_needs_the_token(bare_router):
    server, url = bare_router(RouterConfig(port=0, admin_token="s3cret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cretX"},
                    {"Authorization": "s3cret"}):
        status, _, raw = call(url, "POST", "/scaleout", {"replicas": 2}, headers=headers)
        assert status == 401, headers
        assert_envelope(raw, code="unauthorized", type_="authentication_error")
    assert server.scale_requests.take(0.1) is None, "a refused request never reaches the App"
    taken: list = []
    thread = _answer_one_scale_request(server, taken)
    status, _, raw = call(url, "POST", "/scaleout", {"replicas": 2},
                          headers={"Authorization": "Bearer s3cret"})
    thread.join(5)
    assert status == 200 and json.loads(raw) == {"ok": True} and taken[0].verb == "scaleout"


# ---- Router edge cases: client disconnects in metrics, request ids on Router errors ----------------

@pytest.fixture
def slow_upstream():
    """A fake replica whose streams last 10 s: one event every 0.1 s."""
    import asyncio

    from aiohttp import web

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(100):
            await response.write(b'data: {"choices": []}\n\n')
            await asyncio.sleep(0.1)
        return response

    with fake_replica(stream) as url:
        yield url


def test_a_client_disconnect_is_not_counted_as_a_server_error(bare_router, slow_upstream):
    server, url = bare_router()
    server.update_replicas([ReplicaInfo(replica_id="x", state=ReplicaState.READY, url=slow_upstream)])
    parts = urlsplit(url)
    body = json.dumps(chat_body("demo", stream=True)).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 5
    while server.snapshot()["replicas"][0]["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    text = call(url, "GET", "/metrics")[2].decode()
    assert metric_value(text, "yrllm_router_requests_total", route="/v1/chat/completions",
                        status="500") is None, "a 200 stream the client left is counted as a 500"


def test_router_errors_carry_the_request_id(bare_router):
    _, url = bare_router()
    status, headers, _ = call(url, "POST", "/v1/chat/completions", chat_body("no-such-model"),
                              headers={"X-Request-Id": "r-404"})
    assert status == 404
    assert headers.get("X-Request-Id") == "r-404"
