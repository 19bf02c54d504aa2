"""Scaling requests that arrive over HTTP, held for the App (the controller) to carry out."""

from __future__ import annotations

import asyncio
import queue
import uuid
from typing import Any, Literal

from pydantic import BaseModel


class ScaleRequest(BaseModel):
    """A scaling request that arrived over HTTP, waiting for the App (the controller) to carry it out."""

    request_id: str
    verb: Literal["scaleout", "scalein", "wake"]
    body: dict[str, Any]


class ScaleMailbox:
    """Hands HTTP scaling requests to the App and its answers back.

    The Router cannot call the App (the App is the driver, not an actor), so the App long-polls
    ``take`` through an actor call and answers with ``finish``. This works the same in local mode
    (threads) and cluster mode (processes)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[ScaleRequest] = queue.Queue()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._wake: str | None = None  # the id of the wake-up the App has not finished yet

    def wake(self) -> bool:
        """Ask the App to bring the pools at zero back, unless it is already asked; nobody waits for the
        answer (held requests wait for a ready replica instead). True if a wake-up was posted."""
        if self._wake is not None:
            return False
        request = ScaleRequest(request_id=uuid.uuid4().hex, verb="wake", body={})
        self._wake = request.request_id
        self._queue.put(request)
        return True

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
        if request_id == self._wake:
            self._wake = None
        waiting = self._waiting.get(request_id)
        if waiting is not None:
            loop, future = waiting
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result((status, body)))
