"""Disaggregated prefill/decode on real engines: a second App (one Prefill and one Decode replica, a
data system worker of its own) beside the session's merged App, compared token for token.

The prefill leg computes the prompt and stores its KV in the data system; the decode leg loads it,
computes the last prompt token and generates. A handoff that is missing or corrupt is recomputed,
with the same tokens, and counted.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import LONG_PROMPT, complete, side_app
from test_healing import events, wait_for
from test_serving import call, metric_value

from app.kv.journal import JournalReader
from app.kv.store import BlockStore

pytestmark = pytest.mark.engine

SAMPLED = {"temperature": 1.0, "seed": 11, "max_tokens": 16}  # see test_kv_reuse: a sample shows wrong KV


@pytest.fixture(scope="module")
def pd_app(model_dir):
    yield from side_app(model_dir, "disaggregated", mode="disaggregated")


def roles(app) -> dict[str, str]:
    return {r["replica_id"]: r["role"] for r in app.status()["replicas"] if r["state"] == "ready"}


def urls(app, role: str) -> list[str]:
    return [r["url"] for r in app.status()["replicas"] if r["state"] == "ready" and r["role"] == role]


def kv_stats(app, **at_least: int) -> dict:
    """/status kv once the App has read the journals; ``handoff_<result>`` names a handoff count."""
    deadline = time.monotonic() + 15
    while True:
        stats = app.status()["kv"]
        flat = {**stats, **{f"handoff_{name}": count for name, count in stats["handoffs"].items()}}
        if all(flat[name] >= value for name, value in at_least.items()) or time.monotonic() > deadline:
            return flat
        time.sleep(0.2)


def test_each_replica_has_its_role_in_status(pd_app):
    status = pd_app.status()
    assert status["mode"] == "disaggregated"
    assert roles(pd_app) == {"p1": "prefill", "d2": "decode"}
    assert "prefill 0 -> 1 of 1, decode 0 -> 1 of 1" in str(pd_app.start_report)


def test_completions_equal_merged_token_for_token_and_the_handoff_is_counted(app, pd_app, model_name):
    prompt = "# disaggregated completions\n" + LONG_PROMPT
    before = kv_stats(pd_app)
    merged = complete(app.url, model_name, prompt, max_tokens=16)
    split = complete(pd_app.url, model_name, prompt, max_tokens=16)
    assert split["tokens"] == merged["tokens"] and split["prompt_tokens"] == merged["prompt_tokens"]
    sample = complete(app.url, model_name, prompt, **SAMPLED)["tokens"]
    assert len(set(sample)) > 4, "the sample must be one in which a wrong KV would show"
    assert complete(pd_app.url, model_name, prompt, **SAMPLED)["tokens"] == sample
    # The decode replica loaded all of the prompt but its last token, handed over whole each time.
    stats = kv_stats(pd_app, handoff_complete=before["handoff_complete"] + 2)
    assert stats["handoff_complete"] - before["handoff_complete"] == 2
    assert stats["hit_tokens"] - before["hit_tokens"] >= merged["prompt_tokens"] - 1
    metrics = urllib.request.urlopen(f"{pd_app.url}/metrics", timeout=10).read().decode()
    assert metric_value(metrics, "yrllm_kv_handoffs_total", result="complete") == stats["handoff_complete"]
    assert metric_value(metrics, "yrllm_router_prefill_legs_total", outcome="handed_over") >= 2


def _chat(url: str, model: str, stream: bool) -> str:
    body = {"model": model, "max_tokens": 12, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": "disaggregated chat\n" + LONG_PROMPT[:600]}]}
    status, _, raw = call(url, "POST", "/v1/chat/completions", body)
    assert status == 200, raw
    if not stream:
        return json.loads(raw)["choices"][0]["message"]["content"]
    events = [line[len(b"data: "):] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return "".join(json.loads(event)["choices"][0]["delta"].get("content") or ""
                   for event in events[:-1] if json.loads(event)["choices"])


def test_chat_and_streaming_equal_merged(app, pd_app, model_name):
    merged = _chat(app.url, model_name, stream=False)
    assert merged and _chat(pd_app.url, model_name, stream=False) == merged
    assert _chat(pd_app.url, model_name, stream=True) == merged


def _failed_prefill_legs(app) -> float:
    metrics = urllib.request.urlopen(f"{app.url}/metrics", timeout=10).read().decode()
    return metric_value(metrics, "yrllm_router_prefill_legs_total", outcome="failed") or 0


def test_an_error_in_either_leg_is_the_answer_in_the_openai_envelope(pd_app, model_name):
    failed_before = _failed_prefill_legs(pd_app)
    # Longer than engine.max_model_len: the prefill engine refuses it, and no decode leg starts.
    status, _, raw = call(pd_app.url, "POST", "/v1/completions",
                          {"model": model_name, "prompt": LONG_PROMPT * 2, "max_tokens": 4})
    assert status == 400 and json.loads(raw)["error"]["message"], raw
    assert _failed_prefill_legs(pd_app) == failed_before + 1
    # min_tokens above max_tokens: the prefill leg (which drops min_tokens) passes, the decode engine refuses.
    status, _, raw = call(pd_app.url, "POST", "/v1/completions",
                          {"model": model_name, "prompt": "hello", "max_tokens": 2, "min_tokens": 5})
    assert status == 400 and "min_tokens" in json.loads(raw)["error"]["message"], raw
    assert _failed_prefill_legs(pd_app) == failed_before + 1


def _prefill_leg(pd_app, model_name: str, prompt: str) -> dict:
    """A prefill leg sent to the prefill replica itself: the decode leg's kv_transfer_params."""
    (prefill,) = urls(pd_app, "prefill")
    body = {"model": model_name, "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "kv_transfer_params": {"do_remote_decode": True}}
    status, _, raw = call(prefill, "POST", "/v1/completions", body)
    assert status == 200, raw
    return json.loads(raw)["kv_transfer_params"]


def _decode_leg(pd_app, model_name: str, prompt: str, params: dict) -> dict:
    (decode,) = urls(pd_app, "decode")
    return complete(decode, model_name, prompt, max_tokens=16, kv_transfer_params=params)


def test_a_handoff_missing_from_the_data_system_is_recomputed_and_counted(app, pd_app, model_name):
    prompt = "# a prefill that never happened\n" + LONG_PROMPT
    before = kv_stats(pd_app)
    merged = complete(app.url, model_name, prompt, max_tokens=16)
    recomputed = _decode_leg(pd_app, model_name, prompt, {"do_remote_prefill": True})
    assert recomputed["tokens"] == merged["tokens"]
    stats = kv_stats(pd_app, handoff_missed=before["handoff_missed"] + 1)
    assert stats["handoff_missed"] - before["handoff_missed"] == 1


def test_a_corrupt_handoff_is_recomputed_and_counted(app, pd_app, model_name):
    prompt = "# a corrupt handoff\n" + LONG_PROMPT
    params = _prefill_leg(pd_app, model_name, prompt)
    assert params["do_remote_prefill"] is True and params["blocks"] == 4  # 3 full blocks and the tail
    journal = JournalReader(Path(pd_app.status()["logs"]) / "kv-p1", "worker").read()
    keys = [line for line in journal if line["op"] == "stored"][-1]["keys"]
    store = BlockStore(pd_app.status()["ds_address"], timeout_ms=2000, ttl_s=0)
    (good,) = store.get(keys[2:3])
    damaged = bytearray(good)
    damaged[-1] ^= 0xFF
    store.put(keys[2:3], len(damaged), lambda _, out: out.__setitem__(slice(None), damaged))
    before = kv_stats(pd_app)
    merged = complete(app.url, model_name, prompt, max_tokens=16)
    assert _decode_leg(pd_app, model_name, prompt, params)["tokens"] == merged["tokens"]
    stats = kv_stats(pd_app, handoff_load_failed=before["handoff_load_failed"] + 1)
    assert stats["handoff_load_failed"] - before["handoff_load_failed"] == 1
    assert stats["blocks_load_failed"] - before["blocks_load_failed"] == 2  # the corrupt block and the tail


def test_each_pool_scales_on_its_own(pd_app, model_name):
    report = pd_app.scale(prefill=2)
    assert report.ok, str(report)
    (added,) = [r for r in report.replicas if r.action == "added"]
    assert added.role.value == "prefill" and added.weights.plan.value == "map"  # the same cached weights
    status, _, raw = call(pd_app.url, "POST", "/scaleout", {"role": "decode"})
    assert status == 200, raw
    answer = json.loads(raw)
    assert answer["pools"]["decode"] == {"requested": 2, "before": 1, "after": 2}
    assert answer["pools"]["prefill"]["after"] == 2
    assert sorted(roles(pd_app).values()) == ["decode", "decode", "prefill", "prefill"]
    assert complete(pd_app.url, model_name, "# four replicas\n" + LONG_PROMPT)["tokens"]
    # Errors change nothing: a pool this App does not have, a merged-style call.
    status, _, raw = call(pd_app.url, "POST", "/scaleout", {"role": "merged", "replicas": 3})
    assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_role"
    with pytest.raises(ValueError, match="scale\\(prefill=n, decode=m\\)"):
        pd_app.scale(3)
    status, _, raw = call(pd_app.url, "POST", "/scalein", {"role": "decode", "replicas": 1})
    assert status == 200, raw
    assert pd_app.scale(prefill=1).ok
    assert sorted(roles(pd_app).values()) == ["decode", "prefill"]


def test_a_dead_decode_replica_is_healed_in_its_pool(pd_app, model_name):
    (victim,) = [r for r in pd_app.status()["replicas"] if r["role"] == "decode"]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: events(pd_app, "replica_failed", victim["replica_id"]), "the decode replica declared failed")
    wait_for(lambda: len(urls(pd_app, "decode")) == 1 and victim["replica_id"] not in roles(pd_app),
             "a replacement decode replica")
    assert complete(pd_app.url, model_name, "# healed\n" + LONG_PROMPT)["tokens"]


def test_both_pools_go_to_zero_and_a_request_brings_both_back(app, pd_app, model_name):
    report = pd_app.scale(prefill=0, decode=0)
    assert report.ok and report.replicas_after == 0, str(report)
    assert pd_app.status()["replicas"] == []
    prompt = "# back from zero\n" + LONG_PROMPT
    assert complete(pd_app.url, model_name, prompt)["tokens"] == complete(app.url, model_name, prompt)["tokens"]
    assert sorted(roles(pd_app).values()) == ["decode", "prefill"]
    (woken,) = events(pd_app, "woken")
    assert "prefill, decode 0 -> 2 replicas" in woken["reason"], woken
