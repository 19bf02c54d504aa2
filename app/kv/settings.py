"""What the App tells each engine's connector (``kv_connector_extra_config``), validated on both
sides, and the ``--kv-transfer-config`` that loads the connector into vLLM."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

CONNECTOR_NAME = "DataSystemKVConnector"
CONNECTOR_MODULE = "app.kv.connector"


class ConnectorSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ds_address: str  # the data system worker, HOST:PORT
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16,64}$")  # the weights' identity
    journal: Path  # this engine's journal: the base name of its files (``app.kv.journal``)
    timeout_ms: int = Field(gt=0)
    ttl_s: int = Field(ge=0)
    splits: int = Field(1, ge=1)  # objects per block (``keys``): the App's largest TP size, at most the KV heads

    def transfer_config(self) -> str:
        """The value of vLLM's ``--kv-transfer-config``."""
        return json.dumps({
            "kv_connector": CONNECTOR_NAME, "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            # A block that fails to load is recomputed by vLLM, never used and never an error.
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": self.model_dump(mode="json")})
