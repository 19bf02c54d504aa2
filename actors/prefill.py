"""Prefill actor: hosts one vLLM engine (``actors.engine_actor``).

In PD-merged mode (the default, the original case's DECODE_INS_NUM=0) a Prefill replica serves whole
requests (role ``merged``). In disaggregated mode (role ``prefill``) it computes the prompt, stores its
KV in the data system and answers the parameters of the decode leg.
"""

from __future__ import annotations

import yr

from actors.engine_actor import EngineActor
from app.replica import Role


@yr.instance
class Prefill(EngineActor):
    roles = (Role.MERGED, Role.PREFILL)
