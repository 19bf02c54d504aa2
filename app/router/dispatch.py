"""Which replicas serve a request. Merged mode: one replica, the ready one with the fewest requests in
flight. Disaggregated mode: two legs with one request id (``handoff``), each on its pool's least busy
replica. The prefill leg first; only if it answered 200 does the decode leg start, and its answer
streams to the client. An error of the prefill leg is the client's answer; a client that leaves
cancels whichever leg is running (its connection closes, and vLLM aborts the request).

A replica that fails before answering is retried once per leg, on another replica of the pool if there
is one: a decode replica loads the KV from the data system, so any of them can take the leg.

A leg whose pool has no ready replica waits for one in the ``WaitingRoom`` (a pool scaled to zero, or
one whose replicas are all starting), or gets the 503 the waiting room gives.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable, TypeVar

from aiohttp import web

from app.config import ServingMode
from app.replica import ReplicaInfo, Role
from app.router.handoff import decode_leg, handed_over, prefill_leg
from app.router.metrics import RouterMetrics
from app.router.openai_protocol import ProxiedRequest
from app.router.proxy import REQUEST_ID, NothingSent, Upstream
from app.router.replica_pool import ReplicaPool
from app.router.waiting_room import WaitingRoom

logger = logging.getLogger(__name__)
_Answer = TypeVar("_Answer")


class Dispatcher:
    def __init__(self, mode: ServingMode, pool: ReplicaPool, waiting: WaitingRoom, upstream: Upstream,
                 metrics: RouterMetrics) -> None:
        self._mode = mode
        self._pool = pool
        self._waiting = waiting
        self._upstream = upstream
        self._metrics = metrics

    async def serve(self, request: web.Request, proxied: ProxiedRequest, request_id: str) -> web.StreamResponse:
        route = proxied.route
        if self._mode is ServingMode.MERGED:
            return await self._on_replica(Role.MERGED, request_id, lambda replica: self._upstream.forward(
                request, route, proxied.raw, replica, request_id))
        started = time.perf_counter()  # the client's time to first token includes the prefill leg
        status, answer = await self._on_replica(Role.PREFILL, request_id, lambda replica: self._upstream.call(
            route, prefill_leg(proxied.body), replica, request_id))
        if status != 200:  # vLLM's own error, in the OpenAI envelope: passed through
            self._metrics.prefill_legs.labels("failed").inc()
            return web.Response(body=answer, status=status, content_type="application/json",
                                headers={REQUEST_ID: request_id})
        params = handed_over(answer)
        self._metrics.prefill_legs.labels("handed_over" if params else "no_handoff").inc()
        return await self._on_replica(Role.DECODE, request_id, lambda replica: self._upstream.forward(
            request, route, decode_leg(proxied.body, params), replica, request_id, started))

    async def _on_replica(self, role: Role, request_id: str,
                          send: Callable[[ReplicaInfo], Awaitable[_Answer]]) -> _Answer:
        """``send`` to the ready replica of ``role`` with the fewest requests in flight, once there is one;
        retried once on ``NothingSent`` (on the same replica if it is the only one: a connection the
        replica was closing is the common case there)."""
        replica = self._pool.pick(role)
        deadline = None
        while replica is None:
            deadline = deadline or self._waiting.deadline()
            await self._waiting.wait(role, deadline)
            replica = self._pool.pick(role)
        try:
            return await self._tracked(replica, send)
        except NothingSent as failed:
            retry = self._pool.pick(role, avoid=replica.replica_id)
            if retry is None:
                raise failed.error from None
            self._metrics.retries.labels(failed.reason).inc()
            logger.info("request %s: %s failed before answering (%s); retrying on %s", request_id,
                        replica.replica_id, failed.reason, retry.replica_id)
            try:
                return await self._tracked(retry, send)
            except NothingSent as again:
                raise again.error from None

    async def _tracked(self, replica: ReplicaInfo, send: Callable[[ReplicaInfo], Awaitable[_Answer]]) -> _Answer:
        self._pool.started(replica.replica_id)
        try:
            return await send(replica)
        finally:
            self._pool.finished(replica.replica_id)
