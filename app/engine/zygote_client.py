"""The driver's handle on one zygote process (``app.engine.zygote``): it starts it, waits for it to be
ready, sends it orders, and restarts it when it dies.

A thread of the driver waits on the zygote. If it exits while held, the event goes to the listeners
and a new zygote starts (after 1 s, with a delay that doubles to 60 s while it keeps dying young).
Until the new one is ready, forks are refused (``ZygoteUnavailable``), so that scale-outs spawn rather
than wait for an import; only the first start is waited for.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import sys
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Callable, Mapping

from app.engine.engine_process import ForkedProcess
from app.engine.order import EngineOrder
from app.engine.zygote import CONTROL_FD_ENV, MAX_MESSAGE, Forked, ZygoteReady
from app.runtime.memory import family_memory
from app.runtime.processes import ChildProcess

logger = logging.getLogger(__name__)

#: A listener hears what happened to a zygote: ("died" | "restarted", a sentence).
Listener = Callable[[str, str], None]
_FORK_TIMEOUT_S = 30.0


class ZygoteUnavailable(RuntimeError):
    """The zygote cannot fork now; the message says why."""


class ZygoteState(str, Enum):
    STARTING = "starting"  # importing; scale-outs wait for the first start, and spawn during a restart
    READY = "ready"
    DEAD = "dead"  # exited; a restart is scheduled
    CLOSED = "closed"


class Zygote:
    """One zygote process and its restarts."""

    _count = itertools.count(1)

    def __init__(self, environment: Mapping[str, str | None], log_dir: Path, start_timeout_s: float) -> None:
        self._environment = dict(environment)
        self._log_dir = log_dir
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()  # one order at a time on the socket
        self._listeners: list[Listener] = []
        self._state = ZygoteState.STARTING
        self._ready: ZygoteReady | None = None
        self._starts = 0
        self._spawned_at = 0.0
        self._death: str | None = None  # how the last zygote died, while it is restarted
        self._process, self._control = self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="zygote-watch", daemon=True)
        self._watcher.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def wait_ready(self, timeout_s: float | None = None) -> ZygoteReady:
        """The zygote's ready message, waiting for its first start; raises ZygoteUnavailable if it
        died or is restarting (restarts are not waited for: scale-outs spawn meanwhile)."""
        with self._lock:
            return self._wait_ready(self._start_timeout_s if timeout_s is None else timeout_s)

    def _wait_ready(self, timeout_s: float) -> ZygoteReady:
        if self._ready is not None:
            return self._ready
        if self._state is not ZygoteState.STARTING or self._starts > 1:
            raise ZygoteUnavailable(f"the zygote is {self._describe()}")
        self._control.settimeout(timeout_s)
        try:
            message = self._control.recv(MAX_MESSAGE)
        except OSError as exc:  # a timeout, or the socket closed under us
            raise ZygoteUnavailable(f"the zygote (pid {self.pid}) is not ready after {timeout_s:.0f} s: {exc}")
        if not message:
            raise ZygoteUnavailable(f"the zygote (pid {self.pid}) exited while importing: {self._last_line()}")
        self._ready = ZygoteReady.model_validate_json(message)
        self._state = ZygoteState.READY
        logger.info("zygote %d ready (%d modules pre-imported; fork: %s)", self.pid,
                    self._ready.preimported_modules, self._ready.fork_refusal or "supported")
        return self._ready

    def fork(self, order: EngineOrder, log_file: Path) -> ForkedProcess:
        """Fork an engine process for ``order``, its output in ``log_file``."""
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._wait_ready(self._start_timeout_s)
            order.spec.exit_code_path.unlink(missing_ok=True)  # a replica id's earlier process may have left one
            log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                self._control.settimeout(_FORK_TIMEOUT_S)
                socket.send_fds(self._control, [order.model_dump_json().encode()], [log_fd])
                message, fds, _, _ = socket.recv_fds(self._control, MAX_MESSAGE, 1)
            except OSError as exc:
                raise ZygoteUnavailable(f"the zygote (pid {self.pid}) did not fork: {exc}")
            finally:
                os.close(log_fd)
            if not message or len(fds) != 1:
                raise ZygoteUnavailable(f"the zygote (pid {self.pid}) exited: {self._last_line()}")
        forked = Forked.model_validate_json(message)
        logger.info("replica %s runs in engine process %d, forked from zygote %d (log %s)",
                    order.spec.replica_id, forked.pid, self.pid, log_file)
        return ForkedProcess(forked.pid, fds[0], log_file, order.spec.exit_code_path)

    def status(self) -> dict:
        memory = family_memory(self.pid)  # the zygote first, then what runs under it
        return {"pid": self.pid, "state": self._state.value, "starts": self._starts, "log": str(self._process.log_file),
                "preimported_modules": self._ready.preimported_modules if self._ready else None,
                "processes": len(memory), "rss_bytes": memory[0].rss if memory else None,
                "pss_bytes": memory[0].pss if memory else None,
                # What copy-on-write sharing with the zygote saves: anonymous pages counted once, not per process.
                "cow_saved_bytes": sum(m.anonymous - m.pss_anon for m in memory)}

    def close(self) -> None:
        """Stop the zygote (its engine processes are their replicas' to stop). Idempotent."""
        with self._lock:
            self._state = ZygoteState.CLOSED
            self._control.close()
            self._process.stop(grace_s=5)

    # ---- supervision ---------------------------------------------------------------------------------

    def _spawn(self) -> tuple[ChildProcess, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._starts += 1
        self._spawned_at = time.monotonic()
        try:
            process = ChildProcess(
                "zygote", [sys.executable, "-m", "app.engine.zygote"],
                self._log_dir / f"zygote-{os.getpid()}-{next(self._count)}.log",
                env={**self._environment, "PYTHONPATH": project_root(), CONTROL_FD_ENV: str(theirs.fileno())},
                pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        return process, ours

    def _watch(self) -> None:
        delay = 1.0
        while True:
            process = self._process
            code = process.wait(None)
            if self._state is ZygoteState.CLOSED:
                return
            lived = time.monotonic() - self._spawned_at
            with self._lock:
                self._state, self._ready = ZygoteState.DEAD, None
                self._death = f"zygote (pid {process.pid}) exited with code {code}: {self._last_line()}"
                self._control.close()
            self._tell("died", f"{self._death}; scale-outs spawn engine processes until it is restarted")
            time.sleep(delay)
            delay = min(60.0, delay * 2) if lived < 60 else 1.0  # one that keeps dying backs off
            with self._lock:
                if self._state is ZygoteState.CLOSED:
                    return
                self._process, self._control = self._spawn()
                self._state = ZygoteState.STARTING
            self._tell("restarted", f"zygote restarted as pid {self._process.pid} (start {self._starts}); "
                                    "scale-outs fork from it once it has imported")
            threading.Thread(target=self._await_restart, name="zygote-restart", daemon=True).start()

    def _await_restart(self) -> None:
        # Without the lock: forks do not touch the socket of a restarting zygote (they spawn), and must
        # not wait for it.
        control = self._control
        control.settimeout(self._start_timeout_s)
        try:
            message = control.recv(MAX_MESSAGE)
        except OSError:
            return  # it died again, or was closed: the watcher takes it from there
        with self._lock:
            if message and control is self._control and self._state is ZygoteState.STARTING:
                self._ready = ZygoteReady.model_validate_json(message)
                self._state, self._death = ZygoteState.READY, None
                logger.info("restarted zygote %d ready", self.pid)

    def _tell(self, what: str, sentence: str) -> None:
        logger.warning("%s", sentence)
        for listener in list(self._listeners):
            try:
                listener(what, sentence)
            except Exception:  # noqa: BLE001 - a listener must not stop the supervision
                logger.exception("a zygote listener failed")

    def _describe(self) -> str:
        if self._state is ZygoteState.STARTING:
            return f"restarting after the {self._death} (pid {self.pid}, start {self._starts}), still importing"
        return f"{self._state.value}: the {self._death}" if self._death else self._state.value

    def _last_line(self) -> str:
        return (self._process.log_tail(1).strip() or "no log")[-300:]


def project_root() -> str:
    """PYTHONPATH for processes of ours: they must import this project even when the driver was
    started from elsewhere."""
    root = str(Path(__file__).resolve().parents[2])
    existing = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{existing}" if existing else root
