"""Prefix reuse through the data system, on the shared App's real engines: a prefix computed on one
replica is loaded, not recomputed, on another, with the same tokens; a block that is corrupt or
missing is recomputed, with the same tokens."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from conftest import LONG_PROMPT, complete, replica_urls

from app.kv.block_format import HEADER_SIZE, read_block
from app.kv.journal import JournalReader
from app.kv.store import BlockStore

pytestmark = pytest.mark.engine

BLOCK = 128  # vLLM's default block size on CPU


@pytest.fixture(scope="module")
def two_replicas(app):
    app.scale(2)
    first, second = sorted(replica_urls(app).items())
    yield first, second
    app.scale(1)  # the other test modules expect the App as the session fixture started it


def _kv_stats(app, **changed: int) -> dict:
    """/status kv once the App has read the journals (it does every kv.accounting_interval_s)."""
    deadline = time.monotonic() + 15
    while True:
        stats = app.status()["kv"]
        if all(stats[name] >= value for name, value in changed.items()) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def _stored_keys(app, replica_id: str) -> list[str]:
    """The keys of the blocks the replica stored last (its connector's journal; a second reader, which is
    harmless until the journal first rotates, at 4 MiB)."""
    lines = JournalReader(Path(app.status()["logs"]) / f"kv-{replica_id}", "worker").read()
    return [line for line in lines if line["op"] == "stored"][-1]["keys"]


def test_a_prefix_computed_on_one_replica_is_a_counted_hit_on_another_with_the_same_tokens(app, model_name,
                                                                                          two_replicas):
    (a, url_a), (_, url_b) = two_replicas
    before = _kv_stats(app)
    prompt = "# first question\n" + LONG_PROMPT  # a prefix of its own
    computed = complete(url_a, model_name, prompt)
    assert computed["prompt_tokens"] > 3 * BLOCK
    local_hit = complete(url_a, model_name, prompt, logprobs=1)  # vLLM's own prefix cache, for comparison
    loaded = complete(url_b, model_name, prompt, logprobs=1)
    assert loaded["tokens"] == computed["tokens"] == local_hit["tokens"]
    # Loaded blocks are the bytes a local prefix hit reads (the same split of the prompt): the same
    # numbers, bit for bit.
    assert loaded["logprobs"] == local_hit["logprobs"]
    # Greedy tokens of a random-weight model repeat; seeded sampling over its near-flat distribution
    # shows a change in the numbers in the tokens themselves.
    sampled = {"temperature": 1.0, "seed": 7, "max_tokens": 16}
    local_sample = complete(url_a, model_name, prompt, **sampled)["tokens"]
    assert len(set(local_sample)) > 4, "the sample must be one in which a wrong KV would show"
    assert complete(url_b, model_name, prompt, **sampled)["tokens"] == local_sample
    stats = _kv_stats(app, hits=before["hits"] + 1, blocks_loaded=before["blocks_loaded"] + 3)
    assert stats["hits"] == before["hits"] + 1
    assert stats["blocks_loaded"] - before["blocks_loaded"] == 3
    assert stats["hit_tokens"] - before["hit_tokens"] == 3 * BLOCK
    assert stats["blocks_stored"] - before["blocks_stored"] == 3  # once, by A: nobody stores a block twice
    metrics = urllib.request.urlopen(f"{app.url}/metrics", timeout=10).read().decode()
    assert f'yrllm_kv_lookups_total{{result="hit"}} {float(stats["hits"])}' in metrics


def _ds_store(app) -> BlockStore:
    return BlockStore(app.status()["ds_address"], timeout_ms=2000, ttl_s=0)


def test_a_corrupt_block_is_recomputed_with_the_same_tokens_and_replaced(app, model_name, two_replicas):
    (a, url_a), (_, url_b) = two_replicas
    prompt = "# second question\n" + LONG_PROMPT  # a prefix of its own
    computed = complete(url_a, model_name, prompt)
    keys = _stored_keys(app, a)
    store = _ds_store(app)
    (good,) = store.get(keys[1:2])
    damaged = bytearray(good)
    damaged[-1] ^= 0xFF
    store.put(keys[1:2], len(damaged), lambda _, out: out.__setitem__(slice(None), damaged))
    before = _kv_stats(app)
    loaded = complete(url_b, model_name, prompt)
    assert loaded["tokens"] == computed["tokens"]
    stats = _kv_stats(app, blocks_load_failed=before["blocks_load_failed"] + 2)
    assert stats["blocks_loaded"] - before["blocks_loaded"] == 1  # the block before the corrupt one
    assert stats["blocks_load_failed"] - before["blocks_load_failed"] == 2  # it and the one after it
    # Recomputed, the block was stored again, intact: the next replica will not trip on it.
    (replaced,) = store.get(keys[1:2])
    assert bytes(replaced) != bytes(damaged)
    read_block(replaced, bytes(replaced[8:24]), len(replaced) - HEADER_SIZE)  # raises if not intact


def test_a_missing_block_ends_the_prefix_and_the_rest_is_recomputed(app, model_name, two_replicas):
    (a, url_a), (_, url_b) = two_replicas
    prompt = "# third question\n" + LONG_PROMPT  # a prefix of its own
    computed = complete(url_a, model_name, prompt)
    keys = _stored_keys(app, a)
    _ds_store(app).delete(keys[1:2])
    before = _kv_stats(app)
    loaded = complete(url_b, model_name, prompt)
    assert loaded["tokens"] == computed["tokens"]
    stats = _kv_stats(app, hit_tokens=before["hit_tokens"] + BLOCK)
    assert stats["hit_tokens"] - before["hit_tokens"] == BLOCK
    assert stats["blocks_load_failed"] == before["blocks_load_failed"]
