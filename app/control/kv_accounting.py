"""Keeps the KV blocks in the data system within ``kv.capacity_gb`` (``AppConfig.kv_capacity_gb``),
and the KV metrics current.

Every ``kv.accounting_interval_s`` it reads what each serving replica's connector did since the last
read (its journal, through the replica's actor), updates the ``KVLedger``, deletes the blocks the
ledger evicts, and hands the totals to the Router (``/metrics`` ``yrllm_kv_*``, ``/status`` ``kv``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from app.config import KVConfig
from app.control.scaling import Scaler
from app.kv.ledger import KVLedger
from app.kv.store import BlockStore, StoreUnavailable

logger = logging.getLogger(__name__)


class KVAccountant:
    """``start`` once, ``stop`` once."""

    def __init__(self, config: KVConfig, capacity_gb: float, scaler: Scaler, router: Any, ds_address: str) -> None:
        self._config = config
        self._scaler = scaler
        self._router = router
        self._store = BlockStore(ds_address, config.timeout_ms, config.ttl_s)
        self._ledger = KVLedger(int(capacity_gb * 1e9))
        self._lock = threading.Lock()  # the ledger: the accounting thread and forget_all
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-accounting", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        try:
            self.account()  # the last lines, so that /metrics ends complete
        except Exception:  # noqa: BLE001 - shutdown goes on
            logger.exception("the last KV accounting failed")

    def resident_bytes(self) -> int:
        """The bytes of KV blocks in the data system, as the ledger accounts them."""
        with self._lock:
            return self._ledger.stats.resident_bytes

    def forget_all(self) -> None:
        """The data system worker restarted without its objects."""
        with self._lock:
            self._ledger.forget_all()

    def _run(self) -> None:
        while not self._stop.wait(self._config.accounting_interval_s):
            try:
                self.account()
            except Exception:  # noqa: BLE001 - accounting must not die; the next round retries
                logger.exception("KV accounting failed")

    def account(self) -> None:
        import yr

        lines = []
        for replica_id, actor in self._scaler.serving().items():
            try:
                lines += yr.get(actor.kv_journal.invoke(), timeout=10) or []
            except Exception as exc:  # noqa: BLE001 - a replica that died: its last lines are lost
                logger.debug("no KV journal from %s: %s", replica_id, exc)
        with self._lock:
            self._ledger.ingest(lines)
            evicted = self._ledger.evictions()
            stats = self._ledger.stats.model_copy()
        if evicted:
            try:
                self._store.delete(evicted)
            except StoreUnavailable:
                pass  # the worker is gone, and the blocks with it
        yr.get(self._router.record_kv.invoke(stats))
