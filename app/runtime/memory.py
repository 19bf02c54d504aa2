"""Memory of processes as the kernel counts it (``/proc/<pid>/smaps_rollup``): resident, proportional
(PSS: each shared page divided among the processes that map it) and anonymous (heap, not files)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class ProcessMemory(BaseModel):
    pid: int
    rss: int  # bytes
    pss: int
    anonymous: int  # resident anonymous memory, shared copy-on-write or not
    pss_anon: int  # its proportional share

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
                   anonymous=fields.get("Anonymous", 0), pss_anon=fields.get("Pss_Anon", 0))


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
