"""The body of an engine actor: one vLLM engine in a supervised process of its own.

Why a process per engine, and not the engine inside the actor: in yr local mode actors are threads of
the driver, and engines sharing one process share a GIL and silently clobber each other's ``vllm:*``
Prometheus metrics; a crashed engine would also take the driver down. Processes are forked from the
node's zygote (``zygotes``), which imported everything once. The process runs vLLM's own OpenAI
server; its EngineCore is a second process, forked from it (``launcher``) or spawned by vLLM.
Without tensor parallelism the model worker stays inside EngineCore (see ``EngineSpec.environment``),
so a replica is two processes; with N ranks, EngineCore forks one worker per rank
(``forked_workers``): 2 + N processes, all in one process group, each watched here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request

from app.engine.launch_report import LaunchReport, WorkersReport
from app.engine.spec import EngineSpec
from app.engine.zygotes import ZYGOTES
from app.kv.journal import SIDES, JournalReader, rank_journal
from app.replica import ReplicaInfo, ReplicaState
from app.runtime.processes import GroupLeader, free_port, is_live_child, parent_pid
from app.weights.load_report import LoadReport
from app.weights.plan import WeightPlan

logger = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine process died or never became ready. The message carries its last log lines."""


class EngineHost:
    """Starts, watches and stops one engine process. ``__init__`` does no I/O; ``start`` blocks until
    the engine answers ``/health`` (or fails with the reason)."""

    def __init__(self, spec: EngineSpec) -> None:
        self._spec = spec
        self._state = ReplicaState.PENDING
        self._process: GroupLeader | None = None
        self._failure: str | None = None
        self._launch: LaunchReport | None = None  # once ready
        self._workers: dict[int, int] = {}  # tensor parallel: each worker's pid -> its parent's, once ready
        self._lock = threading.Lock()
        self.timeline: dict[str, float] = {"actor_up": time.time()}
        self._kv_journals = [JournalReader(spec.kv_journal_path, SIDES[0])] + [
            JournalReader(rank_journal(spec.kv_journal_path, rank), SIDES[1]) for rank in range(spec.tensor_parallel)] \
            if spec.kv_connector else []

    @property
    def spec(self) -> EngineSpec:
        return self._spec

    def info(self) -> ReplicaInfo:
        """The replica as it is now. A READY replica whose engine process exited, or whose forked
        EngineCore did (the server follows it down, but only after a moment), reads FAILED with the
        reason: this is how the App's supervision notices a dead engine, from the processes, without
        any HTTP."""
        if self._state is ReplicaState.READY and self._process is not None:
            failure = self._exit_reason()  # the supervisor and a health check may both ask at once
            if failure is not None:
                self._state, self._failure = ReplicaState.FAILED, failure
        launch = self._launch or (self.launch_report() if self._process is not None else None)
        return ReplicaInfo(replica_id=self._spec.replica_id, role=self._spec.role, state=self._state,
                           node=self._spec.node.name if self._spec.node else None,
                           url=self._spec.url if self._state is ReplicaState.READY else None,
                           pid=self._process.pid if self._process else None,
                           log=str(self._process.log_file) if self._process else None,
                           launcher=launch.launcher.value if launch else None,
                           core_pid=launch.core_pid if launch else None,
                           tensor_parallel=self._spec.tensor_parallel, worker_pids=list(self._workers),
                           failure=self._failure)

    def _exit_reason(self) -> str | None:
        assert self._process is not None
        core_pid = self._launch.core_pid if self._launch else None
        core_gone = core_pid is not None and not is_live_child(core_pid, self._process.pid)
        # A killed server takes its core with it (PDEATHSIG) before the kernel has finished tearing
        # the server down: give it a moment to become waitable, so the reason names what died first.
        code = self._process.wait(0.2) if core_gone else self._process.poll()
        if code is not None:
            last_line = (self._process.log_tail(1).strip() or "no log")[-300:]
            return f"engine process exited with code {code}: {last_line}"
        if core_gone:
            return f"its EngineCore (pid {core_pid}) exited; the engine server goes down with it"
        for rank, (pid, parent) in enumerate(self._workers.items()):
            if not is_live_child(pid, parent):  # vLLM's core notices too, but only as it shuts down
                return f"its tensor-parallel worker of rank {rank} (pid {pid}) exited"
        return None

    def start(self, plan: WeightPlan | None = None) -> ReplicaInfo:
        """``plan``: how the WeightCache says to load the weights; None leaves the spec's load format."""
        with self._lock:
            if self._state is not ReplicaState.PENDING:
                raise RuntimeError(f"replica {self._spec.replica_id} is {self._state.value}, not pending")
            if plan is not None:
                self._spec = self._spec.with_weights(plan)
            # A node's own namespace has nothing else listening: a port free here is free there.
            port = self._spec.port or free_port("127.0.0.1" if self._spec.netns else self._spec.host)
            self._spec = self._spec.model_copy(update={"port": port})
            self._state = ReplicaState.LOADING
            self._process = ZYGOTES.engine_process(self._spec)
            self.timeline["process_made"] = time.time()
        try:
            self._wait_ready()
        except BaseException:
            self._state = ReplicaState.FAILED
            self._process.stop(grace_s=5)
            raise
        self.timeline["engine_ready"] = time.time()
        self._launch = self.launch_report()
        if self._launch is not None and self._launch.core_forked_at is not None:
            self.timeline["core_forked"] = self._launch.core_forked_at
        if self._launch is not None and self._launch.workers is not None:
            self._workers = {pid: parent_pid(pid) for pid in self._launch.workers.pids}
        self._state = ReplicaState.READY
        return self.info()

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._spec.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EngineFailed(f"engine {self._spec.replica_id} exited with code "
                                   f"{self._process.poll()} while starting; last log lines:\n"
                                   f"{self._process.log_tail()}")
            if self._healthy():
                return
            time.sleep(0.02)  # a forked replica is ready in about a second: poll finely
        raise EngineFailed(f"engine {self._spec.replica_id} not ready after "
                           f"{self._spec.start_timeout_s:.0f} s; log {self._process.log_file}")

    def _healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self._spec.url}/health", timeout=timeout_s) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def check_health(self, timeout_s: float = 2.0) -> None:
        """Raise ``EngineFailed`` if the replica cannot serve: not ready, process gone, or no /health
        answer within ``timeout_s`` (a hung or stopped engine)."""
        info = self.info()
        if info.state is not ReplicaState.READY:
            raise EngineFailed(info.failure or f"replica {self._spec.replica_id} is {info.state.value}")
        if not self._healthy(timeout_s):
            raise EngineFailed(f"no /health answer within {timeout_s:g} s")

    def stop(self, grace_s: float = 30.0) -> ReplicaInfo:
        """Stop the engine (its EngineCore too): SIGTERM, then after ``grace_s`` SIGKILL to its whole
        process group. A failed replica is stopped with no grace (a stopped process cannot act on
        SIGTERM). Idempotent."""
        with self._lock:
            if self._process is not None:
                code = self._process.stop(grace_s)
                logger.info("engine %s stopped (exit code %s)", self._spec.replica_id, code)
            if self._state is not ReplicaState.FAILED:
                self._state = ReplicaState.STOPPED
        return self.info()

    def launch_report(self) -> LaunchReport | None:
        """How the engine process launched its engine, and its EngineCore its tensor-parallel workers
        (None until it has)."""
        try:
            report = LaunchReport.model_validate_json(self._spec.launch_report_path.read_text())
        except FileNotFoundError:
            return None
        try:
            workers = WorkersReport.model_validate_json(self._spec.workers_report_path.read_text())
        except FileNotFoundError:
            return report
        return report.model_copy(update={"workers": workers})

    def load_report(self) -> LoadReport | None:
        """How this engine's weights were loaded, rank by rank (None with vLLM's own load formats)."""
        ranks = []
        for path in self._spec.load_report_paths():
            try:
                ranks.append(LoadReport.model_validate_json(path.read_text()))
            except FileNotFoundError:
                continue
        return LoadReport.of_ranks(ranks) if ranks else None

    def first_token(self) -> float:
        """Send a one-token completion and return when its answer arrived (the 'first token' mark)."""
        body = json.dumps({"model": self._spec.served_model_name, "prompt": "Hello",
                           "max_tokens": 1, "temperature": 0}).encode()
        request = urllib.request.Request(f"{self._spec.url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
        self.timeline["first_token"] = time.time()
        return self.timeline["first_token"]

    def kv_journal(self) -> list[dict]:
        """What this engine's KV connector did since the last call (its journal lines)."""
        return [line for reader in self._kv_journals for line in reader.read()]
