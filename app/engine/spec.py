"""Everything one engine process needs to start, as one validated, JSON-serialisable model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.config import AppConfig, RuntimeMode


class EngineSpec(BaseModel):
    """One vLLM engine: which model, how, and where it listens. Built by the App, run by an engine
    actor in a process of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replica_id: str
    model: Path
    served_model_name: str
    host: str
    port: int
    dtype: str
    max_model_len: int | None
    kv_cache_gib: int
    threads: int
    enforce_eager: bool
    extra_args: list[str] = Field(default_factory=list)
    load_format: str = "auto"
    loader_extra_config: dict[str, Any] = Field(default_factory=dict)
    log_dir: Path
    start_timeout_s: float
    standby_processes: int = 0

    @classmethod
    def from_config(cls, config: AppConfig, *, replica_id: str, model: Path, served_model_name: str,
                    log_dir: Path, port: int = 0) -> "EngineSpec":
        engine = config.engine
        return cls(replica_id=replica_id, model=model, served_model_name=served_model_name,
                   host=engine.host, port=port, dtype=engine.dtype, max_model_len=engine.max_model_len,
                   kv_cache_gib=engine.kv_cache_gib, threads=engine.threads,
                   enforce_eager=engine.enforce_eager, extra_args=list(engine.extra_args),
                   log_dir=log_dir, start_timeout_s=engine.start_timeout_s,
                   # Standbys help where engine actors share a process: local mode.
                   standby_processes=engine.standby_processes
                   if config.runtime.resolved_mode is RuntimeMode.LOCAL else 0)

    def server_args(self) -> list[str]:
        """The ``vllm serve`` flags for this engine."""
        args = ["--model", str(self.model), "--served-model-name", self.served_model_name,
                "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
                "--distributed-executor-backend", "uni",
                "--load-format", self.load_format, "--disable-uvicorn-access-log"]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.loader_extra_config:
            args += ["--model-loader-extra-config", json.dumps(self.loader_extra_config)]
        return args + list(self.extra_args)

    def environment(self, cpu_count: int) -> dict[str, str]:
        threads = self.threads or cpu_count
        return {
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "OMP_NUM_THREADS": str(threads),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            # Engines share cores with each other and the driver: pinning threads would stack them.
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            # Keeps the model worker inside EngineCore ("uni" executor; vLLM's CPU platform
            # switches to the multiprocess executor otherwise): one process spawn, and one
            # re-import of torch and vLLM (~8 s on 2 cores), fewer per replica.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }

    @property
    def load_report_path(self) -> Path:
        """Where our load format writes this engine's LoadReport."""
        return self.log_dir / f"load-{self.replica_id}.json"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
