"""A rank's manifest: every tensor's name, shape, dtype, size and checksums, plus what it was built
from. A new replica loads an entry only if the manifest matches its own model exactly."""

from __future__ import annotations

import hashlib
from enum import Enum

from pydantic import BaseModel, ConfigDict

from app.weights.identity import RankLayout

_STRIPE = 4096


class VerifyMode(str, Enum):
    """Checksum verification when a replica takes cached weights."""

    OFF = "off"
    SAMPLED = "sampled"  # every tensor's first, middle and last 4 KiB: catches torn or shifted data cheaply
    FULL = "full"  # every byte: about 1 s per GB


def full_digest(data: memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def sampled_digest(data: memoryview) -> str:
    size = len(data)
    if size <= 3 * _STRIPE:
        return full_digest(data)
    middle = (size // 2) - (_STRIPE // 2)
    digest = hashlib.blake2b(digest_size=16)
    for start in (0, middle, size - _STRIPE):
        digest.update(data[start:start + _STRIPE])
    return digest.hexdigest()


class TensorEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    full: str
    sampled: str

    def check(self, data: memoryview, mode: VerifyMode) -> None:
        """Raise ValueError if ``data`` is not this tensor's bytes (as far as ``mode`` looks)."""
        if len(data) != self.nbytes:
            raise ValueError(f"{self.name}: {len(data)} bytes cached, {self.nbytes} expected")
        if mode is VerifyMode.SAMPLED and sampled_digest(data) != self.sampled:
            raise ValueError(f"{self.name}: checksum mismatch (sampled)")
        if mode is VerifyMode.FULL and full_digest(data) != self.full:
            raise ValueError(f"{self.name}: checksum mismatch (full)")


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    fingerprint: str
    layout: RankLayout
    vllm_version: str
    dtype: str  # the dtype vLLM resolved, e.g. torch.float32
    tensors: list[TensorEntry]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def mismatch(self, expected: list[tuple[str, tuple[int, ...], str, int]]) -> str | None:
        """Why this manifest does not describe a model with ``expected`` (name, shape, dtype, nbytes)
        tensors, or None if it does."""
        have = [(t.name, t.shape, t.dtype, t.nbytes) for t in self.tensors]
        if have == expected:
            return None
        names_have, names_want = {h[0] for h in have}, {e[0] for e in expected}
        if names_have != names_want:
            missing, extra = sorted(names_want - names_have), sorted(names_have - names_want)
            return f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})"
        for h, e in zip(have, expected):
            if h != e:
                return f"tensor {e[0]} differs: cached {h[1:]}, engine {e[1:]}"
        return "tensor order differs"
