"""Faults under streaming load: what the clients see, how fast the App notices, how fast it heals.

    python -m bench.chaos [--seconds 120] [--clients 16] [--replicas 3] [--out bench/out]

Runs the App as users do (``python entrypoint.py``, its own process) on the demo model, ``--replicas``
replicas of one engine thread each, and first measures the Router's own cost: one-token completions
sent alternately to a replica directly and through the Router, one at a time, nothing else running.
Then ``--clients`` threads stream completions back to back for ``--seconds`` while a schedule
SIGKILLs an engine server, an EngineCore and the data system worker, and SIGSTOPs a replica (server and
core) for 10 s. Per fault: requests failed (before streaming, mid-stream), time to detect (the
supervision event), time until the desired count was ready again. Where this host can make network
namespaces, a fourth kind follows on an App of three nodes: a partition (``bench.partition``). Writes ``<out>/chaos.json`` (every request),
``<out>/chaos.md`` and ``<out>/chaos-driver.log`` (the App's logs), and its BENCHMARKS.md sections when
``--out`` is the default.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from app.runtime.node_network import NodeNetworkError, check_available
from bench.chaos_report import DEFAULT_OUT, report
from bench.driver import ds_worker_pid, start_driver, status, stop_driver, wait_until_quiet
from bench.run import conditions

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox"
STOP_S = 10.0  # how long the SIGSTOP fault lasts


@dataclass
class Fault:
    name: str
    at_s: float  # seconds into the load
    target: str  # "server", "core", "ds-worker" or "stop"


def schedule(seconds: float) -> list[Fault]:
    step = seconds / 5
    return [Fault("SIGKILL engine server", step * 0.5, "server"), Fault("SIGKILL EngineCore", step * 1.5, "core"),
            Fault("SIGKILL data system worker", step * 2.5, "ds-worker"),
            Fault(f"SIGSTOP replica for {STOP_S:.0f} s", step * 3.5, "stop")]


@dataclass
class Outcome:
    started: float
    first_byte: float | None = None
    ended: float | None = None
    failure: str | None = None  # None: a complete answer
    mid_stream: bool = False  # the failure came after bytes reached the client


def stream_once(url: str, model: str, tokens: int, outcome: Outcome) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            outcome.failure = f"HTTP {response.status}: {response.read()[:200]!r}"
            return
        done = False
        for line in response:
            if outcome.first_byte is None:
                outcome.first_byte = time.time()
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: ") and b'"error"' in line:
                outcome.failure, outcome.mid_stream = f"error event: {line[:200]!r}", True
                return
        if not done:
            outcome.failure, outcome.mid_stream = "stream ended without [DONE]", outcome.first_byte is not None
    except (OSError, http.client.HTTPException) as exc:
        outcome.failure = f"{type(exc).__name__}: {exc}"[:200]
        outcome.mid_stream = outcome.first_byte is not None
    finally:
        outcome.ended = time.time()
        conn.close()


# ---- the App under test ---------------------------------------------------------------------------------

def start_app(replicas: int, log: Path) -> tuple[subprocess.Popen, str]:
    return start_driver(replicas, log, {"YRLLM_ENGINE__THREADS": "1", "YRLLM_ENGINE__DTYPE": "float32",
                                        "YRLLM_ENGINE__MAX_MODEL_LEN": "512"})


# ---- the Router's own cost ---------------------------------------------------------------------------------

def router_overhead(url: str, model: str, rounds: int, block: int = 50) -> dict:
    """Median one-token completion time directly and through the Router, each path on a kept-alive
    connection of its own (as the OpenAI client keeps them). The paths take turns in blocks of
    ``block`` requests: back-to-back alternation would time each request with the leftovers of the
    other path's previous one (its connection handling in three processes on two cores), and long
    runs of one path would time drift; blocks avoid both."""
    replica = next(r for r in status(url)["replicas"] if r["state"] == "ready")
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    paths = {"direct": urlsplit(replica["url"]), "router": urlsplit(url)}
    conns = {name: http.client.HTTPConnection(parts.hostname, parts.port, timeout=60) for name, parts in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for turn in range(2 * (rounds // block)):
            name = ("direct", "router")[turn % 2]
            for index in range(block + 5):
                started = time.perf_counter()
                conns[name].request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                response = conns[name].getresponse()
                response.read()
                elapsed = time.perf_counter() - started
                if response.status != 200:
                    raise RuntimeError(f"{name} answered {response.status}")
                if index >= 5:  # the first requests of a block still see the other path's leftovers
                    times[name].append(elapsed)
    finally:
        for conn in conns.values():
            conn.close()
    direct, routed = (statistics.median(times[name]) * 1000 for name in ("direct", "router"))
    return {"rounds": len(times["direct"]), "block": block, "direct_p50_ms": round(direct, 2),
            "router_p50_ms": round(routed, 2), "overhead_p50_ms": round(routed - direct, 2)}


# ---- load and faults ------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    driver, url = start_app(args.replicas, args.out / "chaos-driver.log")
    try:
        model = status(url)["models"][0]
        wait_until_quiet()  # the replicas' start-up work would be timed as the Router's cost
        overhead = router_overhead(url, model, args.overhead_rounds)
        print(f"router overhead: {overhead}", flush=True)
        result = {**chaos(driver, url, model, args), "router_overhead": overhead,
                  "conditions": conditions(argparse.Namespace(quick=False))}
    finally:
        stop_driver(driver)
    try:
        check_available()
    except NodeNetworkError as exc:
        print(f"no partition drill: {exc}", flush=True)
        return result
    print("partition drill: three nodes in network namespaces", flush=True)
    result["partition"] = partition_drill(args.clients, args.tokens, args.out / "chaos-partition-driver.log")
    return result


def chaos(driver: subprocess.Popen, url: str, model: str, args: argparse.Namespace) -> dict:
    outcomes: list[Outcome] = []
    samples: list[tuple[float, list[str]]] = []  # (time, ready replica ids)
    stop = threading.Event()
    start = time.time()

    def client() -> None:
        while not stop.is_set():
            outcome = Outcome(started=time.time())
            outcomes.append(outcome)
            stream_once(url, model, args.tokens, outcome)

    def sampler() -> None:
        while not stop.is_set() or time.time() - start < args.seconds + 120:
            try:
                ready = [r["replica_id"] for r in status(url)["replicas"] if r["state"] == "ready"]
                samples.append((time.time(), ready))
                if stop.is_set() and len(ready) == args.replicas:
                    return
            except OSError:
                pass
            time.sleep(0.1)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    monitor = threading.Thread(target=sampler, daemon=True)
    for thread in [*threads, monitor]:
        thread.start()
    faults = []
    for fault in schedule(args.seconds):
        time.sleep(max(0.0, start + fault.at_s - time.time()))
        faults.append(inject(driver, url, fault))
        print(f"{fault.at_s:6.1f} s  {fault.name}: {faults[-1]['victim']}", flush=True)
    time.sleep(max(0.0, start + args.seconds - time.time()))
    stop.set()
    for thread in threads:
        thread.join(150)
    monitor.join(150)
    events = status(url)["events"]
    return {"seconds": args.seconds, "clients": args.clients, "replicas": args.replicas, "tokens": args.tokens,
            "faults": [judge(fault, window, samples, events, args.replicas)
                       for fault, window in zip(faults, by_fault(faults, outcomes))],
            "requests": len(outcomes), "completed": sum(1 for o in outcomes if o.failure is None),
            "failed_before_stream": sum(1 for o in outcomes if o.failure and not o.mid_stream),
            "failed_mid_stream": sum(1 for o in outcomes if o.failure and o.mid_stream),
            "failures": sorted({o.failure for o in outcomes if o.failure})[:10],
            "events": events, "outcomes": [asdict(o) for o in outcomes]}


def inject(driver: subprocess.Popen, url: str, fault: Fault) -> dict:
    ready = [r for r in status(url)["replicas"] if r["state"] == "ready"]
    victim = min(ready, key=lambda r: int(r["replica_id"].lstrip("r")))  # the oldest
    at = time.time()
    if fault.target == "server":
        os.kill(victim["pid"], signal.SIGKILL)
    elif fault.target == "core":
        os.kill(victim["core_pid"], signal.SIGKILL)
    elif fault.target == "ds-worker":
        os.kill(ds_worker_pid(driver), signal.SIGKILL)
    else:
        os.killpg(victim["pid"], signal.SIGSTOP)
        threading.Timer(STOP_S, _resume, (victim["pid"],)).start()
    subject = "ds-worker" if fault.target == "ds-worker" else victim["replica_id"]
    return {"name": fault.name, "target": fault.target, "victim": subject, "at": at}


def _resume(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass  # replaced meanwhile: the supervision killed it


def by_fault(faults: list[dict], outcomes: list[Outcome]) -> list[list[Outcome]]:
    """Each request belongs to the last fault that hit before it ended (it was in flight then, or
    started after it); requests that ended before the first fault belong to none."""
    windows: list[list[Outcome]] = [[] for _ in faults]
    for outcome in outcomes:
        hit = [i for i, fault in enumerate(faults) if fault["at"] <= (outcome.ended or outcome.started)]
        if hit:
            windows[hit[-1]].append(outcome)
    return windows


def judge(fault: dict, window: list[Outcome], samples: list[tuple[float, list[str]]], events: list[dict],
          desired: int) -> dict:
    after = [e for e in events if e["at"] >= fault["at"] and e["subject"] == fault["victim"]]
    detected = next((e for e in after if e["kind"] in ("replica_failed", "ds_worker_died")), None)
    row = {**fault, "requests": len(window),
           "failed_before_stream": sum(1 for o in window if o.failure and not o.mid_stream),
           "failed_mid_stream": sum(1 for o in window if o.failure and o.mid_stream),
           "detect_s": None if detected is None else round(detected["at"] - fault["at"], 2)}
    if fault["target"] == "ds-worker":
        restarted = next((e for e in after if e["kind"] == "ds_worker_restarted"), None)
        row["healed_s"] = None if restarted is None else round(restarted["at"] - fault["at"], 2)
        row["scale_out_s"] = None
        return row
    replaced = next((e for e in events if e["kind"] == "replica_replaced" and detected
                     and e["at"] >= detected["at"]), None)
    healed = next((t for t, ready in samples if t >= fault["at"] and len(ready) >= desired
                   and fault["victim"] not in ready), None)
    row["healed_s"] = None if healed is None else round(healed - fault["at"], 2)
    row["scale_out_s"] = _scale_out_seconds(replaced)
    row["replacement"] = None if replaced is None else replaced["reason"]
    return row


def _scale_out_seconds(event: dict | None) -> float | None:
    """The replacement's own scale-out time, from its event ('serving X s after it was requested')."""
    if event is None:
        return None
    return float(event["reason"].split("serving ", 1)[1].split(" s ", 1)[0])


def partition_drill(clients: int, tokens: int, log: Path) -> dict:
    from bench.partition import partition_drill as drill  # it builds on this module's client

    return drill(clients, tokens, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the load (faults spread over it)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    parser.add_argument("--replicas", type=int, default=3, help="the desired replica count")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per streamed completion")
    parser.add_argument("--overhead-rounds", type=int, default=300, help="completions per path for the overhead")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = run(args)
    (args.out / "chaos.json").write_text(json.dumps(result))
    report(result, args.out)


if __name__ == "__main__":
    main()
