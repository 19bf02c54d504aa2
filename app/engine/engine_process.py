"""An engine process forked by a zygote (``zygotes``). Spawned engine processes are ``ChildProcess``es of
the driver; both are ``GroupLeader``s to the engine host."""

from __future__ import annotations

import os
import select
import time
from pathlib import Path

from app.runtime.processes import GroupLeader

#: The exit code reported for a forked engine whose zygote died before it could reap it.
EXIT_CODE_UNKNOWN = 255


class ForkedProcess(GroupLeader):
    """An engine process forked by a zygote. It is the zygote's child, not ours: it is watched through a
    pidfd, and its exit code comes from the file the zygote writes when it reaps it."""

    def __init__(self, pid: int, pidfd: int, log_file: Path, exit_code_path: Path) -> None:
        self.name, self.log_file = f"engine process {pid}", log_file
        self._pid, self._pidfd, self._exit_code_path = pid, pidfd, exit_code_path
        self._code: int | None = None

    @property
    def pid(self) -> int:
        return self._pid

    def wait(self, timeout_s: float | None) -> int | None:
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
