"""Main of one engine process: vLLM's own OpenAI server, embedded, for one EngineSpec.

Run as ``python -m app.engine.main`` by ``app.engine.pool``. Before it reads its spec (one JSON line on
stdin) the process becomes a warm standby: it imports vLLM's server, the modules a real start imports
(``preimports``), fills torch.compile's per-process caches where the App runs tensor-parallel
engines (``preimports.warm_compiler``), checks that it can fork an EngineCore
(``launcher.fork_support``) and that the core can fork its tensor-parallel workers
(``forked_workers.fork_workers_support``), then collects and freezes its heap, so that neither vLLM's five full collections during start-up nor the forked
core walk those objects again. No torch operation runs before the fork: OpenMP threads would start.

On its spec it launches the engine with the launcher the spec asks for (fork by default, spawn as the
fallback) and writes a LaunchReport. The server, its routes, streaming and errors are vLLM's.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

from app.engine.launch_report import Launcher, LaunchReport, WorkersReport
from app.engine.launcher import external_engine_args, fork_core, fork_support, threads_running, watch_core
from app.engine.preimports import (CACHE_DIR_ENV, HEALTH_URL_ENV, WARM_COMPILER_ENV, preimport,
                                   record_when_serving, warm_compiler)
from app.engine.spec import EngineSpec
from app.files import write_atomically
from app.runtime.processes import child_environment, free_port

#: Printed once the standby is warm (imports done, heap frozen).
STANDBY_READY = "yrllm: engine process ready for its spec"


def main() -> None:
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from app.engine.forked_workers import RANK_THREADS_ENV, WORKERS_REPORT_ENV, fork_workers_support

    parser = make_arg_parser(FlexibleArgumentParser(prog="engine"))
    cache_dir = Path(os.environ[CACHE_DIR_ENV]) if os.environ.get(CACHE_DIR_ENV) else None
    preimported = preimport(cache_dir)
    if os.environ.get(WARM_COMPILER_ENV):  # tensor-parallel pools: their first request compiles
        warm_compiler()
    fork_refusal = fork_support(parser)
    workers_refusal = fork_workers_support()
    gc.collect()
    gc.freeze()
    print(f"{STANDBY_READY} ({preimported} modules pre-imported; fork: "
          f"{fork_refusal or 'supported'})", flush=True)
    line = sys.stdin.readline()
    if not line:
        return  # a standby that was never used: the pool closed our stdin
    received = time.time()
    spec = EngineSpec.model_validate_json(line)
    # The pool started us with spec.environment() already; applied again for whoever runs us by hand.
    # Computed before the clear: it is this environment with the spec's changes.
    environment = child_environment({**spec.environment(os.cpu_count() or 1),
                                     WORKERS_REPORT_ENV: str(spec.workers_report_path),
                                     RANK_THREADS_ENV: str(spec.rank_threads(os.cpu_count() or 1)),
                                     HEALTH_URL_ENV: f"{spec.url}/health"})
    os.environ.clear()
    os.environ.update(environment)

    report = LaunchReport(replica_id=spec.replica_id, launcher=Launcher.SPAWN, preimported_modules=preimported,
                          spec_received_at=received)
    fork_workers = spec.tp_workers is Launcher.FORK and workers_refusal is None
    if spec.tensor_parallel > 1 and not fork_workers:
        reason = workers_refusal and f"fork unavailable: {workers_refusal}"
        report.workers = WorkersReport(method=Launcher.SPAWN, reason=reason)
        print(f"yrllm: tensor-parallel workers are spawned ({reason or 'as configured'})", file=sys.stderr, flush=True)
    server_args = spec.server_args(fork_workers=fork_workers)
    args = parser.parse_args(server_args)
    configure_logging_from_args(args)  # before the fork: the core logs the same way
    validate_parsed_serve_args(args)
    wants_fork = spec.launcher is Launcher.FORK
    # Checked at standby start; threads again now, in case something started one since.
    refusal = (fork_refusal or threads_running()) if wants_fork else None
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
    write_atomically(spec.launch_report_path, report.model_dump_json())
    record_when_serving(f"{spec.url}/health", cache_dir, "server", spec.start_timeout_s)
    # run_server binds first, builds the engine client, serves; SIGTERM shuts it down, then exits.
    uvloop.run(run_server(args))


if __name__ == "__main__":
    main()
