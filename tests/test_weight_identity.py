"""Weight identity, keys and manifests: the pure parts of the weight plane."""

import re
import shutil

import pytest

from app.datasystem_keys import check_key
from app.weights.identity import RankLayout, WeightIdentity, WeightKeys, content_digest
from app.weights.manifest import Manifest, TensorEntry, VerifyMode, full_digest, sampled_digest

KEY_RULE = re.compile(r"^[a-zA-Z0-9\-_!@#%\^\*\(\)\+\=\:;]*$")


def identity(**changes):
    base = dict(content="c" * 64, dtype="float32", quantization=None, vllm_version="0.32.0")
    return WeightIdentity(**{**base, **changes})


def test_fingerprint_changes_with_everything_that_decides_the_weights():
    base = identity().fingerprint
    for change in ({"content": "d" * 64}, {"dtype": "bfloat16"}, {"quantization": "fp8"},
                   {"vllm_version": "0.33.0"}, {"tp_size": 2}, {"pp_size": 2}):
        assert identity(**change).fingerprint != base, change
    assert identity().fingerprint == base  # and only with those


def test_content_digest_follows_bytes_not_paths(tmp_path):
    model = tmp_path / "a"
    model.mkdir()
    (model / "config.json").write_text('{"x": 1}')
    (model / "model.safetensors").write_bytes(b"\x01" * 1000)
    (model / "tokenizer.json").write_text("{}")
    digest = content_digest(model)
    copy = tmp_path / "b"
    shutil.copytree(model, copy)
    assert content_digest(copy) == digest  # another path, same content
    (copy / "tokenizer.json").write_text('{"changed": true}')
    assert content_digest(copy) == digest  # the tokenizer does not decide the weights
    (copy / "model.safetensors").write_bytes(b"\x02" * 1000)
    assert content_digest(copy) != digest


def test_content_digest_cache_is_keyed_by_size_and_mtime(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    weights.write_bytes(b"\x01" * 100)
    cache = tmp_path / "digests.json"
    first = content_digest(model, cache)
    assert cache.is_file() and content_digest(model, cache) == first
    weights.write_bytes(b"\x02" * 200)  # new size and mtime: the cached digest must not be used
    assert content_digest(model, cache) != first


def test_keys_obey_the_data_system_rules():
    layout = RankLayout(tp_rank=1, tp_size=2)
    keys = WeightKeys(identity().fingerprint, layout)
    for key in (keys.manifest, keys.abandoned("r1"), *keys.tensors(3)):
        assert KEY_RULE.match(key) and len(key) <= 255
    assert len(set(keys.tensors(3))) == 3
    other_rank = WeightKeys(identity().fingerprint, RankLayout(tp_rank=0, tp_size=2))
    assert other_rank.manifest != keys.manifest


@pytest.mark.parametrize("bad", ["a.b", "a/b", "", "x" * 256, "space key"])
def test_invalid_keys_are_refused(bad):
    with pytest.raises(ValueError):
        check_key(bad)


def test_fingerprint_must_be_hex():
    with pytest.raises(ValueError):
        WeightKeys("../../etc", RankLayout())


def entry_for(name, data):
    view = memoryview(data)
    return TensorEntry(name=name, shape=(len(data),), dtype="torch.uint8", nbytes=len(data),
                       full=full_digest(view), sampled=sampled_digest(view))


def test_checksums_catch_corruption_in_the_sampled_stripes_and_anywhere_in_full():
    data = bytearray(range(256)) * 1024  # 256 KiB
    entry = entry_for("w", bytes(data))
    entry.check(memoryview(bytes(data)), VerifyMode.SAMPLED)
    entry.check(memoryview(bytes(data)), VerifyMode.FULL)
    head = bytearray(data)
    head[10] ^= 0xFF
    with pytest.raises(ValueError, match="sampled"):
        entry.check(memoryview(bytes(head)), VerifyMode.SAMPLED)
    between = bytearray(data)
    between[50_000] ^= 0xFF  # outside the three 4 KiB stripes
    entry.check(memoryview(bytes(between)), VerifyMode.SAMPLED)  # sampled cannot see it...
    with pytest.raises(ValueError, match="full"):
        entry.check(memoryview(bytes(between)), VerifyMode.FULL)  # ...full does
    with pytest.raises(ValueError, match="bytes cached"):
        entry.check(memoryview(bytes(data[:-1])), VerifyMode.OFF)


def test_manifest_mismatch_names_the_difference():
    manifest = Manifest(fingerprint="ab" * 16, layout=RankLayout(), vllm_version="0.32.0",
                        dtype="torch.float32", tensors=[entry_for("a", b"\0" * 8), entry_for("b", b"\0" * 4)])
    assert manifest.mismatch([("a", (8,), "torch.uint8", 8), ("b", (4,), "torch.uint8", 4)]) is None
    assert "names differ" in manifest.mismatch([("a", (8,), "torch.uint8", 8)])
    assert "tensor b differs" in manifest.mismatch([("a", (8,), "torch.uint8", 8),
                                                    ("b", (2, 2), "torch.uint8", 4)])
    assert manifest.total_bytes == 12
