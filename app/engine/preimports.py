"""The modules a real engine start imports, recorded per vLLM version and imported by the zygote (or a
spawned engine process) before any spec, so that the start itself imports almost nothing.

Recorded, not kept by hand: once an engine serves, each of its processes (the API server, the
EngineCore and, with tensor parallelism, its workers) writes the names in its ``sys.modules`` to a file
of its own under the cache directory; a zygote imports the union of them. A name that fails to
import is skipped: the list is a hint that makes a start faster, never a condition for it.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from app.files import write_atomically

logger = logging.getLogger(__name__)

#: The engine processes' environment names the cache directory (a zygote has no spec).
CACHE_DIR_ENV = "YRLLM_ENGINE_CACHE_DIR"
#: Set where the App runs tensor-parallel engines: its zygote fills torch.compile's caches (``warm_compiler``).
WARM_COMPILER_ENV = "YRLLM_WARM_COMPILER"
#: Names the engine's /health URL, for processes that are not told their spec (tensor-parallel workers).
HEALTH_URL_ENV = "YRLLM_ENGINE_HEALTH_URL"
ROLES = ("server", "core", "worker")
_NEVER = ("__main__", "__mp_main__")


def list_path(cache_dir: Path, role: str) -> Path:
    import vllm

    python = f"{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir / f"modules-vllm{vllm.__version__}-py{python}-{role}.txt"


def preimport(cache_dir: Path | None) -> int:
    """Import every recorded module not imported yet; returns how many were."""
    if cache_dir is None:
        return 0
    names: set[str] = set()
    for role in ROLES:
        try:
            names.update(list_path(cache_dir, role).read_text().split())
        except OSError:
            continue  # nothing recorded yet for this vLLM: the first start records it
    imported = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(names - set(sys.modules) - set(_NEVER)):
            try:
                importlib.import_module(name)
                imported += 1
            except Exception:  # noqa: BLE001 - a hint, not a contract (see the module docstring)
                continue
    return imported


def warm_compiler() -> None:
    """Fill the per-process caches of ``torch.compile`` that a forked child inherits, so that what a
    replica compiles on its first request (at tensor parallel > 1, vLLM's vocab-parallel masking) only
    loads its kernel from the inductor cache: the hash of torch's own sources (~0.4 s) and the CPU's
    vector ISA, found by compiling and loading a probe (~0.5 s). Neither runs a torch operation, and the
    probe's subprocesses have ended when this returns. Best effort: a failure only costs that time later."""
    try:
        from torch._inductor import codecache, cpu_vec_isa

        codecache.torch_key()
        cpu_vec_isa.pick_vec_isa()
    except Exception:  # noqa: BLE001 - a hint, like the module list
        logger.warning("could not warm torch.compile's caches", exc_info=True)


def record_when_serving(health_url: str, cache_dir: Path | None, role: str, timeout_s: float,
                        again_after_s: float = 10.0) -> None:
    """In a daemon thread: once ``health_url`` answers, write this process's modules for ``role``, and
    again ``again_after_s`` later, when the App's first-token probe has imported what a first request
    imports (at tensor parallel > 1, torch.compile's runtime)."""
    if cache_dir is None:
        return

    def record() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(health_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        else:
            return
        _record(cache_dir, role)
        time.sleep(again_after_s)
        _record(cache_dir, role)

    threading.Thread(target=record, name=f"record-{role}-modules", daemon=True).start()


def _record(cache_dir: Path, role: str) -> None:
    path = list_path(cache_dir, role)
    try:
        known = set(path.read_text().split())
    except OSError:
        known = set()
    names = known | {name for name in list(sys.modules) if name not in _NEVER}
    if names == known:
        return
    write_atomically(path, "\n".join(sorted(names)) + "\n")  # a zygote never reads half a list
    logger.info("recorded %d modules a %s start imports in %s", len(names), role, path)
