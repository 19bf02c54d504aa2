"""WeightCache actor: owns the cached weights and answers how a new replica gets them
(see ``app.weights.cache``)."""

from __future__ import annotations

from pathlib import Path

import yr

from app.replica import Node
from app.weights.cache import WeightCache as _WeightCache
from app.weights.identity import WeightIdentity
from app.weights.load_report import LoadReport, PlanKind
from app.weights.manifest import VerifyMode
from app.weights.plan import WeightPlan


@yr.instance
class WeightCache:
    def __init__(self, ds_address: str, tier: str, cpu_mode: PlanKind, verify: VerifyMode, timeout_ms: int,
                 await_seed_s: float, fanout: str = "chain") -> None:
        self._cache = _WeightCache(ds_address, tier=tier, cpu_mode=cpu_mode, verify=verify,
                                   timeout_ms=timeout_ms, await_seed_s=await_seed_s, fanout=fanout)

    def plan(self, identity: WeightIdentity, replica_id: str, node: Node, report_path: Path) -> WeightPlan:
        return self._cache.plan(identity, replica_id, node, report_path)

    def report(self, report: LoadReport) -> str | None:
        return self._cache.report(report)

    def abandon(self, replica_id: str) -> None:
        self._cache.abandon(replica_id)

    def release(self, replica_id: str) -> None:
        self._cache.release(replica_id)

    def retire(self, fingerprint: str) -> bool:
        return self._cache.retire(fingerprint)

    def forget_node(self, node: str) -> int:
        return self._cache.forget_node(node)

    def set_reachable(self, node: str, reachable: bool) -> None:
        self._cache.set_reachable(node, reachable)

    def revalidate(self) -> list[str]:
        return self._cache.revalidate()

    def clear(self) -> None:
        self._cache.clear()

    def stats(self) -> dict[str, object]:
        return self._cache.stats()
