"""Whether a tensor parallel size fits the model and the host, checked before any engine starts, so
that a size vLLM would refuse minutes later (or a host it would oversubscribe) is a clear error now."""

from __future__ import annotations

import json
import os
from pathlib import Path

from app.config_sources import ConfigError


def check_tensor_parallel(model_dir: Path, size: int, *, field: str) -> None:
    """Raise ConfigError, with the numbers, if ``size`` ranks cannot serve the model in ``model_dir``
    on this host."""
    if size == 1:
        return
    heads, kv_heads = _heads(model_dir)
    if heads and heads % size:
        raise ConfigError(f"{field}={size}: the model's {heads} attention heads do not split over {size} "
                          f"ranks; use a size that divides {heads}")
    if kv_heads and kv_heads % size and size % kv_heads:
        raise ConfigError(f"{field}={size}: the model's {kv_heads} KV heads neither split over {size} ranks "
                          f"nor replicate evenly; use a divisor or a multiple of {kv_heads}")
    cores = len(os.sched_getaffinity(0))
    if size > cores:
        raise ConfigError(f"{field}={size}: each rank needs a core of its own, and this host has {cores}")


def kv_splits(model_dir: Path, sizes: set[int]) -> int:
    """Objects per KV block for an App whose pools run the tensor parallel ``sizes``: the largest size,
    at most the model's KV heads, so that every rank of every pool reads and writes whole objects of
    its own heads. Raises ConfigError for sizes that cannot share one split (2 and 3, say)."""
    from app.kv.transfer import RankShare, UnsupportedLayout

    kv_heads = _heads(model_dir)[1] or 1
    splits = min(kv_heads, max(sizes))
    for size in sorted(sizes):
        try:
            RankShare.of(0, size, kv_heads, splits)
        except UnsupportedLayout as exc:
            raise ConfigError(f"prefill.tensor_parallel and decode.tensor_parallel ({' and '.join(map(str, sorted(sizes)))}) "
                              f"cannot share KV blocks: {exc}. Use sizes that divide one another.") from None
    return splits


def _heads(model_dir: Path) -> tuple[int | None, int | None]:
    """The model's attention heads and KV heads (its language model's, for a multimodal model)."""
    config = json.loads((model_dir / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    return heads, config.get("num_key_value_heads", heads)
