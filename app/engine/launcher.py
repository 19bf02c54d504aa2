"""The fork launcher: a pre-imported engine process forks vLLM's EngineCore and serves vLLM's OpenAI server
against it.

vLLM's OpenAI server normally spawns its EngineCore (the CPU platform forces ``spawn``), and the new
process imports torch and vLLM again: ~7 s of a replica's start on 2 cores. Here the engine process,
forked from a zygote that imported everything (``zygote``), forks instead. The child runs vLLM's own
engine-core entry point (``EngineCoreProc.run_engine_core``, as ``vllm serve --headless`` does) and
handshakes over TCP; the parent runs vLLM's OpenAI server with ``--data-parallel-size-local 0``, its
documented way of serving engines started elsewhere. Nothing of vLLM is patched or monkeypatched.

That entry point and its arguments are internal API, so ``fork_support`` checks them (and the other
prerequisites) when the process prepares; when they do not hold, the engine process uses the spawn
path and says why.

vLLM does not watch an external engine (and can wait for one for ten minutes), so the parent does:
a thread waits on the core's pid, and if it exits at any time the server exits at once, after
printing the core's last log lines.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NoReturn

from app.files import tail
from app.runtime.processes import die_with_parent, run_as_forked_child

#: Exit code of an engine process whose EngineCore died.
CORE_DIED = 70
_EXTERNAL_ENGINE_FLAGS = ("--data-parallel-size-local", "--data-parallel-address", "--data-parallel-rpc-port")
_ENGINE_PARAMETERS = ("vllm_config", "local_client", "handshake_address", "executor_class", "log_stats")


def fork_support(parser: argparse.ArgumentParser) -> str | None:
    """None if this process can fork an EngineCore; otherwise the reason it cannot."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.core import EngineCoreProc
    from vllm.v1.executor import Executor

    if not current_platform.is_cpu():
        return f"the fork launcher is verified on CPU only (platform {current_platform.device_name})"
    entry = inspect.signature(EngineCoreProc.run_engine_core).parameters
    if not {"dp_rank", "local_dp_rank"} <= set(entry) or not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in entry.values()):
        return f"EngineCoreProc.run_engine_core{inspect.signature(EngineCoreProc.run_engine_core)} changed"
    missing = [name for name in _ENGINE_PARAMETERS if name not in inspect.signature(EngineCoreProc.__init__).parameters]
    if missing:
        return f"EngineCoreProc() takes no {', '.join(missing)} any more"
    if "headless" not in inspect.signature(AsyncEngineArgs.create_engine_config).parameters:
        return "AsyncEngineArgs.create_engine_config() takes no 'headless' any more"
    if not callable(getattr(Executor, "get_class", None)):
        return "Executor.get_class() is gone"
    _, unknown = parser.parse_known_args([_EXTERNAL_ENGINE_FLAGS[0], "0", _EXTERNAL_ENGINE_FLAGS[1], "127.0.0.1",
                                          _EXTERNAL_ENGINE_FLAGS[2], "1"])
    if unknown:
        return f"vLLM's server no longer accepts {' '.join(unknown)}"
    return threads_running()


def threads_running(benign: tuple[str, ...] = ()) -> str | None:
    """None if this is the process's only thread, but for threads whose names start with one of
    ``benign`` (checked again right before the fork)."""
    names = sorted(t.name for t in threading.enumerate()
                   if t is not threading.current_thread() and not t.name.startswith(benign))
    if names:
        return f"threads are running ({', '.join(names)}): forking would copy a process in an unknown state"
    return None


def external_engine_args(host: str, rpc_port: int) -> list[str]:
    """vLLM server flags for an engine started elsewhere that handshakes on ``host:rpc_port``."""
    return [_EXTERNAL_ENGINE_FLAGS[0], "0", _EXTERNAL_ENGINE_FLAGS[1], host, _EXTERNAL_ENGINE_FLAGS[2], str(rpc_port)]


def fork_core(core_args: argparse.Namespace, host: str, rpc_port: int, log_file: Path,
              on_start: Callable[[], None]) -> int:
    """Fork the EngineCore; returns its pid. The child runs ``on_start``, then the core, and never
    returns: it exits with the core."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_core(core_args, f"tcp://{host}:{rpc_port}", log_file, on_start)
    return pid


def _run_core(args: argparse.Namespace, handshake_address: str, log_file: Path,
              on_start: Callable[[], None]) -> NoReturn:
    def core() -> None:
        # Killed with the server (the thread that forked us is the server's main thread, which lives as
        # long as the server); stays in the server's process group, which the App stops as one.
        die_with_parent()
        on_start()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.core import EngineCoreProc
        from vllm.v1.executor import Executor

        engine_args = AsyncEngineArgs.from_cli_args(args)
        config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
        EngineCoreProc.run_engine_core(vllm_config=config, local_client=False, handshake_address=handshake_address,
                                       executor_class=Executor.get_class(config),
                                       log_stats=not engine_args.disable_log_stats, dp_rank=0, local_dp_rank=0)

    run_as_forked_child(log_file, core)


def watch_core(pid: int, log_file: Path) -> None:
    """In a daemon thread: when the core exits, for whatever reason, print its last log lines and end
    this process (the server) at once. vLLM's server would otherwise keep answering /health without
    an engine, or wait for one for up to VLLM_ENGINE_READY_TIMEOUT_S."""

    def watch() -> None:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        last_lines = tail(log_file, 20) or "(no log)"
        # The summary comes last, so that whoever reads the end of this server's log reads it.
        print(f"yrllm: the last log lines of EngineCore (pid {pid}, {log_file}):\n{last_lines}\n"
              f"yrllm: EngineCore (pid {pid}) exited with code {code} at {time.time():.3f}; "
              "this engine server exits too", file=sys.stderr, flush=True)
        os._exit(CORE_DIED)

    threading.Thread(target=watch, name="engine-core-watch", daemon=True).start()
