"""The Router's HTTP server: OpenAI routes proxied to engine replicas, health, metrics, status and the
scaling endpoints. Its parts live beside it: ``dispatch`` (which replicas serve a request: one, or a
prefill and a decode leg), ``replica_pool`` (who is routed to), ``waiting_room`` (requests held while
their pool has no ready replica), ``proxy`` (the upstream side), ``scale_mailbox`` (scaling requests
and wake-ups for the App), ``openai_protocol``, ``metrics``.

It imports no vLLM and no torch, so it starts in well under a second. It runs its own asyncio loop;
the methods marked *thread-safe* may be called from any thread (the Router actor's call threads).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from aiohttp import web

from app.config import RouterConfig, ServingMode
from app.events import Event
from app.kv.ledger import KVStats
from app.replica import ReplicaInfo, Role
from app.router.dispatch import Dispatcher
from app.router.metrics import RouterMetrics
from app.router.openai_protocol import (
    ApiError,
    ErrorType,
    Route,
    bad_request,
    parse_request,
    unauthorized,
)
from app.router.proxy import REQUEST_ID, ClientGone, Upstream
from app.router.replica_pool import ReplicaPool
from app.router.scale_mailbox import ScaleMailbox
from app.router.waiting_room import WaitingRoom

logger = logging.getLogger(__name__)

#: Recorded for requests whose client went away before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499
_REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id", str)


class RouterServer:
    """Front door: validates, balances, proxies, measures."""

    def __init__(self, config: RouterConfig, served_models: list[str], mode: ServingMode = ServingMode.MERGED,
                 policy: str = "least_outstanding") -> None:
        self._config = config
        self._models = list(served_models)
        self._mode = mode
        self._roles = mode.roles
        self._metrics = RouterMetrics()
        self._pool = ReplicaPool(self._metrics, self._roles, policy)
        self.scale_requests = ScaleMailbox()
        self._waiting = WaitingRoom(config.queue_max, config.queue_timeout_s, self._metrics, self.scale_requests.wake)
        self._last_request_at = time.monotonic()  # of the last proxied request (or the start): idleness
        self._footprint: dict[str, Any] | None = None  # what the App holds, as it last measured it
        # (wall time, seconds to first byte) of recent client requests: the autoscaler's TTFT signal (of
        # the pool that computes prompts).
        self._first_bytes: deque[tuple[float, float]] = deque(maxlen=512)
        self._decisions: deque[dict[str, Any]] = deque(maxlen=20)
        self._events: deque[dict[str, Any]] = deque(maxlen=50)
        self._upstream = Upstream(config.request_timeout_s, self._metrics,
                                  lambda ttft: self._first_bytes.append((time.time(), ttft)))
        self._dispatcher = Dispatcher(mode, self._pool, self._waiting, self._upstream, self._metrics)
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start_in_thread(self) -> int:
        """Run the server on a loop in a daemon thread; returns the bound port. Thread-safe."""
        started: Future[int] = Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                started.set_result(loop.run_until_complete(self.start()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                started.set_exception(exc)
                return
            loop.run_forever()
            loop.run_until_complete(self._cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="router-http", daemon=True)
        self._thread.start()
        return started.result(timeout=30)

    def stop_thread(self) -> None:
        """Stop the server started by ``start_in_thread``. Thread-safe, idempotent."""
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    async def start(self) -> int:
        app = web.Application(middlewares=[self._errors_and_metrics], client_max_size=64 * 1024 * 1024)
        app.add_routes([
            web.get("/health", self._health),
            web.get("/ready", self._ready),
            web.get("/metrics", self._metrics_page),
            web.get("/status", self._status),
            web.get("/v1/models", self._models_page),
            web.post(Route.COMPLETIONS.value, self._proxy),
            web.post(Route.CHAT_COMPLETIONS.value, self._proxy),
            web.post("/scaleout", self._scale),
            web.post("/scalein", self._scale),
        ])
        await self._upstream.open()
        # handler_cancellation: a client that disconnects cancels its handler, which closes the
        # upstream connection, which makes vLLM abort the request instead of generating for nobody.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        logger.info("Router listening on http://%s:%d", self._config.host, self.port)
        return self.port

    async def _cleanup(self) -> None:
        self._waiting.close()  # held requests get their 503 before the server goes
        if self._runner is not None:
            await self._runner.cleanup()
        await self._upstream.close()

    # ---- control plane (thread-safe) ---------------------------------------------------------------

    def update_replicas(self, replicas: list[ReplicaInfo]) -> None:
        """Replace the replica table; requests held for a pool that now has a ready replica go to it.
        Thread-safe."""
        self._call_in_loop(self._replace_replicas, replicas)

    def attach(self, attached: bool) -> None:
        """An App that starts replicas on demand is attached (True) or going away (False): while it is,
        requests that find no ready replica are held and wake their pool. Thread-safe."""
        self._call_in_loop(self._waiting.open if attached else self._waiting.close)

    def drain(self, replica_id: str, timeout_s: float) -> bool:
        """Stop routing to a replica and wait until its in-flight requests are done. Thread-safe.
        Returns False if requests were still running after ``timeout_s``."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._pool.drain(replica_id, timeout_s), self._loop).result()

    def signals(self, window_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """Load signals for the autoscaler, per role. Thread-safe."""
        horizon = time.time() - window_s
        recent = sorted(ttft for at, ttft in list(self._first_bytes) if at >= horizon)
        ttft = recent[len(recent) // 2] if recent else None
        since_request_s = round(time.monotonic() - self._last_request_at, 3)
        return {role.value: {"ready": len(self._pool.ready_ids(role)), "in_flight": self._pool.in_flight(role),
                             "held": self._waiting.held(role), "since_request_s": since_request_s,
                             "ttft_p50_s": None if role is Role.DECODE else ttft} for role in self._roles}

    def record_decision(self, decision: dict[str, Any]) -> None:
        """Show an autoscaling decision in /status and /metrics. Thread-safe."""
        self._decisions.append({"at": time.time(), **decision})
        self._metrics.autoscale_target.labels(decision["role"]).set(decision["target"])
        self._metrics.autoscale_decisions.labels(decision["role"], decision["reason"].split(":")[0]).inc()

    def record_event(self, event: Event) -> None:
        """Show a supervision event in /status and /metrics. Thread-safe."""
        self._events.append(event.model_dump(mode="json"))
        self._metrics.supervision_events.labels(event.kind.value).inc()

    def record_kv(self, stats: KVStats) -> None:
        """Show the App's KV totals in /status and /metrics. Thread-safe (one reference swapped)."""
        self._metrics.kv.stats = stats

    def record_footprint(self, footprint: dict[str, Any]) -> None:
        """Show what the App holds (processes, data system bytes) in /status. Thread-safe."""
        self._footprint = footprint

    def snapshot(self) -> dict[str, Any]:
        """The ``/status`` document. Thread-safe (reads are of immutable snapshots)."""
        return {
            "models": self._models,
            "mode": self._mode.value,
            "autoscale_decisions": list(self._decisions),
            "events": list(self._events),
            "kv": self._metrics.kv.stats.model_dump(),
            "ready_replicas": len(self._pool.ready_ids()),
            "wakes_on_request": self._waiting.opened,
            "held_requests": self._waiting.held(),
            "footprint": self._footprint,
            "replicas": self._pool.rows(),
        }

    def _replace_replicas(self, replicas: list[ReplicaInfo]) -> None:
        self._pool.replace(replicas)
        for role in self._roles:
            if self._pool.ready_ids(role):
                self._waiting.release(role)

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            fn(*args)
        else:
            asyncio.run_coroutine_threadsafe(_as_coroutine(fn, *args), self._loop).result()

    # ---- HTTP --------------------------------------------------------------------------------------

    @web.middleware
    async def _errors_and_metrics(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        started = time.perf_counter()
        request[_REQUEST_ID_KEY] = request.headers.get(REQUEST_ID) or f"req-{uuid.uuid4().hex}"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except ApiError as error:
            status = error.status
            return web.json_response(error.body(), status=error.status,
                                     headers={**error.headers(), REQUEST_ID: request[_REQUEST_ID_KEY]})
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client left; not a server error
            raise
        except ClientGone as gone:
            status = CLIENT_CLOSED
            return gone.response
        finally:
            self._metrics.requests.labels(route, str(status)).inc()
            self._metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        """200 while a request sent now will be served: a replica is ready, or the App holds the request
        and wakes a pool at zero (``wakes_on_request``)."""
        ready = len(self._pool.ready_ids())
        serves = ready > 0 or (self._waiting.opened and self._config.queue_max > 0)
        return web.json_response({"ready": serves, "ready_replicas": ready, "wakes_on_request": self._waiting.opened},
                                 status=200 if serves else 503)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), content_type="text/plain", charset="utf-8")

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def _models_page(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "yrllm"} for name in self._models]})

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        route = Route(request.path)
        proxied = parse_request(route, await request.read(), set(self._models))
        self._last_request_at = time.monotonic()
        return await self._dispatcher.serve(request, proxied, request[_REQUEST_ID_KEY])

    async def _scale(self, request: web.Request) -> web.Response:
        if not self._may_scale(request):
            raise unauthorized()
        raw = await request.read()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        try:
            status, answer = await self.scale_requests.submit(request.path.strip("/"), body,
                                                              self._config.scale_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "The scaling request did not finish in time; see /status.",
                           ErrorType.UNAVAILABLE, None, "scale_timeout") from None
        return web.json_response(answer, status=status)

    def _may_scale(self, request: web.Request) -> bool:
        token = self._config.admin_token
        if token is not None:
            scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
            return scheme.lower() == "bearer" and secrets.compare_digest(
                presented.strip().encode(), token.get_secret_value().encode())
        try:
            return ipaddress.ip_address(request.remote or "").is_loopback
        except ValueError:
            return False


async def _as_coroutine(fn: Callable[..., None], *args: Any) -> None:
    fn(*args)
