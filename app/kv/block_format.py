"""One KV block as one data system object: a header, then every layer's bytes of the block.

Header: magic, format version, the namespace digest (so an object of another model or layout is
refused even under a colliding key), the payload length and a CRC-32 of the payload (zlib's runs at
~5 GB/s here: 5 ms for a 2k-token prompt of the 0.5B shape). A block that fails any check is
``CorruptBlock``; the connector then recomputes it and deletes the object.
"""

from __future__ import annotations

import struct
import zlib
from typing import Sequence

_MAGIC = b"YRKV"
_VERSION = 1
# magic, version, reserved, namespace digest (first 16 bytes), payload length, crc32
_HEADER = struct.Struct("<4sHH16sQI")
HEADER_SIZE = _HEADER.size


class CorruptBlock(ValueError):
    """An object that is not a complete, intact block of the expected namespace."""


def object_size(payload_size: int) -> int:
    return HEADER_SIZE + payload_size


def write_block(out: memoryview, namespace_digest: bytes, parts: Sequence[memoryview]) -> None:
    """Fill ``out`` (exactly ``object_size`` bytes) with the header and ``parts`` back to back."""
    offset, crc = HEADER_SIZE, 0
    for part in parts:
        out[offset:offset + len(part)] = part
        crc = zlib.crc32(part, crc)
        offset += len(part)
    if offset != len(out):
        raise ValueError(f"block parts fill {offset} of {len(out)} bytes")
    _HEADER.pack_into(out, 0, _MAGIC, _VERSION, 0, namespace_digest[:16], offset - HEADER_SIZE, crc)


def read_block(data: memoryview, namespace_digest: bytes, payload_size: int) -> memoryview:
    """The payload of a stored block, after checking it; raises CorruptBlock."""
    if len(data) != object_size(payload_size):
        raise CorruptBlock(f"{len(data)} bytes, expected {object_size(payload_size)}")
    magic, version, _, digest, length, crc = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC or version != _VERSION:
        raise CorruptBlock(f"not a KV block of format {_VERSION} (magic {magic!r}, version {version})")
    if digest != namespace_digest[:16]:
        raise CorruptBlock("a block of another namespace (model, dtype or layout)")
    payload = data[HEADER_SIZE:]
    if length != payload_size or zlib.crc32(payload) != crc:
        raise CorruptBlock("checksum mismatch")
    return payload
