"""Which simulated nodes the driver can reach: a partition (a node's link cut) is seen as its worker
no longer accepting connections from here, and its heal as accepting them again.

Each node is probed every ``interval_s`` from a thread of its own, so that a cut node's connect
timeout never delays the others' probes. ``on_change`` hears of every transition once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from app.replica import Node
from app.runtime.processes import port_open

logger = logging.getLogger(__name__)

#: ``on_change(node, reachable, seconds)``: seconds it was reachable before a cut, or cut before a heal.
OnChange = Callable[[Node, bool, float], None]


class NodeWatch:
    def __init__(self, nodes: list[Node], interval_s: float, timeout_s: float, on_change: OnChange) -> None:
        self._nodes = nodes
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._on_change = on_change
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(node,), name=f"node-watch-{node.name}",
                                          daemon=True) for node in nodes]
        self._unreachable: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self._timeout_s + self._interval_s + 5)

    def unreachable(self) -> set[str]:
        with self._lock:
            return set(self._unreachable)

    def _watch(self, node: Node) -> None:
        host, _, port = node.ds_address.rpartition(":")
        reachable, since = True, time.monotonic()
        while not self._stop.wait(self._interval_s):
            now_reachable = port_open(host, int(port), timeout_s=self._timeout_s)
            if now_reachable == reachable or self._stop.is_set():
                continue
            reachable, seconds, since = now_reachable, time.monotonic() - since, time.monotonic()
            with self._lock:
                (self._unreachable.discard if reachable else self._unreachable.add)(node.name)
            try:
                self._on_change(node, reachable, seconds)
            except Exception:  # noqa: BLE001 - the watch must outlive what it reports to
                logger.exception("handling %s's %s failed", node.name, "rejoin" if reachable else "cut")
