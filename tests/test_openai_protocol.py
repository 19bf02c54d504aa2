"""Request checks and the OpenAI error envelope."""

import pytest

from app.router.openai_protocol import ApiError, Route, no_replica_ready, parse_request

MODELS = {"demo"}


@pytest.mark.parametrize("route, raw, status, param", [
    (Route.COMPLETIONS, b"{not json", 400, None),
    (Route.COMPLETIONS, b"[1, 2]", 400, None),
    (Route.COMPLETIONS, b'{"prompt": "hi"}', 400, "model"),
    (Route.COMPLETIONS, b'{"model": "demo"}', 400, "prompt"),
    (Route.COMPLETIONS, b'{"model": "demo", "prompt": 3}', 400, "prompt"),
    (Route.CHAT_COMPLETIONS, b'{"model": "demo", "messages": []}', 400, "messages"),
    (Route.CHAT_COMPLETIONS, b'{"model": "demo", "messages": [{}], "stream": "yes"}', 400, "stream"),
    (Route.CHAT_COMPLETIONS, b'{"model": "other", "messages": [{}]}', 404, "model"),
])
def test_rejects_with_status_and_param(route, raw, status, param):
    with pytest.raises(ApiError) as info:
        parse_request(route, raw, MODELS)
    assert info.value.status == status
    body = info.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param and body["message"]


def test_accepts_a_valid_request_unchanged():
    raw = b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "stream": true, "temperature": 0.10}'
    request = parse_request(Route.CHAT_COMPLETIONS, raw, MODELS)
    assert request.stream and request.body["temperature"] == 0.1
    assert request.raw is raw  # forwarded as received, not re-encoded


def test_unavailable_carries_retry_after():
    error = no_replica_ready(retry_after_s=7)
    assert error.status == 503 and error.headers() == {"Retry-After": "7"}
