"""Main of one engine process: vLLM's own OpenAI server, embedded, for one EngineSpec.

Run as ``python -m app.engine_main '<EngineSpec JSON>'`` by ``app.engine_process``. The server, its
routes, streaming and errors are vLLM's; this module only turns a spec into vLLM's arguments.
"""

from __future__ import annotations

import os
import sys

from app.engine_spec import EngineSpec


def main(argv: list[str]) -> None:
    spec = EngineSpec.model_validate_json(argv[0])
    os.environ.update(spec.environment(os.cpu_count() or 1))

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog=f"engine {spec.replica_id}"))
    args = parser.parse_args(spec.server_args())
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    # run_server binds first, builds the engine, serves; SIGTERM shuts the engine down, then exits.
    uvloop.run(run_server(args))


if __name__ == "__main__":
    main(sys.argv[1:])
