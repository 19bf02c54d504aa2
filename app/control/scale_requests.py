"""Scaling requests that arrive over HTTP (``POST /scaleout``, ``/scalein``), and the Router's wake-ups
(a request found a pool at zero): the Router cannot call the App (the App is the driver, not an
actor), so a thread of the App long-polls the Router's mailbox, carries each request out through the
Scaler and hands the answer back."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from app.config import MAX_REPLICAS
from app.control.scaling import Scaler
from app.router.openai_protocol import bad_request

logger = logging.getLogger(__name__)


class ScaleRequestServer:
    def __init__(self, router: Any, scaler: Scaler, wake_to: Callable[[], int]) -> None:
        self._router = router
        self._scaler = scaler
        self._wake_to = wake_to  # how many replicas a pool at zero wakes up to
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="app-scale-requests", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        import yr

        while not self._stop.is_set():
            try:
                request = yr.get(self._router.next_scale_request.invoke(1.0), timeout=30)
            except Exception:  # noqa: BLE001 - the Router is going away
                if self._stop.is_set():
                    return
                logger.exception("polling the Router for scaling requests failed")
                time.sleep(1)
                continue
            if request is None:
                continue
            try:
                status, body = self.answer(request.verb, request.body)
            except Exception as exc:  # noqa: BLE001 - answered, and the thread serves the next request
                logger.exception("%s failed", request.verb)
                status, body = 500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error",
                                               "param": None, "code": None}}
            yr.get(self._router.finish_scale_request.invoke(request.request_id, status, body))

    def answer(self, verb: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """HTTP status and body for one request; a bad request changes nothing. ``role`` names the pool
        (``prefill`` or ``decode``; a merged App has one pool and needs none), ``replicas`` its new size
        (one more, or one fewer, if absent). ``wake`` brings the pools at zero back."""
        if verb == "wake":
            report = self._scaler.wake(self._wake_to())
            return (200, {}) if report is None else ((200 if report.ok else 500), report.to_dict())
        roles = self._scaler.roles
        role_name = body.get("role", roles[0].value if len(roles) == 1 else None)
        role = next((r for r in roles if r.value == role_name), None)
        if role is None:
            names = " or ".join(repr(r.value) for r in roles)
            return 400, bad_request(f"'role' must be {names}.", "role", "invalid_role").body()
        current = self._scaler.counts()[role]
        target = body.get("replicas", current + 1 if verb == "scaleout" else current - 1)
        if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target <= MAX_REPLICAS:
            return 400, bad_request(f"'replicas' must be an integer between 0 and {MAX_REPLICAS}.", "replicas",
                                    "invalid_replicas").body()
        if (verb == "scaleout" and target < current) or (verb == "scalein" and target > current):
            return 400, bad_request(f"{verb} to {target} {role.value} replicas, but {current} are running.",
                                    "replicas", "invalid_replicas").body()
        report = self._scaler.scale({role: target})
        return (200 if report.ok else 500), report.to_dict()
