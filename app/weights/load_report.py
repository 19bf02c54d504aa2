"""What one engine's weight load did: the plan it was given, where the weights really came from, how
much and how fast, and why it fell back to disk if it did."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from pydantic import BaseModel, Field


class PlanKind(str, Enum):
    """How a new replica gets its weights (decided by the WeightCache)."""

    DISK = "disk"  # vLLM's default loader, nothing published (no cache)
    SEED = "seed"  # load from disk, then publish to the data system for the replicas after it
    MAP = "map"  # parameters become views of the data system's shared memory (host tier, CPU)
    PULL = "pull"  # parameters filled by key from the data system (GPU/NPU, or host copy)


class WeightSource(str, Enum):
    """Where the weights a replica runs on actually came from."""

    DISK = "disk"
    HOST = "host"  # the data system's shared host memory
    NPU = "npu"  # device-memory objects (Ascend)


#: Worst first: a replica's summary source is the worst of its ranks'.
_SOURCE_ORDER = (WeightSource.DISK, WeightSource.HOST, WeightSource.NPU)


def rank_report_path(path: Path, rank: int) -> Path:
    """Where rank ``rank`` writes its report, beside the replica's ``path``."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


class SeedMove(BaseModel):
    """A CPU seed rank's move of its parameters into the data system (``app.weights.seeding``), with
    the rank's resident anonymous and shared memory: the lean seed's bound is on ``added_bytes``."""

    resident_before_bytes: int = Field(description="When the move began: what vLLM's own load left resident.")
    resident_peak_bytes: int = Field(description="The highest while moving (sampled after every chunk copied).")
    remap_seconds: float = Field(description="Re-pointing the parameters at the published bytes (part of "
                                 "publish_seconds).")

    @property
    def added_bytes(self) -> int:
        """What publishing held beyond vLLM's load: one chunk, where a copy would hold the weights twice."""
        return self.resident_peak_bytes - self.resident_before_bytes


class LoadReport(BaseModel):
    """One rank's load, or a replica's: then ``ranks`` holds each rank's, and the other fields sum them
    up (the worst source, the slowest seconds, the bytes of all ranks)."""

    replica_id: str
    rank: int | None = Field(None, description="The tensor parallel rank this report is of; None: a replica's.")
    plan: PlanKind
    source: WeightSource
    node: str | None = Field(None, description="The node (data system worker) the replica used.")
    fetched_from: str | None = Field(None, description="The node the weights were relayed from (the last "
                                     "batch's, after a failover), when this replica brought its node's copy.")
    fetch_failovers: list[str] = Field(default_factory=list, description="Sources given up mid-relay, "
                                       "each with why ('node3: ...'); the relay went on from the next.")
    fetch_seconds: float | None = Field(None, description="The relay onto this node (part of ``seconds``).")
    fetch_read_seconds: float | None = Field(None, description="Of ``fetch_seconds``, waiting for reads: the "
                                             "link, or a source still relaying; the rest is storing.")
    parameters: int = Field(0, description="Parameters filled.")
    bytes: int = Field(0, description="Weight bytes filled.")
    seconds: float = Field(0.0, description="Time to fill every parameter (and publish, for a seed).")
    publish_seconds: float | None = Field(None, description="Seed only: time to publish.")
    seed_move: SeedMove | None = Field(None, description="A CPU seed rank's: its memory while publishing.")
    waited_seconds: float = Field(0.0, description="Time spent waiting for a seed still loading (its "
                                  "engine started in parallel); not part of ``seconds``.")
    fallback_reason: str | None = Field(None, description="Why a fast path fell back to disk.")
    finished_at: float = Field(0.0, description="Wall-clock time the weights were in place.")
    ranks: list["LoadReport"] = Field(default_factory=list, description="A replica's: one report per rank.")

    @classmethod
    def of_ranks(cls, ranks: list["LoadReport"]) -> "LoadReport":
        """A replica's report from its ranks' (at least one)."""
        ranks = sorted(ranks, key=lambda r: r.rank or 0)
        worst = min(ranks, key=lambda r: _SOURCE_ORDER.index(r.source))
        slowest = max(ranks, key=lambda r: r.seconds)
        fallbacks = [f"rank {r.rank}: {r.fallback_reason}" if len(ranks) > 1 else r.fallback_reason
                     for r in ranks if r.fallback_reason]
        fetched = {r.fetched_from for r in ranks}
        relays = [r.fetch_seconds for r in ranks if r.fetch_seconds is not None]
        reads = [r.fetch_read_seconds for r in ranks if r.fetch_read_seconds is not None]
        publish = [r.publish_seconds for r in ranks if r.publish_seconds is not None]
        return cls(replica_id=ranks[0].replica_id, plan=ranks[0].plan, source=worst.source, node=ranks[0].node,
                   fetched_from=fetched.pop() if len(fetched) == 1 else None,
                   fetch_failovers=[f for r in ranks for f in r.fetch_failovers],
                   fetch_seconds=max(relays) if relays else None, fetch_read_seconds=max(reads) if reads else None,
                   parameters=sum(r.parameters for r in ranks), bytes=sum(r.bytes for r in ranks),
                   seconds=slowest.seconds, publish_seconds=max(publish) if publish else None,
                   waited_seconds=max(r.waited_seconds for r in ranks),
                   seed_move=ranks[0].seed_move if len(ranks) == 1 else None,
                   fallback_reason="; ".join(fallbacks) or None, finished_at=max(r.finished_at for r in ranks),
                   ranks=ranks if len(ranks) > 1 else [])

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def summary(self) -> str:
        origin = self.source.value + (f" on {self.node}" if self.node and self.source is not WeightSource.DISK
                                      else "")
        if self.fetched_from:
            origin += f" (fetched from {self.fetched_from}"
            origin += f" after {len(self.fetch_failovers)} failover(s))" if self.fetch_failovers else ")"
        text = (f"plan {self.plan.value}, from {origin}: {self.parameters} params, "
                f"{self.bytes / 1e6:.1f} MB in {self.seconds:.3f} s ({self.gbps:.2f} GB/s)")
        if self.waited_seconds:
            text += f", after waiting {self.waited_seconds:.2f} s for " + ("the seed" if not self.node else
                                                                           f"the copy on {self.node}")
        if self.publish_seconds is not None:
            text += f", published in {self.publish_seconds:.3f} s"
        if self.seed_move:
            text += f" holding +{self.seed_move.added_bytes / 1e6:.0f} MB beyond the load at most"
        if self.ranks:
            text += f" (slowest of {len(self.ranks)} ranks)"
        if self.fallback_reason:
            text += f"; FELL BACK to disk: {self.fallback_reason}"
        return text
