"""The zygote: one pre-imported, frozen process per node that forks every engine process.

Android's zygote and gunicorn's ``preload_app`` in one line: import once, fork many. The zygote runs
``main.prepare`` (vLLM and every module a real start imports, the fork checks, a frozen heap; no torch
operation, no thread), tells the driver it is ready, then waits for orders. Per order it forks a child,
which becomes a session of its own (the App stops a replica by its process group), writes to the log
file the driver opened for it, and runs ``main.serve``: its EngineCore and tensor-parallel workers are
forked from it in turn, so every process of a replica shares the zygote's pages copy-on-write and none
imports anything.

Protocol, over a ``SOCK_SEQPACKET`` socket pair inherited from the driver (one JSON message each way,
never a pickle): the zygote first sends ``ZygoteReady``; then per ``EngineOrder`` (with the log file's
descriptor attached) it answers ``Forked`` with a pidfd of the child attached, which the driver watches
(the child is the zygote's, not the driver's). The zygote reaps its children and writes each one's exit
code to the file the order's spec names (``EngineSpec.exit_code_path``). It exits when the driver
closes the socket, or with the driver (PR_SET_PDEATHSIG); its children outlive it, each watching the
driver (``EngineOrder.watch_pid``).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from pydantic import BaseModel

from app.engine.main import Prepared, prepare, serve
from app.engine.order import EngineOrder
from app.files import write_atomically
from app.runtime.processes import run_as_forked_child

#: Names the descriptor of the zygote's end of its socket pair.
CONTROL_FD_ENV = "YRLLM_ZYGOTE_FD"
MAX_MESSAGE = 1 << 20


class ZygoteReady(BaseModel):
    preimported_modules: int
    fork_refusal: str | None  # why an engine process cannot fork its EngineCore, if it cannot


class Forked(BaseModel):
    pid: int


def main() -> None:
    control = socket.socket(fileno=int(os.environ.pop(CONTROL_FD_ENV)))
    prepared = prepare()
    control.send(ZygoteReady(preimported_modules=prepared.preimported,
                             fork_refusal=prepared.fork_refusal).model_dump_json().encode())
    children: dict[int, tuple[int, Path]] = {}  # pidfd -> (pid, where its exit code goes)
    while True:
        readable, _, _ = select.select([control, *children], [], [])
        for pidfd in [fd for fd in readable if fd in children]:
            pid, exit_code_path = children.pop(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(pid, 0)
            write_atomically(exit_code_path, str(os.waitstatus_to_exitcode(status)))
        if control not in readable:
            continue
        message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 1)
        if not message:
            return  # the driver is done with us; our children live on
        order = EngineOrder.model_validate_json(message)
        (log_fd,) = fds
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            control.close()
            _become_engine(order, log_fd, prepared, list(children))
        os.close(log_fd)
        pidfd = os.pidfd_open(pid)
        children[pidfd] = (pid, order.spec.exit_code_path)
        socket.send_fds(control, [Forked(pid=pid).model_dump_json().encode()], [pidfd])


def _become_engine(order: EngineOrder, log_fd: int, prepared: Prepared, inherited: list[int]) -> NoReturn:
    """In the forked child: detach from the zygote, serve ``order``, and never return."""
    def engine() -> None:
        os.setsid()  # its own session and process group, which the App stops as one
        for fd in inherited:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        serve(order, prepared)

    run_as_forked_child(log_fd, engine)


if __name__ == "__main__":
    main()
