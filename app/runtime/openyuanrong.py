"""The openYuanrong runtime the App runs on: embedded (local mode plus the data system workers the
App starts and always stops, ``runtime.local_nodes`` of them: ``LocalCluster``) or an existing cluster
(the App connects and starts nothing)."""

from __future__ import annotations

import logging
import threading
import time

from app.config import ConfigError, NodeNetworkMode, RuntimeConfig, RuntimeMode
from app.replica import Node
from app.runtime.local_cluster import LocalCluster
from app.runtime.node_network import NodeNetwork, NodeNetworkError, check_available

logger = logging.getLogger(__name__)

# yr.init may run once per process, but a notebook (or a test session) may hold several Apps: the
# first App initialises yr, the last one to stop finalises it.
_yr_lock = threading.Lock()
_yr_users: list[RuntimeMode] = []


class Runtime:
    def __init__(self, config: RuntimeConfig) -> None:
        self._config = config
        self.mode = config.resolved_mode
        self._cluster: LocalCluster | None = None  # local mode: the App's own workers
        self.network: NodeNetwork | None = None  # node_network=netns: the nodes' namespaces
        self._yr_started = False
        self.ds_address: str | None = config.ds_address  # the worker the App's own bookkeeping uses
        self.nodes: list[Node] = []  # local mode: the simulated nodes; cluster mode: the App's host
        self.ready_at: float | None = None  # wall-clock time the runtime (and its data system) was ready

    @property
    def worker_pid(self) -> int | None:
        """The pid of the worker at ``ds_address`` (local mode)."""
        return self._cluster.head.pid if self._cluster else None

    def node_pids(self) -> dict[str, int | None]:
        return self._cluster.pids() if self._cluster else {}

    def node_status(self, cut_off: set[str]) -> list[dict]:
        """Each node as ``/status`` shows it: where it is, its worker's pid, whether the driver reaches it."""
        pids = self.node_pids()
        return [{**node.model_dump(), "pid": pids.get(node.name), "reachable": node.name not in cut_off}
                for node in self.nodes]

    def dead_nodes(self) -> dict[str, int]:
        """Local mode: the nodes whose worker exited, with its exit code."""
        return self._cluster.dead() if self._cluster else {}

    def restart_node(self, name: str) -> float:
        """Local mode: start a fresh, empty worker for node ``name`` at the same address (its ``Node``
        stays valid). Returns the seconds it took."""
        if self._cluster is None:
            raise RuntimeError("only the App's own (local mode) data system workers can be restarted")
        return self._cluster.restart(name, self._config.ds_start_timeout_s)

    def start(self, shared_memory_mb: int | None = None) -> None:
        """``shared_memory_mb``: local mode, each worker's (``runtime.ds_shared_memory_mb`` if None)."""
        import yr

        if self.mode is RuntimeMode.LOCAL:
            runtime = self._config
            shared_memory_mb = shared_memory_mb or runtime.ds_shared_memory_mb
            if shared_memory_mb is None:
                raise ValueError("local mode needs the workers' shared memory size (the App plans it)")
            if runtime.node_network is NodeNetworkMode.NETNS:
                try:
                    check_available()
                except NodeNetworkError as exc:
                    raise ConfigError(str(exc)) from None
                self.network = NodeNetwork(runtime.local_nodes, str(runtime.node_subnet), runtime.link_gbps)
                self.network.create()
            self._cluster = LocalCluster(runtime.local_nodes, shared_memory_mb, runtime.ds_home,
                                         runtime.ds_populate, self.network)
            self.nodes = self._cluster.start(runtime.ds_start_timeout_s)
            self.ds_address = self._cluster.head.address
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
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
        if self.network is not None:
            self.network.remove()
            self.network = None

