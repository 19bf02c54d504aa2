"""The memory a local App needs, computed from the model before anything starts.

The data system worker's shared memory must hold the weights (once per rank layout the pools use: a
disaggregated App with PTP=2 and DTP=1 holds two copies), the KV blocks it keeps (``kv.capacity_gb``)
and some headroom; unset, ``runtime.ds_shared_memory_mb`` is sized to exactly that. The host must hold
that, the replicas started at start-up (their KV caches and vLLM's own memory, per rank), and the App's
own processes. If it cannot, start-up fails now, with the numbers, instead of a replica being OOM-killed
half way through loading the weights.

The weights' bytes come from the checkpoint's safetensors headers (a few KB read per file), in the
dtype the engines serve. The allowances for vLLM and the App are round upper bounds of what the App's
footprint measured on this project's machine kind (``make seedcase``, the 7B shape at PTP=2).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pydantic import BaseModel, computed_field

from app.config import AppConfig, RuntimeMode
from app.config_sources import ConfigError
from app.host_memory import mem_available

GB = 1_000_000_000
MB = 1 << 20
# vLLM's own memory per engine rank beyond its weights and KV cache (activations, the process, the
# torch and vLLM it imported): a replica of two ranks with 0.25 GiB of KV cache each held 1.49-1.53 GB
# PSS, about 0.5 GB per rank beyond its KV cache, doubled here.
ENGINE_RANK_BYTES = 1 * GB
# The driver and Router with the zygote (0.41 GB PSS in the same run), each data system worker (0.23 GB).
APP_BYTES, WORKER_BYTES = 1 * GB, GB // 4
# A worker stores objects in only 83-90% of its size (measured, data system 0.8.1: 100 MiB objects
# filled 1,700 of 2,000 MiB and 7,100 of 8,000; 10 MiB ones 1,660 of 2,000). A size planned here adds
# 256 MB for manifests and markers. A size larger than its use costs nothing: the worker's pages are
# allocated as objects fill them.
USABLE_FRACTION, HEADROOM_BYTES = 0.83, 256 * MB
RELAY_PIECE_BYTES = 64 * MB  # app.weights.relay.BATCH_BYTES: the control plane does not import the weight plane
_DTYPE_BYTES = {"float32": 4, "F32": 4, "bfloat16": 2, "BF16": 2, "float16": 2, "F16": 2, "F64": 8,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class HostMemoryError(ConfigError):
    """The App, as configured, does not fit in this host's memory."""


class MemoryPlan(BaseModel):
    weights_bytes: int  # one copy of the weights, as the engines hold them
    copies: int  # rank layouts the pools use: one copy of the weights each, in the data system
    private_copies: int  # replicas that hold their own copy (weights disabled, or pulled)
    nodes: int  # local nodes that hold copies at start-up
    kv_capacity_bytes: int  # KV blocks the data system keeps
    # Several nodes: a relaying node also holds its largest tensor's transit chunks, the piece it is
    # reading and the piece it is storing (app.weights.relay) beside its copy.
    relay_bytes: int = 0
    engine_ranks: int  # engine ranks started at start-up
    engine_rank_bytes: int  # each: its KV cache and vLLM's own memory
    available_bytes: int  # MemAvailable when the App started
    configured_shared_memory_mb: int | None  # runtime.ds_shared_memory_mb, if set

    @computed_field
    @property
    def shared_memory_mb(self) -> int:
        """Each worker's shared memory: the configured size, or what the weights and KV need."""
        if self.configured_shared_memory_mb is not None:
            return self.configured_shared_memory_mb
        return _mb(self._stored / USABLE_FRACTION + HEADROOM_BYTES)

    @computed_field
    @property
    def needed_bytes(self) -> int:
        return (self.weights_bytes * (self.copies * self.nodes + self.private_copies) + self.kv_capacity_bytes
                + APP_BYTES + WORKER_BYTES * self.nodes + self.engine_ranks * self.engine_rank_bytes)

    @property
    def _stored(self) -> int:
        """What the worker must store: the weights, and the KV blocks it may keep."""
        return self.weights_bytes * self.copies + self.kv_capacity_bytes + self.relay_bytes

    def check(self) -> None:
        """Raise HostMemoryError, with the numbers, if the shared memory or the host is too small."""
        weights = f"the weights ({self.weights_bytes / GB:.2f} GB x {self.copies} rank layout(s))"
        if self.shared_memory_mb * MB * USABLE_FRACTION < self._stored:
            raise HostMemoryError(
                f"runtime.ds_shared_memory_mb={self.configured_shared_memory_mb} cannot hold {weights} and the KV "
                f"blocks ({self.kv_capacity_bytes / GB:.2f} GB, kv.capacity_gb): a worker stores objects in "
                f"{USABLE_FRACTION:.0%} of its size, so it needs {_mb(self._stored / USABLE_FRACTION)} MB. "
                f"Raise it, or unset it to size it from the model")
        if self.needed_bytes > self.available_bytes:
            raise HostMemoryError(
                f"this host has {self.available_bytes / GB:.2f} GB available and the App needs "
                f"{self.needed_bytes / GB:.2f} GB: {weights} on {self.nodes} node(s)"
                + (f" and {self.private_copies} replica(s) holding a copy of their own" if self.private_copies else "")
                + f", the KV blocks "
                f"{self.kv_capacity_bytes / GB:.2f} GB (kv.capacity_gb), {self.engine_ranks} engine rank(s) x "
                f"{self.engine_rank_bytes / GB:.2f} GB (engine.kv_cache_gib plus vLLM's own "
                f"{ENGINE_RANK_BYTES / GB:.1f} GB), and the App's processes "
                f"{(APP_BYTES + WORKER_BYTES * self.nodes) / GB:.2f} GB. Start fewer replicas, lower "
                f"kv.capacity_gb or engine.kv_cache_gib, or use a host with more memory")

    def summary(self) -> str:
        return (f"weights {self.weights_bytes / GB:.2f} GB x {self.copies}, "
                f"KV blocks {self.kv_capacity_bytes / GB:.2f} GB; "
                f"data system {self.shared_memory_mb} MB per worker; App needs {self.needed_bytes / GB:.2f} GB "
                f"of {self.available_bytes / GB:.2f} GB available")


def plan_memory(config: AppConfig, model_dir: Path, available_bytes: int | None = None) -> MemoryPlan | None:
    """The plan of a local App serving ``model_dir``, checked; None in cluster mode (the App starts no
    worker and its replicas run on the cluster's hosts). Raises HostMemoryError."""
    if config.runtime.resolved_mode is not RuntimeMode.LOCAL:
        return None
    pools = config.pools
    sizes = {role: config.tensor_parallel(role) for role in pools}
    replicas = sum(pools.values())
    # The seed moves its weights into the data system; a pulled replica copies them out again.
    private = (replicas if not config.weights.enabled
               else max(0, replicas - 1) if config.weights.cpu_mode == "pull" else 0)
    tensors = tensor_bytes(model_dir, config.engine.dtype)
    relaying = config.weights.enabled and config.runtime.local_nodes > 1
    plan = MemoryPlan(
        weights_bytes=sum(tensors),
        relay_bytes=max(tensors, default=0) + 2 * RELAY_PIECE_BYTES if relaying else 0,
        copies=len(set(sizes.values())) if config.weights.enabled else 0,
        private_copies=private,
        nodes=max(1, min(config.runtime.local_nodes, replicas)),
        kv_capacity_bytes=int(config.kv_capacity_gb * GB) if config.kv.enabled else 0,
        engine_ranks=sum(count * sizes[role] for role, count in pools.items()),
        engine_rank_bytes=int(config.engine.kv_cache_gib * 2**30) + ENGINE_RANK_BYTES,
        available_bytes=available_bytes if available_bytes is not None else mem_available(),
        configured_shared_memory_mb=config.runtime.ds_shared_memory_mb)
    plan.check()
    return plan


def _mb(nbytes: float) -> int:
    """Whole MiB, rounded up."""
    return -(-int(nbytes) // MB)


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """The bytes of the checkpoint's tensors in ``dtype`` ("auto": as stored), from the safetensors
    headers; the files' sizes for other formats."""
    return sum(tensor_bytes(model_dir, dtype))


def tensor_bytes(model_dir: Path, dtype: str) -> list[int]:
    """Each checkpoint tensor's bytes in ``dtype``, from the safetensors headers; each file's size for
    other formats."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return [path.stat().st_size for pattern in ("*.bin", "*.pt") for path in model_dir.glob(pattern)]
    sizes = []
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for extent in tensor["shape"]:
                numel *= extent
            sizes.append(numel * (_DTYPE_BYTES.get(dtype) or _DTYPE_BYTES.get(tensor["dtype"], 2)))
    return sizes
