"""The App's side of the WeightCache actor: a plan for each new replica, its load report afterwards,
its release when it stops. If the WeightCache cannot answer, a replica loads from disk and says why:
a missing cache costs speed, never a replica."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from app.replica import Node
from app.weights.identity import WeightIdentity
from app.weights.load_report import LoadReport, PlanKind
from app.weights.plan import WeightPlan

logger = logging.getLogger(__name__)


class WeightCacheClient:
    def __init__(self, actor: Any, identity: WeightIdentity) -> None:
        self.actor = actor  # the WeightCache actor's handle
        self.identity = identity

    def plan(self, replica_id: str, node: Node, report_path: Path, tensor_parallel: int = 1) -> WeightPlan:
        """How ``replica_id`` gets its weights. Every rank of a ``tensor_parallel`` engine loads its own
        shard: the identity covers the rank layout, each rank's keys its rank."""
        import yr

        identity = self.identity.model_copy(update={"tp_size": tensor_parallel})
        try:
            return yr.get(self.actor.plan.invoke(identity, replica_id, node, report_path))
        except Exception as exc:  # noqa: BLE001 - the replica still starts, from disk
            logger.warning("the WeightCache could not plan %s (%s); it loads from disk", replica_id, exc)
            return WeightPlan(kind=PlanKind.DISK, replica_id=replica_id, fingerprint=identity.fingerprint,
                              node=node.name, ds_address=node.ds_address, report_path=report_path,
                              reason=f"WeightCache unavailable: {type(exc).__name__}: {exc}")

    def settle(self, replica_id: str, report: LoadReport | None, failed: bool) -> str | None:
        """Tell the cache how the replica's load went: its report, or that it never became a replica
        (a failed seed is then abandoned and the next replica seeds again). Returns why the cache
        retired its entry, if this report made it."""
        import yr

        try:
            if failed or report is None:
                yr.get(self.actor.abandon.invoke(replica_id))
                return None
            return yr.get(self.actor.report.invoke(report))
        except Exception:  # noqa: BLE001 - bookkeeping; serving goes on without it
            logger.exception("could not report %s's weight load to the WeightCache", replica_id)
            return None

    def forget_node(self, node: str) -> int:
        """The data system worker of ``node`` died with the objects it held: drop the entries it was
        home to and its copies of others (the next replica seeds or fetches again). Returns how many
        entries were dropped."""
        import yr

        return yr.get(self.actor.forget_node.invoke(node))

    def set_reachable(self, node: str, reachable: bool) -> None:
        """A node was cut off (its copies are no relay source) or is back."""
        import yr

        yr.get(self.actor.set_reachable.invoke(node, reachable))

    def revalidate(self) -> list[str]:
        """Check every copy key by key and drop the incomplete ones; returns what was dropped."""
        import yr

        return yr.get(self.actor.revalidate.invoke())

    def release(self, replica_id: str) -> None:
        import yr

        try:
            yr.get(self.actor.release.invoke(replica_id))
        except Exception:  # noqa: BLE001 - the replica is stopped regardless
            logger.exception("releasing %s's weights failed", replica_id)

    def stats(self) -> dict[str, object]:
        import yr

        return yr.get(self.actor.stats.invoke())
