"""The WeightCache: who holds which weights where, and how a new replica should get them.

One entry per weight identity (fingerprint). ``plan`` is single-flight: the first replica of an
identity nobody holds becomes the *seed* (loads from disk, publishes); every replica planned while
that seed is loading is told to await it (its engine starts in parallel and its loader waits for the
seed's manifest), then maps or pulls. Exactly one cold load per identity, and the followers' process
start-up overlaps the seed's load instead of queueing behind it.

Entries know their copies per node (data system worker). The seed's node is the entry's *home*. The
first replica on another node is planned to *fetch*: it relays the node a copy of its own from a
source node (``app.weights.relay``), and maps that. Replicas planned onto that node while it fetches
await its copy (single-flight per node), and every later one maps the local copy: one transfer per node.

Sources form chains, not a star: a new copy reads from the copy with the fewest relays reading from
it now, the newest on a tie. Nodes that need the weights at once line up home -> 2 -> 3 -> 4, each
relaying batches on as they land, so no link carries more than one copy each way. The plan names the
chain back to the home: a source that dies mid-relay costs a switch to the one before it. Cut-off
nodes (``set_reachable``) are no source; after a worker restarts or a node rejoins, ``revalidate``
checks every copy key by key (the data system can lose keys of other nodes then: REFERENCE.md) and
drops what is incomplete, so a half copy is never mapped.

The cache owns the entries, not the engines: host-tier objects in the data system outlive the engine
that published them, so the seed replica can be scaled in and the cache stays. Entries are freed on
``retire`` and ``clear`` (App shutdown), and when they cannot serve: a replica planned to map or pull a
ready entry that had to load from disk instead (checksum or manifest mismatch, missing object, data
system gone) retires it, so the next replica seeds again instead of every later one falling back.
``forget_node`` drops what died with a node's worker."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pydantic import BaseModel

from app.replica import Node
from app.weights.entries import CacheEntry, CopyState, EntryObjects, EntryState, NodeCopy
from app.weights.identity import WeightIdentity
from app.weights.load_report import LoadReport, PlanKind, WeightSource
from app.weights.manifest import VerifyMode
from app.weights.plan import WeightPlan

logger = logging.getLogger(__name__)


class CacheStats(BaseModel):
    hits: int = 0  # replicas planned to map/pull
    misses: int = 0  # replicas planned to seed (cold loads)
    fallbacks: int = 0  # replicas that were planned to map/pull but loaded from disk
    retired: int = 0  # entries freed because they could not serve, or died with the data system
    bytes_served: int = 0  # weight bytes replicas took from the data system
    fetches: int = 0  # replicas that brought a node its first copy, across nodes
    bytes_fetched: int = 0  # weight bytes those fetches read across nodes


class WeightCache:
    """Thread-safe; one instance behind the WeightCache actor."""

    def __init__(self, ds_address: str, *, tier: str = "host", cpu_mode: PlanKind = PlanKind.MAP,
                 verify: VerifyMode = VerifyMode.SAMPLED, timeout_ms: int = 5000,
                 await_seed_s: float = 600.0, fanout: str = "chain") -> None:
        if cpu_mode not in (PlanKind.MAP, PlanKind.PULL) or fanout not in ("chain", "star"):
            raise ValueError(f"cpu_mode must be map or pull and fanout chain or star, got {cpu_mode}, {fanout}")
        self._star = fanout == "star"
        self._tier_name = tier
        self._cpu_mode = cpu_mode
        self._verify = verify
        self._timeout_ms = timeout_ms
        self._await_seed_s = await_seed_s
        self._entries: dict[str, CacheEntry] = {}
        self._planned: dict[str, CacheEntry] = {}  # replica id -> the entry it was planned on
        self._unreachable: set[str] = set()  # nodes cut off: no source for a relay
        self._stats = CacheStats()
        self._lock = threading.Lock()
        self._objects = EntryObjects(ds_address, timeout_ms)

    def plan(self, identity: WeightIdentity, replica_id: str, node: Node, report_path: Path) -> WeightPlan:
        fingerprint = identity.fingerprint
        fetch_from, fetcher, seed_replica, await_seed_s, await_fetch_s = None, None, None, 0.0, 0.0
        fallbacks: list[str] = []
        home, reason = node.name, None
        with self._lock:
            entry = self._entries.get(fingerprint)
            if entry is None:
                entry = self._entries[fingerprint] = CacheEntry(identity, replica_id, home=node.name)
                entry.copies[node.name] = NodeCopy(CopyState.SEEDING, replica_id)
                self._stats.misses += 1
                kind = PlanKind.SEED
            else:
                home = entry.home
                # Device objects are pulled device to device; only host memory can be mapped.
                kind = self._cpu_mode if self._tier_name == "host" else PlanKind.PULL
                if entry.state is EntryState.SEEDING:
                    seed_replica, await_seed_s = entry.seed_replica, self._await_seed_s
                copy = entry.copies.get(node.name)
                if copy is None:  # the first replica on this node brings the copy
                    chain = entry.relay_chain(node.name, self._unreachable, star=self._star)
                    if chain:
                        entry.copies[node.name] = NodeCopy(CopyState.FETCHING, replica_id, source=chain[0])
                        entry.fetchers[replica_id] = node.name
                        fetch_from, fallbacks = chain[0], chain[1:]
                    else:  # no hit: nothing of this entry is planned for it
                        kind, reason = PlanKind.DISK, "every copy of the weights is on an unreachable node"
                        seed_replica, await_seed_s = None, 0.0
                elif copy.state is CopyState.FETCHING:
                    fetcher, await_fetch_s = copy.by, self._await_seed_s
                if kind is not PlanKind.DISK:
                    self._stats.hits += 1
                    entry.readers.add(replica_id)
            if kind is not PlanKind.DISK:
                self._planned[replica_id] = entry
        how = kind.value + (f" after relaying from {' then '.join([fetch_from, *fallbacks])}" if fetch_from else "")
        waits = (f" (awaiting the seed {seed_replica})" if seed_replica
                 else f" (awaiting {fetcher}'s fetch)" if fetcher else "")
        logger.info("weight plan for %s on %s: %s%s", replica_id, node.name, how, waits)
        return WeightPlan(kind=kind, replica_id=replica_id, fingerprint=fingerprint, tier=self._tier_name,
                          node=node.name, ds_address=node.ds_address, fetch_from=fetch_from,
                          fetch_fallbacks=fallbacks, home=home, reason=reason, verify=self._verify,
                          timeout_ms=self._timeout_ms, seed_replica=seed_replica, await_seed_s=await_seed_s,
                          await_fetch_s=await_fetch_s, fetcher=fetcher, report_path=report_path)

    def report(self, report: LoadReport) -> str | None:
        """Record how a planned replica's load went. Returns why the entry was retired, if this report
        retired it (a ready entry that could not serve this replica)."""
        with self._lock:
            if report.replica_id not in self._planned:
                return None
            follower = report.plan is not PlanKind.SEED
            if follower and report.source is WeightSource.DISK:
                self._stats.fallbacks += 1
            elif follower:
                self._stats.bytes_served += report.bytes
            if report.fetched_from is not None:
                self._stats.fetches += 1
                self._stats.bytes_fetched += report.bytes
            entry = self._current_locked(report.replica_id)
            if entry is None:  # retired, abandoned or forgotten since this replica was planned
                return None
            fingerprint = entry.identity.fingerprint
            if not follower:
                if report.fallback_reason is None:
                    entry.copies[entry.home].state, entry.bytes = CopyState.READY, report.bytes
                    entry.readers.add(report.replica_id)
                else:
                    self._abandon_locked(fingerprint, entry)
                return None
            copy = entry.copies.get(report.node or "")
            if copy is not None and copy.by == report.replica_id and copy.state is CopyState.FETCHING:
                if report.source is not WeightSource.DISK:
                    copy.state = CopyState.READY
                else:
                    del entry.copies[report.node or ""]  # the next replica on that node fetches again
            if report.source is not WeightSource.DISK or entry.state is not EntryState.READY:
                return None  # served; or its seed failed: abandoned, or about to be
            del self._entries[fingerprint]
            self._stats.retired += 1
        reason = f"{report.replica_id} could not use it: {report.fallback_reason}"
        logger.warning("weight entry %s retired; the next replica seeds again (%s)", fingerprint, reason)
        self._objects.delete(entry)
        return reason

    def abandon(self, replica_id: str) -> None:
        """A planned replica never reported (its engine failed). If it was the seed, the entry goes,
        and replicas awaiting it are told (they load from disk); the next plan seeds again."""
        with self._lock:
            entry = self._current_locked(replica_id)
            self._planned.pop(replica_id, None)
            if entry is None:
                return
            if entry.state is EntryState.SEEDING and entry.seed_replica == replica_id:
                self._abandon_locked(entry.identity.fingerprint, entry)
                return
            entry.readers.discard(replica_id)
            stalled = [name for name, copy in entry.copies.items()
                       if copy.by == replica_id and copy.state is CopyState.FETCHING]
            for name in stalled:
                del entry.copies[name]
        if stalled:  # its node fetches again with the next replica; those waiting for it stop now
            self._objects.mark_fetch_failed(entry, replica_id)
            for name in stalled:  # what it relayed before it died
                self._objects.delete_copy(entry, name)

    def release(self, replica_id: str) -> None:
        """A replica stopped; the entry stays (the cache, not the replica, owns it)."""
        with self._lock:
            entry = self._current_locked(replica_id)
            self._planned.pop(replica_id, None)
            if entry is not None:
                entry.readers.discard(replica_id)

    def retire(self, fingerprint: str) -> bool:
        """Free an entry and its data system objects. Replicas that mapped it keep their pages (the
        data system does not pull memory from under a reader)."""
        with self._lock:
            entry = self._entries.pop(fingerprint, None)
        if entry is None:
            return False
        self._objects.delete(entry)
        return True

    def forget_node(self, node: str) -> int:
        """The worker of ``node`` died, and a fresh one holds nothing: drop the entries it was home to
        (their objects are gone, and the other nodes' copies with them) and its copies of the others,
        without touching the data system. Returns how many entries were dropped."""
        with self._lock:
            homed = [fp for fp, entry in self._entries.items() if entry.home == node]
            for fingerprint in homed:
                del self._entries[fingerprint]
            for entry in self._entries.values():
                entry.copies.pop(node, None)
            self._stats.retired += len(homed)
        return len(homed)

    def clear(self) -> None:
        for fingerprint in list(self._entries):
            self.retire(fingerprint)

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {**self._stats.model_dump(), "entries": [
                {"fingerprint": fp, "state": e.state.value, "seed_replica": e.seed_replica, "home": e.home,
                 "nodes": {name: copy.state.value for name, copy in e.copies.items()},
                 "sources": {name: copy.source for name, copy in e.copies.items() if copy.source},
                 "readers": sorted(e.readers), "bytes": e.bytes} for fp, e in self._entries.items()]}

    def set_reachable(self, node: str, reachable: bool) -> None:
        """A node was cut off (its copies are no source until it is back) or is back (call
        ``revalidate`` then: its copies may have lost keys meanwhile)."""
        with self._lock:
            if reachable:
                self._unreachable.discard(node)
            else:
                self._unreachable.add(node)

    def revalidate(self) -> list[str]:
        """Check every ready copy key by key and drop what is incomplete: a node's copy goes (the next
        replica there relays it again), an incomplete home copy takes its entry with it (the next
        replica seeds again). After a worker restart or a node's rejoin the data system may have lost
        keys of other nodes whose bytes it still holds. Returns what was dropped, as sentences."""
        with self._lock:
            checks = [(entry, name) for entry in self._entries.values() for name, copy in entry.copies.items()
                      if copy.state is CopyState.READY]
        dropped, doomed = [], []
        for entry, name in checks:
            missing = self._objects.missing_keys(entry, name)
            if not missing:
                continue
            fingerprint = entry.identity.fingerprint
            with self._lock:
                if self._entries.get(fingerprint) is not entry:
                    continue
                if name == entry.home:
                    del self._entries[fingerprint]
                    self._stats.retired += 1
                    doomed.append(entry)
                else:
                    entry.copies.pop(name, None)
            what = "its entry retired" if name == entry.home else "dropped"
            dropped.append(f"{fingerprint[:12]} on {name}: {missing} keys missing, {what}")
            logger.warning("weight copy %s", dropped[-1])
            if name != entry.home:
                self._objects.delete_copy(entry, name)
        for entry in doomed:
            self._objects.delete(entry)
        return dropped

    def _current_locked(self, replica_id: str) -> CacheEntry | None:
        """The entry ``replica_id`` was planned on, if it is still the live one of its identity (not
        retired, abandoned or forgotten since, and not replaced by a newer seed)."""
        entry = self._planned.get(replica_id)
        if entry is not None and self._entries.get(entry.identity.fingerprint) is entry:
            return entry
        return None

    def _abandon_locked(self, fingerprint: str, entry: CacheEntry) -> None:
        del self._entries[fingerprint]
        self._objects.mark_abandoned(entry)
        self._objects.delete(entry, keep_tombstones=True)
