"""The openYuanrong runtime the App runs on: embedded (local mode plus a data system worker the App
starts and always stops) or an existing cluster (the App connects and starts nothing)."""

from __future__ import annotations

import logging
import threading
import time

from app.config import RuntimeConfig, RuntimeMode
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
        self._worker: DataSystemWorker | None = None
        self._yr_started = False
        self.ds_address: str | None = config.ds_address
        self.ready_at: float | None = None  # wall-clock time the runtime (and its data system) was ready

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker else None

    def worker_exit_code(self) -> int | None:
        """Local mode: the exit code of the App's data system worker if it died; None while it runs."""
        return self._worker.exit_code() if self._worker else None

    def restart_worker(self) -> float:
        """Local mode: start a fresh data system worker at the same address (``ds_address`` stays
        valid). Returns the seconds it took."""
        if self._worker is None:
            raise RuntimeError("only the App's own (local mode) data system worker can be restarted")
        started = time.monotonic()
        self._worker.restart(self._config.ds_start_timeout_s)
        return time.monotonic() - started

    def start(self) -> None:
        import yr

        if self.mode is RuntimeMode.LOCAL:
            self._worker = DataSystemWorker(self._config.ds_shared_memory_mb, self._config.ds_home)
            self.ds_address = self._worker.start(self._config.ds_start_timeout_s)
            config = yr.Config(local_mode=True)
        else:
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
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
