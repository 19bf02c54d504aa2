"""What Prefill and Decode have in common: one vLLM engine (``app.engine.host.EngineHost``), the same
launcher, supervision and weights. They differ in their role only, which the spec carries.

The App asks an actor for its ``node`` before it plans the weights: in cluster mode that is the
worker of the host the actor runs on (DS_WORKER_ADDR, as the original case's engines read it)."""

from __future__ import annotations

import logging
import os
from typing import ClassVar

from app.engine.host import EngineHost
from app.engine.launch_report import LaunchReport
from app.engine.spec import EngineSpec
from app.replica import Node, ReplicaInfo, Role
from app.weights.load_report import LoadReport
from app.weights.plan import WeightPlan

logger = logging.getLogger(__name__)


class EngineActor:
    roles: ClassVar[tuple[Role, ...]]  # the roles an actor of this class may take

    def __init__(self, spec: EngineSpec) -> None:
        if spec.role not in self.roles:
            raise ValueError(f"a {type(self).__name__} actor takes roles {[r.value for r in self.roles]}, "
                             f"not {spec.role.value}")
        if spec.node_from_host and os.environ.get("DS_WORKER_ADDR"):
            address = os.environ["DS_WORKER_ADDR"]
            spec = spec.on_node(Node(name=address, ds_address=address))
            logger.info("replica %s uses this host's data system worker %s", spec.replica_id, address)
        self._host = EngineHost(spec)

    def node(self) -> Node | None:
        return self._host.spec.node

    def start(self, plan: WeightPlan | None = None) -> ReplicaInfo:
        return self._host.start(plan)

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

    def timeline(self) -> dict[str, float]:
        return dict(self._host.timeline)

    def stop(self, grace_s: float = 30.0) -> ReplicaInfo:
        return self._host.stop(grace_s)
