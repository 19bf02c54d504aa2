"""The plan a WeightCache gives a new replica, carried to our vLLM load format through
``model_loader_extra_config`` (JSON), and validated again on arrival."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from app.weights.load_report import PlanKind
from app.weights.manifest import VerifyMode

LOAD_FORMAT = "yrllm"


class WeightPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: PlanKind
    replica_id: str
    fingerprint: str
    tier: str = Field("host", description="host or npu.")
    ds_address: str
    verify: VerifyMode = VerifyMode.SAMPLED
    timeout_ms: int = Field(5000, gt=0)
    report_path: Path = Field(description="Where the loader writes its LoadReport (JSON).")
