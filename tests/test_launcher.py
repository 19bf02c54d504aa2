"""How engine processes are made: every process of a replica is forked from the zygote (the server
from the zygote, its EngineCore from the server) and serves the seed's tokens; a dead EngineCore,
during start-up or after, ends its replica at once and leaves nothing running; a killed zygote is
restarted, and scale-outs spawn meanwhile; the spawn paths take over when the fork's prerequisites
fail, and say why."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
from conftest import greedy, leftovers, replica_urls

from app.engine.host import EngineFailed, EngineHost
from app.engine.launch_report import Launcher, Origin
from app.engine.spec import EngineSpec
from app.replica import ReplicaState
from app.weights.load_report import PlanKind
from app.weights.plan import LOAD_FORMAT, WeightPlan

pytestmark = pytest.mark.engine


def engine_spec(app, model_dir, model_name, tmp_path, replica_id: str, **changes) -> EngineSpec:
    spec = EngineSpec.from_config(app.config, replica_id=replica_id, model=model_dir, served_model_name=model_name,
                                  log_dir=tmp_path)
    return spec.model_copy(update=changes)


def wait_for_core(spec: EngineSpec, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return int(json.loads(spec.launch_report_path.read_text())["core_pid"])
        except (OSError, ValueError, TypeError):
            time.sleep(0.05)
    raise AssertionError("the engine process never forked its core")


def test_a_forked_replica_generates_exactly_like_the_seed(app, model_dir, model_name, tmp_path):
    (seed_url,) = replica_urls(app).values()
    host = EngineHost(engine_spec(app, model_dir, model_name, tmp_path, "fork-disk"))
    try:
        host.start()
        launch = host.launch_report()
        assert launch.origin is Origin.ZYGOTE and launch.origin_reason is None
        assert launch.launcher is Launcher.FORK and launch.core_pid and launch.reason is None
        assert psutil.Process(host.info().pid).ppid() == app.status()["zygote"]["pid"]
        assert psutil.Process(launch.core_pid).ppid() == host.info().pid  # the core is the server's child
        assert greedy(host.spec.url, model_name) == greedy(seed_url, model_name)
    finally:
        host.stop()


def test_the_zygote_is_shared_copy_on_write_and_reported(app):
    status = app.status()
    zygote = status["zygote"]
    # Ready, with its count of pre-imported modules (0 on a fresh machine: none were recorded yet).
    assert zygote["state"] == "ready" and zygote["starts"] >= 1 and zygote["preimported_modules"] is not None
    for replica in status["replicas"]:
        assert psutil.Process(replica["pid"]).ppid() == zygote["pid"]
    assert 0 < zygote["pss_bytes"] < zygote["rss_bytes"]  # its pages are shared with what it forked
    # The zygote and, under it, each replica's engine server and EngineCore.
    assert zygote["cow_saved_bytes"] > 0 and zygote["processes"] >= 1 + 2 * len(status["replicas"])


def test_a_killed_zygote_is_restarted_and_scale_outs_spawn_meanwhile(app, model_dir, model_name, tmp_path):
    (seed_url,) = replica_urls(app).values()
    killed = app.status()["zygote"]["pid"]
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while app.status()["zygote"]["state"] == "ready" and time.monotonic() < deadline:
        time.sleep(0.05)  # the driver's watcher notices at once
    host = EngineHost(engine_spec(app, model_dir, model_name, tmp_path, "while-the-zygote-restarts"))
    try:
        host.start()
        launch = host.launch_report()
        assert launch.origin is Origin.SPAWN, launch
        assert f"zygote (pid {killed}) exited with code -9" in launch.origin_reason
        assert greedy(host.spec.url, model_name) == greedy(seed_url, model_name)
    finally:
        host.stop()
    deadline = time.monotonic() + 300
    while app.status()["zygote"]["state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.2)
    zygote = app.status()["zygote"]
    assert zygote["state"] == "ready" and zygote["pid"] != killed and zygote["starts"] == 2
    kinds = [event["kind"] for event in app.status()["events"]]
    assert "zygote_died" in kinds and "zygote_restarted" in kinds
    host = EngineHost(engine_spec(app, model_dir, model_name, tmp_path, "after-the-zygote-restarted"))
    try:
        host.start()
        assert host.launch_report().origin is Origin.ZYGOTE
        assert psutil.Process(host.info().pid).ppid() == zygote["pid"]
    finally:
        host.stop()


def test_a_core_killed_during_start_up_fails_the_replica_fast(app, model_dir, model_name, tmp_path):
    # A weight plan that waits for a seed nobody publishes keeps the core in start-up for minutes.
    spec = engine_spec(app, model_dir, model_name, tmp_path, "fork-killed-early")
    plan = WeightPlan(kind=PlanKind.MAP, replica_id=spec.replica_id, fingerprint="0" * 32,
                      ds_address=app.status()["ds_address"], await_seed_s=300, report_path=spec.load_report_path)
    host = EngineHost(spec.model_copy(update={"load_format": LOAD_FORMAT,
                                              "loader_extra_config": plan.model_dump(mode="json")}))
    failure: list[BaseException] = []
    starting = threading.Thread(target=lambda: _capture(host.start, failure))
    starting.start()
    core = psutil.Process(wait_for_core(spec))
    server = psutil.Process(host.info().pid)
    killed_at = time.monotonic()
    os.kill(core.pid, signal.SIGKILL)
    starting.join(timeout=60)
    assert not starting.is_alive(), "the replica's start did not notice its dead core"
    assert time.monotonic() - killed_at < 10  # not VLLM_ENGINE_READY_TIMEOUT_S (600 s)
    assert len(failure) == 1 and isinstance(failure[0], EngineFailed)
    assert f"EngineCore (pid {core.pid}) exited with code -9" in str(failure[0])
    assert host.info().state is ReplicaState.FAILED
    host.stop()
    assert not leftovers([core, server])


def test_a_core_killed_after_ready_ends_its_server(app, model_dir, model_name, tmp_path):
    host = EngineHost(engine_spec(app, model_dir, model_name, tmp_path, "fork-killed-late"))
    host.start()
    core = psutil.Process(host.launch_report().core_pid)
    server = psutil.Process(host.info().pid)
    os.kill(core.pid, signal.SIGKILL)
    try:
        server.wait(timeout=10)  # the server stops at once; within 2 s on an idle machine
    except psutil.TimeoutExpired:
        pytest.fail("the engine server kept running without its core")
    info = host.info()
    assert info.state is ReplicaState.FAILED and info.url is None
    assert f"EngineCore (pid {core.pid}) exited with code -9" in open(info.log).read()
    host.stop()
    assert not leftovers([core, server])


def test_the_spawn_path_takes_over_when_forking_is_unsafe(app, model_dir, model_name, tmp_path, monkeypatch):
    """A module on the standby's pre-import list that starts a thread makes forking unsafe (the child
    would inherit a process in an unknown state): the engine serves through vLLM's spawn path and its
    report says why."""
    import vllm

    from app.engine.preimports import ROLES, list_path

    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "yrllm_test_thread_at_import.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), name='started-at-import',"
        " daemon=True).start()\n")
    monkeypatch.setenv("PYTHONPATH", f"{modules}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    path = list_path(cache_dir, ROLES[0])
    assert path.name.startswith(f"modules-vllm{vllm.__version__}-")
    path.write_text("yrllm_test_thread_at_import\n")
    host = EngineHost(engine_spec(app, model_dir, model_name, tmp_path, "spawn-fallback", cache_dir=cache_dir))
    (seed_url,) = replica_urls(app).values()
    try:
        host.start()
        launch = host.launch_report()
        # Its environment (another cache directory) is no zygote's: the engine process was spawned too.
        assert launch.origin is Origin.SPAWN and "no zygote holds engines like this one" in launch.origin_reason
        assert launch.launcher is Launcher.SPAWN and launch.core_pid is None
        assert "threads are running (started-at-import)" in launch.reason
        assert "using the spawn launcher" in open(host.info().log).read()
        assert greedy(host.spec.url, model_name) == greedy(seed_url, model_name)
    finally:
        host.stop()


def _capture(call, failures: list[BaseException]) -> None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - inspected by the test
        failures.append(exc)


def test_forked_tensor_parallel_workers_take_the_cpus_vllm_binds_them_to():
    """vLLM's per-rank binding variables (configure_omp_envs), as a forked worker re-applies them; and
    this vLLM holds what forking workers relies on."""
    from app.engine.forked_workers import _bound_cpus, fork_workers_support

    assert _bound_cpus({"OMP_PLACES": "{0,1,2}", "OMP_PROC_BIND": "true"}) == {0, 1, 2}
    assert _bound_cpus({"GOMP_CPU_AFFINITY": "4 5 6"}) == {4, 5, 6}
    assert _bound_cpus({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[2,3,8-10]"}) == {2, 3, 8, 9, 10}
    assert _bound_cpus({}) == set()  # nobind: the thread count only
    assert fork_workers_support() is None


def test_a_tensor_parallel_spec_asks_for_forked_workers_or_vllms_spawned_ones(app, model_dir, model_name, tmp_path):
    from app.engine.launch_report import FORKED_WORKERS_EXECUTOR

    spec = engine_spec(app, model_dir, model_name, tmp_path, "tp", tensor_parallel=2)
    args = spec.server_args()
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--distributed-executor-backend") + 1] == FORKED_WORKERS_EXECUTOR
    spawned = spec.server_args(fork_workers=False)
    assert spawned[spawned.index("--distributed-executor-backend") + 1] == "mp"
    one = engine_spec(app, model_dir, model_name, tmp_path, "one").server_args()
    assert one[one.index("--distributed-executor-backend") + 1] == "uni"
    assert spec.rank_threads(8) == 4 and spec.model_copy(update={"threads": 3}).rank_threads(8) == 3
