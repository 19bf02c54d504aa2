"""This host's memory as the kernel reports it (for the control plane's plan and the engines' checks)."""

from __future__ import annotations

from pathlib import Path


def meminfo() -> dict[str, int]:
    """``/proc/meminfo``, in bytes (``AnonPages``, ``Shmem``, ``SwapFree``...)."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = int(value.split()[0]) * (1024 if value.strip().endswith("kB") else 1)
    return fields


def mem_available() -> int:
    """Bytes the kernel can hand out without swapping (``MemAvailable``: free memory plus the page cache
    and other memory it can reclaim)."""
    return meminfo()["MemAvailable"]


def require_available(needed: int, what: str) -> None:
    """Raise MemoryError, with the numbers, unless the host has ``needed`` bytes available for ``what``.
    A CPU load from disk fills private memory; if the host cannot hold it, the kernel's OOM killer picks
    a process, perhaps a replica already serving: refusing first keeps those serving."""
    available = mem_available()
    if needed > available:
        raise MemoryError(f"{what} needs {needed / 1e9:.2f} GB of host memory; this host has "
                          f"{available / 1e9:.2f} GB available. The replicas running keep serving; free "
                          f"memory, or scale in first")
