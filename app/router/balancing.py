"""Replica selection policies for the Router.

Policies register themselves by name so a config can pick one; an unknown name is a clear error.
"""

from __future__ import annotations

import logging
import random
from typing import ClassVar, Sequence

logger = logging.getLogger(__name__)


class BalancingPolicy:
    """Pick one replica among the ready ones. Subclasses implement ``_select`` only."""

    registry: ClassVar[dict[str, type["BalancingPolicy"]]] = {}
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        BalancingPolicy.registry[cls.name] = cls

    @classmethod
    def create(cls, name: str) -> "BalancingPolicy":
        try:
            return cls.registry[name]()
        except KeyError:
            raise ValueError(f"unknown balancing policy {name!r}; known: {sorted(cls.registry)}") from None

    def select(self, ready: Sequence[str], in_flight: dict[str, int]) -> str | None:
        """Return the replica to use, or None if no replica is ready."""
        if not ready:
            return None
        chosen = self._select(ready, in_flight)
        logger.debug("selected replica %s among %d (in flight %s)", chosen, len(ready), in_flight)
        return chosen

    def _select(self, ready: Sequence[str], in_flight: dict[str, int]) -> str:
        raise NotImplementedError


class LeastOutstandingRequests(BalancingPolicy):
    """The ready replica with the fewest requests in flight; ties broken at random so that equal
    replicas share load instead of the first one taking every request after an idle period."""

    name = "least_outstanding"

    def _select(self, ready: Sequence[str], in_flight: dict[str, int]) -> str:
        fewest = min(in_flight.get(replica, 0) for replica in ready)
        return random.choice([r for r in ready if in_flight.get(r, 0) == fewest])
