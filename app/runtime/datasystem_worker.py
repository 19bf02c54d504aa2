"""A real openYuanrong data system worker, started by the App on loopback in local mode.

We run the ``datasystem_worker`` binary ourselves, in the foreground, instead of through ``dscli``:
``dscli`` daemonises it, and a daemon is exactly the orphan the App must never leave behind. The
flags are the ones ``dscli start`` passes, with every path pinned under the worker's home.

Several workers form one cluster without etcd: the first runs the metastore, the others join it
(``metastore=`` the worker running it). A value put through one worker is then readable through any other.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Mapping

from app.runtime.node_network import exec_in
from app.runtime.processes import ChildProcess, free_port, port_open

logger = logging.getLogger(__name__)


def _package_dir() -> Path:
    import yr.datasystem

    return Path(yr.datasystem.__file__).resolve().parent


class DataSystemWorker:
    """Start with ``start()``, stop with ``stop()`` (idempotent). The address is ``host:port``."""

    def __init__(self, shared_memory_mb: int, home: Path | None = None, host: str = "127.0.0.1",
                 metastore: "DataSystemWorker | None" = None, flags: Mapping[str, str] | None = None,
                 netns: str | None = None) -> None:
        """``metastore``: the worker whose metastore this one joins (started first); None runs the
        metastore in this worker. ``flags``: further worker flags (``name: value``, without dashes).
        ``netns``: the network namespace it runs in, where ``host`` is its address."""
        self._shared_memory_mb = shared_memory_mb
        self._owns_home = home is None
        self._home = home
        self.host = host
        self.port: int | None = None
        self._joins = metastore
        self.metastore_address: str | None = None
        self._flags = dict(flags or {})
        self._process: ChildProcess | None = None
        self._netns = netns
        # Ports are picked here; in a fresh namespace of its own, where nothing else listens, any port
        # free on this loopback is free there too.
        self._port_host = "127.0.0.1" if netns else host

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the data system worker is not started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def exit_code(self) -> int | None:
        """The worker's exit code once it has exited on its own; None while it runs (or before start)."""
        return self._process.poll() if self._process else None

    def start(self, timeout_s: float = 60.0) -> str:
        self.port = free_port(self._port_host)
        if self._joins is None:
            self.metastore_address = f"{self.host}:{free_port(self._port_host)}"
        elif self._joins.metastore_address is None:
            raise RuntimeError("the worker running the metastore must be started first")
        else:
            self.metastore_address = self._joins.metastore_address
        return self._launch(timeout_s)

    def restart(self, timeout_s: float = 60.0) -> str:
        """Start a fresh worker at the same address, after this one died. Its objects died with it:
        the new worker starts empty (its old state folder is removed, so that it does not recover
        metadata of objects whose memory is gone). Processes that mapped objects of the old worker
        keep those pages."""
        if self._process is None or self._process.poll() is None:
            raise RuntimeError("restart() is for a worker that has exited")
        self._process.stop(grace_s=0)  # reaps it, and whatever is left of its process group
        assert self._home is not None
        shutil.rmtree(self._home / "datasystem", ignore_errors=True)
        return self._launch(timeout_s)

    def _launch(self, timeout_s: float) -> str:
        home = self._home or Path(tempfile.mkdtemp(prefix="yrllm-ds-"))
        self._home = home
        state = home / "datasystem"
        ready_file = state / "probe" / "ready"
        ready_file.unlink(missing_ok=True)  # a stale probe survives a stop and would lie
        package = _package_dir()
        flags = {
            "worker_address": f"{self.host}:{self.port}",
            "metastore_address": self.metastore_address,
            "start_metastore_service": "false" if self._joins else "true",
            "shared_memory_size_mb": str(self._shared_memory_mb),
            "log_dir": state / "logs",
            "rocksdb_store_dir": state / "rocksdb",
            "unix_domain_socket_dir": state / "uds",
            "ready_check_path": ready_file,
            "health_check_path": state / "probe" / "healthy",
            "monitor_config_file": state / "config" / "datasystem.config",
            "client_reconnect_wait_s": "5",
            # With fallocate (the default, for Kubernetes' accounting) the worker backs each object's
            # whole allocator size class: 1.20-1.22x the bytes for weight tensors (measured). Without
            # it, only the pages written are used.
            "enable_fallocate": "false",
            **self._flags,
        }
        started = time.monotonic()
        inside = exec_in(self._netns) if self._netns else []
        self._process = ChildProcess(
            "data system worker",
            [*inside, str(package / "datasystem_worker"), *(f"--{k}={v}" for k, v in flags.items())],
            home / "worker.log", env={"LD_LIBRARY_PATH": str(package / "lib")}, cwd=home)
        while time.monotonic() - started < timeout_s:
            if self._process.poll() is not None:
                raise RuntimeError(f"the data system worker exited with code {self._process.poll()}; "
                                   f"see {state / 'logs'}:\n{self._process.log_tail()}")
            if ready_file.exists() and port_open(self.host, self.port):
                logger.info("data system worker ready at %s in %.1f s (home %s)", self.address,
                            time.monotonic() - started, home)
                return self.address
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the data system worker was not ready within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self._process is not None:
            started = time.monotonic()
            self._process.stop(grace_s=15)
            logger.info("data system worker stopped in %.1f s", time.monotonic() - started)
            self._process = None
        if self._owns_home and self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None
