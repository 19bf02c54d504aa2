"""A Qwen2-architecture model with RANDOM weights, built locally because no model hub is reachable.

It exercises every part of the serving path (tokenizer, chat template, vLLM's Qwen2 implementation,
weight loading) but its answers are gibberish. Built once per shape and cached; the cache entry is
published atomically (built in a temporary folder, then renamed) so a crash never leaves half a model.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from enum import Enum
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when what the builder writes changes, so stale caches are rebuilt instead of reused.
BUILDER_VERSION = 1
SEED = 1234

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
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

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

    torch.manual_seed(SEED)
    config = Qwen2Config(**shape.config_kwargs(), bos_token_id=None,
                         eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
                         torch_dtype=dtype)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").write_text(f"Demo model {shape.value}: Qwen2 architecture, RANDOM weights "
                                   f"(seed {SEED}), tokenizer trained on Python's standard library.\n")


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
