"""The KV plane without an engine: keys, the block format, the scheduler side's plans, the worker
side's copies, the journal and the App's ledger."""

from __future__ import annotations

import json

import pytest
import torch

from app.kv.block_format import CorruptBlock, object_size, read_block, write_block
from app.kv.journal import HandoffResult, JournalReader, JournalWriter, KVOp, journal_file
from app.kv.keys import KVNamespace, block_keys, layout_tag, object_keys
from app.kv.ledger import KVLedger
from app.kv.scheduling import BlockScheduler, Handoff, StepRequest
from app.kv.store import StoreUnavailable
from app.kv.transfer import BlockCopier, RankShare, UnsupportedLayout

BLOCK = 4
NAMESPACE = KVNamespace(fingerprint="ab" * 16, dtype="float32", block_size=BLOCK,
                        layout=layout_tag(["l0", "l1"], 2, 8, (2, BLOCK, 16)))


def test_keys_are_a_chain_shared_by_prompts_with_the_same_prefix():
    first = block_keys(NAMESPACE, list(range(12)), 3)
    second = block_keys(NAMESPACE, list(range(8)) + [99, 10, 11, 12], 3)
    assert first[:2] == second[:2] and first[2] != second[2]
    # A block's key depends on every token before it, not only its own.
    assert block_keys(NAMESPACE, [7] + list(range(1, 12)), 3)[1] != first[1]
    assert len(set(first)) == 3 and all(key.startswith(NAMESPACE.prefix) for key in first)


@pytest.mark.parametrize("change", [{"fingerprint": "cd" * 16}, {"dtype": "bfloat16"}, {"block_size": 8},
                                    {"layout": "other"}, {"splits": 2}])
def test_anything_the_bytes_depend_on_changes_every_key(change):
    other = NAMESPACE.model_copy(update=change)
    tokens = list(range(16))
    assert not set(block_keys(NAMESPACE, tokens, 2)) & set(block_keys(other, tokens, 2))


def test_keys_obey_the_data_system_rules_and_only_full_blocks_have_one():
    (key,) = block_keys(NAMESPACE, list(range(5)), 1)
    assert "." not in key and "/" not in key and len(key) <= 255
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        block_keys(NAMESPACE, list(range(5)), 2)


def _block(parts: list[bytes], digest: bytes = NAMESPACE.digest) -> bytearray:
    out = bytearray(object_size(sum(map(len, parts))))
    write_block(memoryview(out), digest, [memoryview(part) for part in parts])
    return out


def test_a_block_reads_back_whole():
    data = _block([b"a" * 10, b"b" * 6])
    assert bytes(read_block(memoryview(data), NAMESPACE.digest, 16)) == b"a" * 10 + b"b" * 6


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data.__setitem__(-1, data[-1] ^ 1), "checksum"),
    (lambda data: data.__delitem__(slice(-4, None)), "bytes, expected"),
    (lambda data: data.__setitem__(slice(0, 4), b"XXXX"), "not a KV block"),
])
def test_a_damaged_block_is_refused(damage, reason):
    data = _block([b"a" * 16])
    damage(data)
    with pytest.raises(CorruptBlock, match=reason):
        read_block(memoryview(data), NAMESPACE.digest, 16)


def test_a_block_of_another_namespace_is_refused():
    other = NAMESPACE.model_copy(update={"dtype": "bfloat16"})
    with pytest.raises(CorruptBlock, match="another namespace"):
        read_block(memoryview(_block([b"a" * 16], other.digest)), NAMESPACE.digest, 16)


class FakeStore:
    def __init__(self, present: set[str] = frozenset(), up: bool = True) -> None:
        self.present, self.up, self.asked = set(present), up, 0

    def present_prefix(self, keys):
        self.asked += 1
        if not self.up:
            raise StoreUnavailable("down")
        count = 0
        for key in keys:
            if key not in self.present:
                break
            count += 1
        return count


@pytest.fixture
def journal(tmp_path):
    return JournalWriter(tmp_path / "kv-r1", "scheduler")


def test_a_lookup_finds_the_stored_prefix_and_leaves_one_token_to_compute(journal):
    prompt = list(range(12))  # 3 full blocks; the last token must be computed, so 2 may load
    keys = block_keys(NAMESPACE, prompt, 3)
    scheduler = BlockScheduler(NAMESPACE, FakeStore(set(keys)), journal)
    assert scheduler.lookup("r", prompt, 0) == 2 * BLOCK
    assert scheduler.lookup("r", prompt, 0) == 2 * BLOCK  # asked again: answered without the store
    scheduler.allocated("r", [10, 11, 12], 2 * BLOCK)
    loads, stores = scheduler.step([StepRequest("r", 12, [10, 11, 12], replace=True)])
    assert [(t.keys, t.block_ids) for t in loads] == [(keys[:2], [10, 11])]
    # Block 3 was computed this step: it is stored; the loaded ones are not stored again.
    assert [(t.keys, t.block_ids) for t in stores] == [(keys[2:], [12])]


def test_a_gap_ends_the_prefix(journal):
    prompt = list(range(13))
    keys = block_keys(NAMESPACE, prompt, 3)
    scheduler = BlockScheduler(NAMESPACE, FakeStore({keys[0], keys[2]}), journal)
    assert scheduler.lookup("r", prompt, 0) == BLOCK


def test_a_lookup_starts_where_the_engines_own_prefix_cache_stopped(journal):
    prompt = list(range(13))
    keys = block_keys(NAMESPACE, prompt, 3)
    store = FakeStore(set(keys))
    scheduler = BlockScheduler(NAMESPACE, store, journal)
    assert scheduler.lookup("r", prompt, 2 * BLOCK) == BLOCK
    scheduler.allocated("r", [5, 6, 7, 8], BLOCK)
    loads, stores = scheduler.step([StepRequest("r", 13, [5, 6, 7, 8], replace=True)])
    assert [(t.keys, t.block_ids) for t in loads] == [(keys[2:3], [7])] and stores == []


def test_an_unreachable_store_is_a_miss_not_an_error(journal):
    prompt = list(range(12))
    scheduler = BlockScheduler(NAMESPACE, FakeStore(up=False), journal)
    assert scheduler.lookup("r", prompt, 0) == 0
    scheduler.allocated("r", [1, 2, 3], 0)
    _, stores = scheduler.step([StepRequest("r", 12, [1, 2, 3], replace=True)])
    assert stores[0].block_ids == [1, 2, 3]  # computed, so stored (the store may be back)


def test_chunked_prefill_stores_blocks_as_they_fill(journal):
    prompt = list(range(16))
    keys = block_keys(NAMESPACE, prompt, 4)
    scheduler = BlockScheduler(NAMESPACE, FakeStore(), journal)
    scheduler.lookup("r", prompt, 0)
    scheduler.allocated("r", [1, 2], 0)
    _, first = scheduler.step([StepRequest("r", 6, [1, 2], replace=True)])
    _, second = scheduler.step([StepRequest("r", 16, [3, 4])])
    _, decode = scheduler.step([StepRequest("r", 17, [5])])
    assert [(t.keys, t.block_ids) for t in first + second] == [(keys[:1], [1]), (keys[1:], [2, 3, 4])]
    assert decode == []  # generated tokens are not content-addressed by the prompt


def test_blocks_that_failed_to_load_are_stored_again_once_recomputed(journal):
    prompt = list(range(12))
    keys = block_keys(NAMESPACE, prompt, 3)
    scheduler = BlockScheduler(NAMESPACE, FakeStore(set(keys)), journal)
    scheduler.lookup("r", prompt, 0)
    scheduler.allocated("r", [1, 2, 3], 2 * BLOCK)
    scheduler.step([StepRequest("r", 12, [1, 2, 3], replace=True)])
    scheduler.invalidated({2})
    _, stores = scheduler.step([StepRequest("r", 12, None)])
    assert [(t.keys, t.block_ids) for t in stores] == [(keys[1:], [2, 3])]


def test_the_journal_says_what_the_lookups_found(tmp_path):
    writer = JournalWriter(tmp_path / "kv-r1", "scheduler")
    prompt = list(range(12))
    scheduler = BlockScheduler(NAMESPACE, FakeStore(set(block_keys(NAMESPACE, prompt, 1))), writer)
    scheduler.lookup("hit", prompt, 0)
    scheduler.lookup("miss", [5] + prompt[1:], 0)
    scheduler.lookup("short", prompt[:3], 0)  # no full block: nothing to look up, no line
    lines = JournalReader(tmp_path / "kv-r1", "scheduler").read()
    assert [(line["op"], line["blocks"]) for line in lines] == [("lookup", 1), ("lookup", 0)]


def test_a_tail_key_covers_a_partial_last_block_and_is_never_a_full_blocks_key():
    prompt = list(range(10))  # 2 full blocks and 2 tokens
    keys = block_keys(NAMESPACE, prompt, 2, tail=True)
    assert keys[:2] == block_keys(NAMESPACE, prompt, 2) and len(keys) == 3
    assert block_keys(NAMESPACE, prompt + [10, 11], 3)[2] != keys[2]  # the full block over the same start
    assert block_keys(NAMESPACE, prompt[:8], 2, tail=True) == keys[:2]  # no partial block: no tail key
    with pytest.raises(ValueError, match="a block or more"):
        block_keys(NAMESPACE, prompt, 1, tail=True)


def test_a_prefill_leg_stores_the_whole_prompt_and_answers_the_decode_legs_parameters(journal):
    prompt = list(range(10))
    keys = block_keys(NAMESPACE, prompt, 2, tail=True)
    scheduler = BlockScheduler(NAMESPACE, FakeStore(), journal)
    assert scheduler.lookup("p", prompt, 0, handoff=Handoff.of({"do_remote_decode": True})) == 0
    scheduler.allocated("p", [4, 5, 6], 0)
    _, stores = scheduler.step([StepRequest("p", 10, [4, 5, 6], replace=True)])
    assert [(t.keys, t.block_ids) for t in stores] == [(keys, [4, 5, 6])]  # the partial block too
    assert scheduler.finished("p") == {"do_remote_prefill": True, "prompt_tokens": 10, "blocks": 3}


def test_a_prefill_leg_stores_again_what_its_own_prefix_cache_holds_and_the_data_system_lost(journal):
    prompt = list(range(10))
    keys = block_keys(NAMESPACE, prompt, 2, tail=True)
    scheduler = BlockScheduler(NAMESPACE, FakeStore({keys[0]}), journal)  # block 2 was evicted
    assert scheduler.lookup("p", prompt, 2 * BLOCK, handoff=Handoff.PRODUCE) == 0  # 2 blocks hit locally
    scheduler.allocated("p", [4, 5, 6], 0)
    _, stores = scheduler.step([StepRequest("p", 10, [4, 5, 6], replace=True)])
    assert [(t.keys, t.block_ids) for t in stores] == [(keys[1:], [5, 6])]


@pytest.mark.parametrize("tokens, loaded_tokens", [(10, 9), (8, 7), (9, 8)])
def test_a_decode_leg_loads_every_prompt_token_but_the_last(tmp_path, tokens, loaded_tokens):
    # 10 tokens: 2 blocks and the tail; 8: the second block holds the last token; 9: the tail is it.
    prompt = list(range(tokens))
    keys = block_keys(NAMESPACE, prompt, tokens // BLOCK, tail=True)
    writer = JournalWriter(tmp_path / "kv-d1", "scheduler")
    scheduler = BlockScheduler(NAMESPACE, FakeStore(set(keys)), writer)
    assert scheduler.lookup("d", prompt, 0, handoff=Handoff.CONSUME) == loaded_tokens
    blocks = list(range(1, len(keys) + 1))
    scheduler.allocated("d", blocks, loaded_tokens)
    loads, stores = scheduler.step([StepRequest("d", tokens, blocks, replace=True)])
    needed = -(-loaded_tokens // BLOCK)
    assert [(t.keys, t.block_ids) for t in loads] == [(keys[:needed], blocks[:needed])] and stores == []
    _, later = scheduler.step([StepRequest("d", tokens + 8, [9, 10])])  # generating: nothing to store
    assert later == [] and scheduler.finished("d") is None
    lines = JournalReader(tmp_path / "kv-d1", "scheduler").read()
    assert [line for line in lines if line["op"] == "handoff"] == [
        {"op": "handoff", "result": "complete", "blocks": needed}]


def test_a_decode_leg_that_misses_the_handoff_recomputes_and_says_so(tmp_path):
    prompt = list(range(10))
    keys = block_keys(NAMESPACE, prompt, 2, tail=True)
    writer = JournalWriter(tmp_path / "kv-d1", "scheduler")
    scheduler = BlockScheduler(NAMESPACE, FakeStore({keys[0]}), writer)
    assert scheduler.lookup("partial", prompt, 0, handoff=Handoff.CONSUME) == BLOCK
    assert scheduler.lookup("partial", prompt, 0, handoff=Handoff.CONSUME) == BLOCK  # recorded once
    assert scheduler.lookup("missed", [7] + prompt[1:], 0, handoff=Handoff.CONSUME) == 0
    scheduler.lookup("corrupt", prompt, 0, handoff=Handoff.CONSUME)
    scheduler.allocated("corrupt", [1, 2, 3], BLOCK)
    scheduler.step([StepRequest("corrupt", 10, [1, 2, 3], replace=True)])
    scheduler.invalidated({1})
    lines = JournalReader(tmp_path / "kv-d1", "scheduler").read()
    assert [line["result"] for line in lines if line["op"] == "handoff"] == [
        "partial", "missed", "partial", "load_failed"]


def test_handoffs_are_counted_by_result():
    ledger = KVLedger(capacity_bytes=1 << 20)
    ledger.ingest([{"op": "handoff", "result": result.value, "blocks": 1} for result in HandoffResult]
                  + [{"op": "handoff", "result": "missed", "blocks": 0}])
    assert ledger.stats.handoffs == {"complete": 1, "partial": 1, "missed": 2, "load_failed": 1}


def test_a_journal_reader_never_returns_half_a_line(tmp_path):
    JournalWriter(tmp_path / "kv-r1", "worker").record(KVOp.STORED, keys=["a"], bytes=1, seconds=0.1)
    path = journal_file(tmp_path / "kv-r1", "worker")
    with open(path, "a") as handle:
        handle.write('{"op": "stored", "ke')
    reader = JournalReader(tmp_path / "kv-r1", "worker")
    assert [line["keys"] for line in reader.read()] == [["a"]]
    with open(path, "a") as handle:
        handle.write('ys": ["b"], "bytes": 1, "seconds": 0.1}\n')
    assert [line["keys"] for line in reader.read()] == [["b"]]
    assert reader.read() == []


def test_a_journal_rotates_and_the_reader_deletes_what_it_has_read(tmp_path):
    writer = JournalWriter(tmp_path / "kv-r1", "worker", rotate_bytes=200)
    reader = JournalReader(tmp_path / "kv-r1", "worker")
    seen = []
    for index in range(30):
        writer.record(KVOp.STORED, keys=[f"k{index}"], bytes=1, seconds=0.1)
        if index % 7 == 0:
            seen += reader.read()
    seen += reader.read()
    assert [line["keys"][0] for line in seen] == [f"k{index}" for index in range(30)]  # each once, in order
    assert len(list(tmp_path.glob("kv-r1-worker-*.jsonl"))) == 1  # only the file being written is left


def _cache(blocks: int = 3, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(blocks, 2, BLOCK, 16).to(dtype)


def test_blocks_copy_between_caches_byte_for_byte():
    source, target = [_cache(), _cache()], [torch.zeros(3, 2, BLOCK, 16, dtype=torch.bfloat16) for _ in range(2)]
    out = BlockCopier(NAMESPACE.digest, source, (2, BLOCK, 16))
    into = BlockCopier(NAMESPACE.digest, target, (2, BLOCK, 16))
    data = bytearray(out.object_size)
    out.fill(1, memoryview(data))
    into.load(2, memoryview(bytes(data)))
    assert all(torch.equal(s[1], t[2]) for s, t in zip(source, target))
    assert all(not t[0].any() and not t[1].any() for t in target)  # no other block touched


def test_a_corrupt_block_writes_nothing_into_the_cache():
    source, target = [_cache()], [torch.zeros(3, 2, BLOCK, 16, dtype=torch.bfloat16)]
    data = bytearray(BlockCopier(NAMESPACE.digest, source, (2, BLOCK, 16)).object_size)
    BlockCopier(NAMESPACE.digest, source, (2, BLOCK, 16)).fill(0, memoryview(data))
    data[-1] ^= 0xFF
    with pytest.raises(CorruptBlock):
        BlockCopier(NAMESPACE.digest, target, (2, BLOCK, 16)).load(0, memoryview(bytes(data)))
    assert not target[0].any()


def test_a_cache_that_is_not_whole_contiguous_blocks_is_refused():
    with pytest.raises(UnsupportedLayout, match="expected contiguous"):
        BlockCopier(NAMESPACE.digest, [_cache().transpose(1, 2)], (2, BLOCK, 16))
    with pytest.raises(UnsupportedLayout):
        BlockCopier(NAMESPACE.digest, [torch.zeros(2, 3, BLOCK, 16)], (2, BLOCK, 16))


def _stored(keys, size=100):
    return {"op": "stored", "keys": keys, "bytes": size * len(keys), "seconds": 0.01}


def test_the_ledger_evicts_the_least_recently_used_blocks_beyond_its_capacity():
    ledger = KVLedger(capacity_bytes=300)
    ledger.ingest([_stored(["a", "b", "c"]), {"op": "loaded", "keys": ["a"], "bytes": 100, "seconds": 0.01}])
    assert ledger.evictions() == []
    ledger.ingest([_stored(["d"])])
    assert ledger.evictions() == ["b"]  # a was loaded after b was stored
    assert ledger.stats.resident_bytes == 300 and ledger.stats.blocks_evicted == 1


def test_the_ledger_counts_what_the_journals_say():
    ledger = KVLedger(capacity_bytes=10**6)
    ledger.ingest([
        {"op": "lookup", "blocks": 2, "tokens": 256, "seconds": 0.001},
        {"op": "lookup", "blocks": 0, "tokens": 0, "seconds": 0.001},
        _stored(["a", "b"]),
        {"op": "loaded", "keys": ["a"], "bytes": 100, "seconds": 0.002},
        {"op": "load_failed", "keys": ["b"], "reason": "corrupt"},
        {"op": "not_stored", "keys": ["c"], "reason": "full"},
    ])
    stats = ledger.stats
    assert (stats.lookups, stats.hits, stats.misses, stats.hit_tokens) == (2, 1, 1, 256)
    assert (stats.blocks_stored, stats.blocks_loaded, stats.blocks_load_failed, stats.blocks_not_stored) == (2, 1, 1, 1)
    assert stats.resident_blocks == 1  # b was deleted by the connector that found it corrupt
    json.dumps(stats.model_dump())  # /status carries it


def test_a_cache_salt_isolates_its_requests_blocks():
    tokens = list(range(8))
    plain, tenant = block_keys(NAMESPACE, tokens, 2), block_keys(NAMESPACE, tokens, 2, salt="tenant-a")
    assert not set(plain) & set(tenant)
    assert block_keys(NAMESPACE, tokens, 2, salt="tenant-a") == tenant


def test_a_request_whose_tokens_do_not_decide_its_kv_is_neither_loaded_nor_stored(journal):
    store = FakeStore(set(block_keys(NAMESPACE, list(range(12)), 3)))
    scheduler = BlockScheduler(NAMESPACE, store, journal)
    assert scheduler.lookup("image", None, 0) == 0  # the connector passes None for images and adapters
    scheduler.allocated("image", [1, 2, 3], 0)
    assert scheduler.step([StepRequest("image", 12, [1, 2, 3], replace=True)]) == ([], [])
    assert store.asked == 0


def _rank_caches(full: list[torch.Tensor], rank: int, size: int) -> list[torch.Tensor]:
    """What rank ``rank`` of ``size`` holds of each layer's full cache: its KV heads, as vLLM splits them
    (a head replicated when there are more ranks than heads)."""
    heads = full[0].shape[1]
    if size <= heads:
        per = heads // size
        return [layer[:, rank * per:(rank + 1) * per].clone() for layer in full]
    return [layer[:, rank // (size // heads):rank // (size // heads) + 1].clone() for layer in full]


@pytest.mark.parametrize(("writer", "reader", "splits"), [(2, 1, 2), (1, 2, 2), (2, 2, 2), (4, 1, 2), (1, 4, 2),
                                                          (4, 2, 2), (1, 1, 1)])
def test_kv_heads_written_at_one_tensor_parallel_size_are_read_at_another(writer, reader, splits):
    """Objects of whole heads: every rank of the writing pool stores its own, every rank of the reading
    pool loads its own, and the reading ranks' caches end up exactly the writer's heads."""
    full = [torch.randn(3, 2, BLOCK, 16).to(torch.bfloat16) for _ in range(2)]  # 2 layers, 2 KV heads
    store: dict[int, bytes] = {}
    for rank in range(writer):
        caches = _rank_caches(full, rank, writer)
        copier = BlockCopier(NAMESPACE.digest, caches, tuple(caches[0].shape[1:]), RankShare.of(rank, writer, 2, splits))
        for part in copier.share.stores:
            data = bytearray(copier.object_size)
            copier.fill(1, memoryview(data), part)
            assert part not in store, "two ranks wrote the same object"
            store[part] = bytes(data)
    assert sorted(store) == list(range(splits))
    for rank in range(reader):
        expected = _rank_caches(full, rank, reader)
        caches = [torch.zeros_like(layer) for layer in expected]
        copier = BlockCopier(NAMESPACE.digest, caches, tuple(caches[0].shape[1:]), RankShare.of(rank, reader, 2, splits))
        for part in copier.share.loads:
            copier.load(0, memoryview(store[part]), part)
        assert all(torch.equal(got[0], want[1]) for got, want in zip(caches, expected))
        assert all(not got[1:].any() for got in caches)  # no other block touched


def test_sizes_that_cannot_share_one_split_of_the_heads_are_refused():
    with pytest.raises(UnsupportedLayout, match="does not divide"):
        RankShare.of(0, 2, 3, 3)
    with pytest.raises(UnsupportedLayout, match="do not split"):
        RankShare.of(0, 1, 3, 2)


def test_object_keys_are_the_block_keys_without_splits_and_distinct_per_split():
    keys = block_keys(NAMESPACE, list(range(8)), 2)
    assert object_keys(NAMESPACE, keys) == keys
    split = NAMESPACE.model_copy(update={"splits": 2})
    objects = object_keys(split, keys)
    assert len(set(objects)) == 4 and object_keys(split, keys, [1]) == objects[1::2]
