"""Decode actor: hosts one vLLM engine in the decode role (``actors.engine_actor``). It loads the
prompt's KV that a Prefill replica stored in the data system, computes the last prompt token and
generates; KV that is missing or corrupt is recomputed (``app.kv``)."""

from __future__ import annotations

import yr

from actors.engine_actor import EngineActor
from app.replica import Role


@yr.instance
class Decode(EngineActor):
    roles = (Role.DECODE,)
