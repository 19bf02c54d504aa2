"""What an engine process is told when it is made: its spec, and how and why it was made."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.engine.launch_report import Origin
from app.engine.spec import EngineSpec


class EngineOrder(BaseModel):
    """One engine to run: sent to a zygote (which forks a process for it) or, on the spawn path, to a
    fresh engine process on its stdin. One JSON message either way; nothing in it is unpickled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: EngineSpec
    origin: Origin
    reason: str | None = Field(None, description="Why the process was spawned, if it was.")
    watch_pid: int | None = Field(None, description="The driver: a forked engine ends its process group "
                                  "when this process exits (a zygote's child has the zygote as parent, so "
                                  "PR_SET_PDEATHSIG cannot tie it to the driver).")
