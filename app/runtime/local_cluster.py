"""Simulated nodes on one host: ``nodes`` data system workers in one cluster (one metastore, no etcd),
as ``runtime.local_nodes`` asks. A value put through one worker is readable through any other: the
same cross-node path a real cluster has, over loopback, or, with a ``NodeNetwork``, each worker in
its node's network namespace at its node's address, over links that can be shaped and cut.

Workers of several nodes run without data replication: a read across then leaves no copy on the
reader's worker. Weights are relayed into node-scoped keys of the reader's own (``app.weights.relay``),
which a replicated copy would only double.

The last worker runs the metastore. The first replica (the seed) goes to node1, so the node the others
fetch from is one whose death the cluster survives: the head's death stalls every worker, and its
shutdown hangs while others are connected (REFERENCE.md), so it is stopped last.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.replica import Node
from app.runtime.datasystem_worker import DataSystemWorker
from app.runtime.node_network import NodeNetwork

# Pre-faulting needs one arena per tenant and no fallocate (the worker refuses otherwise; every worker
# runs without fallocate anyway).
POPULATE_FLAGS = {"shared_memory_populate": "true", "arena_per_tenant": "1"}


class LocalCluster:
    def __init__(self, nodes: int, shared_memory_mb: int, home: Path | None = None, populate: bool = False,
                 network: NodeNetwork | None = None) -> None:
        """``home``: the workers' homes (``home`` itself for one node, ``home/nodeN`` for several); fresh
        temporary folders if None. ``populate``: pre-fault each worker's shared memory at start.
        ``network``: the nodes' namespaces (created already), one per node; None: all on loopback."""
        if nodes < 1:
            raise ValueError("a cluster has at least one node")
        if network is not None and len(network.nodes) != nodes:
            raise ValueError(f"the network has {len(network.nodes)} nodes, the cluster {nodes}")
        names = [f"node{index}" for index in range(1, nodes + 1)]
        flags = {**(POPULATE_FLAGS if populate else {}),
                 **({"enable_data_replication": "false"} if nodes > 1 else {})}
        places = {node.name: {"host": node.address, "netns": node.netns} for node in network.nodes} if network else {}
        self._network = network

        def worker(name: str, metastore: DataSystemWorker | None = None) -> DataSystemWorker:
            return DataSystemWorker(shared_memory_mb, None if home is None else home if nodes == 1 else home / name,
                                    metastore=metastore, flags=flags, **places.get(name, {}))

        head = worker(names[-1])
        self._workers = {name: worker(name, head) for name in names[:-1]}
        self._workers[names[-1]] = head  # in node order, the head last
        self.nodes: list[Node] = []
        self.start_seconds: dict[str, float] = {}

    @property
    def head(self) -> DataSystemWorker:
        return list(self._workers.values())[-1]

    def start(self, timeout_s: float = 60.0) -> list[Node]:
        """Start the head, then the others together (they join it). Stops what started if one fails."""
        *joining, head = self._workers
        try:
            self._start(head, timeout_s)
            with ThreadPoolExecutor(max_workers=max(1, len(joining))) as pool:
                list(pool.map(lambda name: self._start(name, timeout_s), joining))
        except BaseException:
            self.stop()
            raise
        netns = {node.name: node for node in self._network.nodes} if self._network else {}
        self.nodes = [Node(name=name, ds_address=worker.address, address=netns[name].address if netns else None,
                           netns=netns[name].netns if netns else None) for name, worker in self._workers.items()]
        return self.nodes

    def _start(self, name: str, timeout_s: float) -> None:
        started = time.monotonic()
        self._workers[name].start(timeout_s)
        self.start_seconds[name] = round(time.monotonic() - started, 2)

    def pids(self) -> dict[str, int | None]:
        return {name: worker.pid for name, worker in self._workers.items()}

    def dead(self) -> dict[str, int]:
        """The nodes whose worker exited, with its exit code."""
        codes = {name: worker.exit_code() for name, worker in self._workers.items()}
        return {name: code for name, code in codes.items() if code is not None}

    def restart(self, name: str, timeout_s: float = 60.0) -> float:
        """Start a fresh, empty worker for node ``name`` at the same address. Returns the seconds it took."""
        started = time.monotonic()
        self._workers[name].restart(timeout_s)
        return time.monotonic() - started

    def stop(self) -> None:
        """Idempotent. The others first, together; the head last."""
        workers = list(self._workers.values())
        with ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:
            list(pool.map(DataSystemWorker.stop, workers[:-1]))
        self.head.stop()
