"""Everything one engine process needs to start, as one validated, JSON-serialisable model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.config import AppConfig
from app.engine.launch_report import FORKED_WORKERS_EXECUTOR as EXECUTOR
from app.engine.launch_report import Launcher
from app.engine.preimports import CACHE_DIR_ENV, WARM_COMPILER_ENV
from app.kv.settings import ConnectorSettings
from app.replica import Node, Role
from app.weights.plan import LOAD_FORMAT, WeightPlan


class EngineSpec(BaseModel):
    """One vLLM engine: which model, how, and where it listens. Built by the App, run by an engine
    actor in a process of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replica_id: str
    role: Role = Role.MERGED
    model: Path
    served_model_name: str
    host: str
    port: int
    dtype: str
    max_model_len: int | None
    kv_cache_gib: float
    threads: int
    tensor_parallel: int = 1  # ranks: one worker process each (vLLM's multiprocess executor) when > 1
    enforce_eager: bool
    extra_args: list[str] = Field(default_factory=list)
    load_format: str = "auto"
    loader_extra_config: dict[str, Any] = Field(default_factory=dict)
    log_dir: Path
    start_timeout_s: float
    launcher: Launcher = Launcher.FORK
    tp_workers: Launcher = Launcher.FORK  # how a tensor-parallel EngineCore starts its workers
    # Some pool of the App is tensor parallel, so its first requests compile: the zygote warms the compiler
    # (App-wide, not this engine's size, so that every pool's specs match the same zygote).
    warm_compiler: bool = False
    cache_dir: Path | None = None  # where engine processes record the modules a start imports
    kv_connector: ConnectorSettings | None = None  # None: no KV blocks through the data system
    node: Node | None = None  # the data system worker this engine uses for weights and KV blocks
    node_from_host: bool = False  # cluster mode: the engine actor's host names its worker (DS_WORKER_ADDR)

    @classmethod
    def from_config(cls, config: AppConfig, *, replica_id: str, model: Path, served_model_name: str,
                    log_dir: Path, port: int = 0, role: Role = Role.MERGED) -> "EngineSpec":
        engine = config.engine
        return cls(replica_id=replica_id, role=role, model=model, served_model_name=served_model_name,
                   host=engine.host, port=port, dtype=engine.dtype, max_model_len=engine.max_model_len,
                   kv_cache_gib=engine.kv_cache_gib, threads=engine.threads,
                   tensor_parallel=config.tensor_parallel(role),
                   warm_compiler=any(config.tensor_parallel(r) > 1 for r in config.mode.roles),
                   enforce_eager=engine.enforce_eager, extra_args=list(engine.extra_args),
                   log_dir=log_dir, start_timeout_s=engine.start_timeout_s,
                   launcher=Launcher(engine.launcher), tp_workers=Launcher(engine.tp_workers),
                   cache_dir=config.demo_cache_dir / "engine")

    def on_node(self, node: Node) -> "EngineSpec":
        """This spec on ``node``: its KV blocks go through that node's worker too, and on a node with a
        network namespace of its own the engine runs in it and listens at the node's address."""
        kv = self.kv_connector.model_copy(update={"ds_address": node.ds_address}) if self.kv_connector else None
        where = {"host": node.address} if node.netns and node.address else {}
        return self.model_copy(update={"node": node, "kv_connector": kv, **where})

    @property
    def netns(self) -> str | None:
        """The network namespace the engine's processes run in (runtime.node_network=netns)."""
        return self.node.netns if self.node else None

    def with_weights(self, plan: WeightPlan) -> "EngineSpec":
        """This spec loading its weights as ``plan`` says, with our load format."""
        return self.model_copy(update={"load_format": LOAD_FORMAT, "loader_extra_config": plan.model_dump(mode="json")})

    def server_args(self, fork_workers: bool = True) -> list[str]:
        """The ``vllm serve`` flags for this engine. ``fork_workers``: tensor-parallel workers are forked
        from the EngineCore (``forked_workers``); False: vLLM's own ``mp`` executor spawns them."""
        executor = "uni" if self.tensor_parallel == 1 else EXECUTOR if fork_workers else "mp"
        args = ["--model", str(self.model), "--served-model-name", self.served_model_name,
                "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
                "--tensor-parallel-size", str(self.tensor_parallel), "--distributed-executor-backend", executor,
                "--load-format", self.load_format, "--disable-uvicorn-access-log",
                "--kv-cache-memory-bytes", str(int(self.kv_cache_gib * 2**30))]
        # Unset: vLLM's "auto", the model's own length or the longest one request can have in the KV
        # cache (the 7B shape's 32k tokens need 0.88 GiB per rank; 0.25 GiB holds 9k).
        args += ["--max-model-len", str(self.max_model_len or "auto")]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.loader_extra_config:
            args += ["--model-loader-extra-config", json.dumps(self.loader_extra_config)]
        if self.kv_connector:
            args += ["--kv-transfer-config", self.kv_connector.transfer_config()]
        return args + list(self.extra_args)

    def environment(self, cpu_count: int) -> dict[str, str | None]:
        """The engine process's environment on top of the App's; None removes a variable."""
        threads = self.threads or cpu_count
        return {
            # Whole GiB only, and it overrides --kv-cache-memory-bytes (an empty value crashes vLLM).
            # The bytes are per rank with tensor parallelism (each rank caches its KV heads).
            "VLLM_CPU_KVCACHE_SPACE": None,
            "OMP_NUM_THREADS": str(threads),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            # Engines share cores with each other and the driver: pinning threads would stack them.
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            # Keeps the model worker inside EngineCore ("uni" executor; vLLM's CPU platform
            # switches to the multiprocess executor otherwise): one process spawn, and one
            # re-import of torch and vLLM (~8 s on 2 cores), fewer per replica.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            # What torch.compile builds (TP > 1 compiles vLLM's vocab-parallel masking on the first
            # request, 11.5 s cold here) is kept across replicas and App runs.
            "TORCHINDUCTOR_CACHE_DIR": str(self.cache_dir / "inductor") if self.cache_dir else None,
            # A precompiled header only speeds up compiling new C++ kernels; inductor preprocesses the
            # whole torch header set in every process to hash it (~0.35 s of each replica's first
            # request here), even when every kernel is cached.
            "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS": "0",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            CACHE_DIR_ENV: str(self.cache_dir) if self.cache_dir else None,
            WARM_COMPILER_ENV: "1" if self.warm_compiler else None,
        }

    def rank_threads(self, cpu_count: int) -> int:
        """Threads of each tensor-parallel rank: ``threads``, or the cores shared among the ranks."""
        return self.threads or max(1, cpu_count // self.tensor_parallel)

    @property
    def load_report_path(self) -> Path:
        """Where our load format writes this engine's LoadReport."""
        return self.log_dir / f"load-{self.replica_id}.json"

    def load_report_paths(self) -> list[Path]:
        """The LoadReports our load format writes, one per rank (``app.weights.load_report``)."""
        return sorted(self.log_dir.glob(f"{self.load_report_path.stem}.rank*.json"))

    @property
    def workers_report_path(self) -> Path:
        """Where a tensor-parallel EngineCore writes how it started its workers."""
        return self.log_dir / f"workers-{self.replica_id}.json"

    @property
    def launch_report_path(self) -> Path:
        """Where the engine process writes its LaunchReport."""
        return self.log_dir / f"launch-{self.replica_id}.json"

    @property
    def exit_code_path(self) -> Path:
        """Where the zygote that forked this engine's process writes its exit code."""
        return self.log_dir / f"exit-{self.replica_id}"

    @property
    def core_log_path(self) -> Path:
        """The forked EngineCore's own log."""
        return self.log_dir / f"engine-core-{self.replica_id}.log"

    @property
    def kv_journal_path(self) -> Path:
        """The base name of this engine's KV connector journal files (``app.kv.journal``)."""
        return self.log_dir / f"kv-{self.replica_id}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
