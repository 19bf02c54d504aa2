"""One weight load in a fresh process: ``python -m bench.load_once '<json>'`` prints one JSON line.

vLLM's ``LLM`` runs in-process here (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the time measured is
the load format's, not process start-up's. vLLM's own loaders report their time in their log line
"Loading weights took X seconds" (``bench.run`` reads it from this process's output); ours in the
LoadReport it writes.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(args: dict) -> dict:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                       "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    import vllm

    started = time.perf_counter()
    llm = vllm.LLM(model=args["model"], dtype=args["dtype"], max_model_len=256, enforce_eager=True,
                   load_format=args["load_format"],
                   model_loader_extra_config=args.get("extra") or {},
                   distributed_executor_backend="uni")
    engine_s = time.perf_counter() - started
    out = llm.generate(["def f(x):"], vllm.SamplingParams(max_tokens=8, temperature=0))
    return {"engine_s": round(engine_s, 3),
            "tokens": list(out[0].outputs[0].token_ids)}


if __name__ == "__main__":
    try:
        print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
    except Exception as exc:  # noqa: BLE001 - reported to the benchmark as this peer's error
        print("RESULT " + json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:300]}"}), flush=True)
    os._exit(0)  # skip interpreter teardown of vLLM's threads
