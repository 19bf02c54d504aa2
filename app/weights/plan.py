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
    fetch_from: str | None = Field(None, description="The first replica on its node: the weights are "
                                   "on this node, read them across through ds_address once.")
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
