"""Decode actor: the decode half of a disaggregated replica. Not available yet.

The seam is here so that the App, the Router's ``Role`` and ``/status`` already speak of it:
disaggregation needs a KV connector that moves KV blocks through the data system (see
``../shared/REFERENCE.md``, "Prefill/Decode on vLLM's CPU backend"), which is a later issue.
"""

from __future__ import annotations

import yr

from app.engine.spec import EngineSpec


@yr.instance
class Decode:
    def __init__(self, spec: EngineSpec) -> None:
        self._spec = spec

    def start(self) -> None:
        raise NotImplementedError("disaggregated prefill/decode is not implemented yet; "
                                  "replicas run PD-merged (Prefill actors)")
