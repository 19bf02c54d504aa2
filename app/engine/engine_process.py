"""Engine processes as the engine host sees them, however they were made (``zygotes``): spawned ones are
``ChildProcess``es of the driver; forked ones are ``ForkedProcess``es, children of a zygote."""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from pathlib import Path
from typing import Protocol

from app.files import tail

logger = logging.getLogger(__name__)

#: The exit code reported for a forked engine whose zygote died before it could reap it.
EXIT_CODE_UNKNOWN = 255


class EngineProcess(Protocol):
    """What the engine host needs of an engine process, however it was made."""

    pid: int
    log_file: Path

    def poll(self) -> int | None: ...
    def wait(self, timeout_s: float) -> int | None: ...
    def log_tail(self, lines: int = 30) -> str: ...
    def stop(self, grace_s: float = 30.0) -> int: ...


class ForkedProcess:
    """An engine process forked by a zygote. It is the zygote's child, not ours: it is watched through a
    pidfd, and its exit code comes from the file the zygote writes when it reaps it."""

    def __init__(self, pid: int, pidfd: int, log_file: Path, exit_code_path: Path) -> None:
        self.pid, self.log_file = pid, log_file
        self._pidfd, self._exit_code_path = pidfd, exit_code_path
        self._code: int | None = None

    def poll(self) -> int | None:
        return self.wait(0)

    def wait(self, timeout_s: float) -> int | None:
        if self._code is not None:
            return self._code
        readable, _, _ = select.select([self._pidfd], [], [], timeout_s)
        if not readable:
            return None
        deadline = time.monotonic() + 2.0  # the zygote reaps it at once, unless the zygote is gone too
        while time.monotonic() < deadline and not self._exit_code_path.exists():
            time.sleep(0.01)
        try:
            self._code = int(self._exit_code_path.read_text())
        except (OSError, ValueError):
            self._code = EXIT_CODE_UNKNOWN
        os.close(self._pidfd)
        return self._code

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_file, lines)

    def stop(self, grace_s: float = 30.0) -> int:
        """SIGTERM the process (it stops its core and workers), wait up to ``grace_s``, then SIGKILL
        whatever is left of its process group. Idempotent."""
        if self.poll() is None:
            self._signal_group(signal.SIGTERM)
            if self.wait(grace_s) is None:
                logger.warning("engine process %d did not stop within %.0f s; killing it", self.pid, grace_s)
        self._signal_group(signal.SIGKILL)
        code = self.wait(30)
        return EXIT_CODE_UNKNOWN if code is None else code

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
