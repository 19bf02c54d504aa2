"""The Router's HTTP server: OpenAI routes proxied to engine replicas, health, metrics, status and the
scaling endpoints.

It imports no vLLM and no torch, so it starts in well under a second. It runs its own asyncio loop;
the methods marked *thread-safe* may be called from any thread (the Router actor's call threads).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future
from typing import Any, Awaitable, Callable, Literal

import aiohttp
from aiohttp import web
from pydantic import BaseModel

from app.balancing import BalancingPolicy
from app.config import RouterConfig
from app.openai_protocol import (
    ApiError,
    ErrorType,
    Route,
    bad_request,
    no_replica_ready,
    parse_request,
    unauthorized,
    upstream_failed,
)
from app.replica import ReplicaInfo, ReplicaState
from app.router_metrics import RouterMetrics

logger = logging.getLogger(__name__)

REQUEST_ID = "X-Request-Id"
#: Recorded for requests whose client went away before the answer was complete (nginx's convention).
CLIENT_CLOSED = 499
_UPSTREAM_KEEPALIVE_S = 2.0
_REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id", str)


class ScaleRequest(BaseModel):
    """A scaling request that arrived over HTTP, waiting for the App (the controller) to carry it out."""

    request_id: str
    verb: Literal["scaleout", "scalein"]
    body: dict[str, Any]


class ScaleMailbox:
    """Hands HTTP scaling requests to the App and its answers back.

    The Router cannot call the App (the App is the driver, not an actor), so the App long-polls
    ``take`` through an actor call and answers with ``finish``. This works the same in local mode
    (threads) and cluster mode (processes)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[ScaleRequest] = queue.Queue()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}

    async def submit(self, verb: str, body: dict[str, Any], timeout_s: float) -> tuple[int, dict[str, Any]]:
        request = ScaleRequest(request_id=uuid.uuid4().hex, verb=verb, body=body)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = (asyncio.get_running_loop(), future)
        self._queue.put(request)
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(request.request_id, None)

    def take(self, timeout_s: float) -> ScaleRequest | None:
        """Thread-safe."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def finish(self, request_id: str, status: int, body: dict[str, Any]) -> None:
        """Thread-safe. An answer for a request whose client has gone is dropped."""
        waiting = self._waiting.get(request_id)
        if waiting is not None:
            loop, future = waiting
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result((status, body)))


class RouterServer:
    """Front door: validates, balances, proxies, measures."""

    def __init__(self, config: RouterConfig, served_models: list[str],
                 policy: str = "least_outstanding") -> None:
        self._config = config
        self._models = list(served_models)
        self._policy = BalancingPolicy.create(policy)
        self._replicas: dict[str, ReplicaInfo] = {}
        self._in_flight: Counter[str] = Counter()
        self._idle = asyncio.Condition()
        self._metrics = RouterMetrics()
        self.scale_requests = ScaleMailbox()
        # (wall time, seconds to first byte) of recent proxied requests: the autoscaler's TTFT signal.
        self._first_bytes: deque[tuple[float, float]] = deque(maxlen=512)
        self._decisions: deque[dict[str, Any]] = deque(maxlen=20)
        self._session: aiohttp.ClientSession | None = None
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
        timeout = aiohttp.ClientTimeout(total=self._config.request_timeout_s, sock_connect=5)
        # No connection limit per host: the balancer, not the pool, decides how many go to a replica.
        # Idle connections are dropped before vLLM's server drops them (uvicorn's keep-alive is 5 s):
        # otherwise a request can be sent on a connection the server is closing at that moment.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_UPSTREAM_KEEPALIVE_S)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)
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
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # ---- control plane (thread-safe) ---------------------------------------------------------------

    def update_replicas(self, replicas: list[ReplicaInfo]) -> None:
        """Replace the replica table. Thread-safe."""
        self._call_in_loop(self._set_replicas, replicas)

    def drain(self, replica_id: str, timeout_s: float) -> bool:
        """Stop routing to a replica and wait until its in-flight requests are done. Thread-safe.
        Returns False if requests were still running after ``timeout_s``."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self._drain(replica_id, timeout_s),
                                                self._loop).result()

    def signals(self, window_s: float = 30.0) -> dict[str, Any]:
        """Load signals for the autoscaler. Thread-safe."""
        horizon = time.time() - window_s
        recent = sorted(ttft for at, ttft in list(self._first_bytes) if at >= horizon)
        return {"ready": len(self._ready_ids()), "in_flight": sum(self._in_flight.values()),
                "ttft_p50_s": recent[len(recent) // 2] if recent else None}

    def record_decision(self, decision: dict[str, Any]) -> None:
        """Show an autoscaling decision in /status and /metrics. Thread-safe."""
        self._decisions.append({"at": time.time(), **decision})
        self._metrics.autoscale_target.set(decision["target"])
        self._metrics.autoscale_decisions.labels(decision["reason"].split(":")[0]).inc()

    def snapshot(self) -> dict[str, Any]:
        """The ``/status`` document. Thread-safe (reads are of immutable snapshots)."""
        return {
            "models": self._models,
            "autoscale_decisions": list(self._decisions),
            "ready_replicas": len(self._ready_ids()),
            "replicas": [{**info.model_dump(mode="json"), "in_flight": self._in_flight[rid]}
                         for rid, info in sorted(self._replicas.items())],
        }

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            fn(*args)
        else:
            asyncio.run_coroutine_threadsafe(_as_coroutine(fn, *args), self._loop).result()

    def _set_replicas(self, replicas: list[ReplicaInfo]) -> None:
        self._replicas = {info.replica_id: info for info in replicas}
        by_state = Counter(info.state for info in replicas)
        for state in ReplicaState:
            self._metrics.replicas.labels(state.value).set(by_state[state])

    async def _drain(self, replica_id: str, timeout_s: float) -> bool:
        info = self._replicas.get(replica_id)
        if info is not None:
            self._replicas[replica_id] = info.model_copy(update={"state": ReplicaState.DRAINING})
        async with self._idle:
            try:
                await asyncio.wait_for(self._idle.wait_for(lambda: self._in_flight[replica_id] == 0),
                                       timeout_s)
                return True
            except asyncio.TimeoutError:
                return False

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
        except _ClientGone as gone:
            status = CLIENT_CLOSED
            return gone.response
        finally:
            self._metrics.requests.labels(route, str(status)).inc()
            self._metrics.latency.labels(route).observe(time.perf_counter() - started)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        ready = len(self._ready_ids())
        return web.json_response({"ready": ready > 0, "ready_replicas": ready}, status=200 if ready else 503)

    def _ready_ids(self) -> list[str]:
        return [rid for rid, info in self._replicas.items()
                if info.state is ReplicaState.READY and info.url]

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
        request_id = request[_REQUEST_ID_KEY]
        replica = self._policy.select(self._ready_ids(), dict(self._in_flight))
        if replica is None:
            raise no_replica_ready()
        url = f"{self._replicas[replica].url}{route.value}"
        self._track(replica, +1)
        started = time.perf_counter()
        response: web.StreamResponse | None = None
        try:
            async with self._session.post(  # type: ignore[union-attr]
                    url, data=proxied.encoded(),
                    headers={"Content-Type": "application/json", REQUEST_ID: request_id}) as upstream:
                headers = {REQUEST_ID: request_id}
                if upstream.content_type:
                    headers["Content-Type"] = upstream.headers.get("Content-Type", upstream.content_type)
                response = web.StreamResponse(status=upstream.status, headers=headers)
                first = True
                async for chunk in upstream.content.iter_any():
                    if first:
                        ttft = time.perf_counter() - started
                        self._metrics.first_byte.labels(route.value).observe(ttft)
                        self._first_bytes.append((time.time(), ttft))
                        await _to_client(response, response.prepare(request))
                        first = False
                    await _to_client(response, response.write(chunk))
                if first:
                    await _to_client(response, response.prepare(request))
                await _to_client(response, response.write_eof())
                return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.warning("replica %s failed request %s: %r", replica, request_id, exc)
            if response is None or not response.prepared:
                raise upstream_failed(repr(exc)) from None
            # Headers are gone; the only honest signal left for a stream is an error event.
            await _to_client(response, response.write(
                b"data: " + json.dumps(upstream_failed(repr(exc)).body()).encode() + b"\n\n"))
            await _to_client(response, response.write_eof())
            return response
        finally:
            self._track(replica, -1)

    def _track(self, replica: str, delta: int) -> None:
        self._in_flight[replica] += delta
        self._metrics.in_flight.labels(replica).set(self._in_flight[replica])
        if delta < 0:
            asyncio.ensure_future(self._notify_idle())

    async def _notify_idle(self) -> None:
        async with self._idle:
            self._idle.notify_all()

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


class _ClientGone(Exception):
    """The client closed its connection while we were writing to it."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client gone")
        self.response = response


async def _to_client(response: web.StreamResponse, operation: Awaitable[Any]) -> None:
    # A failed write to the client is the client leaving, not the replica failing: it must not be
    # caught as an upstream error below (aiohttp's reset error is also a ClientError).
    try:
        await operation
    except ConnectionResetError:
        raise _ClientGone(response) from None


async def _as_coroutine(fn: Callable[..., None], *args: Any) -> None:
    fn(*args)
