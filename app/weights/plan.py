"""The plan a WeightCache gives a new replica, carried to our vLLM load format through
``model_loader_extra_config`` (JSON), and validated again on arrival."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.weights.load_report import PlanKind
from app.weights.manifest import VerifyMode

LOAD_FORMAT = "yrllm"


class WeightPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: PlanKind
    replica_id: str
    fingerprint: str
    tier: Literal["host", "npu"] = "host"
    node: str = Field("node1", description="The node this replica runs on: ds_address is its worker.")
    ds_address: str
    fetch_from: str | None = Field(None, description="The first replica on its node: relay that node's "
                                   "copy onto this one, through ds_address, once.")
    fetch_fallbacks: list[str] = Field(default_factory=list, description="Where to go on relaying if "
                                       "fetch_from fails mid-way: the nodes it relays from in turn, the "
                                       "seed's last. Each holds at any moment at least what the one before it does.")
    home: str | None = Field(None, description="The node whose copy is under the entry's own keys (the "
                             "seed's). None: the last source, or this node if there is none.")
    verify: VerifyMode = VerifyMode.SAMPLED
    timeout_ms: int = Field(5000, gt=0)
    await_seed_s: float = Field(0.0, ge=0, description="map/pull planned while the seed is still "
                                "loading: wait this long for its manifest to appear.")
    await_fetch_s: float = Field(0.0, ge=0, description="map/pull planned while the first replica on "
                                 "this node (fetcher) is still fetching: wait this long for its copy.")
    seed_replica: str | None = Field(None, description="The seed replica to await (its tombstone says it failed).")
    fetcher: str | None = Field(None, description="The replica whose fetch onto this node to await.")
    reason: str | None = Field(None, description="disk plans: why the cache is not used (reported).")
    report_path: Path = Field(description="Where the loader writes its LoadReport (JSON).")

    @property
    def sources(self) -> list[str]:
        """The nodes to relay from, in the order to try them."""
        return [self.fetch_from, *self.fetch_fallbacks] if self.fetch_from else []

    @property
    def home_node(self) -> str:
        return self.home or (self.sources[-1] if self.sources else self.node)
