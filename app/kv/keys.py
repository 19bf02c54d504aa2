"""Content-addressed keys for KV blocks.

A block's KV depends on every token before it, so its key is a chain hash: block i's digest covers
block i-1's digest and block i's token ids. The chain starts from the namespace's digest, which covers
everything else the bytes depend on: the weights (their fingerprint), the KV dtype, the block size, the
KV layout (layers, heads, head size). Two replicas find each other's blocks exactly when they would
have computed the same bytes.

With tensor parallelism each rank holds some of the KV heads, so a block is stored as ``splits`` objects
of whole KV heads each (``object_keys``): every rank writes and reads the objects of its own heads, and
pools of different tensor parallel sizes read the same objects. ``splits`` is one number for the whole
App (the largest TP size of its pools, at most the heads); 1 is one object per block.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field

from app.datasystem_keys import KEY_PREFIX, check_key

# 160 bits of the chain digest: collisions are out of reach, and keys stay short.
_DIGEST_HEX = 40


class KVNamespace(BaseModel):
    """What a KV block's bytes depend on besides its tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fingerprint: str = Field(pattern=r"^[0-9a-f]{16,64}$")  # the weights' identity
    dtype: str
    block_size: int = Field(gt=0)
    layout: str  # layers, heads, head size and the device's cache shape: ``layout_tag``
    splits: int = Field(1, ge=1)  # objects per block, each of kv_heads / splits whole heads

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.model_dump_json().encode()).digest()

    @property
    def prefix(self) -> str:
        return check_key(f"{KEY_PREFIX}_kv_{self.digest.hex()[:16]}")


def object_keys(namespace: KVNamespace, block_keys: Sequence[str], splits: Sequence[int] | None = None) -> list[str]:
    """The data system keys of ``block_keys``' objects: block by block, the objects ``splits`` (all of
    them if None) in order. With one split an object's key is its block's."""
    if namespace.splits == 1:
        return list(block_keys)
    parts = range(namespace.splits) if splits is None else splits
    return [check_key(f"{key}_s{part}of{namespace.splits}") for key in block_keys for part in parts]


def layout_tag(layers: Sequence[str], num_kv_heads: int, head_size: int, shape: Sequence[int]) -> str:
    """The KV layout as one string: the attention layers (by name, in order), the model's KV heads and
    head size, and the per-head shape of a block in the cache tensor."""
    names = hashlib.sha256("\n".join(layers).encode()).hexdigest()[:16]
    return f"L{len(layers)}_{names}_H{num_kv_heads}_D{head_size}_S{'x'.join(map(str, shape))}"


def block_keys(namespace: KVNamespace, token_ids: Sequence[int], blocks: int, salt: str | None = None,
               tail: bool = False) -> list[str]:
    """Keys of the first ``blocks`` full blocks of ``token_ids``, and with ``tail`` one more for the
    tokens after them, if any (a partial block: prefill/decode hands the whole prompt over). A
    request's ``cache_salt`` (vLLM's per-tenant prefix cache isolation) starts its chain, so only
    requests with the same salt share."""
    size = namespace.block_size
    if blocks * size > len(token_ids):
        raise ValueError(f"{len(token_ids)} tokens hold fewer than {blocks} blocks of {size}")
    digest = namespace.digest if salt is None else hashlib.sha256(namespace.digest + salt.encode()).digest()
    keys = []
    for index in range(blocks):
        tokens = array("q", token_ids[index * size:(index + 1) * size]).tobytes()
        digest = hashlib.sha256(digest + tokens).digest()
        keys.append(f"{namespace.prefix}_{digest.hex()[:_DIGEST_HEX]}")
    rest = token_ids[blocks * size:]
    if tail and len(rest) >= size:
        raise ValueError(f"the tail after {blocks} blocks holds {len(rest)} tokens, a block or more")
    if tail and rest:
        # Marked, so that a partial block's key can never be that of a full one.
        digest = hashlib.sha256(digest + b"tail" + array("q", rest).tobytes()).digest()
        keys.append(f"{namespace.prefix}_{digest.hex()[:_DIGEST_HEX]}")
    return keys
