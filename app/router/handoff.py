"""The two legs of a disaggregated request, as bodies (the pattern of Ray Serve LLM's prefill/decode
proxy and vLLM's disaggregated serving examples).

The prefill leg is the client's request cut to one token, not streamed, asking its engine to keep the
prompt's KV for a remote decode (``do_remote_decode``); the engine's KV connector stores it in the data
system and answers the ``kv_transfer_params`` of the decode leg. The decode leg is the client's request
as sent, with those parameters: its engine loads the KV and generates, streamed if the client asked.
The Router owns the handoff: parameters a client sends are replaced in both legs.
"""

from __future__ import annotations

import json
from typing import Any

# What shapes the generation, not the prompt: the prefill leg computes the prompt and one token.
_GENERATION_ONLY = ("max_completion_tokens", "min_tokens", "n", "stream_options", "kv_transfer_params")


def prefill_leg(body: dict[str, Any]) -> bytes:
    leg = {name: value for name, value in body.items() if name not in _GENERATION_ONLY}
    leg.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    return json.dumps(leg).encode()


def decode_leg(body: dict[str, Any], params: dict[str, Any] | None) -> bytes:
    """``params`` None: the prefill handed nothing over, and the decode engine computes the prompt."""
    leg = {name: value for name, value in body.items() if name != "kv_transfer_params"}
    if params is not None:
        leg["kv_transfer_params"] = params
    return json.dumps(leg).encode()


def handed_over(answer: bytes) -> dict[str, Any] | None:
    """The decode leg's ``kv_transfer_params`` from a prefill engine's answer, or None if it holds none
    that asks for a remote prefill (a connector that is off answers none)."""
    try:
        params = json.loads(answer).get("kv_transfer_params")
    except (ValueError, AttributeError):
        return None
    return params if isinstance(params, dict) and params.get("do_remote_prefill") is True else None
