"""The App as users run it (``python entrypoint.py``, a process of its own), for benchmarks that must
not share a process, or a GIL, with what they measure."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from app.runtime.processes import free_port

ROOT = Path(__file__).resolve().parent.parent


def http_call(url: str, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST" if body is not None else "GET", path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def status(url: str) -> dict:
    return json.loads(http_call(url, "/status", timeout=10)[1])


def start_driver(replicas: int, log: Path, env: dict[str, str],
                 flags: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """``python entrypoint.py`` with ``env`` on top of ours (YRLLM_* variables, or the original case's,
    configure it) and ``flags`` (default: ``--replicas <replicas>``); returns once ``replicas`` replicas
    are ready. The Router listens on ``SERVER_PORT`` if ``env`` sets it, on a free port otherwise."""
    port = int(env["SERVER_PORT"]) if "SERVER_PORT" in env else free_port()
    flags = ["--replicas", str(replicas)] if flags is None else flags
    flags = flags if "SERVER_PORT" in env else ["--port", str(port), *flags]
    env = {**os.environ, **env}
    driver = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py"), *flags], cwd=ROOT,
                              env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise RuntimeError(f"the App exited with code {driver.returncode}; see {log}")
        try:
            if sum(r["state"] == "ready" for r in status(url)["replicas"]) == replicas:
                return driver, url
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the App was not serving {replicas} replicas within 600 s; see {log}")


def stop_driver(driver: subprocess.Popen) -> None:
    driver.send_signal(signal.SIGTERM)
    try:
        driver.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)


def wait_until_quiet(busy_percent: float = 15.0, timeout_s: float = 180.0) -> None:
    """Until the machine's CPUs were under ``busy_percent`` busy for two seconds in a row."""
    deadline, quiet = time.monotonic() + timeout_s, 0
    while quiet < 2 and time.monotonic() < deadline:
        quiet = quiet + 1 if psutil.cpu_percent(interval=1.0) < busy_percent else 0


def ds_worker_pid(driver: subprocess.Popen) -> int:
    for child in psutil.Process(driver.pid).children(recursive=True):
        if "datasystem_worker" in child.name():
            return child.pid
    raise RuntimeError("no data system worker under the App")


def ds_address(driver: subprocess.Popen) -> str:
    """The HOST:PORT of the App's data system worker (from its command line)."""
    for arg in psutil.Process(ds_worker_pid(driver)).cmdline():
        if arg.startswith("--worker_address="):
            return arg.split("=", 1)[1]
    raise RuntimeError("the data system worker has no --worker_address")
