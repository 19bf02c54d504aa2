"""Nothing outlives the App: the processes it starts are stopped on shutdown, on a failed start, and
when the driver itself is killed; bad configuration is refused before anything starts.

That the shared App (``conftest.app``) leaves no data system worker, engine or EngineCore behind is
checked by that fixture's teardown, at the end of the session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import app_descendants, leftovers, test_cache_dir

from app.config import AppConfig, ConfigError
from app.runtime.datasystem_worker import DataSystemWorker
from app.runtime.processes import port_open

ROOT = Path(__file__).resolve().parent.parent


def _clean_env() -> dict[str, str]:
    """This environment without the App's own variables, so a developer's settings do not leak in."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("YRLLM_") and k not in ("YR_SERVER_ADDRESS", "DS_WORKER_ADDR")}


# ---- the data system worker ------------------------------------------------------------------------

def test_data_system_worker_stop_leaves_nothing():
    worker = DataSystemWorker(256)
    address = worker.start(timeout_s=60)
    try:
        process = psutil.Process(worker.pid)
        home = Path(process.cwd())  # the worker runs in its (temporary) home
        assert home.name.startswith("yrllm-ds-") and home.is_dir()
        host, port = address.rsplit(":", 1)
        assert port_open(host, int(port))
    finally:
        worker.stop()
    assert not leftovers([process]), "the data system worker survived stop()"
    assert not home.exists(), "stop() leaves the temporary home behind"
    assert not port_open(host, int(port))
    worker.stop()  # idempotent


def test_data_system_worker_killed_from_outside_is_still_cleaned_up():
    worker = DataSystemWorker(256)
    worker.start(timeout_s=60)
    process = psutil.Process(worker.pid)
    home = Path(process.cwd())
    os.kill(worker.pid, signal.SIGKILL)
    worker.stop()  # must not raise for a worker that is already gone
    assert not leftovers([process])
    assert not home.exists()


def test_data_system_worker_dies_with_a_killed_driver(tmp_path):
    # A driver that is SIGKILLed runs no cleanup at all; PR_SET_PDEATHSIG must take its worker down.
    script = textwrap.dedent("""
        import sys, time
        from app.runtime.datasystem_worker import DataSystemWorker
        worker = DataSystemWorker(256)
        worker.start(timeout_s=60)
        print(worker.pid, flush=True)
        time.sleep(600)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_clean_env(),
                              stdout=subprocess.PIPE, text=True)
    home = None
    try:
        line = driver.stdout.readline()
        assert line.strip().isdigit(), f"the driver did not start its worker: {line!r}"
        worker = psutil.Process(int(line))
        home = Path(worker.cwd())
        driver.kill()
        driver.wait(10)
        assert not leftovers([worker]), "the data system worker outlived its killed driver"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
        if home is not None:  # the killed driver could not remove it; we do
            shutil.rmtree(home, ignore_errors=True)


def test_data_system_worker_survives_the_thread_that_started_it():
    worker = DataSystemWorker(256)
    thread = threading.Thread(target=worker.start)
    thread.start()
    thread.join(60)
    try:
        process = psutil.Process(worker.pid)
        time.sleep(0.5)
        assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE, \
            "the data system worker was killed when its starting thread ended"
    finally:
        worker.stop()


# ---- refused before anything starts ------------------------------------------------------------------

def test_a_bogus_model_dir_is_refused_before_anything_starts(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ConfigError, match="model") as info:
        AppConfig.load(env={}, overrides={"model": str(tmp_path / "no-such-model"),
                                          "demo_cache_dir": str(test_cache_dir())})
    assert "no-such-model" in str(info.value)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_entrypoint_rejects_an_invalid_port_with_exit_code_2():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "entrypoint.py", "--port", "70000"], cwd=ROOT,
                            env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "router.port" in result.stderr
    assert "70000" in result.stderr
    assert time.monotonic() - started < 60  # refused up front, not after starting the runtime


def test_entrypoint_rejects_a_flag_of_the_wrong_type():
    result = subprocess.run([sys.executable, "entrypoint.py", "--replicas", "two"], cwd=ROOT,
                            env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--replicas" in result.stderr


# ---- engine processes ------------------------------------------------------------------------------

@pytest.mark.engine
def test_engine_processes_die_with_a_killed_driver(model_dir, tmp_path):
    """A forked engine's parent is the zygote, not the driver, so PR_SET_PDEATHSIG cannot tie it to the
    driver: the engine watches the driver itself. SIGKILL runs no cleanup in the driver at all."""
    script = textwrap.dedent(f"""
        import json, time, urllib.request
        from pathlib import Path
        from app.config import AppConfig
        from app.engine.spec import EngineSpec
        from app.engine.zygotes import ZYGOTES
        from app.runtime.processes import free_port
        config = AppConfig.load(env={{}}, overrides={{"engine.dtype": "float32", "engine.max_model_len": 512,
                                "engine.kv_cache_gib": 0.125, "demo_cache_dir": {str(test_cache_dir())!r}}})
        spec = EngineSpec.from_config(config, replica_id="orphan", model=Path({str(model_dir)!r}),
                                      served_model_name="m", log_dir=Path({str(tmp_path)!r}), port=free_port())
        zygote = ZYGOTES.hold(spec)
        engine = ZYGOTES.engine_process(spec)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(spec.url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        print(json.dumps({{"zygote": zygote.pid, "engine": engine.pid}}), flush=True)
        time.sleep(600)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_clean_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline()
        pids = json.loads(line)
        engine = psutil.Process(pids["engine"])
        assert engine.ppid() == pids["zygote"], "the engine process was not forked from the zygote"
        family = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        assert len(family) >= 4, family  # the driver, the zygote, the engine server and its EngineCore
        driver.kill()
        driver.wait(10)
        left = leftovers(family)
        assert not left, f"processes outlived their killed driver: {[p.pid for p in left]}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)


# ---- a failed start stops what it started ------------------------------------------------------------

@pytest.mark.engine
def test_an_app_whose_engine_cannot_start_stops_everything(tmp_path):
    from app import App

    config = AppConfig.load(env={}, overrides={
        "router.port": 0, "engine.dtype": "float32", "engine.max_model_len": 512,
        "engine.kv_cache_gib": 0.125, "runtime.ds_shared_memory_mb": 256,
        "engine.extra_args": ["--no-such-vllm-flag"], "demo_cache_dir": str(test_cache_dir())})
    app = App(config)
    seen: dict[psutil.Process, str] = {}
    before = set(app_descendants())  # the session's shared App may be running beside this one

    def watch() -> None:  # remember every process the App starts, while it runs
        while not done.is_set():
            for child in app_descendants():
                if child not in seen and child not in before:
                    seen[child] = " ".join(_cmdline(child))
            time.sleep(0.05)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(RuntimeError, match="could not start") as info:
            app.start()
    finally:
        done.set()
        watcher.join(5)
    assert "no-such-vllm-flag" in str(info.value), "the error carries the engine's own reason"
    # Its engine process existed (forked from the zygote this App shares with the session's, it may have
    # come and gone between two looks of the watcher) and exited on the bad flag.
    assert "engine r1 exited with code 2 while starting" in str(info.value)
    assert any("datasystem_worker" in cmd for cmd in seen.values()), seen
    assert not leftovers(list(seen)), "a failed start left processes behind"
    assert not set(app_descendants()) - before
    app.shutdown()  # idempotent after a failed start


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []
