"""One engine process: vLLM's own OpenAI server, embedded, for one EngineOrder.

An engine process is made in one of two ways (``EngineOrder.origin``), and both run the two halves
below:

- ``prepare`` imports vLLM's server and the modules a real start imports (``preimports``), sets up
  vLLM's logging as its defaults configure it, fills torch.compile's per-process caches where the App
  runs tensor-parallel engines (``preimports.warm_compiler``), checks that the process can fork an
  EngineCore (``launcher.fork_support``) and that the core can fork its tensor-parallel workers
  (``forked_workers.fork_workers_support``), then collects and freezes the heap, so that neither
  vLLM's five full collections during start-up nor a forked child walk those objects again. No torch
  operation and no thread runs: OpenMP threads would start, and a fork would copy them half-made.
- ``serve`` launches the engine of one order with the launcher its spec asks for (fork by default,
  spawn as the fallback), writes a LaunchReport and runs the server until SIGTERM.

A zygote (``app.engine.zygote``) prepares once and forks a child per order, which only serves. The
spawn path (``python -m app.engine.main``, this module's ``main``) prepares, reads its order from
stdin, and serves. The server, its routes, streaming and errors are vLLM's.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app.engine.launch_report import Launcher, LaunchReport, WorkersReport
from app.engine.launcher import external_engine_args, fork_core, fork_support, threads_running, watch_core
from app.engine.order import EngineOrder
from app.engine.preimports import (
    CACHE_DIR_ENV,
    HEALTH_URL_ENV,
    WARM_COMPILER_ENV,
    preimport,
    record_when_serving,
    warm_compiler,
)
from app.files import write_atomically
from app.runtime.node_network import enter
from app.runtime.processes import child_environment, end_group_with, free_port

#: Printed once a process is prepared (imports done, heap frozen).
PREPARED = "yrllm: engine process prepared"


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` did, for every engine this process (or its forked children) will serve."""

    parser: argparse.ArgumentParser  # vLLM's server flags
    preimported: int  # modules imported ahead of any spec
    fork_refusal: str | None  # why this process cannot fork an EngineCore, if it cannot
    workers_refusal: str | None  # why an EngineCore cannot fork its tensor-parallel workers, if it cannot


def prepare() -> Prepared:
    """Import and check everything an engine start needs, then freeze the heap (see the module docstring)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from app.engine.forked_workers import fork_workers_support

    parser = make_arg_parser(FlexibleArgumentParser(prog="engine"))
    # vLLM's logging as its defaults configure it (a dictConfig, 0.1 s in each forked child): vLLM applies
    # an engine's own again in ``serve`` only where its flags change it (configure_logging_if_needed).
    configure_logging_from_args(parser.parse_args([]))
    cache_dir = Path(os.environ[CACHE_DIR_ENV]) if os.environ.get(CACHE_DIR_ENV) else None
    preimported = preimport(cache_dir)
    if os.environ.get(WARM_COMPILER_ENV):  # tensor-parallel pools: their first request compiles
        warm_compiler()
    prepared = Prepared(parser=parser, preimported=preimported, fork_refusal=fork_support(parser),
                        workers_refusal=fork_workers_support())
    gc.collect()
    gc.freeze()
    print(f"{PREPARED} ({preimported} modules pre-imported; fork: {prepared.fork_refusal or 'supported'})",
          flush=True)
    return prepared


def serve(order: EngineOrder, prepared: Prepared) -> None:
    """Run ``order``'s engine until the server shuts down (SIGTERM)."""
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.logger import configure_logging_from_args

    from app.engine.forked_workers import RANK_THREADS_ENV, WORKERS_REPORT_ENV

    received = time.time()
    spec = order.spec
    if spec.netns:  # first, while this process has one thread: setns moves only the calling thread
        enter(spec.netns)
    cache_dir = Path(os.environ[CACHE_DIR_ENV]) if os.environ.get(CACHE_DIR_ENV) else None
    # The process was made with spec.environment() already; applied again for whoever runs us by hand.
    # Computed before the clear: it is this environment with the spec's changes.
    environment = child_environment({**spec.environment(os.cpu_count() or 1),
                                     WORKERS_REPORT_ENV: str(spec.workers_report_path),
                                     RANK_THREADS_ENV: str(spec.rank_threads(os.cpu_count() or 1)),
                                     HEALTH_URL_ENV: f"{spec.url}/health"})
    os.environ.clear()
    os.environ.update(environment)

    report = LaunchReport(replica_id=spec.replica_id, origin=order.origin, origin_reason=order.reason,
                          launcher=Launcher.SPAWN, preimported_modules=prepared.preimported, spec_received_at=received)
    fork_workers = spec.tp_workers is Launcher.FORK and prepared.workers_refusal is None
    if spec.tensor_parallel > 1 and not fork_workers:
        reason = prepared.workers_refusal and f"fork unavailable: {prepared.workers_refusal}"
        report.workers = WorkersReport(method=Launcher.SPAWN, reason=reason)
        print(f"yrllm: tensor-parallel workers are spawned ({reason or 'as configured'})", file=sys.stderr, flush=True)
    server_args = spec.server_args(fork_workers=fork_workers)
    parser = prepared.parser
    args = parser.parse_args(server_args)
    configure_logging_from_args(args)  # before the fork: the core logs the same way
    validate_parsed_serve_args(args)
    wants_fork = spec.launcher is Launcher.FORK
    # Checked when the process was prepared; threads again now, in case something started one since.
    refusal = (prepared.fork_refusal or threads_running()) if wants_fork else None
    if refusal:
        report.reason = f"fork launcher unavailable: {refusal}"
        print(f"yrllm: {report.reason}; using the spawn launcher", file=sys.stderr, flush=True)
    elif wants_fork:
        rpc_port = free_port(spec.host)
        core_log = spec.core_log_path
        pid = fork_core(args, spec.host, rpc_port, core_log, on_start=lambda: record_when_serving(
            f"{spec.url}/health", cache_dir, "core", spec.start_timeout_s))
        watch_core(pid, core_log)
        report.launcher, report.core_pid, report.core_log = Launcher.FORK, pid, str(core_log)
        report.core_forked_at = time.time()
        args = parser.parse_args(server_args + external_engine_args(spec.host, rpc_port))
    if order.watch_pid is not None:  # a thread: only once the core is forked
        end_group_with(order.watch_pid)
    write_atomically(spec.launch_report_path, report.model_dump_json())
    record_when_serving(f"{spec.url}/health", cache_dir, "server", spec.start_timeout_s)
    # run_server binds first, builds the engine client, serves; SIGTERM shuts it down, then returns.
    uvloop.run(run_server(args))


def main() -> None:
    """The spawn path: prepare, then serve the order that arrives on stdin."""
    prepared = prepare()
    line = sys.stdin.readline()
    if not line:
        return  # whoever started us changed their mind
    serve(EngineOrder.model_validate_json(line), prepared)


if __name__ == "__main__":
    main()
