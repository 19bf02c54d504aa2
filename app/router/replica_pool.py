"""The replicas the Router routes to: the table the App publishes, the requests in flight on each,
the choice of a replica for a request, and draining.

Changed only on the Router's event loop; the readers called from other threads (``ready_ids``,
``in_flight``, ``rows``) copy before they iterate.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from app.replica import ReplicaInfo, ReplicaState, Role
from app.router.balancing import BalancingPolicy
from app.router.metrics import RouterMetrics


class ReplicaPool:
    def __init__(self, metrics: RouterMetrics, roles: tuple[Role, ...] = (Role.MERGED,),
                 policy: str = "least_outstanding") -> None:
        self._metrics = metrics
        self._roles = roles  # the pools of the App's mode
        self._policy = BalancingPolicy.create(policy)
        self._replicas: dict[str, ReplicaInfo] = {}
        self._in_flight: Counter[str] = Counter()
        self._idle = asyncio.Condition()  # notified whenever a request on some replica ends

    def replace(self, replicas: list[ReplicaInfo]) -> None:
        """Take the App's replica table as it is now."""
        self._replicas = {info.replica_id: info for info in replicas}
        by_role_state = Counter((info.role, info.state) for info in replicas)
        for role in self._roles:
            for state in ReplicaState:
                self._metrics.replicas.labels(role.value, state.value).set(by_role_state[role, state])

    def ready_ids(self, role: Role | None = None) -> list[str]:
        """The replicas that take requests (of ``role``, if given)."""
        return [rid for rid, info in list(self._replicas.items())
                if info.state is ReplicaState.READY and info.url and role in (None, info.role)]

    def in_flight(self, role: Role | None = None) -> int:
        """Requests in flight (on the replicas of ``role``, if given)."""
        replicas = dict(self._replicas)
        return sum(count for rid, count in dict(self._in_flight).items()
                   if role is None or (rid in replicas and replicas[rid].role is role))

    def rows(self) -> list[dict[str, Any]]:
        """One ``/status`` row per replica."""
        in_flight = dict(self._in_flight)
        return [{**info.model_dump(mode="json"), "in_flight": in_flight.get(rid, 0)}
                for rid, info in sorted(dict(self._replicas).items())]

    def pick(self, role: Role, avoid: str | None = None) -> ReplicaInfo | None:
        """The ready replica of ``role`` for the next request (None if none is ready). ``avoid`` is
        taken only if it is the one ready replica."""
        ready = self.ready_ids(role)
        others = [rid for rid in ready if rid != avoid]
        chosen = self._policy.select(others or ready, dict(self._in_flight))
        return None if chosen is None else self._replicas[chosen]

    def started(self, replica_id: str) -> None:
        """A request went to ``replica_id``; ``finished`` must follow, whatever happens."""
        self._track(replica_id, +1)

    def finished(self, replica_id: str) -> None:
        self._track(replica_id, -1)
        asyncio.ensure_future(self._notify_idle())

    async def drain(self, replica_id: str, timeout_s: float) -> bool:
        """Stop routing to a replica and wait until its in-flight requests are done. Returns False if
        requests were still running after ``timeout_s``."""
        info = self._replicas.get(replica_id)
        if info is not None:
            self._replicas[replica_id] = info.model_copy(update={"state": ReplicaState.DRAINING})
        async with self._idle:
            try:
                await asyncio.wait_for(self._idle.wait_for(lambda: self._in_flight[replica_id] == 0), timeout_s)
                return True
            except asyncio.TimeoutError:
                return False

    def _track(self, replica_id: str, delta: int) -> None:
        self._in_flight[replica_id] += delta
        self._metrics.in_flight.labels(replica_id).set(self._in_flight[replica_id])

    async def _notify_idle(self) -> None:
        async with self._idle:
            self._idle.notify_all()
