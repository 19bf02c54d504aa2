"""What a replica's connector did with KV blocks, as JSON lines the App reads.

The connector runs inside vLLM's EngineCore, where it cannot reach the App; it appends one line per
engine step that touched the data system. The engine host reads the new lines when the App asks
(``JournalReader``), and the App keeps the KV memory bounded and the metrics current from them.

A journal is a sequence of files, ``<base>-<side>-<n>.jsonl``: the writer starts the next file once
one holds ``ROTATE_BYTES``, and the reader deletes a file once it has read it to the end and the next
one exists (the writer never writes to a file again after creating the next). So a long-running
replica's journal takes at most about two files. Lines are appended in one ``write`` each and read
only up to the last newline, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Any

logger = logging.getLogger("vllm.yrllm.kv")

ROTATE_BYTES = 4 << 20
#: A connector journals from each of its two roles, to files of its own: no two writers share one.
SIDES = ("scheduler", "worker")


class KVOp(str, Enum):
    """One kind of journal line."""

    LOOKUP = "lookup"  # a new request asked for its prefix: blocks found (0: a miss), tokens
    STORED = "stored"  # blocks written: keys, bytes, seconds
    NOT_STORED = "not_stored"  # blocks that could not be written (data system full or gone)
    LOADED = "loaded"  # blocks read into the cache: keys, bytes, seconds
    LOAD_FAILED = "load_failed"  # blocks that were found but could not be used: recomputed
    HANDOFF = "handoff"  # a decode request looked for the KV its prefill stored: ``HandoffResult``


class HandoffResult(str, Enum):
    """What a decode replica found of the prompt's KV that a prefill replica handed over."""

    COMPLETE = "complete"  # all of it (in the data system, or in the engine's own prefix cache)
    PARTIAL = "partial"  # a prefix of it: the rest is recomputed
    MISSED = "missed"  # none of it: the whole prompt is recomputed
    LOAD_FAILED = "load_failed"  # found, but a block failed to load (corrupt, evicted meanwhile): recomputed


def rank_journal(base: Path, rank: int) -> Path:
    """The base name of tensor-parallel rank ``rank``'s worker journal (rank 0 keeps ``base``)."""
    return base if rank == 0 else base.with_name(f"{base.name}-rank{rank}")


def journal_file(base: Path, side: str, index: int = 0) -> Path:
    return base.with_name(f"{base.name}-{side}-{index}.jsonl")


class JournalWriter:
    def __init__(self, base: Path, side: str, rotate_bytes: int = ROTATE_BYTES) -> None:
        base.parent.mkdir(parents=True, exist_ok=True)
        self._base, self._side, self._rotate_bytes = base, side, rotate_bytes
        self._index, self._size = 0, 0
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(journal_file(self._base, self._side, self._index), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                       0o600)

    def record(self, op: KVOp, **fields: Any) -> None:
        line = (json.dumps({"op": op.value, **fields}, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self._fd, line)
            self._size += len(line)
            if self._size >= self._rotate_bytes:
                self._index, self._size = self._index + 1, 0
                previous, self._fd = self._fd, self._open()  # the next file exists before we let go of this one
                os.close(previous)
        except OSError:
            logger.exception("could not write the KV journal")  # accounting only: serving goes on


class JournalReader:
    """Reads the lines appended since the last read, across files."""

    def __init__(self, base: Path, side: str) -> None:
        self._base, self._side = base, side
        self._index, self._offset = 0, 0

    def read(self) -> list[dict[str, Any]]:
        lines = self._read_current()
        while journal_file(self._base, self._side, self._index + 1).exists():
            lines += self._read_current()  # what was written before the next file was created
            journal_file(self._base, self._side, self._index).unlink(missing_ok=True)
            self._index, self._offset = self._index + 1, 0
            lines += self._read_current()
        return lines

    def _read_current(self) -> list[dict[str, Any]]:
        try:
            with open(journal_file(self._base, self._side, self._index), "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line]
