"""Our vLLM load format (``--load-format yrllm``): carry out a WeightPlan inside vLLM's worker.

- seed: vLLM's default loader from disk, then publish every parameter of this rank to the data
  system, manifest last (``app.weights.seeding``). A CPU rank moves its parameters into the data
  system chunk by chunk, so it never holds two copies, and ends up sharing the published one like the
  replicas after it.
- map: every parameter becomes a view of the data system's shared memory. Nothing is copied; all
  replicas on a host share the same physical pages. The views (and the client) live as long as the
  model. The memory is writable in practice: nothing in inference writes weights in place.
- pull: every parameter is filled from the data system by key, straight into the tensors vLLM
  allocated (one batched lookup, no intermediate copy). On a CPU the copy is bound by first-touch page
  faults on that fresh memory; pre-faulting it with MAP_POPULATE was measured and is slower on this
  VM (1.8-2.7 s per GB against 0.3 s of faults), so it is not done.
- fetch (the first replica on a node that holds no copy): relay the node its copy from the plan's
  source node (``app.weights.relay``: pipelined batches, each bounded by a timeout, the next source on
  failure), then map or pull that copy as above. The replica then marks the fetch done or failed, for
  the replicas of its node that await it.
- Any failure of map or pull (missing key, timeout, size, dtype or checksum mismatch, worker gone)
  loads from disk instead and says why in the LoadReport.

It imports only the weight plane and vLLM: it runs inside vLLM's processes.
"""

from __future__ import annotations

import threading
import time
import warnings

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import BaseModelLoader, DefaultModelLoader, register_model_loader

from app.files import write_atomically
from app.host_memory import require_available
from app.weights.host_tier import HostTier, TierError
from app.weights.identity import RankLayout, WeightKeys
from app.weights.load_report import LoadReport, PlanKind, SeedMove, WeightSource, rank_report_path
from app.weights.manifest import Manifest, VerifyMode
from app.weights.npu_tier import NpuTier
from app.weights.plan import LOAD_FORMAT, WeightPlan
from app.weights.relay import Relayed, relay
from app.weights.rendezvous import await_fetch, await_seed, mark_fetch
from app.weights.seeding import Moved, abandon, commit, move_into, publish_copy

logger = init_logger("vllm.yrllm.loader")  # under "vllm." so lines look like vLLM's own


@register_model_loader(LOAD_FORMAT)
class DataSystemLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self._plan = WeightPlan.model_validate(load_config.model_loader_extra_config or {})
        self._disk = DefaultModelLoader(LoadConfig(load_format="auto", device=load_config.device))
        # A process's first data system client takes about 0.13 s to set up (the SDK's one-time start);
        # it connects while vLLM builds the model, which comes between this and load_weights.
        self._connecting = threading.Thread(target=_connect_ahead, args=(self._plan,), daemon=True)
        self._connecting.start()

    def download_model(self, model_config: ModelConfig) -> None:
        self._disk.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        self._connecting.join()
        plan, layout = self._plan, RankLayout.current()
        keys = WeightKeys(plan.fingerprint, layout)
        params = _tensors(model)
        started = time.perf_counter()
        source, fallback, waited_s, publish_s, seed_move = WeightSource.DISK, plan.reason, 0.0, None, None
        relayed = None
        if plan.kind in (PlanKind.MAP, PlanKind.PULL):
            try:
                source, waited_s, relayed = _from_cache(model, plan, keys, layout, params, model_config)
            except (TierError, ValueError) as exc:
                what = f"fetching from {plan.fetch_from} onto {plan.node}" if plan.fetch_from else plan.kind.value
                fallback = f"{what} from the {plan.tier} tier failed: {exc}"
                logger.warning("%s; loading from disk instead", fallback)
            if plan.fetch_from is not None:
                mark_fetch(_host_tier(plan), keys, plan, done=source is not WeightSource.DISK)
        if source is WeightSource.DISK:
            if _on_cpu(params) and layout.tp_rank == 0:  # for all ranks, before the others loaded much
                require_available(sum(p.nbytes for _, p in params) * layout.tp_size,
                                  f"loading this replica's weights from disk ({layout.tp_size} rank(s))")
            self._disk.load_weights(model, model_config)
        seconds = time.perf_counter() - started - waited_s
        if plan.kind is PlanKind.SEED:
            publish_started = time.perf_counter()
            try:
                seed_move = _seed(model, plan, keys, layout, params, model_config)
            except (TierError, ValueError) as exc:
                fallback = f"publishing to the {plan.tier} tier failed: {exc}"
                logger.warning("%s; this replica serves, but the next one will load from disk", fallback)
            publish_s = time.perf_counter() - publish_started
        report = LoadReport(replica_id=plan.replica_id, rank=layout.tp_rank, plan=plan.kind, source=source,
                            node=plan.node, fetched_from=relayed.source if relayed else None,
                            fetch_failovers=relayed.failovers if relayed else [],
                            fetch_seconds=round(relayed.seconds, 4) if relayed else None,
                            fetch_read_seconds=round(relayed.read_seconds, 4) if relayed else None,
                            parameters=len(params),
                            bytes=sum(p.numel() * p.element_size() for _, p in params),
                            seconds=round(seconds, 4), waited_seconds=round(waited_s, 4),
                            publish_seconds=None if publish_s is None else round(publish_s, 4), seed_move=seed_move,
                            fallback_reason=fallback, finished_at=time.time())
        logger.info("yrllm weights (rank %d of %d): %s", layout.tp_rank, layout.tp_size, report.summary())
        write_atomically(rank_report_path(plan.report_path, layout.tp_rank), report.model_dump_json())


def _from_cache(model: nn.Module, plan: WeightPlan, keys: WeightKeys, layout: RankLayout,
                params: list[tuple[str, torch.Tensor]],
                model_config: ModelConfig) -> tuple[WeightSource, float, Relayed | None]:
    """Map or pull every parameter from the data system (relaying this node its copy first, if the
    plan says so); returns the source, the seconds spent waiting for a seed still loading or a copy
    still relayed, and the relay. Raises TierError or ValueError, having changed nothing that a disk
    load would not overwrite."""
    tier = _host_tier(plan)
    waited_s = await_seed(tier, keys, plan.seed_replica, plan.await_seed_s) if plan.seed_replica else 0.0
    if plan.await_fetch_s and plan.fetcher:
        waited_s += await_fetch(tier, keys, plan)
    if plan.tier == NpuTier.name:
        # Device to device: checksums would need a copy to the host, so only the manifest (names,
        # shapes, dtypes, sizes) is checked on this tier.
        _checked_manifest(tier, keys, layout, params, model_config)
        _npu_tier(plan).pull(keys.tensors(len(params)), [p.data for _, p in params], plan.timeout_ms)
        return WeightSource.NPU, waited_s, None
    relayed = None
    if plan.sources:
        manifest = _source_manifest(tier, keys, plan, layout, params, model_config)
        relayed = relay(tier, _host_tier(plan, writes=True), keys, plan, manifest)
    local = keys if plan.node == plan.home_node else keys.on(plan.node)
    views = _fetch(tier, local, layout, params, model_config, plan.verify, plan.timeout_ms)
    if plan.kind is PlanKind.MAP and _on_cpu(params):
        _map(model, params, views)
    else:
        _pull(params, views)
    return WeightSource.HOST, waited_s, relayed


def _seed(model: nn.Module, plan: WeightPlan, keys: WeightKeys, layout: RankLayout,
          params: list[tuple[str, torch.Tensor]], model_config: ModelConfig) -> SeedMove | None:
    """Publish what was loaded from disk. A CPU rank moves its parameters into the data system (the
    lean seed: it never holds two copies, and it shares the published one as the replicas after it
    do); a device rank's tensors are copied to the host tier, or are the npu tier's objects."""
    tier, npu = _host_tier(plan), None
    try:
        if plan.tier == NpuTier.name or not _on_cpu(params):
            npu = _npu_tier(plan) if plan.tier == NpuTier.name else None
            publish_copy(tier, keys, layout, params, model_config, npu)
            return None
        moved = Moved()
        model._yrllm_keepalive = moved.views  # the parameters' memory from here on
        try:
            move_into(tier, keys.tensors(len(params)), params, moved)
            commit(tier, keys, layout, moved.entries, model_config)
        finally:
            _keep_linear_weights_shared(model, set(moved.names))
    except TierError:
        abandon(tier, keys, len(params), plan.replica_id, npu)
        raise
    logger.info("Moved %d tensors (%.2f GB) into the data system, holding at most %.0f MB beyond what "
                "vLLM's load left", len(moved.names), sum(e.nbytes for e in moved.entries) / 1e9,
                (moved.resident_peak - moved.resident_before) / 1e6)
    return SeedMove(resident_before_bytes=moved.resident_before, resident_peak_bytes=moved.resident_peak,
                    remap_seconds=round(moved.remap_seconds, 4))


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # Tied weights appear once (named_parameters drops duplicates): one key per storage.
    return [(name, param) for name, param in model.named_parameters() if param.numel() > 0]


def _on_cpu(params: list[tuple[str, torch.Tensor]]) -> bool:
    return all(p.device.type == "cpu" for _, p in params)


def _describe(params: list[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str, int]]:
    return [(name, tuple(p.shape), str(p.dtype), p.numel() * p.element_size()) for name, p in params]


_TIERS: dict[tuple[str, bool], HostTier] = {}  # per worker and timeout; alive as long as mapped weights are
# A seed's publish, or a relay's, is worth waiting for: abandoned, it sends the next replica to the
# disk again, with a second copy of the weights in memory. On 2 busy cores (the 7B shape, both ranks
# moving at once; a relay beside engines starting) the worker answered a seal after more than 5 s.
_SEED_TIMEOUT_MS = 60_000


def _host_tier(plan: WeightPlan, writes: bool = False) -> HostTier:
    """This replica's client of its node's worker. The host tier also carries the manifests of the npu
    tier. ``writes``: a client for a seed's or a relay's writes, whose seals are worth waiting for."""
    key = (plan.ds_address, writes or plan.kind is PlanKind.SEED)
    if key not in _TIERS:
        _TIERS[key] = HostTier(plan.ds_address, max(plan.timeout_ms, _SEED_TIMEOUT_MS) if key[1] else plan.timeout_ms)
    return _TIERS[key]


def _connect_ahead(plan: WeightPlan) -> None:
    if plan.kind is not PlanKind.DISK:
        try:
            _host_tier(plan)
            if plan.sources:
                _host_tier(plan, writes=True)
        except TierError:
            pass  # the load itself connects again, and reports why it could not


def _npu_tier(plan: WeightPlan) -> NpuTier:
    try:
        import torch_npu  # noqa: F401 - registers the "npu" device with torch
    except ImportError:
        raise TierError("the npu tier needs torch_npu (Ascend)") from None
    return NpuTier(plan.ds_address, torch.npu.current_device())


def _checked_manifest(tier: HostTier, keys: WeightKeys, layout: RankLayout,
                      params: list[tuple[str, torch.Tensor]], model_config: ModelConfig) -> Manifest:
    """This rank's manifest, if it describes exactly this engine's model; ValueError otherwise."""
    import vllm

    manifest = Manifest.model_validate_json(bytes(tier.get([keys.manifest])[0]))
    if manifest.fingerprint != keys.fingerprint or manifest.layout != layout:
        raise ValueError("the cached entry belongs to another model or rank layout")
    if manifest.vllm_version != vllm.__version__ or manifest.dtype != str(model_config.dtype):
        raise ValueError(f"the cached entry was made by vLLM {manifest.vllm_version} as "
                         f"{manifest.dtype}; this engine is vLLM {vllm.__version__} as {model_config.dtype}")
    reason = manifest.mismatch(_describe(params))
    if reason:
        raise ValueError(f"the cached entry does not match this model: {reason}")
    return manifest


def _source_manifest(tier: HostTier, keys: WeightKeys, plan: WeightPlan, layout: RankLayout,
                     params: list[tuple[str, torch.Tensor]], model_config: ModelConfig) -> Manifest:
    """The entry's manifest, checked against this model: the seed's, or, where the seed's node cannot
    answer, a finished copy's of a node the relay would read from."""
    errors = []
    for node in [plan.home_node, *plan.sources]:
        try:
            return _checked_manifest(tier, keys if node == plan.home_node else keys.on(node), layout, params,
                                     model_config)
        except TierError as exc:
            errors.append(f"{node}: {exc}")
    raise TierError("no manifest to relay by: " + "; ".join(errors))


def _fetch(tier: HostTier, keys: WeightKeys, layout: RankLayout, params: list[tuple[str, torch.Tensor]],
           model_config: ModelConfig, verify: VerifyMode, timeout_ms: int = 5000) -> list[memoryview]:
    """All of this rank's tensors as read-only views of this node's copy, after checking they are
    exactly ours. One call (30 calls for the 7B shape's rank took 0.06-0.12 s, one call 7 ms)."""
    manifest = _checked_manifest(tier, keys, layout, params, model_config)
    views = tier.get(keys.tensors(len(params)), timeout_ms=timeout_ms)
    for entry, view in zip(manifest.tensors, views):
        entry.check(view, verify)
    return views


def _as_tensor(view: memoryview, like: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # the views are read-only by contract; we never write them
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(view, dtype=torch.uint8).view(like.dtype).view(like.shape)


def _map(model: nn.Module, params: list[tuple[str, torch.Tensor]], views: list[memoryview]) -> None:
    for (_, param), view in zip(params, views):
        param.data = _as_tensor(view, param)
    model._yrllm_keepalive = views  # the memoryviews pin the shared memory the parameters now use
    _keep_linear_weights_shared(model, {name for name, _ in params})


def _keep_linear_weights_shared(model: nn.Module, mapped: set[str]) -> None:
    """Stop vLLM's CPU weight prepacking from copying mapped linear weights.

    On CPUs with AVX-512, vLLM's CPU linear layers hand their weight to oneDNN after loading, which
    keeps a private repacked copy and empties the parameter (``dispatch_cpu_unquantized_gemm``): one
    private copy per replica instead of the shared one, and seconds of repacking at every start. vLLM
    skips that for layers marked ``_cpu_skip_gemm_dispatch`` (its own flag, read by
    ``UnquantizedLinearMethod``) and computes with ``torch.nn.functional.linear`` on the weight as it
    is, which is what it does anyway where oneDNN is unavailable (AVX2 CPUs)."""
    from vllm.model_executor.layers.linear import LinearBase

    marked = 0
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and f"{name}.weight" in mapped:
            module._cpu_skip_gemm_dispatch = True
            marked += 1
    logger.info("%d linear layers compute on the shared weights (no private CPU prepacking)", marked)


def _pull(params: list[tuple[str, torch.Tensor]], views: list[memoryview]) -> None:
    started, total, done = time.perf_counter(), len(params), 0
    for index, ((name, param), view) in enumerate(zip(params, views), start=1):
        param.data.copy_(_as_tensor(view, param), non_blocking=param.device.type != "cpu")
        done += len(view)
        if index == total or index % max(1, total // 4) == 0:
            logger.info("Pulling weights from the data system: %3d%% (%d/%d tensors, %.2f GB, %.2f s)",
                        100 * index // total, index, total, done / 1e9, time.perf_counter() - started)
    if not _on_cpu(params):
        torch.accelerator.synchronize()
