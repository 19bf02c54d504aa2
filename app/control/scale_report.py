"""What ``App.scale`` did, for a person (``print(report)`` in a notebook) and for programs
(``report.to_dict()``, the JSON that ``POST /scaleout`` answers)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.engine.launch_report import LaunchReport, Origin
from app.replica import ReplicaState, Role
from app.weights.load_report import LoadReport

#: Timeline marks in the order a replica passes them.
MILESTONES = ("requested", "actor_up", "process_made", "core_forked", "weights_loaded", "engine_ready",
              "first_token", "drained", "stopped")


class ReplicaReport(BaseModel):
    replica_id: str
    role: Role = Role.MERGED
    node: str | None = Field(None, description="The node (data system worker) it ran on.")
    action: Literal["added", "removed"]
    state: ReplicaState
    timeline: dict[str, float] = Field(default_factory=dict, description="Wall-clock time of each "
                                       "milestone (seconds since the epoch).")
    launch: LaunchReport | None = None
    weights: LoadReport | None = None
    error: str | None = None

    def seconds_since_requested(self) -> dict[str, float]:
        start = self.timeline.get("requested")
        if start is None:
            return {}
        return {mark: round(self.timeline[mark] - start, 3) for mark in MILESTONES if mark in self.timeline}


class PoolChange(BaseModel):
    """One role's replicas in a scaling: asked for, before, ready after."""

    requested: int
    before: int
    after: int


class ScaleReport(BaseModel):
    pools: dict[Role, PoolChange]
    seconds: float
    replicas: list[ReplicaReport] = Field(default_factory=list)

    @property
    def requested_replicas(self) -> int:
        return sum(pool.requested for pool in self.pools.values())

    @property
    def replicas_before(self) -> int:
        return sum(pool.before for pool in self.pools.values())

    @property
    def replicas_after(self) -> int:
        return sum(pool.after for pool in self.pools.values())

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.replicas)

    def to_dict(self) -> dict[str, Any]:
        data = {"requested_replicas": self.requested_replicas, "replicas_before": self.replicas_before,
                "replicas_after": self.replicas_after, **self.model_dump(mode="json")}
        for replica, source in zip(data["replicas"], self.replicas):
            replica["seconds_since_requested"] = source.seconds_since_requested()
        return data

    def __str__(self) -> str:
        pools = ", ".join(("" if role is Role.MERGED else f"{role.value} ") +
                          f"{pool.before} -> {pool.after} of {pool.requested}" for role, pool in self.pools.items())
        lines = [f"scale: {pools} replicas in {self.seconds:.2f} s" + ("" if self.ok else "  (with errors)")]
        for replica in self.replicas:
            marks = "  ".join(f"{mark} +{s:.2f}s" for mark, s in replica.seconds_since_requested().items())
            lines.append(f"  {replica.replica_id:<6} {replica.role.value:<8} {replica.node or '':<6} "
                         f"{replica.action:<8} {replica.state.value:<8} {marks}")
            if replica.launch is not None:
                workers = replica.launch.workers
                forked = replica.launch.origin is Origin.ZYGOTE
                lines.append(f"         engine: process {'forked from the zygote' if forked else 'spawned'}"
                             + (f" ({replica.launch.origin_reason})" if replica.launch.origin_reason else "")
                             + f", {replica.launch.launcher.value} launcher"
                             + (f" ({replica.launch.reason})" if replica.launch.reason else "")
                             + (f", {len(workers.pids)} tensor-parallel workers {workers.method.value}ed"
                                + (f" ({workers.reason})" if workers.reason else "") if workers else ""))
            if replica.weights is not None:
                lines.append(f"         weights: {replica.weights.summary()}")
                lines += [f"           rank {rank.rank}: {rank.summary()}" for rank in replica.weights.ranks]
            if replica.error:
                lines.append(f"         error: {replica.error}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython/Jupyter display
        printer.text(str(self))
