"""Memory of processes as the kernel counts it (``/proc/<pid>/smaps_rollup``): resident, proportional
(PSS: each shared page divided among the processes that map it), anonymous (heap, not files) and
shared memory; and the pages a process's memfd holds, mapped by anyone or by nobody."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel


class ProcessMemory(BaseModel):
    pid: int
    rss: int  # bytes
    pss: int
    anonymous: int  # resident anonymous memory, shared copy-on-write or not
    pss_anon: int  # its proportional share
    pss_shmem: int = 0  # the proportional share of shared memory it maps (the data system's, say)

    @classmethod
    def of(cls, pid: int) -> "ProcessMemory | None":
        """None if the process is gone (or not ours to read)."""
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            return None
        fields = {}
        for line in text.splitlines()[1:]:
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0]) * 1024  # kB
        return cls(pid=pid, rss=fields.get("Rss", 0), pss=fields.get("Pss", 0),
                   anonymous=fields.get("Anonymous", 0), pss_anon=fields.get("Pss_Anon", 0),
                   pss_shmem=fields.get("Pss_Shmem", 0))


def memfd_bytes(pid: int, name: str) -> int:
    """The bytes the memfds called ``name`` that ``pid`` holds open have in memory (allocated pages,
    whoever maps them: a page written and then unmapped by every process is in no process's PSS)."""
    files = {}
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            if os.readlink(fd).startswith(f"/memfd:{name}"):
                stat = fd.stat()
                files[stat.st_ino] = stat.st_blocks * 512
        except OSError:
            continue  # closed meanwhile
    return sum(files.values())


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children and so on, from /proc (parents before children)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def family_memory(pid: int) -> list[ProcessMemory]:
    """``pid`` and its descendants that still run, ``pid`` first."""
    return [memory for memory in map(ProcessMemory.of, [pid, *descendants(pid)]) if memory is not None]
