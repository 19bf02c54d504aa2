"""The Router's client side: one connection pool to every replica, and forwarding one request to one
replica with its answer streamed back to the client as it arrives (SSE chunks are passed through
untouched).

A replica that fails before any byte reached the client raises ``NothingSent``: the request can go
to another replica (Envoy's "connect-failure, reset" retry policy). Timeouts are not in that class: a
request that timed out may still be running on its replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from app.replica import ReplicaInfo
from app.router.metrics import RouterMetrics
from app.router.openai_protocol import ApiError, Route, upstream_failed

logger = logging.getLogger(__name__)

REQUEST_ID = "X-Request-Id"
# Idle connections are dropped before vLLM's server drops them (uvicorn's keep-alive is 5 s):
# otherwise a request can be sent on a connection the server is closing at that moment.
_UPSTREAM_KEEPALIVE_S = 2.0


class ClientGone(Exception):
    """The client closed its connection while we were writing to it."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client gone")
        self.response = response


class NothingSent(Exception):
    """The replica could not be reached, or closed the connection, before any byte of the answer
    reached the client."""

    def __init__(self, reason: str, error: ApiError) -> None:
        super().__init__(error.message)
        self.reason = reason  # "connect" or "disconnect": the retry metric's label
        self.error = error  # what the client gets if there is no retry left


class Upstream:
    """``open`` and ``close`` on the Router's event loop; ``forward`` per request."""

    def __init__(self, request_timeout_s: float, metrics: RouterMetrics,
                 on_first_byte: Callable[[float], None]) -> None:
        self._request_timeout_s = request_timeout_s
        self._metrics = metrics
        self._on_first_byte = on_first_byte  # seconds from request to the replica's first byte
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._request_timeout_s, sock_connect=5)
        # No connection limit per host: the balancer, not the pool, decides how many go to a replica.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_UPSTREAM_KEEPALIVE_S)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, route: Route, body: bytes, replica: ReplicaInfo, request_id: str) -> tuple[int, bytes]:
        """Send ``body`` to ``replica`` and return its status and whole answer, for the Router itself
        (a prefill leg). Fails as ``forward`` does before an answer started."""
        assert self._session is not None, "Upstream.open() first"
        try:
            async with self._session.post(f"{replica.url}{route.value}", data=body, headers={
                    "Content-Type": "application/json", REQUEST_ID: request_id}) as upstream:
                return upstream.status, await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.warning("replica %s failed request %s: %r", replica.replica_id, request_id, exc)
            raise _before_answer(exc) from None

    async def forward(self, request: web.Request, route: Route, body: bytes, replica: ReplicaInfo,
                      request_id: str, started: float | None = None) -> web.StreamResponse:
        """Send ``body`` to ``replica`` and stream its answer back. A replica that fails before the
        answer started raises ``NothingSent`` (a connection failure: retry elsewhere) or a 502
        ``ApiError`` (a timeout); one that fails mid-stream ends the stream with an OpenAI error
        event, the status line being already sent. The time to first byte counts from ``started``
        (``time.perf_counter()``; now if None)."""
        assert self._session is not None, "Upstream.open() first"
        started = time.perf_counter() if started is None else started
        response: web.StreamResponse | None = None
        try:
            async with self._session.post(
                    f"{replica.url}{route.value}", data=body,
                    headers={"Content-Type": "application/json", REQUEST_ID: request_id}) as upstream:
                headers = {REQUEST_ID: request_id}
                if upstream.content_type:
                    headers["Content-Type"] = upstream.headers.get("Content-Type", upstream.content_type)
                if upstream.content_type != "text/event-stream":
                    # A whole answer goes back in one write with its length: less work on the hot
                    # path than a chunked stream (most of the Router's cost on short completions).
                    whole = await upstream.read()
                    self._first_byte(route, started)
                    return web.Response(body=whole, status=upstream.status, headers=headers)
                response = web.StreamResponse(status=upstream.status, headers=headers)
                first = True
                async for chunk in upstream.content.iter_any():
                    if first:
                        self._first_byte(route, started)
                        await _to_client(response, response.prepare(request))
                        first = False
                    await _to_client(response, response.write(chunk))
                if first:
                    await _to_client(response, response.prepare(request))
                await _to_client(response, response.write_eof())
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.warning("replica %s failed request %s: %r", replica.replica_id, request_id, exc)
            if response is None or not response.prepared:
                raise _before_answer(exc) from None
            # Headers are gone; the only honest signal left for a stream is an error event.
            self._metrics.broken_streams.labels(route.value).inc()
            await _to_client(response, response.write(
                b"data: " + json.dumps(upstream_failed(repr(exc)).body()).encode() + b"\n\n"))
            await _to_client(response, response.write_eof())
            return response

    def _first_byte(self, route: Route, started: float) -> None:
        ttft = time.perf_counter() - started
        self._metrics.first_byte.labels(route.value).observe(ttft)
        self._on_first_byte(ttft)


def _before_answer(exc: Exception) -> Exception:
    """What a failure before the answer started is: a timeout may still be running on the replica (502),
    a connection that failed or closed is ``NothingSent`` (retried elsewhere)."""
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return upstream_failed(repr(exc))
    reason = "connect" if isinstance(exc, aiohttp.ClientConnectorError) else "disconnect"
    return NothingSent(reason, upstream_failed(repr(exc)))


async def _to_client(response: web.StreamResponse, operation: Awaitable[Any]) -> None:
    # A failed write to the client is the client leaving, not the replica failing: it must not be
    # caught as an upstream error above (aiohttp's reset error is also a ClientError).
    try:
        await operation
    except ConnectionResetError:
        raise ClientGone(response) from None
