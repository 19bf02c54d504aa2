"""What Prefill and Decode have in common: one vLLM engine (``app.engine.host.EngineHost``), the same
launcher, supervision and weights. They differ in their role only, which the spec carries."""

from __future__ import annotations

from typing import ClassVar

from app.engine.host import EngineHost
from app.engine.launch_report import LaunchReport
from app.engine.spec import EngineSpec
from app.replica import ReplicaInfo, Role
from app.weights.load_report import LoadReport


class EngineActor:
    roles: ClassVar[tuple[Role, ...]]  # the roles an actor of this class may take

    def __init__(self, spec: EngineSpec) -> None:
        if spec.role not in self.roles:
            raise ValueError(f"a {type(self).__name__} actor takes roles {[r.value for r in self.roles]}, "
                             f"not {spec.role.value}")
        self._host = EngineHost(spec)

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
