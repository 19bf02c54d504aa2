"""The connector's worker side, without vLLM's classes: bytes between the engine's KV cache tensors
and block objects.

On vLLM's CPU backend each attention layer's cache is one tensor ``[num_blocks, num_kv_heads,
block_size, 2 * head_size]`` (K rows then V rows per head), so block ``b`` of a layer is one
contiguous run of bytes: a block object is those runs of every layer, back to back, copied whole.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from app.kv.block_format import object_size, read_block, write_block


class UnsupportedLayout(ValueError):
    """KV cache tensors this connector cannot copy as whole blocks; it then stays off."""


class BlockCopier:
    def __init__(self, namespace_digest: bytes, caches: Sequence[torch.Tensor], block_shape: tuple[int, ...]) -> None:
        self._digest = namespace_digest
        self._layers: list[np.ndarray] = []
        for cache in caches:
            if tuple(cache.shape[1:]) != block_shape or not cache.is_contiguous() or cache.device.type != "cpu":
                raise UnsupportedLayout(f"KV cache {tuple(cache.shape)} on {cache.device} (contiguous: "
                                        f"{cache.is_contiguous()}); expected contiguous [blocks, "
                                        f"{', '.join(map(str, block_shape))}] on cpu")
            # One row of raw bytes per block; views of the cache, no copy.
            self._layers.append(cache.view(torch.uint8).reshape(cache.shape[0], -1).numpy())
        if not self._layers:
            raise UnsupportedLayout("no attention layers")
        self.payload_size = sum(layer.shape[1] for layer in self._layers)
        self.object_size = object_size(self.payload_size)

    def fill(self, block_id: int, out: memoryview) -> None:
        write_block(out, self._digest, [layer[block_id] for layer in self._layers])

    def load(self, block_id: int, data: memoryview) -> None:
        """Copy a stored block into cache block ``block_id``; raises CorruptBlock before writing
        anything if the object is not intact."""
        payload = np.frombuffer(read_block(data, self._digest, self.payload_size), dtype=np.uint8)
        offset = 0
        for layer in self._layers:
            width = layer.shape[1]
            layer[block_id] = payload[offset:offset + width]
            offset += width
