"""Engine processes started ahead of need.

After the weights (mapped in under 0.1 s), a replica's start is dominated by processes importing
torch and vLLM. An engine process becomes a warm standby first and only then reads its EngineSpec
from stdin (``app.engine.main``), so the pool keeps ``spec.standby_processes`` of them, started with
the App; a scale-out takes one and skips the imports, and its EngineCore is forked from it. The pool
is refilled after a replica served its first token (not while it starts: on a small machine the
refill would compete for the same cores).

One pool per process: in yr local mode every engine actor is a thread of the driver and shares it;
in cluster mode each actor is a process of its own, and the App leaves the pool empty there. Several
Apps in one driver (a notebook, the tests) share it: each ``hold``s it while it runs, and the last to
``release`` it stops the standbys.
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
from app.engine.spec import EngineSpec
from app.runtime.processes import ChildProcess

logger = logging.getLogger(__name__)


class EnginePool:
    def __init__(self) -> None:
        self._idle: list[tuple[dict[str, str | None], ChildProcess]] = []
        self._lock = threading.Lock()
        self._count = itertools.count(1)
        self._holders = 0

    def take(self, spec: EngineSpec) -> ChildProcess:
        """A standby for ``spec`` if there is one (alive, warm or still importing), a fresh process
        otherwise: a burst larger than the pool starts fresh processes, each serving once imported."""
        env = self._environment(spec)
        with self._lock:
            for index, (standby_env, process) in enumerate(self._idle):
                if standby_env == env and process.poll() is None:
                    del self._idle[index]
                    logger.info("using standby engine process %d", process.pid)
                    return process
        return self._start(env, spec.log_dir)

    def prepare(self, spec: EngineSpec) -> None:
        """Start standbys for ``spec`` until ``spec.standby_processes`` are idle."""
        env = self._environment(spec)
        with self._lock:
            self._idle = [(e, p) for e, p in self._idle if p.poll() is None]
            missing = spec.standby_processes - len(self._idle)
        for _ in range(missing):
            process = self._start(env, spec.log_dir)
            with self._lock:
                self._idle.append((env, process))

    def warm_pids(self) -> list[int]:
        """Idle standbys that are warm (imports done, heap frozen)."""
        with self._lock:
            idle = [p for _, p in self._idle if p.poll() is None]
        return [process.pid for process in idle if STANDBY_READY in process.log_head()]

    def hold(self) -> None:
        """An App starts using the pool."""
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        """An App is done with the pool; the last one stops the standbys."""
        with self._lock:
            self._holders = max(0, self._holders - 1)
            last = self._holders == 0
        if last:
            self.close()

    def close(self) -> None:
        """Stop every idle standby. Idempotent."""
        with self._lock:
            idle, self._idle = self._idle, []
        for _, process in idle:
            process.stop(grace_s=5)

    @staticmethod
    def _environment(spec: EngineSpec) -> dict[str, str | None]:
        return spec.environment(os.cpu_count() or 1)

    def _start(self, env: Mapping[str, str | None], log_dir: Path) -> ChildProcess:
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
