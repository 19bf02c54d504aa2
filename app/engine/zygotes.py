"""The driver's side of the zygotes (``app.engine.zygote``): the one way engine processes are made.

``ZYGOTES.engine_process(spec)`` forks the process of one replica from the zygote that holds the spec's
environment, or, while no zygote can fork, spawns a fresh one (``python -m app.engine.main``) and says
why in its LaunchReport. Nothing is kept standing by: a fork from the zygote costs milliseconds, so
there is nothing to refill after a scale-out and nothing idles but the zygote itself.

One zygote per environment and node. Simulated local nodes (``runtime.local_nodes``) are data system
workers on this host, in this network namespace, so their replicas share one zygote; a zygote per
node matters where a node is a place of its own. Engines of several Apps in one driver (a notebook,
the tests) share a zygote when their engines' environment is the same: each App ``hold``s it while it
runs, and the last to ``release`` it stops it.

A zygote is supervised (``zygote_client``): if it dies it is restarted, and scale-outs spawn until
the new one is ready.

One registry per process: in yr local mode every engine actor is a thread of the driver and shares
it; in cluster mode each engine actor is a process of its own, holds no zygote, and spawns.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from app.engine.launch_report import Origin
from app.engine.order import EngineOrder
from app.engine.spec import EngineSpec
from app.engine.zygote_client import Listener, Zygote, ZygoteUnavailable, project_root
from app.runtime.processes import ChildProcess, GroupLeader

logger = logging.getLogger(__name__)


class Zygotes:
    """The zygotes of this process, one per engine environment (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zygotes: dict[tuple, tuple[Zygote, int]] = {}  # environment -> (zygote, holders)

    def hold(self, spec: EngineSpec, listener: Listener | None = None) -> Zygote:
        """An App will make engines like ``spec``: start (or share) their zygote; it imports while the
        App starts its other parts."""
        key = _key(spec)
        with self._lock:
            zygote, holders = self._zygotes.get(key) or (None, 0)
            if zygote is None:
                zygote = Zygote(_environment(spec), spec.log_dir, spec.start_timeout_s)
                logger.info("zygote %d started for engines like %s", zygote.pid, spec.replica_id)
            self._zygotes[key] = (zygote, holders + 1)
        if listener is not None:
            zygote.listen(listener)
        return zygote

    def release(self, zygote: Zygote, listener: Listener | None = None) -> None:
        """An App is done with ``zygote`` (what ``hold`` returned); the last holder stops it."""
        with self._lock:
            key = next((key for key, (held, _) in self._zygotes.items() if held is zygote), None)
            if key is None:
                return
            holders = self._zygotes[key][1]
            if holders > 1:
                self._zygotes[key] = (zygote, holders - 1)
            else:
                del self._zygotes[key]
        if listener is not None:
            zygote.unlisten(listener)
        if holders == 1:
            zygote.close()

    def engine_process(self, spec: EngineSpec) -> GroupLeader:
        """A process running ``spec``'s engine: forked from its zygote, or spawned (see the module docstring)."""
        log_file = spec.log_dir / f"engine-{spec.replica_id}.log"
        with self._lock:
            zygote, _ = self._zygotes.get(_key(spec)) or (None, 0)
        if zygote is None:
            reason = "no zygote holds engines like this one in this process"
        else:
            try:
                return zygote.fork(EngineOrder(spec=spec, origin=Origin.ZYGOTE, watch_pid=os.getpid()), log_file)
            except ZygoteUnavailable as exc:
                reason = str(exc)
        logger.warning("replica %s: spawning its engine process (%s)", spec.replica_id, reason)
        process = ChildProcess(f"engine process {spec.replica_id}", [sys.executable, "-m", "app.engine.main"],
                               log_file, env={**_environment(spec), "PYTHONPATH": project_root()}, stdin=True)
        process.send_line(EngineOrder(spec=spec, origin=Origin.SPAWN, reason=reason).model_dump_json())
        return process


def _environment(spec: EngineSpec) -> dict[str, str | None]:
    return spec.environment(os.cpu_count() or 1)


def _key(spec: EngineSpec) -> tuple:
    # The environment decides what a zygote imported and how (OpenMP reads OMP_NUM_THREADS as it loads).
    return tuple(sorted(_environment(spec).items(), key=lambda item: item[0]))


#: The zygotes of this process (see the module docstring).
ZYGOTES = Zygotes()
