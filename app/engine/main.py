"""Main of one engine process: vLLM's own OpenAI server, embedded, for one EngineSpec.

Run as ``python -m app.engine.main`` by ``app.engine.pool``: it imports torch and vLLM's server first
(about 7 s on 2 cores), then reads its EngineSpec (one JSON line) from stdin. A process can therefore be
started before the replica it will serve is requested (a standby), and the import is off the scale-out
path. The server, its routes, streaming and errors are vLLM's; this module only turns a spec into
vLLM's arguments.
"""

from __future__ import annotations

import os
import sys

from app.engine.spec import EngineSpec

#: Printed once the imports are done: the process is a warm standby from then on.
STANDBY_READY = "yrllm: engine process ready for its spec"


def main() -> None:
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="engine"))
    print(STANDBY_READY, flush=True)
    line = sys.stdin.readline()
    if not line:
        return  # a standby that was never used: the pool closed our stdin
    spec = EngineSpec.model_validate_json(line)
    # The pool started us with spec.environment() already; applied again for whoever runs us by hand.
    os.environ.update(spec.environment(os.cpu_count() or 1))

    args = parser.parse_args(spec.server_args())
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    # run_server binds first, builds the engine, serves; SIGTERM shuts the engine down, then exits.
    uvloop.run(run_server(args))


if __name__ == "__main__":
    main()
