"""Engine processes started ahead of need.

After the weights (mapped in under 0.1 s), a replica's start is dominated by processes importing
torch and vLLM. An engine process imports its server first and only then reads its EngineSpec from
stdin (``app.engine.main``), so the pool can keep ``size`` processes standing by, already imported;
a scale-out takes one and skips that import. The pool is refilled after a replica is ready (not
while it starts: on a small machine the refill would compete for the same cores).

One pool per process: in yr local mode every engine actor is a thread of the driver and shares it;
in cluster mode each actor is a process of its own, and the App leaves the pool empty there.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Mapping

from app.engine.main import STANDBY_READY
from app.runtime.processes import ChildProcess

logger = logging.getLogger(__name__)


class EnginePool:
    def __init__(self) -> None:
        self._idle: list[tuple[dict[str, str], ChildProcess]] = []
        self._lock = threading.Lock()
        self._count = itertools.count(1)

    def take(self, env: Mapping[str, str], log_dir: Path) -> ChildProcess:
        """A standby started with ``env`` if there is one (alive), a fresh process otherwise."""
        with self._lock:
            for index, (standby_env, process) in enumerate(self._idle):
                if standby_env == dict(env) and process.poll() is None:
                    del self._idle[index]
                    logger.info("using standby engine process %d", process.pid)
                    return process
        return self._start(env, log_dir)

    def refill(self, env: Mapping[str, str], log_dir: Path, size: int) -> None:
        """Start standbys until ``size`` are idle."""
        with self._lock:
            self._idle = [(e, p) for e, p in self._idle if p.poll() is None]
            missing = size - len(self._idle)
        for _ in range(missing):
            process = self._start(env, log_dir)
            with self._lock:
                self._idle.append((dict(env), process))

    def warm(self) -> int:
        """Idle standbys that have finished importing."""
        with self._lock:
            idle = [p for _, p in self._idle if p.poll() is None]
        return sum(1 for process in idle if STANDBY_READY in process.log_head())

    def close(self) -> None:
        """Stop every idle standby. Idempotent."""
        with self._lock:
            idle, self._idle = self._idle, []
        for _, process in idle:
            process.stop(grace_s=5)

    def _start(self, env: Mapping[str, str], log_dir: Path) -> ChildProcess:
        number = next(self._count)
        return ChildProcess(f"engine process {number}", [sys.executable, "-m", "app.engine.main"],
                            log_dir / f"engine-process-{os.getpid()}-{number}.log",
                            env={**env, "PYTHONPATH": _project_root()}, stdin=True)


def _project_root() -> str:
    # The engine process must import this project even when the driver was started from elsewhere.
    root = str(Path(__file__).resolve().parents[2])
    existing = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{existing}" if existing else root


#: The pool of this process (see the module docstring).
ENGINE_POOL = EnginePool()
