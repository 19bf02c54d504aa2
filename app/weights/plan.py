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
    ds_address: str
    verify: VerifyMode = VerifyMode.SAMPLED
    timeout_ms: int = Field(5000, gt=0)
    await_seed_s: float = Field(0.0, ge=0, description="map/pull planned while the seed is still "
                                "loading: wait this long for its manifest to appear.")
    reason: str | None = Field(None, description="disk plans: why the cache is not used (reported).")
    report_path: Path = Field(description="Where the loader writes its LoadReport (JSON).")
