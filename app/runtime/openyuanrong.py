"""The openYuanrong runtime the App runs on: embedded (local mode plus the data system workers the
App starts and always stops) or an existing cluster (the App connects and starts nothing).

Local mode runs ``runtime.local_nodes`` workers in one cluster, each a simulated node. The last one
runs the metastore: the first replica (the seed) goes to node1, so that the node the others fetch from
is one whose death the cluster survives (the head's death stalls every worker, REFERENCE.md)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.config import RuntimeConfig, RuntimeMode
from app.replica import Node
from app.runtime.datasystem_worker import DataSystemWorker

logger = logging.getLogger(__name__)

# yr.init may run once per process, but a notebook (or a test session) may hold several Apps: the
# first App initialises yr, the last one to stop finalises it.
_yr_lock = threading.Lock()
_yr_users: list[RuntimeMode] = []


class Runtime:
    def __init__(self, config: RuntimeConfig) -> None:
        self._config = config
        self.mode = config.resolved_mode
        self._workers: dict[str, DataSystemWorker] = {}  # local mode: node name -> its worker
        self._yr_started = False
        self.ds_address: str | None = config.ds_address  # the worker the App's own bookkeeping uses
        self.nodes: list[Node] = []  # local mode: the simulated nodes; cluster mode: the App's host
        self.ready_at: float | None = None  # wall-clock time the runtime (and its data system) was ready

    @property
    def worker_pid(self) -> int | None:
        """The pid of the worker at ``ds_address`` (local mode)."""
        head = self._head()
        return head.pid if head else None

    def node_pids(self) -> dict[str, int | None]:
        return {name: worker.pid for name, worker in self._workers.items()}

    def dead_nodes(self) -> dict[str, int]:
        """Local mode: the nodes whose worker exited, with its exit code."""
        codes = {name: worker.exit_code() for name, worker in self._workers.items()}
        return {name: code for name, code in codes.items() if code is not None}

    def restart_node(self, name: str) -> float:
        """Local mode: start a fresh worker for node ``name`` at the same address (its ``Node`` stays
        valid). It starts empty. Returns the seconds it took."""
        worker = self._workers.get(name)
        if worker is None:
            raise RuntimeError("only the App's own (local mode) data system workers can be restarted")
        started = time.monotonic()
        worker.restart(self._config.ds_start_timeout_s)
        return time.monotonic() - started

    def _head(self) -> DataSystemWorker | None:
        return next(reversed(self._workers.values()), None)

    def _start_workers(self) -> None:
        config = self._config
        names = [f"node{index}" for index in range(1, config.local_nodes + 1)]
        # Pre-faulting needs one arena per tenant and no fallocate (the worker refuses otherwise).
        flags = {"shared_memory_populate": "true", "arena_per_tenant": "1",
                 "enable_fallocate": "false"} if config.ds_populate else {}
        head = DataSystemWorker(config.ds_shared_memory_mb, _home(config, names[-1], len(names)), flags=flags)
        self._workers[names[-1]] = head
        head.start(config.ds_start_timeout_s)
        for name in names[:-1]:
            self._workers[name] = DataSystemWorker(config.ds_shared_memory_mb, _home(config, name, len(names)),
                                                   metastore=head.metastore_address, flags=flags)
        self._workers = {name: self._workers[name] for name in names}  # in node order, the head last
        with ThreadPoolExecutor(max_workers=len(names)) as pool:  # they join the head together
            list(pool.map(lambda joining: joining.start(config.ds_start_timeout_s),
                          list(self._workers.values())[:-1]))
        self.nodes = [Node(name=name, ds_address=self._workers[name].address) for name in names]
        self.ds_address = head.address

    def start(self) -> None:
        import yr

        if self.mode is RuntimeMode.LOCAL:
            self._start_workers()
            config = yr.Config(local_mode=True)
        else:
            assert self.ds_address is not None  # the config requires it in cluster mode
            self.nodes = [Node(name=self.ds_address, ds_address=self.ds_address)]
            logger.info("connecting to the openYuanrong cluster at %s (data system %s)",
                        self._config.server_address, self._config.ds_address)
            config = yr.Config(server_address=self._config.server_address, ds_address=self._config.ds_address)
        with _yr_lock:
            if _yr_users and _yr_users[0] is not self.mode:
                raise RuntimeError(f"this process already runs yr in {_yr_users[0].value} mode; an App in "
                                   f"{self.mode.value} mode needs a process of its own")
            if not _yr_users:
                yr.init(config)
            _yr_users.append(self.mode)
        self._yr_started = True
        self.ready_at = time.time()

    def stop(self) -> None:
        """Idempotent; stops what ``start`` started even if it failed half way."""
        if self._yr_started:
            import yr

            self._yr_started = False
            with _yr_lock:
                _yr_users.pop()
                try:
                    if not _yr_users:
                        yr.finalize()
                except Exception:  # noqa: BLE001 - never let it keep the worker alive
                    logger.exception("yr.finalize failed")
        # The others first, together: the head hangs in its metastore's shutdown while workers are
        # connected to it (REFERENCE.md).
        workers = list(self._workers.values())
        with ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:
            list(pool.map(DataSystemWorker.stop, workers[:-1]))
        for head in workers[-1:]:
            head.stop()
        self._workers.clear()


def _home(config: RuntimeConfig, name: str, nodes: int) -> Path | None:
    if config.ds_home is None:
        return None
    return config.ds_home if nodes == 1 else config.ds_home / name
