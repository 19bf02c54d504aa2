"""What a replica's connector did with KV blocks, as JSON lines the App reads.

The connector runs inside vLLM's EngineCore, where it cannot reach the App; it appends one line per
engine step that touched the data system. The engine host reads the new lines when the App asks
(``JournalReader``), and the App keeps the KV memory bounded and the metrics current from them. Lines
are appended in one ``write`` each and read only up to the last newline, so a reader never sees half
of one.
"""

from __future__ import annotations

import json
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Any

logger = logging.getLogger("vllm.yrllm.kv")


class KVOp(str, Enum):
    """One kind of journal line."""

    LOOKUP = "lookup"  # a new request asked for its prefix: blocks found (0: a miss), tokens
    STORED = "stored"  # blocks written: keys, bytes, seconds
    NOT_STORED = "not_stored"  # blocks that could not be written (data system full or gone)
    LOADED = "loaded"  # blocks read into the cache: keys, bytes, seconds
    LOAD_FAILED = "load_failed"  # blocks that were found but could not be used: recomputed


#: A connector journals from each of its two roles, to a file of its own: no two writers share one.
SIDES = ("scheduler", "worker")


def journal_file(base: Path, side: str) -> Path:
    return base.with_name(f"{base.name}-{side}.jsonl")


class JournalWriter:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def record(self, op: KVOp, **fields: Any) -> None:
        line = json.dumps({"op": op.value, **fields}, separators=(",", ":")) + "\n"
        try:
            os.write(self._fd, line.encode())
        except OSError:
            logger.exception("could not write the KV journal")  # accounting only: serving goes on


class JournalReader:
    """Reads the lines appended since the last read."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self._path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line]
