"""How a seed publishes its rank's weights. A CPU rank moves its parameters into the data system (the
lean seed, ``move_into``); a device rank copies them to the host tier, or publishes its device tensors
as the npu tier's objects (``publish_copy``). Either way the manifest comes last (``commit``), and a
failure deletes whatever was stored and leaves a tombstone (``abandon``).

After vLLM's loader has filled the parameters from disk, a rank holds its weights once, in private
memory. Publishing copies them into the data system's shared memory. Copied whole and freed only at the
end, the rank would hold both copies, twice its weights: the 7B shape (15.2 GB in bf16) would need
30 GB on a 24 GB host. Here each parameter is copied in chunks of ``_CHUNK_BYTES``; the private pages
of each chunk go back to the kernel as soon as it is copied (``madvise(MADV_DONTNEED)``), and the
parameter is re-pointed at the published bytes before the next one starts. The rank holds its weights
once, plus one chunk.

Objects are created and sealed in batches of ``_BATCH_BYTES``; the manifest comes last (``commit``).
Whatever fails, no parameter loses a byte: each is private, or points at a read-only view of a sealed
object (which pins its memory, even after the key is deleted or the worker dies); the batch in flight
goes back to private memory, checked against its digests.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from app.weights.host_tier import HostTier, TierError, batches_by_bytes
from app.weights.identity import RankLayout, WeightKeys
from app.weights.manifest import Manifest, TensorEntry, full_digest, sampled_digest
from app.weights.npu_tier import NpuTier

if TYPE_CHECKING:
    from vllm.config import ModelConfig

logger = logging.getLogger("vllm.yrllm.seeding")

# One chunk is what the rank holds twice at a time; smaller chunks only add madvise calls.
_CHUNK_BYTES = 32 << 20
# Objects created (and so allocated in the data system) before they are sealed.
_BATCH_BYTES = 256 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MADV_DONTNEED = 4  # linux/mman.h: the pages are dropped; a later read sees zeros
_libc = ctypes.CDLL(None, use_errno=True)


def resident_bytes() -> int:
    """This process's resident anonymous and shared memory (file pages, which the kernel can drop, not
    counted): the memory a seed holds."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return sum(int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssShmem") if name in fields)


@dataclass
class Moved:
    """How far a move got; filled as it goes, so that a failed move still says what moved."""

    names: list[str] = field(default_factory=list)  # parameters now pointing at published bytes
    views: list[memoryview] = field(default_factory=list)  # their memory: keep these as long as the model
    entries: list[TensorEntry] = field(default_factory=list)
    resident_before: int = field(default_factory=resident_bytes)
    resident_peak: int = 0
    remap_seconds: float = 0.0

    def sample(self) -> None:
        self.resident_peak = max(self.resident_peak, resident_bytes())


def move_into(tier: HostTier, keys: list[str], params: list[tuple[str, torch.Tensor]], moved: Moved) -> None:
    """Publish ``params`` under ``keys`` (one each), re-pointing every parameter at its published bytes.
    Raises TierError; ``moved`` then holds the parameters of the batches sealed before the failure, and
    the failed batch's parameters are private again.

    Once its batch is sealed, a parameter is re-pointed at a read-only view of its object (``get``): only
    those hold the client's mapping of the worker's memory. A created buffer's writable view does not:
    if the worker dies and the client reconnects to its successor, the same addresses show the new
    worker's memory (measured; the engine crashed or read other objects' bytes as weights)."""
    sizes = [param.nbytes for _, param in params]
    index = 0
    for batch_keys, _ in batches_by_bytes(keys, sizes, _BATCH_BYTES):
        created, first = tier.create(batch_keys, sizes[index:index + len(batch_keys)]), index
        try:
            for _, view in created:
                name, param = params[index]
                _move(param, view, moved)
                moved.entries.append(TensorEntry(name=name, shape=tuple(param.shape), dtype=str(param.dtype),
                                                 nbytes=len(view), full=full_digest(view),
                                                 sampled=sampled_digest(view)))
                index += 1
            tier.seal(created)
            readable = tier.get(batch_keys)
        except TierError:
            _take_back(params[first:index], moved.entries[first:], moved)
            del moved.entries[first:]
            raise
        for (name, param), view in zip(params[first:index], readable):
            _point(param, view, moved)
            moved.names.append(name)
            moved.views.append(view)


def _move(param: torch.Tensor, view: memoryview, moved: Moved) -> None:
    data = param.data
    # Only a parameter that spans its whole storage, contiguously, may lose pages early; any other is
    # copied and freed as a whole when the parameter lets go of it. Such a storage is taken to be the
    # parameter's own: an alias kept elsewhere would read zeros (torch counts no users reliably). vLLM's
    # models keep none: make seedcase checks the 7B's greedy tokens against vLLM's own load.
    releasable = data.is_contiguous() and data.storage_offset() == 0 and data.untyped_storage().nbytes() == data.nbytes
    source = memoryview(data.contiguous().view(-1).view(torch.uint8).numpy())
    address, released = data.data_ptr(), -(-data.data_ptr() // _PAGE) * _PAGE  # whole pages only
    for start in range(0, len(source), _CHUNK_BYTES):
        end = min(start + _CHUNK_BYTES, len(source))
        view[start:end] = source[start:end]
        moved.sample()
        if releasable:
            released = _release(released, (address + end) // _PAGE * _PAGE)
    del source
    _point(param, view, moved)


def _take_back(params: list[tuple[str, torch.Tensor]], entries: list[TensorEntry], moved: Moved) -> None:
    """The failed batch's parameters (at most one batch) into private memory again, checked against the
    digests taken as they were copied: if the worker died and the client already mapped its successor's
    memory at the same addresses, their bytes are gone, and this engine must not serve."""
    for (name, param), entry in zip(params, entries):
        private = param.data.clone()
        if full_digest(memoryview(private.view(-1).view(torch.uint8).numpy())) != entry.full:
            raise RuntimeError(f"{name} was lost with the data system worker while the seed published it: "
                               f"this engine cannot serve (the replica is replaced)")
        _point(param, private, moved)


def _point(param: torch.Tensor, memory: memoryview | torch.Tensor, moved: Moved) -> None:
    """Make ``param`` use ``memory`` (a view of published bytes, or a private tensor of its own)."""
    started = time.perf_counter()
    if isinstance(memory, memoryview):
        with warnings.catch_warnings():  # read-only views by contract: weights are never written
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            memory = torch.frombuffer(memory, dtype=torch.uint8).view(param.dtype).view(param.shape)
    with torch.no_grad():
        param.data = memory
    moved.remap_seconds += time.perf_counter() - started


def _release(start: int, end: int) -> int:
    """Hand the private pages in [start, end) back to the kernel; returns where the next release starts."""
    if end > start and _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED):
        logger.warning("madvise failed (%s): this parameter is freed whole, after its copy",
                       os.strerror(ctypes.get_errno()))
    return max(start, end)


def publish_copy(tier: HostTier, keys: WeightKeys, layout: RankLayout, params: list[tuple[str, torch.Tensor]],
                 model_config: ModelConfig, npu: NpuTier | None = None) -> None:
    """Copy this rank's tensors to the host tier (or, with ``npu``, publish the engine's own device
    tensors as they are: they live as long as the engine), then the manifest."""
    started = time.perf_counter()
    entries, items = [], []
    for index, (name, param) in enumerate(params):
        data = memoryview(param.data.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())
        entries.append(TensorEntry(name=name, shape=tuple(param.shape), dtype=str(param.dtype),
                                   nbytes=len(data), full=full_digest(data), sampled=sampled_digest(data)))
        items.append((keys.tensor(index), data))
    if npu is None:
        tier.put(items)
    else:
        npu.publish([key for key, _ in items], [param.data for _, param in params])
    commit(tier, keys, layout, entries, model_config)
    logger.info("Published %d tensors (%.2f GB) to the data system in %.2f s", len(items),
                sum(e.nbytes for e in entries) / 1e9, time.perf_counter() - started)


def commit(tier: HostTier, keys: WeightKeys, layout: RankLayout, entries: list[TensorEntry],
           model_config: ModelConfig) -> None:
    """The manifest, on the host tier, last: only a complete entry has one."""
    import vllm

    manifest = Manifest(fingerprint=keys.fingerprint, layout=layout, vllm_version=vllm.__version__,
                        dtype=str(model_config.dtype), tensors=entries)
    tier.put([(keys.manifest, memoryview(manifest.model_dump_json().encode()))])


def abandon(tier: HostTier, keys: WeightKeys, count: int, seed: str, npu: NpuTier | None = None) -> None:
    """No half entry left behind: whatever was stored goes (readers' views keep their memory), and a
    tombstone tells the replicas awaiting this seed to stop waiting now. Best effort: the data system
    may be what failed; the WeightCache abandons the entry too when the seed reports."""
    try:
        (npu or tier).delete(keys.tensors(count))
        tier.delete([keys.manifest])
        tier.put([(keys.abandoned(seed), memoryview(b"1"))])
    except TierError as exc:
        logger.warning("could not clear the failed publish of %s: %s", keys.prefix, exc)
