"""Requests that found no ready replica in their pool, held until one is ready, in arrival order.

A pool has no ready replica when it was scaled to zero, or while every replica of it is starting
(after a failure, say). While an App is attached (``open``: it can start the replica a request waits
for), such a request waits here instead of being refused, and the first one asks the App to wake the
pools at zero (``wake``, through the scale mailbox) without waiting for the autoscaler. Past
``router.queue_max`` requests held at once, or ``router.queue_timeout_s`` for one of them, the client
gets a 503 with ``Retry-After``. A client that leaves is dropped from the queue: it is never sent
upstream and does not hold a place.

Runs on the Router's event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from enum import Enum
from typing import Callable

from app.replica import Role
from app.router.metrics import RouterMetrics
from app.router.openai_protocol import ApiError, no_replica_ready

#: What a client whose request was refused here should wait before trying again: about one start.
RETRY_AFTER_S = 5


class HoldOutcome(str, Enum):
    RELEASED = "released"  # a replica became ready; the request went to it
    TIMEOUT = "timeout"  # held for router.queue_timeout_s: 503
    FULL = "full"  # router.queue_max requests were held already: 503 at once
    GONE = "gone"  # the client left while held
    CLOSED = "closed"  # the App detached (it is shutting down): 503


class WaitingRoom:
    def __init__(self, limit: int, timeout_s: float, metrics: RouterMetrics, wake: Callable[[], bool]) -> None:
        self._limit = limit
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._wake = wake  # asks the App to wake the pools at zero; False if it was asked already
        self._held: dict[Role, deque[asyncio.Future[None]]] = {}
        self.opened = False  # an App is attached: it starts replicas for the requests held here

    def open(self) -> None:
        self.opened = True

    def held(self, role: Role | None = None) -> int:
        """Requests held now (for ``role``, if given)."""
        return sum(len(queue) for r, queue in list(self._held.items()) if role in (None, r))

    async def wait(self, role: Role, deadline: float) -> None:
        """Return once ``role`` may have a ready replica (``release``); the caller picks one, and waits
        again if it lost the race. Raises the 503 the client gets if the request cannot be held, or was
        held until ``deadline`` (``time.monotonic()``; see ``deadline``)."""
        if not self.opened:
            raise _unavailable(role)
        if self._wake():  # even if this request cannot be held: it says the pool is wanted
            self._metrics.wakes.labels(role.value).inc()
        if self.held() >= self._limit:
            self._count(role, HoldOutcome.FULL)
            raise _unavailable(role, f"{self._limit} requests are already waiting for a replica to start "
                               f"(router.queue_max)", "queue_full")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._held.setdefault(role, deque())
        queue.append(future)
        self._metrics.held.labels(role.value).set(len(queue))
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await future
        except ApiError:
            self._count(role, HoldOutcome.CLOSED)
            raise
        except TimeoutError:
            self._count(role, HoldOutcome.TIMEOUT)
            raise _unavailable(role, f"no replica became ready within {self._timeout_s:g} s "
                               f"(router.queue_timeout_s)", "queue_timeout") from None
        except asyncio.CancelledError:
            self._count(role, HoldOutcome.GONE)
            raise
        finally:
            if future in queue:
                queue.remove(future)
            self._metrics.held.labels(role.value).set(len(queue))
        self._count(role, HoldOutcome.RELEASED)

    def deadline(self) -> float:
        """The ``time.monotonic()`` until which a request that starts waiting now may be held."""
        return time.monotonic() + self._timeout_s

    def release(self, role: Role) -> None:
        """``role``'s pool has a ready replica: every request held for it goes, first come first."""
        queue = self._held.get(role)
        while queue:
            future = queue.popleft()
            if not future.done():
                future.set_result(None)
        if queue is not None:
            self._metrics.held.labels(role.value).set(0)

    def close(self) -> None:
        """No App to start replicas any more: held requests get their 503 now, new ones at once."""
        self.opened = False
        for role, queue in self._held.items():
            while queue:
                future = queue.popleft()
                if not future.done():
                    future.set_exception(_unavailable(role))

    def _count(self, role: Role, outcome: HoldOutcome) -> None:
        self._metrics.holds.labels(role.value, outcome.value).inc()


def _unavailable(role: Role, why: str | None = None, code: str = "no_replica_ready") -> ApiError:
    return no_replica_ready(None if role is Role.MERGED else role.value, RETRY_AFTER_S, why, code)
