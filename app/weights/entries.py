"""A WeightCache entry (who holds one weight identity, on which nodes) and its objects in the data
system: the markers a seed or relay leaves, the keys of each copy, and their deletion and checking.
The WeightCache decides; ``EntryObjects`` touches the data system for it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable

from app.weights.host_tier import HostTier, TierError
from app.weights.identity import RankLayout, WeightIdentity, WeightKeys
from app.weights.manifest import Manifest

logger = logging.getLogger(__name__)


class EntryState(str, Enum):
    SEEDING = "seeding"  # a seed replica is loading from disk and will publish
    READY = "ready"  # complete in the data system; replicas map or pull it


class CopyState(str, Enum):
    """One node's copy of an entry."""

    SEEDING = "seeding"  # the home node: its seed is loading from disk
    FETCHING = "fetching"  # the first replica on this node reads the weights across
    READY = "ready"  # this node's worker holds them


@dataclass
class NodeCopy:
    state: CopyState
    by: str  # the replica that seeds or fetches it
    source: str | None = None  # the node it is relayed from; None for the home's


@dataclass
class CacheEntry:
    identity: WeightIdentity
    seed_replica: str
    home: str  # the seed's node: the one that published, where other nodes fetch from
    copies: dict[str, NodeCopy] = field(default_factory=dict)  # node name -> its copy
    readers: set[str] = field(default_factory=set)
    fetchers: dict[str, str] = field(default_factory=dict)  # every replica planned to fetch -> its node
    bytes: int = 0

    @property
    def state(self) -> EntryState:
        return EntryState.READY if self.copies[self.home].state is CopyState.READY else EntryState.SEEDING

    def relay_chain(self, node: str, unreachable: set[str], star: bool = False) -> list[str]:
        """Where ``node``'s new copy relays from: the reachable copy with the fewest relays reading
        from it now, the newest on a tie (``star``: the home, always); then the copies that one relays
        from, back to the home (the fallbacks if it fails). Empty if no copy is reachable."""
        copies = [name for name in self.copies if name != node and name not in unreachable]
        if star:
            copies = [name for name in copies if name == self.home]
        if not copies:
            return []

        def readers(name: str) -> int:
            return sum(c.state is CopyState.FETCHING and c.source == name for c in self.copies.values())

        source = min(reversed(copies), key=readers)  # min keeps the first of equals: the newest
        chain, name = [source], source
        # A copy dropped and relayed again may name a source downstream of its old self: stop at a loop.
        while (name := self.copies[name].source) in self.copies and name not in chain:
            if name not in unreachable:
                chain.append(name)
        if self.home not in chain and self.home in self.copies and self.home not in unreachable:
            chain.append(self.home)  # the chain was cut where a copy was dropped
        return chain


class EntryObjects:
    """An entry's objects, through one client of the data system (made on first use)."""

    def __init__(self, ds_address: str, timeout_ms: int) -> None:
        self._ds_address = ds_address
        self._timeout_ms = timeout_ms
        self._tier: HostTier | None = None

    def mark_abandoned(self, entry: CacheEntry) -> None:
        """Tombstones for a seed that failed: replicas awaiting it stop."""
        for layout in layouts(entry.identity):
            try:
                self._host().put([(WeightKeys(entry.identity.fingerprint, layout).abandoned(entry.seed_replica),
                                   memoryview(b"1"))])
            except TierError as exc:
                logger.warning("could not mark the failed seed of %s: %s", entry.identity.fingerprint, exc)

    def mark_fetch_failed(self, entry: CacheEntry, fetcher: str) -> None:
        for layout in layouts(entry.identity):
            marker = WeightKeys(entry.identity.fingerprint, layout).fetch_failed(entry.fetchers[fetcher], fetcher)
            try:
                self._host().put([(marker, memoryview(b"1"))])
            except TierError as exc:
                logger.warning("could not mark %s's failed fetch: %s", fetcher, exc)

    def delete(self, entry: CacheEntry, keep_tombstones: bool = False) -> None:
        fingerprint = entry.identity.fingerprint
        relayed = set(entry.copies) | set(entry.fetchers.values())
        relayed.discard(entry.home)
        for layout in layouts(entry.identity):
            keys = WeightKeys(fingerprint, layout)
            count = self._tensor_count(keys, relayed)
            copies = [keys, *(keys.on(node) for node in sorted(relayed))]
            # Without a manifest nothing but manifests is findable.
            doomed = [key for copy in copies for key in (copy.copy_keys(count) if count else [copy.manifest])]
            doomed += [marker for fetcher, node in entry.fetchers.items()
                       for marker in (keys.landed(node, fetcher), keys.fetch_failed(node, fetcher))]
            if not keep_tombstones:
                doomed.append(keys.abandoned(entry.seed_replica))
            try:
                self._host().delete(doomed)
            except TierError as exc:
                logger.warning("could not free %s: %s", keys.prefix, exc)

    def delete_copy(self, entry: CacheEntry, node: str) -> None:
        """Free ``node``'s relayed copy (not the home's) of every rank, whole or partial."""
        for layout in layouts(entry.identity):
            keys = WeightKeys(entry.identity.fingerprint, layout)
            count = self._tensor_count(keys, [node])
            try:
                self._host().delete(keys.on(node).copy_keys(count) if count else [keys.on(node).manifest])
            except TierError as exc:
                logger.warning("could not free %s: %s", keys.on(node).prefix, exc)

    def missing_keys(self, entry: CacheEntry, node: str) -> int:
        """How many keys of ``node``'s copy (every rank's tensors and manifest) the data system lacks."""
        missing = 0
        for layout in layouts(entry.identity):
            keys = WeightKeys(entry.identity.fingerprint, layout)
            copy = keys if node == entry.home else keys.on(node)
            count = self._tensor_count(keys, entry.copies)
            try:
                missing += (1 if count is None else
                            sum(not present for present in self._host().exists(copy.copy_keys(count))))
            except TierError as exc:
                logger.warning("could not check %s: %s", copy.prefix, exc)
        return missing

    def _tensor_count(self, keys: WeightKeys, nodes: Iterable[str]) -> int | None:
        """The tensors in one rank's entry (``keys``: the seed's), from the first manifest that reads: the
        seed's, or one of ``nodes``' copies'."""
        for copy in [keys, *(keys.on(node) for node in nodes)]:
            try:
                return len(Manifest.model_validate_json(bytes(self._host().get([copy.manifest])[0])).tensors)
            except (TierError, ValueError):
                continue
        return None

    def _host(self) -> HostTier:
        if self._tier is None:
            self._tier = HostTier(self._ds_address, self._timeout_ms)
        return self._tier


def layouts(identity: WeightIdentity) -> list[RankLayout]:
    return [RankLayout(tp_rank=tp, tp_size=identity.tp_size, pp_rank=pp, pp_size=identity.pp_size)
            for pp in range(identity.pp_size) for tp in range(identity.tp_size)]
