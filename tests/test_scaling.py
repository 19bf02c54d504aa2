"""Scale-out through the WeightCache and scale-in under load, on the shared real App.

The tests run in file order and build on each other's replicas (engines are the expensive part):
1 replica (the seed) -> 3 (mapped) -> 4 (over HTTP) -> 1 (scale-in while streaming) -> 2, 3, 4
(a corrupted cache entry: retired, reseeded, mapped) -> 1.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import PROMPT, greedy, replica_urls

from app.engine.host import EngineHost
from app.engine.spec import EngineSpec
from app.runtime.processes import free_port
from app.weights.host_tier import HostTier
from app.weights.identity import RankLayout, WeightKeys
from app.weights.load_report import PlanKind, WeightSource
from app.weights.plan import LOAD_FORMAT, WeightPlan

pytestmark = pytest.mark.engine

def shared_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of the data system's shared memory mapped into ``pid``."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and len(line.split()) >= 5:
            inside = "memfd:datasystem" in line
        elif inside and line.startswith(("Rss:", "Pss:")):
            value = int(line.split()[1]) * 1024
            rss, pss = (rss + value, pss) if line.startswith("Rss:") else (rss, pss + value)
    return rss, pss


def engine_cores(app) -> dict[str, psutil.Process]:
    """Each replica's forked EngineCore, as /status names it (the child of its engine server)."""
    cores = {}
    for replica in app.status()["replicas"]:
        core = psutil.Process(replica["core_pid"])
        assert core.ppid() == replica["pid"]
        cores[replica["replica_id"]] = core
    return cores


@pytest.fixture(scope="module", autouse=True)
def back_to_one_replica(app):
    yield
    app.scale(1)  # the other test modules expect the App as the session fixture started it


@pytest.fixture(scope="module")
def seed_tokens(app, model_name):
    (url,) = replica_urls(app).values()
    return greedy(url, model_name)


def test_scale_out_maps_the_seeds_weights_and_reads_no_weight_file(app, model_dir, model_name, seed_tokens):
    hidden = [path.rename(path.with_suffix(".hidden")) for path in model_dir.glob("*.safetensors")]
    try:  # with the weight files gone, a replica that touched the disk could not start
        report = app.scale(3)
    finally:
        for path in hidden:
            path.rename(path.with_suffix(".safetensors"))
    assert report.ok, str(report)
    assert (report.replicas_before, report.replicas_after) == (1, 3)
    added = [r for r in report.replicas if r.action == "added"]
    assert len(added) == 2
    for replica in added:
        assert replica.weights.plan is PlanKind.MAP and replica.weights.source is WeightSource.HOST
        assert replica.weights.fallback_reason is None and replica.weights.bytes > 0
        assert list(replica.seconds_since_requested()) == ["requested", "actor_up", "process_made", "core_forked",
                                                           "weights_loaded", "engine_ready", "first_token"]
        assert replica.launch.launcher.value == "fork" and replica.launch.reason is None
        assert replica.launch.origin.value == "zygote" and replica.launch.origin_reason is None
    printed = str(report)
    assert "plan map, from host" in printed and "GB/s" in printed and "fork launcher" in printed
    assert "process forked from the zygote" in printed
    assert {r["launcher"] for r in app.status()["replicas"]} == {"fork"}
    assert json.loads(json.dumps(report.to_dict()))["replicas"][0]["weights"]["plan"] == "map"
    stats = app.status()["weight_cache"]
    assert stats["misses"] == 1 and stats["hits"] >= 2 and stats["bytes_served"] >= 2 * added[0].weights.bytes


def test_mapped_replicas_generate_exactly_like_the_seed(app, model_name, seed_tokens):
    urls = replica_urls(app)
    assert len(urls) == 3
    for replica_id, url in urls.items():
        assert greedy(url, model_name) == seed_tokens, replica_id


def test_mapped_replicas_share_one_physical_copy_of_the_weights(app):
    weight_bytes = app.status()["weight_cache"]["entries"][0]["bytes"]
    cores = engine_cores(app)
    assert len(cores) == 3
    total_pss = shared_memory(app.status()["ds_worker_pid"])[1]
    for replica_id, core in cores.items():
        rss, pss = shared_memory(core.pid)
        assert rss >= 0.9 * weight_bytes, f"{replica_id} does not map the weights"
        # The same shared memory holds the KV blocks this replica stored or loaded (other tests' prompts):
        # counted in full, the weights' share is still at most half of them.
        beside_weights = max(rss - weight_bytes, 0)
        assert pss <= 0.5 * weight_bytes + beside_weights, f"{replica_id} holds its own copy"
        total_pss += pss
    # Every process that maps the shared memory together accounts for one copy (plus the manifest),
    # beside the KV blocks other tests left in the data system.
    assert total_pss <= 1.2 * weight_bytes + app.status()["kv"]["resident_bytes"]


def test_scaleout_over_http_answers_with_the_report(app):
    request = urllib.request.Request(f"{app.url}/scaleout", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=600) as response:
        report = json.loads(response.read())
    assert report["replicas_after"] == 4
    (added,) = report["replicas"]
    assert added["weights"]["plan"] == "map" and added["weights"]["source"] == "host"
    assert added["seconds_since_requested"]["first_token"] > 0


def test_scale_in_while_streaming_loses_no_request(app, model_name):
    import openai

    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="none", max_retries=0, timeout=300)
    started, results, errors = threading.Barrier(7), [], []

    def stream() -> None:
        try:
            chunks = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=48, stream=True,
                                               temperature=0, extra_body={"ignore_eos": True})
            text, first = [], True
            for chunk in chunks:
                if first:
                    started.wait(60)
                    first = False
                text.append(chunk.choices[0].text if chunk.choices else "")
                finish = chunk.choices[0].finish_reason if chunk.choices else None
            results.append(finish)
        except Exception as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(6)]
    for thread in threads:
        thread.start()
    started.wait(120)  # every stream has its first chunk: all six are in flight
    report = app.scale(1)
    for thread in threads:
        thread.join(300)
    assert errors == []
    assert results == ["length"] * 6
    assert report.ok and report.replicas_after == 1
    assert all(r.action == "removed" and r.error is None for r in report.replicas)


def test_a_corrupted_cache_entry_is_retired_and_the_next_replica_reseeds(app, model_name, seed_tokens):
    entry = app.status()["weight_cache"]["entries"][0]
    tier = HostTier(app.status()["ds_address"])
    keys = WeightKeys(entry["fingerprint"], RankLayout())
    original = bytes(tier.get([keys.tensor(0)])[0])
    tier.put([(keys.tensor(0), memoryview(bytes(len(original))))])  # same size, all zeros
    report = app.scale(2)
    assert report.ok
    (added,) = report.replicas
    assert added.weights.source is WeightSource.DISK
    assert "checksum mismatch" in added.weights.fallback_reason
    assert "FELL BACK" in str(report)
    cache = app.status()["weight_cache"]
    assert cache["fallbacks"] >= 1 and cache["retired"] >= 1 and cache["entries"] == []
    (retired,) = [e for e in app.status()["events"] if e["kind"] == "cache_entry_retired"]
    assert retired["subject"] == entry["fingerprint"] and "checksum mismatch" in retired["reason"]
    assert not any(tier.exists([keys.tensor(0), keys.manifest]))  # its objects are freed
    # The next replica seeds again from disk, and the one after maps what it published.
    (reseeded,) = app.scale(3).replicas
    assert reseeded.weights.plan is PlanKind.SEED and reseeded.weights.fallback_reason is None
    (mapped,) = app.scale(4).replicas
    assert mapped.weights.plan is PlanKind.MAP and mapped.weights.source is WeightSource.HOST
    assert greedy(replica_urls(app)[mapped.replica_id], model_name) == seed_tokens
    app.scale(1)


def test_a_pulled_replica_generates_exactly_like_the_seed(app, model_dir, model_name, seed_tokens, tmp_path):
    entry = app.status()["weight_cache"]["entries"][0]
    host = start_engine(app, model_dir, model_name, tmp_path, PlanKind.PULL, entry["fingerprint"],
                        app.status()["ds_address"])
    try:
        report = host.load_report()
        assert report.source is WeightSource.HOST and report.fallback_reason is None
        assert greedy(host.spec.url, model_name) == seed_tokens
    finally:
        host.stop()


def test_an_unreachable_data_system_falls_back_to_disk_and_says_why(app, model_dir, model_name, seed_tokens,
                                                                   tmp_path):
    entry = app.status()["weight_cache"]["entries"][0]
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: a stopped worker
    host = start_engine(app, model_dir, model_name, tmp_path, PlanKind.MAP, entry["fingerprint"], dead)
    try:
        report = host.load_report()
        assert report.source is WeightSource.DISK
        assert "cannot reach the data system" in report.fallback_reason
        assert greedy(host.spec.url, model_name) == seed_tokens
    finally:
        host.stop()


def start_engine(app, model_dir, model_name, tmp_path, kind, fingerprint, ds_address) -> EngineHost:
    spec = EngineSpec.from_config(app.config, replica_id=f"t-{kind.value}", model=model_dir,
                                  served_model_name=model_name, log_dir=tmp_path)
    plan = WeightPlan(kind=kind, replica_id=spec.replica_id, fingerprint=fingerprint, ds_address=ds_address,
                      timeout_ms=2000, report_path=spec.load_report_path)
    host = EngineHost(spec.model_copy(update={"load_format": LOAD_FORMAT,
                                              "loader_extra_config": plan.model_dump(mode="json")}))
    host.start()
    return host


def test_a_missing_weight_cache_means_disk_with_the_reason(app):
    from app.control.weight_client import WeightCacheClient

    gone = WeightCacheClient(None, app._weights.identity)  # the actor is gone
    plan = gone.plan("r-x", app._runtime.nodes[0], Path("/tmp/r-x.json"))
    assert plan.kind is PlanKind.DISK and plan.reason.startswith("WeightCache unavailable")