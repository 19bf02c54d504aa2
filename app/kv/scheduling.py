"""The connector's scheduler side, without vLLM: which blocks a request can load, and which blocks
each engine step has filled and should be stored.

Prefix reuse shares the full blocks of every prompt. A request loads at most the blocks that leave
one prompt token to compute (vLLM must compute at least one: the load is synchronous), from where the
engine's own prefix cache stopped. A step stores the blocks it completed; blocks that were loaded or
were already in the engine's prefix cache are not stored again.

Prefill/decode hands the whole prompt over (``Handoff``): the prefill side also stores the partial
last block under a key of its own, and the decode side loads every token but the last, which it
computes to sample its first token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Sequence

from app.kv.journal import HandoffResult, JournalWriter, KVOp
from app.kv.keys import KVNamespace, block_keys, object_keys
from app.kv.store import BlockStore, StoreUnavailable


class Handoff(str, Enum):
    """A request's part in a prefill/decode handoff (from its ``kv_transfer_params``)."""

    PRODUCE = "produce"  # prefill: store all of the prompt's KV (``do_remote_decode``)
    CONSUME = "consume"  # decode: load it (``do_remote_prefill``)

    @classmethod
    def of(cls, params: dict | None) -> "Handoff | None":
        if not params:
            return None
        if params.get("do_remote_decode"):
            return cls.PRODUCE
        return cls.CONSUME if params.get("do_remote_prefill") else None


@dataclass(frozen=True)
class BlockTransfer:
    """Blocks of one request to move between the engine's cache and the data system, in order."""

    req_id: str
    keys: list[str]
    block_ids: list[int]


@dataclass
class StepRequest:
    """What a step does to one request (from vLLM's SchedulerOutput)."""

    req_id: str
    computed_after: int  # tokens with KV once the step ran
    block_ids: Sequence[int] | None = None  # blocks added this step (all of them if ``replace``)
    replace: bool = False  # new or resumed from preemption: ``block_ids`` is the whole list


@dataclass
class _Request:
    keys: list[str]  # one per full prompt block, and one for the partial last block in a handoff
    prompt_tokens: int
    loadable: int  # blocks a load may cover: those holding all but the last prompt token
    handoff: Handoff | None = None
    block_ids: list[int] = field(default_factory=list)
    stored: int = 0  # blocks, from the first, that are in the data system or on their way
    found: tuple[int, int] | None = None  # the pending lookup: (first block, blocks found from it)
    held: int | None = None  # a producer's local prefix hit: its blocks, from the first, the data system holds
    handoff_recorded: bool = False  # a consumer's HANDOFF line is written once


class BlockScheduler:
    def __init__(self, namespace: KVNamespace, store: BlockStore, journal: JournalWriter) -> None:
        self._namespace = namespace
        self._store = store
        self._journal = journal
        self._requests: dict[str, _Request] = {}
        self._loads: list[BlockTransfer] = []

    def lookup(self, req_id: str, prompt: Sequence[int] | None, computed: int, salt: str | None = None,
               handoff: Handoff | None = None) -> int:
        """Tokens beyond the ``computed`` ones (the engine's own prefix hit, block-aligned) that the
        data system holds for this request; 0 if none or if it cannot be asked. ``prompt`` None: a
        request whose KV its token ids do not decide (embeddings, images, an adapter); it is neither
        loaded nor stored."""
        size = self._namespace.block_size
        request = self._requests.get(req_id)
        if request is None:
            if not prompt:
                return 0
            full = len(prompt) // size
            # A consumer loads up to the block holding the next-to-last token, partial or not.
            loadable = -(-(len(prompt) - 1) // size) if handoff is Handoff.CONSUME else (len(prompt) - 1) // size
            request = _Request(block_keys(self._namespace, prompt, full, salt, tail=handoff is not None),
                               len(prompt), loadable, handoff)
            self._requests[req_id] = request
        first = computed // size
        if request.found is not None and request.found[0] == first:
            return self._tokens(request, first, request.found[1])  # asked again: not scheduled yet
        if request.handoff is Handoff.PRODUCE and first:
            # The engine's own prefix cache may hold blocks the data system has lost (evicted, expired):
            # the decode side needs them, so they are stored again.
            request.held = self._present(request.keys[:first], default=first)
        if first >= request.loadable:
            request.found = (first, 0)  # the engine holds all it may: no lookup
            self._record_handoff(request, HandoffResult.COMPLETE, 0)
            return 0
        started = time.perf_counter()
        found = self._present(request.keys[first:request.loadable], default=0)
        request.found = (first, found)
        tokens = self._tokens(request, first, found)
        self._journal.record(KVOp.LOOKUP, blocks=found, tokens=tokens,
                             seconds=round(time.perf_counter() - started, 6))
        result = (HandoffResult.COMPLETE if first + found == request.loadable else
                  HandoffResult.PARTIAL if found else HandoffResult.MISSED)
        self._record_handoff(request, result, found)
        return tokens

    def _present(self, keys: list[str], default: int) -> int:
        """Blocks of ``keys``, from the first, whose every object (every rank's heads) is stored."""
        try:
            return self._store.present_prefix(object_keys(self._namespace, keys)) // self._namespace.splits
        except StoreUnavailable:
            return default

    def _tokens(self, request: _Request, first: int, found: int) -> int:
        """Tokens that ``found`` blocks from block ``first`` hold: never the last prompt token."""
        size = self._namespace.block_size
        return min((first + found) * size, request.prompt_tokens - 1) - first * size if found else 0

    def _record_handoff(self, request: _Request, result: HandoffResult, blocks: int) -> None:
        if request.handoff is Handoff.CONSUME and not request.handoff_recorded:
            request.handoff_recorded = True
            self._journal.record(KVOp.HANDOFF, result=result.value, blocks=blocks)

    def allocated(self, req_id: str, block_ids: Sequence[int], external_tokens: int) -> None:
        """The engine allocated the request's blocks; ``external_tokens`` of them are to be loaded."""
        request = self._requests.get(req_id)
        if request is None:
            return
        first, _ = request.found or (0, 0)
        loaded = -(-external_tokens // self._namespace.block_size)  # a handoff's last block may be partial
        if loaded:
            self._loads.append(BlockTransfer(req_id, request.keys[first:first + loaded],
                                             list(block_ids[first:first + loaded])))
        request.stored = max(request.stored, first + loaded)
        if request.held is not None:
            request.stored = min(request.stored, request.held)  # from the first block the data system lost
            request.held = None
        request.found = None

    def step(self, requests: Iterable[StepRequest]) -> tuple[list[BlockTransfer], list[BlockTransfer]]:
        """This step's loads (before the forward) and stores (after it)."""
        stores = []
        for step in requests:
            request = self._requests.get(step.req_id)
            if request is None:
                continue
            if step.replace:
                request.block_ids = list(step.block_ids or ())
            elif step.block_ids:
                request.block_ids += step.block_ids
            full = min(step.computed_after, request.prompt_tokens) // self._namespace.block_size
            if request.handoff is Handoff.PRODUCE and step.computed_after >= request.prompt_tokens:
                full = len(request.keys)  # the partial last block too: the decode side needs all of it
            full = min(full, len(request.block_ids))
            if full > request.stored:
                stores.append(BlockTransfer(step.req_id, request.keys[request.stored:full],
                                            request.block_ids[request.stored:full]))
                request.stored = full
        loads, self._loads = self._loads, []
        return loads, stores

    def invalidated(self, block_ids: set[int]) -> None:
        """Blocks that failed to load are recomputed: store them again once they are."""
        for request in self._requests.values():
            for index, block_id in enumerate(request.block_ids[:request.stored]):
                if block_id in block_ids:
                    request.stored = index
                    if request.handoff is Handoff.CONSUME:
                        self._journal.record(KVOp.HANDOFF, result=HandoffResult.LOAD_FAILED.value, blocks=index)
                    break

    def finished(self, req_id: str) -> dict | None:
        """Forget the request. A producer's answer is the ``kv_transfer_params`` for its decode leg."""
        request = self._requests.pop(req_id, None)
        if request is None or request.handoff is not Handoff.PRODUCE:
            return None
        return {"do_remote_prefill": True, "prompt_tokens": request.prompt_tokens, "blocks": len(request.keys)}
