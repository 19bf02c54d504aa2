"""The driver: ``python entrypoint.py`` starts the App, serves until Ctrl-C or SIGTERM, then stops
everything it started (engines, Router, data system worker).

Flags override environment variables (``YRLLM_*``), which override ``--config FILE``, which overrides
the defaults; see ``app/config.py`` for every field.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from app.config import AppConfig, ConfigError


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, object]]:
    parser = argparse.ArgumentParser(description="Elastic LLM serving on openYuanrong.")
    parser.add_argument("--config", help="YAML config file (fields as in app/config.py).")
    flags = {  # flag -> (config field, type, help)
        "--model": ("model", str, "Local model directory. Default: a small demo model (random weights)."),
        "--served-model-name": ("served_model_name", str, "Model name clients send."),
        "--host": ("router.host", str, "Router bind address (default 127.0.0.1)."),
        "--port": ("router.port", int, "Router port (default 9000; 0 picks a free one)."),
        "--replicas": ("replicas", int, "Merged mode: replicas to start (default 1)."),
        "--mode": ("mode", str, "merged (default: each replica serves whole requests) or disaggregated "
                   "(prefill and decode pools, the KV handed over through the data system)."),
        "--prefill-replicas": ("prefill.replicas", int, "Disaggregated mode: prefill replicas (default 1)."),
        "--decode-replicas": ("decode.replicas", int, "Disaggregated mode: decode replicas (default 1)."),
        "--dtype": ("engine.dtype", str, "auto, float32, bfloat16 or float16."),
        "--max-model-len": ("engine.max_model_len", int, "Context length."),
        "--kv-cache-gib": ("engine.kv_cache_gib", float, "CPU KV cache per engine in GiB (fractions allowed)."),
        "--local-nodes": ("runtime.local_nodes", int, "Local mode: simulated nodes, one data system worker "
                          "each, in one cluster; replicas spread over them (default 1)."),
        "--log-level": ("log_level", str, "DEBUG, INFO, WARNING or ERROR."),
    }
    for flag, (_, kind, help_text) in flags.items():
        parser.add_argument(flag, type=kind, help=help_text)
    parser.add_argument("--autoscale", action="store_const", const=True,
                        help="Follow the traffic between autoscale.min_replicas and autoscale.max_replicas.")
    args = parser.parse_args(argv)
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in flags.items()}
    overrides["autoscale.enabled"] = args.autoscale
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = AppConfig.load(args.config, overrides=overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)

    from app import App

    app = App(config)
    try:
        app.start()
        print(_banner(app), flush=True)
        while True:
            signal.pause()
    except ConfigError as error:  # found at start-up: a tensor parallel size that does not fit, say
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nshutting down...", flush=True)
    finally:
        app.shutdown()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C, so the App is always shut down.
    raise KeyboardInterrupt


def _banner(app: "App") -> str:  # noqa: F821 - imported lazily above
    url, model = app.url, app.served_model_name
    scale_body = "" if app.config.mode.value == "merged" else " -d '{\"role\": \"decode\"}'"
    demo = "" if app.config.model else ("\n  NOTE: the demo model has RANDOM weights: the API is real, "
                                        "the text is gibberish. Pass --model DIR for a real model.")
    if not any(app.config.pools.values()):
        demo += (f"\n  Started at zero replicas: the first request starts one and waits for it (up to "
                 f"router.queue_timeout_s, {app.config.router.queue_timeout_s:g} s).")
    return f"""
Serving '{model}' at {url} (OpenAI-compatible).{demo}

  curl {url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "prompt": "def fib(n):", "max_tokens": 16}}'

  python -c "import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='none'); \\
print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"

  Scale out one replica:  curl -X POST {url}/scaleout{scale_body}
  Status and metrics:     curl {url}/status ; curl {url}/metrics
Press Ctrl-C to stop.
"""


if __name__ == "__main__":
    sys.exit(main())
