"""A node's copy of the weights, relayed from another node's copy batch by batch, pipelined.

The first replica on a node brings the node its copy: it reads a source node's keys through its own
worker (the bytes cross the link once), copies each batch into objects under its own node's keys
(``WeightKeys.on``) and seals them, the copy's manifest last. A node after it in a chain reads those
keys as soon as they are sealed, so node k+1 reads batch i from node k while node k reads batch i+1:
the time to N nodes stays close to the time to one, where a star would push N copies through the
seed's link. The WeightCache plans who relays from whom (``app.weights.cache``).

Why a copy of our own, not the worker's: a reader cannot choose which worker serves a key, and a
read on a third node takes about half the bytes from each holder whatever the links
(REFERENCE.md). Keys that only one worker holds make the source explicit. The App's workers run
without data replication, so a read across leaves no second copy beside the relayed one.

A source that fails (a read error or timeout, or a batch not sealed within a batch's timeout: the
node died, or was cut off) costs a switch to the next source of the plan, the one it relayed from,
from the same batch. With none left the relay fails with every reason, and the loader reads the disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vllm.logger import init_logger

from app.weights.host_tier import HostTier, TierError, batches_by_bytes
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


def relay(tier: HostTier, keys: WeightKeys, plan: WeightPlan, manifest: Manifest) -> Relayed:
    """Bring ``plan.node`` its copy of the entry ``keys`` from ``plan.sources``; see the module docstring.
    Raises TierError, having removed what it created."""
    started, own = time.perf_counter(), keys.on(plan.node)
    sizes = [entry.nbytes for entry in manifest.tensors]
    sources, failovers = list(plan.sources), []
    logger.info("Relaying %d tensors (%.2f GB) onto %s from %s", len(sizes), sum(sizes) / 1e9, plan.node,
                " then ".join(sources))
    try:
        if any(tier.exists(own.copy_keys(len(sizes)))):  # left by a relay onto this node that died
            _remove(tier, own, len(sizes))
        for indices, nbytes in batches_by_bytes(list(range(len(sizes))), sizes, BATCH_BYTES):
            timeout_ms = max(plan.timeout_ms, int(nbytes / SLOWEST_BYTES_PER_S * 1000))
            while True:
                source = keys if sources[0] == plan.home_node else keys.on(sources[0])
                try:
                    views = _read_when_sealed(tier, [source.tensor(i) for i in indices], timeout_ms)
                    break
                except TierError as exc:
                    failovers.append(f"{sources.pop(0)}: {exc}")
                    if not sources:
                        raise TierError("every source failed: " + "; ".join(failovers)) from None
                    logger.warning("Relaying from %s failed (%s); going on from %s at tensor %d", failovers[-1],
                                   exc, sources[0], indices[0])
            created = tier.create([own.tensor(i) for i in indices], [sizes[i] for i in indices])
            for (_, target), view in zip(created, views):
                target[:] = view
            tier.seal(created)
        tier.put([(own.manifest, memoryview(manifest.model_dump_json().encode()))])
    except TierError:
        _remove(tier, own, len(sizes))
        raise
    seconds = time.perf_counter() - started
    logger.info("Relayed %.2f GB onto %s from %s in %.2f s (%.2f GB/s)", sum(sizes) / 1e9, plan.node, sources[0],
                seconds, sum(sizes) / 1e9 / seconds)
    return Relayed(sources[0], failovers, seconds)


def _read_when_sealed(tier: HostTier, names: list[str], timeout_ms: int) -> list:
    """The values of ``names`` once the source has sealed them all (a source still relaying seals
    them as its own batches land), read within ``timeout_ms``."""
    deadline = time.monotonic() + timeout_ms / 1000
    while not all(tier.exists(names)):
        if time.monotonic() > deadline:
            raise TierError(f"{names[0]}.. not there within {timeout_ms / 1000:.0f} s")
        time.sleep(_POLL_S)
    return tier.get(names, timeout_ms=timeout_ms)


def _remove(tier: HostTier, own: WeightKeys, tensors: int) -> None:
    """Best effort: a later relay onto this node creates the same keys again."""
    try:
        tier.delete(own.copy_keys(tensors))
    except TierError as exc:
        logger.warning("could not remove the partial copy %s: %s", own.prefix, exc)
