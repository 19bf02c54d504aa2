"""The memory plan: the data system sized from the model, and a host too small refused at start with
the numbers (never an OOM kill half way through a load). No App needed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from app import AppConfig
from app.control.memory_plan import GB, MB, USABLE_FRACTION, HostMemoryError, plan_memory, weight_bytes
from app.host_memory import require_available

PLENTY = 1000 * GB


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Two safetensors shards in bf16: 24 MiB of weights."""
    path = tmp_path_factory.mktemp("plan-model")
    save_file({"a": torch.zeros(4 << 20, dtype=torch.bfloat16)}, str(path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2048, 4096, dtype=torch.bfloat16)}, str(path / "model-00002-of-00002.safetensors"))
    return path


def config(**overrides):
    return AppConfig.load(env={}, overrides={"router.port": 0, **overrides})


def test_weight_bytes_come_from_the_headers_in_the_served_dtype(model_dir):
    assert weight_bytes(model_dir, "auto") == weight_bytes(model_dir, "bfloat16") == 24 * MB
    assert weight_bytes(model_dir, "float32") == 48 * MB


def test_unset_the_shared_memory_holds_each_rank_layout_and_the_kv_blocks(model_dir):
    merged = plan_memory(config(), model_dir, PLENTY)
    assert (merged.copies, merged.private_copies, merged.kv_capacity_bytes) == (1, 0, GB)
    assert merged.shared_memory_mb * MB * USABLE_FRACTION >= 24 * MB + GB
    # PTP=2 prefill and DTP=1 decode engines cannot share a rank layout: two copies in the data system.
    split = plan_memory(config(mode="disaggregated", **{"prefill.tensor_parallel": 2}), model_dir, PLENTY)
    assert split.copies == 2 and split.engine_ranks == 3
    assert split.shared_memory_mb * MB * USABLE_FRACTION >= 2 * 24 * MB + GB


def test_several_nodes_also_hold_a_relays_transit_chunks_of_the_largest_tensor(model_dir):
    one = plan_memory(config(), model_dir, PLENTY)
    nodes = plan_memory(config(**{"runtime.local_nodes": 3}), model_dir, PLENTY)
    assert (one.relay_bytes, nodes.relay_bytes) == (0, 16 * MB + 2 * 64 * MB)  # "b": 2048 x 4096 bf16; two pieces
    assert nodes.shared_memory_mb * MB * USABLE_FRACTION >= 24 * MB + GB + nodes.relay_bytes
    assert nodes.shared_memory_mb > one.shared_memory_mb


def test_replicas_that_keep_their_own_copy_count_it(model_dir):
    assert plan_memory(config(replicas=3, **{"weights.enabled": False}), model_dir, PLENTY).private_copies == 3
    assert plan_memory(config(replicas=3, **{"weights.cpu_mode": "pull"}), model_dir, PLENTY).private_copies == 2
    assert plan_memory(config(replicas=3), model_dir, PLENTY).private_copies == 0


def test_a_host_too_small_is_refused_with_the_numbers(model_dir):
    with pytest.raises(HostMemoryError) as refused:
        plan_memory(config(replicas=2, **{"engine.kv_cache_gib": 4}), model_dir, available_bytes=6 * GB)
    message = str(refused.value)
    assert "this host has 6.00 GB available and the App needs 12.87 GB" in message
    assert "the weights (0.03 GB x 1 rank layout(s))" in message
    assert "2 engine rank(s) x 5.29 GB (engine.kv_cache_gib plus vLLM's own 1.0 GB)" in message


def test_an_explicit_shared_memory_too_small_for_the_weights_is_refused(model_dir):
    with pytest.raises(HostMemoryError, match=r"runtime.ds_shared_memory_mb=64 cannot hold the weights "
                                              r"\(0.05 GB x 1 rank layout\(s\)\) and the KV blocks \(0.02 GB.*"
                                              r"it needs 77 MB"):
        plan_memory(config(**{"runtime.ds_shared_memory_mb": 64, "engine.dtype": "float32"}), model_dir, PLENTY)
    assert plan_memory(config(**{"runtime.ds_shared_memory_mb": 128}), model_dir, PLENTY).shared_memory_mb == 128


def test_a_cluster_app_plans_nothing(model_dir):
    assert plan_memory(config(**{"runtime.server_address": "127.0.0.1:1", "runtime.ds_address": "127.0.0.1:2"}),
                       model_dir, available_bytes=1) is None


def test_a_load_the_host_cannot_hold_is_refused_with_the_numbers():
    """What a replica's engine checks before it reads its weights from disk into private memory."""
    with pytest.raises(MemoryError, match=r"^loading it needs 1000000.00 GB of host memory; this host has "
                                          r"[0-9.]+ GB available"):
        require_available(1000000 * GB, "loading it")
    require_available(1 * MB, "loading it")
