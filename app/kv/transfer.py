"""The connector's worker side, without vLLM's classes: bytes between the engine's KV cache tensors
and block objects.

On vLLM's CPU backend each attention layer's cache is one tensor ``[num_blocks, num_kv_heads,
block_size, 2 * head_size]`` (K rows then V rows per head), so a run of whole heads of block ``b`` is
one contiguous run of bytes per layer: an object is those runs of every layer, back to back, copied
whole. With tensor parallelism a rank's cache holds its own KV heads only (``RankShare`` says which
objects are its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from app.kv.block_format import object_size, read_block, write_block


class UnsupportedLayout(ValueError):
    """KV cache tensors this connector cannot copy as whole blocks; it then stays off."""


@dataclass(frozen=True)
class RankShare:
    """Which of a block's ``splits`` objects tensor-parallel rank ``rank`` of ``size`` holds, and where
    in its cache. vLLM gives rank r KV heads ``[r * H/size, (r+1) * H/size)``, or, with more ranks than
    heads, head ``r // (size/H)`` replicated (``QKVParallelLinear``)."""

    loads: tuple[int, ...]  # the objects this rank reads into its cache
    stores: tuple[int, ...]  # the objects it writes (a replicated head is written by one rank only)
    first: int  # the first object it holds
    heads_per_object: int  # its cache's heads per object

    @classmethod
    def of(cls, rank: int, size: int, kv_heads: int, splits: int) -> "RankShare":
        if kv_heads % splits:
            raise UnsupportedLayout(f"{kv_heads} KV heads do not split into {splits} objects")
        if size <= splits:
            if splits % size:
                raise UnsupportedLayout(f"tensor parallel size {size} does not divide {splits} objects per block")
            per_rank = splits // size
            owned = tuple(range(rank * per_rank, (rank + 1) * per_rank))
            return cls(owned, owned, owned[0], kv_heads // splits)
        if splits != kv_heads or size % kv_heads:
            raise UnsupportedLayout(f"tensor parallel size {size} with {kv_heads} KV heads needs one object per "
                                    f"head, not {splits}")
        replicas = size // kv_heads
        head = rank // replicas
        return cls((head,), (head,) if rank % replicas == 0 else (), head, 1)


class BlockCopier:
    """Copies objects (runs of whole heads of one block) between a rank's cache and the data system."""

    def __init__(self, namespace_digest: bytes, caches: Sequence[torch.Tensor], block_shape: tuple[int, ...],
                 share: RankShare | None = None) -> None:
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
        heads = block_shape[0]
        self.share = share or RankShare((0,), (0,), 0, heads)
        if (max(self.share.loads) - self.share.first + 1) * self.share.heads_per_object > heads:
            raise UnsupportedLayout(f"this rank's cache holds {heads} KV heads, fewer than its objects need")
        self._head_bytes = [layer.shape[1] // heads for layer in self._layers]
        self.payload_size = sum(self._head_bytes) * self.share.heads_per_object
        self.object_size = object_size(self.payload_size)

    def _runs(self, block_id: int, part: int) -> list[np.ndarray]:
        start = (part - self.share.first) * self.share.heads_per_object
        return [layer[block_id, start * width:(start + self.share.heads_per_object) * width]
                for layer, width in zip(self._layers, self._head_bytes)]

    def fill(self, block_id: int, out: memoryview, part: int = 0) -> None:
        write_block(out, self._digest, self._runs(block_id, part))

    def load(self, block_id: int, data: memoryview, part: int = 0) -> None:
        """Copy a stored object into its heads of cache block ``block_id``; raises CorruptBlock before
        writing anything if the object is not intact."""
        payload = np.frombuffer(read_block(data, self._digest, self.payload_size), dtype=np.uint8)
        offset = 0
        for run in self._runs(block_id, part):
            run[:] = payload[offset:offset + len(run)]
            offset += len(run)
