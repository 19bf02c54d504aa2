"""Tensor-parallel replicas on real engines, and the original case's deployment as its instructions run it.

One App serves the whole module: ``python entrypoint.py`` started with the original case's environment
block (PTP=2, PD-merged, prefix connector on), its MODEL_PATH and SERVER_PORT pointing at a local copy
of the demo model and a free port. The tests talk to it as a user would: HTTP only (completions,
/status, /scaleout). A second App, disaggregated with PTP=2 and DTP=1, checks the KV handoff between
pools of different tensor parallel sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import LONG_PROMPT, complete, greedy, leftovers, side_app, test_cache_dir
from test_config import ORIGINAL_CASE_BLOCK

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _free_port() -> int:
    from app.runtime.processes import free_port

    return free_port()


class Deployment:
    """The original case's deployment: ``python entrypoint.py`` under its environment block."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The App reads every YRLLM_* variable as configuration: the suite's own (YRLLM_TEST_CACHE) stay out.
        ours = {name: value for name, value in os.environ.items() if not name.startswith("YRLLM_")}
        env = {**ours, **ORIGINAL_CASE_BLOCK, "MODEL_PATH": str(model), "SERVER_PORT": str(self.port),
               # Sized for the suite, as every other test App is (the block itself is unchanged).
               "YRLLM_ENGINE__DTYPE": "float32", "YRLLM_ENGINE__MAX_MODEL_LEN": "512",
               "YRLLM_ENGINE__KV_CACHE_GIB": "0.125", "YRLLM_RUNTIME__DS_SHARED_MEMORY_MB": "1024",
               "YRLLM_DEMO_CACHE_DIR": str(test_cache_dir())}
        self.log = log
        self.process = subprocess.Popen([sys.executable, "entrypoint.py"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_serving(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"entrypoint.py exited:\n{self.log.read_text()[-3000:]}"
            if "Serving '" in self.log.read_text():
                return
            time.sleep(0.5)
        raise AssertionError(f"entrypoint.py not serving after {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def status(self) -> dict:
        return _get(f"{self.url}/status")

    def ready(self) -> list[dict]:
        return [r for r in self.status()["replicas"] if r["state"] == "ready"]

    def processes(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


@pytest.fixture(scope="module")
def deployment(model_dir, tmp_path_factory):
    model = tmp_path_factory.mktemp("tp-model") / "qwen2.5_tiny"
    shutil.copytree(model_dir, model)
    run = Deployment(model, tmp_path_factory.mktemp("tp-log") / "entrypoint.log")
    processes: list[psutil.Process] = []
    try:
        run.wait_serving()
        run.model_dir = model
        yield run
        processes = run.processes()
    finally:
        run.process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = run.process.wait(120)
        except subprocess.TimeoutExpired:
            run.process.kill()
            code = None
    assert code == 0, f"Ctrl-C did not stop entrypoint.py cleanly (exit {code}):\n{run.log.read_text()[-2000:]}"
    left = leftovers(processes)
    assert not left, f"Ctrl-C left processes behind: {[p.pid for p in left]}"


def test_the_original_block_serves_tensor_parallel_replicas_with_forked_workers(deployment):
    (replica,) = deployment.ready()
    assert replica["tensor_parallel"] == 2 and len(replica["worker_pids"]) == 2
    assert all(psutil.Process(pid).ppid() == replica["core_pid"] for pid in replica["worker_pids"])
    assert deployment.status()["replicas"][0]["launcher"] == "fork"


def test_tensor_parallel_tokens_equal_one_rank(app, model_name, deployment):
    """The same model at TP=2 (this deployment) and TP=1 (the session's App), float32, greedy."""
    assert greedy(deployment.url, deployment.model_dir.name, 16) == greedy(app.url, model_name, 16)


def test_scaleout_brings_a_replica_whose_every_rank_maps_the_weights(deployment):
    hidden = deployment.model_dir.with_name("hidden")
    weights = list(deployment.model_dir.glob("*.safetensors"))
    hidden.mkdir()
    for path in weights:  # nothing can come from disk
        path.rename(hidden / path.name)
    try:
        report = _post(f"{deployment.url}/scaleout")
    finally:
        for path in hidden.iterdir():
            path.rename(deployment.model_dir / path.name)
    (added,) = report["replicas"]
    assert added["state"] == "ready", added
    assert added["launch"]["workers"]["method"] == "fork" and len(added["launch"]["workers"]["pids"]) == 2
    ranks = added["weights"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["plan"] == "map" and r["source"] == "host" and not r["fallback_reason"] for r in ranks), ranks
    assert added["weights"]["bytes"] == sum(r["bytes"] for r in ranks) > 0
    assert added["weights"]["seconds"] == max(r["seconds"] for r in ranks)
    assert len(deployment.ready()) == 2


def test_a_prefix_one_tensor_parallel_replica_computed_is_loaded_by_another(deployment):
    urls = [r["url"] for r in sorted(deployment.ready(), key=lambda r: r["replica_id"])]
    assert len(urls) == 2, "runs after the scale-out"
    prompt = "# tensor parallel prefix\n" + LONG_PROMPT
    name = deployment.model_dir.name
    before = deployment.status()["kv"]
    computed = complete(urls[0], name, prompt, logprobs=1)
    loaded = complete(urls[1], name, prompt, logprobs=1)
    assert loaded["tokens"] == computed["tokens"]
    deadline = time.monotonic() + 10
    while (stats := deployment.status()["kv"])["hits"] <= before["hits"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats["hits"] == before["hits"] + 1
    assert stats["hit_tokens"] - before["hit_tokens"] == 3 * 128  # three full blocks, every rank's heads


def test_a_killed_worker_fails_its_replica_which_is_replaced(deployment):
    victim = sorted(deployment.ready(), key=lambda r: r["replica_id"])[-1]
    worker = psutil.Process(victim["worker_pids"][1])
    os.kill(worker.pid, signal.SIGKILL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        replicas = deployment.ready()
        if len(replicas) == 2 and victim["replica_id"] not in {r["replica_id"] for r in replicas}:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not replaced: {deployment.status()['replicas']}")
    # Nothing of the dead replica is left: its server, core and other worker are gone too.
    gone = [psutil.Process(pid) for pid in [victim["pid"], victim["core_pid"], victim["worker_pids"][0]]
            if psutil.pid_exists(pid)]
    assert not leftovers(gone), "the failed replica's processes outlived it"
    assert greedy(deployment.url, deployment.model_dir.name, 4)


@pytest.fixture(scope="module")
def pd_tp_app(model_dir):
    yield from side_app(model_dir, "disaggregated TP", mode="disaggregated", **{
        "prefill.tensor_parallel": 2, "decode.tensor_parallel": 1})


def test_prefill_at_two_ranks_hands_its_kv_to_decode_at_one(app, model_name, pd_tp_app):
    """Pools of different tensor parallel sizes share one KV layout (whole heads per object)."""
    roles = {r["role"]: r for r in pd_tp_app.status()["replicas"]}
    assert roles["prefill"]["tensor_parallel"] == 2 and roles["decode"]["tensor_parallel"] == 1
    prompt = "# heterogeneous handoff\n" + LONG_PROMPT
    merged = complete(app.url, model_name, prompt)
    split = complete(pd_tp_app.url, pd_tp_app.served_model_name, prompt)
    assert split["tokens"] == merged["tokens"]
    deadline = time.monotonic() + 10
    while not (kv := pd_tp_app.status()["kv"])["blocks_loaded"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kv["blocks_loaded"] >= 4, kv  # the decode leg loaded the prompt (3 full blocks and the tail)
