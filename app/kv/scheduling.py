"""The connector's scheduler side, without vLLM: which blocks a request can load, and which blocks
each engine step has filled and should be stored.

Only full blocks of the prompt are content-addressable. A request loads at most the blocks that leave
one prompt token to compute (vLLM must compute at least one: the load is synchronous), from where the
engine's own prefix cache stopped. A step stores the blocks it completed; blocks that were loaded or
were already in the engine's prefix cache are not stored again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from app.kv.journal import JournalWriter, KVOp
from app.kv.keys import KVNamespace, block_keys
from app.kv.store import BlockStore, StoreUnavailable


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
    keys: list[str]  # one per full prompt block
    loadable: int  # blocks a load may cover: all but the last prompt token
    block_ids: list[int] = field(default_factory=list)
    stored: int = 0  # blocks, from the first, that are in the data system or on their way
    found: tuple[int, int] | None = None  # the pending lookup: (first block, blocks found from it)


class BlockScheduler:
    def __init__(self, namespace: KVNamespace, store: BlockStore, journal: JournalWriter) -> None:
        self._namespace = namespace
        self._store = store
        self._journal = journal
        self._requests: dict[str, _Request] = {}
        self._loads: list[BlockTransfer] = []

    def lookup(self, req_id: str, prompt: Sequence[int] | None, computed: int, salt: str | None = None) -> int:
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
            request = _Request(block_keys(self._namespace, prompt, full, salt), (len(prompt) - 1) // size)
            self._requests[req_id] = request
        first = computed // size
        if request.found is not None and request.found[0] == first:
            return request.found[1] * size  # asked again: the request could not be scheduled yet
        if first >= request.loadable:
            request.found = (first, 0)  # the engine holds all it may: no lookup
            return 0
        started = time.perf_counter()
        try:
            found = self._store.present_prefix(request.keys[first:request.loadable])
        except StoreUnavailable:
            found = 0
        request.found = (first, found)
        self._journal.record(KVOp.LOOKUP, blocks=found, tokens=found * size,
                             seconds=round(time.perf_counter() - started, 6))
        return found * size

    def allocated(self, req_id: str, block_ids: Sequence[int], external_tokens: int) -> None:
        """The engine allocated the request's blocks; ``external_tokens`` of them are to be loaded."""
        request = self._requests.get(req_id)
        if request is None:
            return
        first, _ = request.found or (0, 0)
        loaded = external_tokens // self._namespace.block_size if external_tokens else 0
        if loaded:
            self._loads.append(BlockTransfer(req_id, request.keys[first:first + loaded],
                                             list(block_ids[first:first + loaded])))
        request.stored = max(request.stored, first + loaded)
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
            full = min(step.computed_after // self._namespace.block_size, len(request.keys),
                       len(request.block_ids))
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
                    break

    def finished(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
