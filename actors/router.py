"""Router actor: the HTTP front door (see ``app.router.server``)."""

from __future__ import annotations

from typing import Any

import yr

from app.config import RouterConfig, ServingMode
from app.events import Event
from app.kv.ledger import KVStats
from app.replica import ReplicaInfo
from app.router.scale_mailbox import ScaleRequest
from app.router.server import RouterServer


@yr.instance
class Router:
    """Owns the aiohttp server thread; the App pushes the replica table and drains replicas through it,
    and long-polls it for scaling requests that arrive over HTTP."""

    def __init__(self, config: RouterConfig, served_models: list[str], mode: ServingMode) -> None:
        self._server = RouterServer(config, served_models, mode)

    def start(self) -> int:
        return self._server.start_in_thread()

    def update_replicas(self, replicas: list[ReplicaInfo]) -> None:
        self._server.update_replicas(replicas)

    def attach(self, attached: bool) -> None:
        self._server.attach(attached)

    def record_footprint(self, footprint: dict[str, Any]) -> None:
        self._server.record_footprint(footprint)

    def drain(self, replica_id: str, timeout_s: float) -> bool:
        return self._server.drain(replica_id, timeout_s)

    def signals(self) -> dict[str, dict[str, Any]]:
        return self._server.signals()

    def record_decision(self, decision: dict[str, Any]) -> None:
        self._server.record_decision(decision)

    def record_event(self, event: Event) -> None:
        self._server.record_event(event)

    def record_kv(self, stats: KVStats) -> None:
        self._server.record_kv(stats)

    def status(self) -> dict[str, Any]:
        return self._server.snapshot()

    def next_scale_request(self, timeout_s: float) -> ScaleRequest | None:
        return self._server.scale_requests.take(timeout_s)

    def finish_scale_request(self, request_id: str, status: int, body: dict[str, Any]) -> None:
        self._server.scale_requests.finish(request_id, status, body)

    def stop(self) -> None:
        self._server.stop_thread()
