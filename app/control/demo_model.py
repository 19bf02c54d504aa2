"""A Qwen2-architecture model with RANDOM weights, built locally because no model hub is reachable.

It exercises every part of the serving path (tokenizer, chat template, vLLM's Qwen2 implementation,
weight loading) but its answers are gibberish. Built once per shape and cached; the cache entry is
published atomically (built in a temporary folder, then renamed) so a crash never leaves half a model.

The weights are written tensor by tensor, in safetensors shards, never as a whole model in memory: the
7B shape (15.2 GB in bf16) is built on a 24 GB host in about as much memory as one shard.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from enum import Enum
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when what the builder writes changes, so stale caches are rebuilt instead of reused.
BUILDER_VERSION = 2
SEED = 1234
# A shard's tensors are held in memory until it is written; Hugging Face's own default is 5 GB.
_SHARD_BYTES = 2 << 30

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class DemoShape(str, Enum):
    """Model shapes: ``tiny`` for tests and the default demo, the others sized like real Qwen2.5 models
    for benchmarks."""

    TINY = "tiny"
    QWEN2_5_0_5B = "qwen2.5-0.5b"
    QWEN2_5_1_5B = "qwen2.5-1.5b"
    QWEN2_5_7B = "qwen2.5-7b"  # the original case's model: its config.json, with random weights

    def config_kwargs(self) -> dict[str, object]:
        common = dict(max_position_embeddings=4096, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      max_window_layers=64, use_sliding_window=False)
        shapes: dict[DemoShape, dict[str, object]] = {
            DemoShape.TINY: dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                 tie_word_embeddings=True),
            DemoShape.QWEN2_5_0_5B: dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2,
                                         vocab_size=151936, tie_word_embeddings=True),
            DemoShape.QWEN2_5_1_5B: dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                         num_attention_heads=12, num_key_value_heads=2,
                                         vocab_size=151936, tie_word_embeddings=True),
            DemoShape.QWEN2_5_7B: dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                       tie_word_embeddings=False, max_position_embeddings=32768,
                                       max_window_layers=28),
        }
        return {**common, **shapes[self]}


def demo_model_dir(cache_dir: Path, shape: DemoShape = DemoShape.TINY, dtype: str = "bfloat16") -> Path:
    """Return the cached demo model directory for ``shape``, building it on first use."""
    target = cache_dir / f"demo-{shape.value}-{dtype}-v{BUILDER_VERSION}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.warning("Building the demo model %s (%s) in %s. Its weights are RANDOM: it serves the API "
                   "correctly but its text is gibberish. Pass --model DIR for a real model.",
                   shape.value, dtype, target)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".building-") as scratch:
        staging = Path(scratch) / "model"
        _build(staging, shape, dtype)
        try:
            staging.rename(target)
        except OSError:  # another process published it first; theirs is as good as ours
            if not (target / "config.json").is_file():
                raise
    return target


def _build(out: Path, shape: DemoShape, dtype: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    eos = fast.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(**shape.config_kwargs(), bos_token_id=None, eos_token_id=eos, torch_dtype=dtype)
    config.save_pretrained(out)
    GenerationConfig(eos_token_id=eos).save_pretrained(out)
    _write_weights(out, config, dtype)
    (out / "README.md").write_text(f"Demo model {shape.value}: Qwen2 architecture, RANDOM weights "
                                   f"(seed {SEED}), tokenizer trained on Python's standard library.\n")


def _write_weights(out: Path, config: "Qwen2Config", dtype: str) -> None:  # noqa: F821 - transformers
    """Random weights as Hugging Face initialises them (normal(0, initializer_range), norms one, biases
    zero), made one tensor at a time from a seeded generator and written in shards of at most
    ``_SHARD_BYTES``, with the index Hugging Face's sharded checkpoints have when there are several."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):  # names and shapes only: no memory
        layout = [(name, tuple(t.shape)) for name, t in Qwen2ForCausalLM(config).state_dict().items()
                  if not (config.tie_word_embeddings and name == "lm_head.weight")]
    generator = torch.Generator().manual_seed(SEED)
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str], int]] = []  # each shard's file, tensors and bytes

    def flush() -> None:
        path = out / f"shard-{len(written) + 1}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard), sum(t.nbytes for t in shard.values())))
        shard.clear()

    for index, (name, shape) in enumerate(layout, start=1):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(".bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, config.initializer_range, generator=generator)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > _SHARD_BYTES:
            flush()
            logger.info("demo model: %d of %d tensors written", index - 1, len(layout))
        shard[name] = tensor
    flush()
    if len(written) == 1:
        written[0][0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for number, (path, names, _) in enumerate(written, start=1):
        final = f"model-{number:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": sum(size for *_, size in written)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _training_text(limit_bytes: int = 4 << 20) -> list[str]:
    """Python's own standard library: text every machine has, so the tokenizer is reproducible."""
    stdlib = Path(shutil.__file__).parent
    texts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(errors="ignore")
        texts.append(text)
        size += len(text)
        if size >= limit_bytes:
            break
    return texts


if __name__ == "__main__":  # python -m app.control.demo_model [shape] [cache_dir]
    logging.basicConfig(level=logging.INFO)
    shape_arg = DemoShape(sys.argv[1]) if len(sys.argv) > 1 else DemoShape.TINY
    cache = Path(sys.argv[2]) if len(sys.argv) > 2 else Path.home() / ".cache" / "yrllm"
    print(demo_model_dir(cache, shape_arg))
