"""Tensor-parallel workers forked from the EngineCore instead of spawned.

With tensor parallel size N > 1 vLLM runs its multiprocess executor: the EngineCore starts one worker
process per rank, and the CPU platform makes them *spawned* processes, each importing torch and vLLM
again (~7 s each on 2 cores). The EngineCore itself was forked from a pre-imported engine process
(``launcher``), so it already holds every module a worker needs. ``ForkedWorkersExecutor`` is vLLM's
``MultiprocExecutor``, chosen through vLLM's documented ``distributed_executor_backend`` (which takes an
``Executor`` subclass by import path), that asks for the ``fork`` start method while, and only while,
it starts its workers: ``get_mp_context()`` reads ``VLLM_WORKER_MULTIPROC_METHOD`` when called. Nothing
of vLLM is patched.

A forked worker's OpenMP runtime was initialised in the parent and ignores the per-rank variables vLLM
sets before each start (``OMPProcessManager.configure_omp_envs``), so a fork hook re-applies them in the
child: the rank's thread count and, where vLLM binds threads, its CPUs.

``_init_executor`` is private API, so ``fork_workers_support`` checks the prerequisites when the
zygote prepares, and the executor checks them again (with the process's threads) before forking; when
they do not hold it spawns the workers, as vLLM would, and says why. Either way it writes which, and the
workers' pids, to the file ``WORKERS_REPORT_ENV`` names, for the engine host's supervision.
"""

from __future__ import annotations

import inspect
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vllm.logger import init_logger
from vllm.v1.executor.multiproc_executor import MultiprocExecutor

from app.engine.launch_report import FORKED_WORKERS_EXECUTOR, Launcher, WorkersReport
from app.engine.launcher import threads_running
from app.engine.preimports import CACHE_DIR_ENV, HEALTH_URL_ENV, record_when_serving
from app.files import write_atomically
from app.runtime.processes import die_with_parent

logger = init_logger("vllm.yrllm.workers")  # under "vllm." so lines look like vLLM's own

#: Names the file the executor writes its WorkersReport to (set by the engine process per replica).
WORKERS_REPORT_ENV = "YRLLM_WORKERS_REPORT"
#: Each rank's thread count (``EngineSpec.rank_threads``, set by the engine process per replica).
RANK_THREADS_ENV = "YRLLM_RANK_THREADS"
# Threads of our own that may run in the EngineCore when it forks: they only poll an HTTP URL and hold
# no lock a worker needs (Python re-initialises the import and logging locks in a forked child).
_BENIGN_THREADS = ("record-",)


def fork_workers_support() -> str | None:
    """None if the EngineCore can fork its workers; otherwise the reason it cannot."""
    from vllm.utils import system_utils
    from vllm.v1.executor import multiproc_executor

    if "_init_executor" not in vars(MultiprocExecutor):
        return "MultiprocExecutor._init_executor is gone"
    if "VLLM_WORKER_MULTIPROC_METHOD" not in inspect.getsource(system_utils.get_mp_context):
        return "get_mp_context() no longer reads VLLM_WORKER_MULTIPROC_METHOD"
    if "proc" not in inspect.signature(multiproc_executor.WorkerProcHandle).parameters:
        return "WorkerProcHandle has no 'proc' any more"
    return None


class ForkedWorkersExecutor(MultiprocExecutor):
    """vLLM's multiprocess executor, whose workers are forked from the (pre-imported) EngineCore."""

    def _init_executor(self) -> None:
        refusal = fork_workers_support() or threads_running(_BENIGN_THREADS)
        method = "spawn" if refusal else "fork"
        if refusal:
            logger.warning("tensor-parallel workers are spawned, not forked: %s", refusal)
        ranks = self.parallel_config.world_size
        with _worker_environment(method, _threads_per_rank(ranks)), _child_hook(method == "fork"):
            super()._init_executor()
        report = WorkersReport(method=Launcher(method), reason=refusal, pids=[w.proc.pid for w in self.workers])
        logger.info("%d tensor-parallel workers %s (pids %s)", ranks,
                    "forked from the EngineCore" if method == "fork" else "spawned", report.pids)
        if os.environ.get(WORKERS_REPORT_ENV):
            write_atomically(Path(os.environ[WORKERS_REPORT_ENV]), report.model_dump_json())


def _threads_per_rank(ranks: int) -> int:
    """Each worker's threads. With vLLM's binding off every worker would otherwise run the engine's
    OMP_NUM_THREADS, and N ranks would oversubscribe the cores N times."""
    if os.environ.get(RANK_THREADS_ENV):
        return int(os.environ[RANK_THREADS_ENV])
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // ranks)


@contextmanager
def _worker_environment(method: str, threads: int) -> Iterator[None]:
    changes = {"VLLM_WORKER_MULTIPROC_METHOD": method, "OMP_NUM_THREADS": str(threads)}
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_forking = False


@contextmanager
def _child_hook(active: bool) -> Iterator[None]:
    """While active, every child this process forks re-applies its rank's OpenMP settings."""
    global _forking
    _forking = active
    try:
        yield
    finally:
        _forking = False


def _in_forked_worker() -> None:
    if not _forking:
        return
    die_with_parent()  # a worker never outlives its EngineCore, even one that was SIGKILLed
    # What a worker imports that its EngineCore did not (the model runner, the model): recorded, so
    # that the next zygote imports it ahead (``preimports``).
    cache_dir = os.environ.get(CACHE_DIR_ENV)
    if cache_dir and os.environ.get(HEALTH_URL_ENV):
        record_when_serving(os.environ[HEALTH_URL_ENV], Path(cache_dir), "worker", timeout_s=600)
    cpus = _bound_cpus(os.environ)
    if cpus:
        os.sched_setaffinity(0, cpus)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or len(cpus) or 1))


def _bound_cpus(env: os._Environ | dict[str, str]) -> set[int]:
    """The CPUs vLLM bound this rank to (``configure_omp_envs``: OMP_PLACES, GOMP_CPU_AFFINITY or
    KMP_AFFINITY's proclist), or none."""
    text = env.get("OMP_PLACES") or env.get("GOMP_CPU_AFFINITY") or ""
    if not text and "proclist=[" in env.get("KMP_AFFINITY", ""):
        text = env["KMP_AFFINITY"].split("proclist=[", 1)[1].split("]", 1)[0]
    cpus: set[int] = set()
    for first, last in re.findall(r"(\d+)(?:-(\d+))?", text):
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


os.register_at_fork(after_in_child=_in_forked_worker)

assert FORKED_WORKERS_EXECUTOR == f"{__name__}.{ForkedWorkersExecutor.__name__}"
