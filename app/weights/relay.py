"""A node's copy of the weights, relayed from another node's copy piece by piece, pipelined.

The first replica on a node brings the node its copy: it reads a source node's keys through its own
worker (the bytes cross the link once), copies each piece into objects under its own node's keys
(``WeightKeys.on``) and seals them, the copy's manifest last. A piece is a batch of whole tensors or
one part of a tensor larger than a batch; a large tensor's object is sealed with its last part, and
each part is sealed meanwhile as a transit chunk of its own. A writer thread stores each piece while
the next is read (``_Writer``). A node after it in a chain reads those keys as soon as they are
sealed, so node k+1 reads a piece from node k about two pieces behind it: the time to N nodes stays
close to the time to one, where a star would push N copies through the seed's link. The WeightCache
plans who relays from whom (``app.weights.cache``).

Why a copy of our own, not the worker's: a reader cannot choose which worker serves a key, and a
read on a third node takes about half the bytes from each holder whatever the links
(REFERENCE.md). Keys that only one worker holds make the source explicit. The App's workers run
without data replication, so a read across leaves no second copy beside the relayed one.

A source that fails (a read error or timeout, or a piece not sealed within its timeout: the node
died, or was cut off) costs a switch to the next source of the plan, the one it relayed from, from
the same piece. With none left the relay fails with every reason, and the loader reads the disk.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field

import torch
from vllm.logger import init_logger

from app.weights.host_tier import HostTier, TierError
from app.weights.identity import WeightKeys
from app.weights.manifest import Manifest
from app.weights.plan import WeightPlan

logger = init_logger("vllm.yrllm.loader")

# Small enough that a node downstream starts within a fraction of a second, large enough that a call's
# overhead (about a millisecond) does not count.
BATCH_BYTES = 64 << 20
# A batch gets the plan's timeout, or what it takes at this rate if that is longer (a tensor larger
# than a batch): several relays may share one shaped link, and only a dead source may trip it.
SLOWEST_BYTES_PER_S = 20e6
_POLL_S = 0.02


@dataclass
class Relayed:
    source: str  # the node the last batch came from
    failovers: list[str] = field(default_factory=list)  # "node: why" for each source given up
    seconds: float = 0.0
    read_seconds: float = 0.0  # of which waiting for reads: the link, or a source still relaying


@dataclass(frozen=True)
class _Piece:
    """What the relay moves at a time: whole tensors (a batch), or one part of a tensor larger than a batch."""

    tensors: tuple[int, ...] = ()
    tensor: int = -1  # a part: of this tensor
    part: int = 0
    offset: int = 0
    nbytes: int = 0
    last: bool = False  # the tensor's last part


def _pieces(sizes: list[int]) -> list[_Piece]:
    """Whole tensors in batches of at most BATCH_BYTES, in order; a larger tensor in parts of that size.

    Parts are what keep a chain in step: a node passes a tensor on part by part, so each hop lags the
    one before it by one part, not by the largest tensor (the 0.5B shape's embedding is 27 % of it)."""
    pieces: list[_Piece] = []
    batch: list[int] = []
    for index, size in enumerate(sizes):
        if size > BATCH_BYTES:
            starts = range(0, size, BATCH_BYTES)
            pieces += [_Piece(tensor=index, part=part, offset=start, nbytes=min(BATCH_BYTES, size - start),
                              last=part == len(starts) - 1) for part, start in enumerate(starts)]
            continue
        if batch and sum(sizes[i] for i in batch) + size > BATCH_BYTES:
            pieces.append(_Piece(tensors=tuple(batch), nbytes=sum(sizes[i] for i in batch)))
            batch = []
        batch.append(index)
    if batch:
        pieces.append(_Piece(tensors=tuple(batch), nbytes=sum(sizes[i] for i in batch)))
    return pieces


def relay(tier: HostTier, store: HostTier, keys: WeightKeys, plan: WeightPlan, manifest: Manifest) -> Relayed:
    """Bring ``plan.node`` its copy of the entry ``keys`` from ``plan.sources``; see the module docstring.
    ``tier`` reads (its calls bounded by the plan's timeouts), ``store`` writes into this node's worker
    (a client with a longer timeout: on 2 busy cores a seal once took more than 5 s). Raises TierError,
    having removed what it created."""
    started, own = time.perf_counter(), keys.on(plan.node)
    sizes = [entry.nbytes for entry in manifest.tensors]
    logger.info("Relaying %d tensors (%.2f GB) onto %s from %s", len(sizes), sum(sizes) / 1e9, plan.node,
                " then ".join(plan.sources))
    state, pieces = _Sources(keys, plan), _pieces(sizes)
    everything = own.copy_keys(len(sizes)) + [own.chunk(p.tensor, p.part) for p in pieces if not p.tensors]
    read_s = 0.0
    try:
        _remove(store, everything)  # what a relay onto this node that died left
        with _Writer(store, own, sizes) as writer:
            for piece in pieces:
                reading = time.perf_counter()
                views = state.read(tier, piece)
                read_s += time.perf_counter() - reading
                writer.store(piece, views)
        store.put([(own.manifest, memoryview(manifest.model_dump_json().encode()))])
    except TierError:
        _remove(store, everything)
        raise
    seconds = time.perf_counter() - started
    logger.info("Relayed %.2f GB onto %s from %s in %.2f s (%.2f GB/s; %.2f s of it reading)", sum(sizes) / 1e9,
                plan.node, state.sources[0], seconds, sum(sizes) / 1e9 / seconds, read_s)
    return Relayed(state.sources[0], state.failovers, seconds, read_s)


class _Writer:
    """Stores the pieces into this node's objects, in order, in a thread of its own, while the relay
    reads the next piece: the copy into shared memory (its page faults) overlaps the read.

    The data system client's read holds the GIL for as long as it runs (FINDINGS.md), so a thread
    that is not yet inside a copy when a read begins waits for the whole read. ``store`` therefore
    hands a piece over and returns only once the writer is inside its first copy (which lets go of
    the GIL); the writer's seals, which need the GIL, then wait at most for that one read. At most two
    pieces are held: the one stored and the one read."""

    def __init__(self, tier: HostTier, own: WeightKeys, sizes: list[int]) -> None:
        self._tier, self._own, self._sizes = tier, own, sizes
        self._open: dict[int, tuple[object, memoryview]] = {}  # large tensors being filled part by part
        self._handed = threading.Semaphore(0)  # a piece is there to store
        self._copying = threading.Semaphore(0)  # the writer took it: inside its copy, or done
        self._piece: tuple[_Piece, list[memoryview]] | None = None  # handed over, not yet taken
        self._waiting = False  # the reader waits for the piece taken to begin its copy
        self._error: TierError | None = None
        self._thread = threading.Thread(target=self._run, name="relay-writer", daemon=True)

    def __enter__(self) -> "_Writer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._piece = None
        self._handed.release()  # None: no more pieces
        self._thread.join()
        if self._error is not None and exc_info[0] is None:
            raise self._error

    def store(self, piece: _Piece, views: list[memoryview]) -> None:
        """Hand ``piece`` over once the previous one is sealed; returns once its copy has begun.
        Raises the TierError that stopped the writer."""
        if self._error is not None:
            raise self._error
        self._piece = (piece, views)
        self._handed.release()
        self._copying.acquire()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            self._handed.acquire()
            handed, self._piece = self._piece, None
            if handed is None:
                return
            piece, views = handed
            self._waiting = True
            try:
                if self._error is not None:
                    continue  # the reader raises it; the finally below frees it if it waits
                if piece.tensors:
                    self._store([self._own.tensor(i) for i in piece.tensors], views)
                else:
                    self._store_part(piece, views[0])
            except Exception as exc:  # noqa: BLE001 - any: a writer that died silently would hang the reader
                self._error = exc if isinstance(exc, TierError) else TierError(f"storing a piece failed: {exc!r}")
            finally:
                self._began()  # a piece that failed before its copy frees the reader too

    def _began(self) -> None:
        """The piece's first copy begins: the reader may read the next (once per piece)."""
        if self._waiting:
            self._waiting = False
            self._copying.release()

    def _store(self, names: list[str], views: list[memoryview]) -> None:
        created = self._tier.create(names, [len(view) for view in views])
        self._copy(views, [target for _, target in created])
        self._tier.seal(created)

    def _store_part(self, piece: _Piece, view: memoryview) -> None:
        """Copy a part into its tensor's object (sealed with the last part), and into a transit chunk
        of its own, sealed for the next node meanwhile; the chunks go once the whole tensor is sealed."""
        own = self._own
        if piece.part == 0:
            self._open[piece.tensor] = self._tier.create([own.tensor(piece.tensor)], [self._sizes[piece.tensor]])[0]
        chunk = self._tier.create([own.chunk(piece.tensor, piece.part)], [piece.nbytes])
        self._copy([view, view], [self._open[piece.tensor][1][piece.offset:piece.offset + piece.nbytes], chunk[0][1]])
        self._tier.seal(chunk)
        if piece.last:
            self._tier.seal([self._open.pop(piece.tensor)])
            _remove(self._tier, [own.chunk(piece.tensor, part) for part in range(piece.part + 1)])

    def _copy(self, views: list[memoryview], targets: list[memoryview]) -> None:
        """One torch call for the piece's copies, not ``target[:] = view``: it lets go of the GIL for
        all of them (one call per tensor would wait for the reader's read between tensors), and
        spreads a large copy over the cores."""
        with warnings.catch_warnings():  # the source views are read-only; they are only read
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            sources = [torch.frombuffer(view, dtype=torch.uint8) for view in views]
            destinations = [torch.frombuffer(target, dtype=torch.uint8) for target in targets]
        self._began()
        torch._foreach_copy_(destinations, sources)


class _Sources:
    """The sources left to read from, the current first, and those given up with why."""

    def __init__(self, keys: WeightKeys, plan: WeightPlan) -> None:
        self._keys = keys
        self._plan = plan
        self.sources = list(plan.sources)
        self.failovers: list[str] = []

    def read(self, tier: HostTier, piece: _Piece) -> list[memoryview]:
        """One piece's bytes, from the current source or, when it fails, the next ones in turn."""
        timeout_ms = max(self._plan.timeout_ms, int(piece.nbytes / SLOWEST_BYTES_PER_S * 1000))
        while self.sources:
            node = self.sources[0]
            source = self._keys if node == self._plan.home_node else self._keys.on(node)
            try:
                return _read_when_sealed(tier, source, piece, timeout_ms)
            except TierError as exc:
                self.failovers.append(f"{self.sources.pop(0)}: {exc}")
                logger.warning("Relaying from %s failed; going on from %s", self.failovers[-1],
                               self.sources[0] if self.sources else "nowhere")
        raise TierError("every source failed: " + "; ".join(self.failovers))


def _read_when_sealed(tier: HostTier, source: WeightKeys, piece: _Piece, timeout_ms: int) -> list[memoryview]:
    """A piece's bytes once the source has them sealed, read within ``timeout_ms``. A source still
    relaying seals its batches as they land, and a large tensor's parts as transit chunks until the
    whole tensor is sealed, when the chunks go: a part is read from whichever is there."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        if piece.tensors:
            names = [source.tensor(i) for i in piece.tensors]
            if all(tier.exists(names)):
                return tier.get(names, timeout_ms=timeout_ms)
        else:
            whole, chunk = tier.exists([source.tensor(piece.tensor), source.chunk(piece.tensor, piece.part)])
            try:
                if whole:
                    return [tier.read_range(source.tensor(piece.tensor), piece.offset, piece.nbytes)]
                if chunk:
                    return tier.get([source.chunk(piece.tensor, piece.part)], timeout_ms=timeout_ms)
            except TierError:
                if time.monotonic() > deadline:  # else: the chunk went as the whole tensor was sealed
                    raise
        if time.monotonic() > deadline:
            what = f"tensor {piece.tensors[0]}.." if piece.tensors else f"part {piece.part} of tensor {piece.tensor}"
            raise TierError(f"{what} not there within {timeout_ms / 1000:.0f} s")
        time.sleep(_POLL_S)


def _remove(tier: HostTier, names: list[str]) -> None:
    """Delete those of ``names`` that exist (best effort: a later relay onto this node deletes them too)."""
    try:
        present = [name for name, there in zip(names, tier.exists(names)) if there]
        if present:
            tier.delete(present)
    except TierError as exc:
        logger.warning("could not remove %s..: %s", names[0], exc)
