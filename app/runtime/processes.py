"""Child processes that can never outlive the App: the data system worker and the engines.

Each child runs in its own process group (so its own children, such as vLLM's EngineCore, are stopped
with it) and gets PR_SET_PDEATHSIG, so the kernel kills it even if the driver is SIGKILLed.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. Children are
therefore always forked from one launcher thread that lives as long as the process, whichever thread
asks for them (yr actor threads, a notebook's worker thread).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, NoReturn, Sequence

from app.files import tail

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LAUNCHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="child-launcher")


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel SIGKILLs this process when the thread that forked it exits."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def end_group_with(pid: int) -> None:
    """In a daemon thread: SIGKILL this process's whole group as soon as process ``pid`` exits (at once
    if it is gone already). For processes whose parent is not the one they must not outlive, such as
    an engine forked by a zygote, which must go with the driver."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.killpg(0, signal.SIGKILL)
        return

    def watch() -> None:
        select.select([pidfd], [], [])  # readable once the process has exited
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name=f"end-with-{pid}", daemon=True).start()


def run_as_forked_child(output: int | Path, body: Callable[[], None]) -> NoReturn:
    """In a child just forked: send stdout and stderr to ``output`` (a descriptor, or a file appended
    to) and read stdin from /dev/null, run ``body``, then exit with its outcome (its SystemExit code,
    0, or 1 after printing the exception). Never returns into the parent's code."""
    code = 1
    try:
        log = output if isinstance(output, int) else os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        body()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:  # noqa: BLE001 - reported in the child's log, then the child ends
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. The child binds it right away, so the race is narrow."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        socket.create_connection((host, port), timeout_s).close()
        return True
    except OSError:
        return False


def is_live_child(pid: int, parent: int) -> bool:
    """True if ``pid`` runs (is not a zombie) as a child of ``parent``. Read from /proc, so that a
    pid the kernel reused for an unrelated process is not mistaken for it."""
    state, ppid = _state_and_parent(pid)
    return state not in ("Z", "X", "") and ppid == parent


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` now (0 if it is gone)."""
    return _state_and_parent(pid)[1]


def _state_and_parent(pid: int) -> tuple[str, int]:
    """``pid``'s state letter and parent, from /proc (``("", 0)`` if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", 0
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]  # the name, in parentheses, may hold spaces
    return state, int(ppid)


def child_environment(changes: Mapping[str, str | None]) -> dict[str, str]:
    """This process's environment with ``changes`` applied; a None value removes the variable."""
    env = {**os.environ, **changes}
    return {name: value for name, value in env.items() if value is not None}


class GroupLeader:
    """A process that leads a process group of its own (its children are in it), with its output in a
    log file. Subclasses say how it is waited for."""

    name: str
    log_file: Path

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def wait(self, timeout_s: float | None) -> int | None:
        """The exit code, waiting up to ``timeout_s`` (None: as long as it takes); None if it still runs."""
        raise NotImplementedError

    def poll(self) -> int | None:
        return self.wait(0)

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_file, lines)

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM the process (it stops its own children), wait up to ``grace_s``, then SIGKILL whatever
        is left of its process group. Idempotent."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            if self.wait(grace_s) is None:
                logger.warning("%s did not stop within %.0f s; killing it", self.name, grace_s)
        # Whatever is left in the group (a grandchild that ignored SIGTERM) goes too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.wait(None)


class ChildProcess(GroupLeader):
    """A supervised child of this process."""

    def __init__(self, name: str, argv: Sequence[str], log_file: Path,
                 env: Mapping[str, str | None] | None = None, cwd: Path | None = None,
                 stdin: bool = False, pass_fds: Sequence[int] = ()) -> None:
        self.name = name
        self.log_file = log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            self._popen = _LAUNCHER.submit(
                subprocess.Popen, list(argv), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=child_environment(env or {}), cwd=cwd,
                start_new_session=True, preexec_fn=die_with_parent, pass_fds=tuple(pass_fds)).result()
        logger.info("started %s (pid %d), log %s", name, self._popen.pid, log_file)

    @property
    def pid(self) -> int:
        return self._popen.pid

    def send_line(self, text: str) -> None:
        """Write one line to the child's stdin (started with ``stdin=True``) and close it."""
        assert self._popen.stdin is not None
        self._popen.stdin.write(text.encode() + b"\n")
        self._popen.stdin.close()

    def poll(self) -> int | None:
        return self._popen.poll()

    def wait(self, timeout_s: float | None) -> int | None:
        try:
            return self._popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
