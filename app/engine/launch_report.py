"""How one engine process started its engine: which launcher, why, and when each step happened."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class Launcher(str, Enum):
    """How an engine process starts vLLM's EngineCore.

    FORK: the pre-imported, frozen engine process forks the core (vLLM's own engine-core entry point,
    handshaking over TCP) and runs vLLM's OpenAI server against it as an external engine: no second
    import of torch and vLLM. SPAWN: vLLM's standard path (its OpenAI server spawns EngineCore, which imports
    everything again); the fallback when the fork's prerequisites do not hold."""

    FORK = "fork"
    SPAWN = "spawn"


class Origin(str, Enum):
    """How an engine process came to be.

    ZYGOTE: forked from its node's zygote, which imported everything once (``app.engine.zygote``): no
    import on the scale-out path. SPAWN: a fresh Python (``python -m app.engine.main``) that imports
    torch and vLLM itself (~8 s of CPU on 2 cores); the fallback while no zygote can fork."""

    ZYGOTE = "zygote"
    SPAWN = "spawn"


#: ``--distributed-executor-backend`` for tensor-parallel workers forked from the EngineCore
#: (``app.engine.forked_workers``; named here so that building a spec imports no vLLM).
FORKED_WORKERS_EXECUTOR = "app.engine.forked_workers.ForkedWorkersExecutor"


class WorkersReport(BaseModel):
    """How a tensor-parallel engine's workers were started (written by its EngineCore)."""

    method: Launcher = Field(description="fork (from the EngineCore) or spawn (vLLM's standard path).")
    reason: str | None = Field(None, description="Why they were spawned where fork was asked for.")
    pids: list[int] = Field(default_factory=list, description="One worker process per rank, in rank order.")


class LaunchReport(BaseModel):
    replica_id: str
    origin: Origin = Field(description="How the engine process was made.")
    origin_reason: str | None = Field(None, description="Why the engine process was spawned, if it was.")
    launcher: Launcher
    reason: str | None = Field(None, description="Why the spawn launcher was used, if it was not asked for.")
    preimported_modules: int = Field(0, description="Modules its zygote (or, spawned, the process itself) "
                                     "imported ahead of its spec.")
    core_pid: int | None = Field(None, description="Fork only: the EngineCore process.")
    core_log: str | None = Field(None, description="Fork only: the EngineCore's own log file.")
    spec_received_at: float = Field(description="Wall-clock time the engine process read its spec.")
    core_forked_at: float | None = Field(None, description="Fork only: wall-clock time of the fork.")
    workers: WorkersReport | None = Field(None, description="Tensor parallel only: how the EngineCore "
                                          "started its workers (once it has).")
