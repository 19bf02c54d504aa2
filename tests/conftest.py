"""Shared fixtures: ONE real App (local runtime, data system worker, Router, one vLLM engine) for the
whole session, and an OpenAI client pointed at it.

The App is started lazily, by the first test that asks for it, and stopped at the end of the session.
Its teardown is also a test of the App's promise to leave nothing behind: every process the App
started (data system worker, engine servers and their EngineCore) must be gone after ``shutdown()``;
a leftover shows up as an error in the pytest report.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Awaitable, Callable, Iterator

import psutil
import pytest
from aiohttp import web

# Children that the App starts; anything else under the test process is none of the App's business.
APP_PROCESS_MARKERS = ("datasystem_worker", "app.engine.", "VLLM::EngineCore", "EngineCore")


PROMPT = "def fibonacci(n):"

# Modules that break the shared App on purpose (they kill its engines and its data system worker):
# they run last, so that every other module sees the App as it started, with its first processes.
DESTRUCTIVE_MODULES = ("test_healing.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name in DESTRUCTIVE_MODULES)  # stable: file order otherwise kept


def greedy(url: str, model: str, tokens: int = 16) -> list[int]:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                       "return_token_ids": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        choice = json.loads(response.read())["choices"][0]
    return choice.get("token_ids") or choice["text"]


# About 420 tokens of the demo tokenizer: three full KV blocks and a partial one. Put a line of your own
# first: blocks are chained, so no two callers then share a block.
LONG_PROMPT = "\n".join(f"def step_{i}(state, value):\n    state[{i}] = value * {i} + len(state)\n    return state"
                        for i in range(14))


def complete(url: str, model: str, prompt: str, **sampling: float) -> dict:
    """A completion's token ids and prompt length (greedy, 8 tokens, unless ``sampling`` says otherwise)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                       "return_token_ids": True, **sampling}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    choice = answer["choices"][0]
    return {"tokens": choice["token_ids"], "prompt_tokens": answer["usage"]["prompt_tokens"],
            "logprobs": choice["logprobs"]["token_logprobs"] if choice.get("logprobs") else None}


def replica_urls(app) -> dict[str, str]:
    return {r["replica_id"]: r["url"] for r in app.status()["replicas"] if r["state"] == "ready"}


@contextmanager
def fake_replica(handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                 route: str = "/v1/chat/completions") -> Iterator[str]:
    """A fake replica on loopback answering POST ``route`` with ``handler``, on a loop of its own;
    yields its URL."""
    loop = asyncio.new_event_loop()
    async def handle(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    runner = web.AppRunner(web.Application())
    runner.app.add_routes([web.post(route, handle)])
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_cache_dir() -> Path:
    """Where the demo model is built once and reused across test sessions."""
    return Path(os.environ.get("YRLLM_TEST_CACHE", str(Path.home() / ".cache" / "yrllm-test")))


test_cache_dir.__test__ = False  # a helper, not a test


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} {proc.name()!r} {' '.join(proc.cmdline())[:200]!r}"
    except psutil.Error:
        return f"pid {proc.pid}"


def is_app_process(proc: psutil.Process) -> bool:
    try:
        text = proc.name() + " " + " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(marker in text for marker in APP_PROCESS_MARKERS)


def still_running(proc: psutil.Process) -> bool:
    """True if this very process (pid *and* start time, so a reused pid does not count) is alive."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leftovers(procs: list[psutil.Process], timeout_s: float = 10.0) -> list[psutil.Process]:
    """The processes among ``procs`` still running after ``timeout_s`` (the kernel may take a moment
    to reap a process killed through PR_SET_PDEATHSIG or reparented to init)."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if still_running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if still_running(p)]
    return alive


def app_descendants() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if is_app_process(p)]


@pytest.fixture(scope="session")
def ds_worker():
    """A data system worker of its own for the weight-plane tests (the App has another)."""
    from app.runtime.datasystem_worker import DataSystemWorker

    worker = DataSystemWorker(1536)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A private copy of the demo model: tests may hide its weight files to prove that a replica
    read none of them."""
    from app.control.demo_model import demo_model_dir

    copy = tmp_path_factory.mktemp("model") / "demo"
    shutil.copytree(demo_model_dir(test_cache_dir()), copy)
    return copy


@pytest.fixture(scope="session")
def app(model_dir):
    from app import App, AppConfig

    config = AppConfig.load(env={}, overrides={
        "model": str(model_dir),
        "router.port": 0,
        "engine.dtype": "float32",
        "engine.max_model_len": 512,
        "engine.kv_cache_gib": 0.125,
        "runtime.ds_shared_memory_mb": 1024,
        "demo_cache_dir": str(test_cache_dir()),
    })
    application = App(config).start()
    try:
        status = application.status()
        pids = {"ds_worker": status["ds_worker_pid"],
                **{f"engine {r['replica_id']}": r["pid"] for r in status["replicas"]}}
        assert all(pids.values()), f"the App reports no pid for some process: {pids}"
        # Every process the App started, EngineCore included, with its start time (psutil.Process
        # remembers it, so a pid reused by an unrelated process later is not mistaken for ours).
        tracked = {pid: psutil.Process(pid) for pid in pids.values()}
        for child in app_descendants():
            tracked.setdefault(child.pid, child)
        application.test_pids = pids  # for tests that want to look at them
        application.test_processes = list(tracked.values())
        yield application
        # Processes started later (a test that scaled out) must be stopped too.
        for child in app_descendants():
            application.test_processes.append(child)
    finally:
        application.shutdown()
    left = leftovers(application.test_processes)
    left += [p for p in app_descendants() if p not in left]
    assert not left, "processes left after App.shutdown():\n" + "\n".join(_describe(p) for p in left)


def side_app(model_dir: Path, what: str, **overrides: object):
    """A generator for a module fixture: a second real App beside the session's (its own data system
    workers), with the suite's engine settings plus ``overrides``. Nothing of it may be left running
    after its shutdown."""
    from app import App, AppConfig

    config = AppConfig.load(env={}, overrides={
        "model": str(model_dir), "router.port": 0, "engine.dtype": "float32", "engine.max_model_len": 512,
        "engine.kv_cache_gib": 0.125, "runtime.ds_shared_memory_mb": 1024, "demo_cache_dir": str(test_cache_dir()),
        **overrides})
    application = App(config).start()
    processes: list[psutil.Process] = []
    try:
        yield application
        status = application.status()
        processes = [psutil.Process(node["pid"]) for node in status["nodes"]] + [
            psutil.Process(r[key]) for r in status["replicas"] for key in ("pid", "core_pid") if r.get(key)]
    finally:
        application.shutdown()
    assert not leftovers(processes), f"the {what} App left processes behind"


@pytest.fixture(scope="session")
def model_name(app) -> str:
    return app.served_model_name


@pytest.fixture
def client(app):
    import openai

    with openai.OpenAI(base_url=app.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c
