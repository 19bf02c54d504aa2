"""Where the control plane's events go: the App's log, and the Router (``/status``, ``/metrics``)."""

from __future__ import annotations

import logging
from typing import Any

from app.events import Event, EventKind

logger = logging.getLogger(__name__)

_FAULTS = {EventKind.REPLICA_FAILED, EventKind.REPLACEMENT_FAILED, EventKind.DS_WORKER_DIED,
           EventKind.DS_WORKER_RESTART_FAILED, EventKind.DS_UNREACHABLE, EventKind.CACHE_ENTRY_RETIRED,
           EventKind.ZYGOTE_DIED}


class EventLog:
    def __init__(self, router: Any) -> None:
        self._router = router  # the Router actor's handle

    def record(self, kind: EventKind, subject: str, reason: str) -> Event:
        import yr

        event = Event(kind=kind, subject=subject, reason=reason)
        logger.log(logging.WARNING if kind in _FAULTS else logging.INFO, "%s", event)
        try:
            yr.get(self._router.record_event.invoke(event), timeout=10)
        except Exception:  # noqa: BLE001 - the log has it; healing must not wait on the Router
            logger.exception("could not hand an event to the Router")
        return event
