"""Prefill actor: hosts one vLLM engine (see ``app.engine.host``).

In PD-merged mode (the default, the original case's PREFILL_INS_NUM=1, DECODE_INS_NUM=0) a Prefill
replica serves whole requests. In disaggregated mode it would prefill and hand the KV cache to a
Decode replica through the data system.
"""

from __future__ import annotations

import yr

from app.engine.host import EngineHost
from app.engine.launch_report import LaunchReport
from app.engine.spec import EngineSpec
from app.replica import ReplicaInfo, Role
from app.weights.load_report import LoadReport


@yr.instance
class Prefill:
    role = Role.MERGED

    def __init__(self, spec: EngineSpec) -> None:
        self._host = EngineHost(spec, self.role)

    def start(self) -> ReplicaInfo:
        return self._host.start()

    def info(self) -> ReplicaInfo:
        return self._host.info()

    def check_health(self, timeout_s: float) -> None:
        self._host.check_health(timeout_s)

    def launch_report(self) -> LaunchReport | None:
        return self._host.launch_report()

    def load_report(self) -> LoadReport | None:
        return self._host.load_report()

    def first_token(self) -> float:
        return self._host.first_token()

    def kv_journal(self) -> list[dict]:
        return self._host.kv_journal()

    def refill_standbys(self) -> None:
        self._host.refill_standbys()

    def timeline(self) -> dict[str, float]:
        return dict(self._host.timeline)

    def stop(self, grace_s: float = 30.0) -> ReplicaInfo:
        return self._host.stop(grace_s)
