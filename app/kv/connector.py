"""``DataSystemKVConnector``: vLLM's KV connector API (``KVConnectorBase_V1``) on the data system.

Loaded by vLLM from ``--kv-transfer-config`` (``kv_connector_module_path``; vLLM unpatched), in
EngineCore, once per role. The scheduler role looks prompts up and plans each step's loads and stores
(``scheduling``); the worker role copies blocks (``transfer``) before the forward (loads, synchronous)
and after it (stores). Prefill/decode disaggregation is the same machinery driven by the request's
``kv_transfer_params``: a prefill leg (``do_remote_decode``) stores the whole prompt and answers the
parameters of its decode leg (``do_remote_prefill``), which loads it (``scheduling.Handoff``).

A block that is missing, corrupt or of another layout is reported through
``get_block_ids_with_load_errors`` and vLLM recomputes it (``kv_load_failure_policy=recompute``); a
corrupt object is deleted so that the next request does not trip on it. A data system that is gone
means recompute, not an error. Where this connector cannot work (a KV layout that is not whole
contiguous blocks, several KV cache groups, pipeline parallelism) it logs why and stays off: every
request then computes as without it.

Tensor parallelism: the scheduler (in EngineCore) plans per block; each worker stores and loads the
objects of its own KV heads (``keys.object_keys``, ``transfer.RankShare``), and a block is a hit only
when every object of it is stored. vLLM unions the workers' load errors, so a block one rank could
not load is recomputed by all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec

from app.kv.block_format import CorruptBlock
from app.kv.journal import SIDES, JournalWriter, KVOp, rank_journal
from app.kv.keys import KVNamespace, layout_tag, object_keys
from app.kv.scheduling import BlockScheduler, BlockTransfer, Handoff, StepRequest
from app.kv.settings import ConnectorSettings
from app.kv.store import BlockStore, StoreUnavailable, logger
from app.kv.transfer import BlockCopier, RankShare, UnsupportedLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


@dataclass
class DataSystemKVMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    stores: list[BlockTransfer] = field(default_factory=list)


class DataSystemKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = ConnectorSettings.model_validate(self._kv_transfer_config.kv_connector_extra_config)
        self._store = BlockStore(settings.ds_address, settings.timeout_ms, settings.ttl_s)
        # Each tensor-parallel worker keeps a journal of its own (rank_journal).
        self._journal = JournalWriter(settings.journal, SIDES[0]) if role is KVConnectorRole.SCHEDULER else \
            JournalWriter(rank_journal(settings.journal, _tp_rank(vllm_config)), SIDES[1])
        self._namespace, self._block_shape, refusal = _namespace(vllm_config, kv_cache_config, settings)
        self._scheduler: BlockScheduler | None = None
        self._copier: BlockCopier | None = None
        self._layer_names: list[str] = list(kv_cache_config.kv_cache_groups[0].layer_names) \
            if kv_cache_config.kv_cache_groups else []
        self._load_errors: set[int] = set()
        if refusal:
            logger.warning("KV blocks are not shared through the data system: %s", refusal)
        elif role is KVConnectorRole.SCHEDULER:
            self._scheduler = BlockScheduler(self._namespace, self._store, self._journal)

    # ---- scheduler side --------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._scheduler is None:
            return 0, False
        # Token ids alone decide the KV only without images (their placeholders are the same tokens
        # for every image) and without a LoRA adapter: other requests are not shared.
        shareable = not request.mm_features and request.lora_request is None
        prompt = request.prompt_token_ids if shareable else None
        return self._scheduler.lookup(request.request_id, prompt, num_computed_tokens, request.cache_salt,
                                      Handoff.of(request.kv_transfer_params)), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        if self._scheduler is not None:
            self._scheduler.allocated(request.request_id, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        if self._scheduler is None:
            return DataSystemKVMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        steps = [StepRequest(new.req_id, new.num_computed_tokens + scheduled[new.req_id], new.block_ids[0], True)
                 for new in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[index]
            steps.append(StepRequest(req_id, cached.num_computed_tokens[index] + scheduled[req_id],
                                     new_blocks[0] if new_blocks else None, req_id in cached.resumed_req_ids))
        loads, stores = self._scheduler.step(steps)
        return DataSystemKVMetadata(loads=loads, stores=stores)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self._scheduler is not None and connector_output.invalid_block_ids:
            self._scheduler.invalidated(connector_output.invalid_block_ids)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Stores are synchronous: the blocks can be freed at once, a decode leg reads the data system.
        return False, self._scheduler.finished(request.request_id) if self._scheduler is not None else None

    # ---- worker side -----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._namespace is None:
            return
        try:
            self._copier = BlockCopier(self._namespace.digest, [kv_caches[name] for name in self._layer_names],
                                       self._block_shape, _rank_share(self._vllm_config, self._namespace))
        except (UnsupportedLayout, KeyError) as exc:
            logger.warning("KV blocks are not shared through the data system: %s", exc)
            return
        logger.info("KV blocks shared through the data system: %d layers, objects %s of %d per block, %d bytes "
                    "each (%s)", len(self._layer_names), list(self._copier.share.loads), self._namespace.splits,
                    self._copier.object_size, self._namespace.prefix)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        if not isinstance(metadata, DataSystemKVMetadata):
            return
        for transfer in metadata.loads:
            if self._copier is None:  # the cache could not be registered: nothing may be assumed loaded
                self._load_errors.update(transfer.block_ids)
            else:
                self._load(transfer)

    def _load(self, transfer: BlockTransfer) -> None:
        """Load this rank's objects of each block, in order, up to the first block one is missing of."""
        assert self._copier is not None
        started = time.perf_counter()
        parts = self._copier.share.loads
        keys = object_keys(self._namespace, transfer.keys, parts)
        loaded, reason = 0, None
        try:
            views = self._store.get(keys)
        except StoreUnavailable as exc:
            views, reason = [], f"data system unavailable: {exc}"
        for index, (key, view) in enumerate(zip(keys, views)):
            if view is None:
                reason = "evicted before it was read"
                break
            try:
                self._copier.load(transfer.block_ids[index // len(parts)], view, parts[index % len(parts)])
            except CorruptBlock as exc:
                reason = f"corrupt: {exc}"
                self._delete(key)
                break
            loaded += 1
        blocks = loaded // len(parts)  # whole blocks: a block with one object missing is recomputed
        if blocks:
            done = keys[:blocks * len(parts)]
            self._store.refresh(done)  # in use: not to expire while it is
            self._journal.record(KVOp.LOADED, keys=done, bytes=len(done) * self._copier.object_size,
                                 seconds=round(time.perf_counter() - started, 6))
        if blocks < len(transfer.keys):
            self._load_errors.update(transfer.block_ids[blocks:])
            self._journal.record(KVOp.LOAD_FAILED, keys=keys[blocks * len(parts):], reason=reason)
            logger.warning("request %s: %d KV blocks recomputed (%s)", transfer.req_id,
                           len(transfer.keys) - blocks, reason)

    def _delete(self, key: str) -> None:
        try:
            self._store.delete([key])
        except StoreUnavailable:
            pass  # gone with the data system anyway

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous: done in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole blocks of every layer are stored after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        metadata = self._get_connector_metadata()
        if self._copier is None or not isinstance(metadata, DataSystemKVMetadata):
            return
        parts = self._copier.share.stores
        if not parts:
            return  # this rank's heads are replicas of another rank's, which stores them
        copier = self._copier
        for transfer in metadata.stores:
            started = time.perf_counter()
            keys = object_keys(self._namespace, transfer.keys, parts)
            try:
                self._store.put(keys, copier.object_size, lambda index, out, ids=transfer.block_ids: copier.fill(
                    ids[index // len(parts)], out, parts[index % len(parts)]))
            except StoreUnavailable as exc:
                self._journal.record(KVOp.NOT_STORED, keys=keys, reason=str(exc).splitlines()[0])
                continue
            self._journal.record(KVOp.STORED, keys=keys, bytes=len(keys) * copier.object_size,
                                 seconds=round(time.perf_counter() - started, 6))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors


def _namespace(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig",
               settings: ConnectorSettings) -> tuple[KVNamespace | None, tuple[int, ...], str | None]:
    """The namespace of this engine's blocks and the per-block shape of this rank's cache, or why there
    is none."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        kinds = [type(group.kv_cache_spec).__name__ for group in groups]
        return None, (), f"needs one full-attention KV cache group, got {kinds}"
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        return None, (), "pipeline parallelism is not supported yet"
    spec = groups[0].kv_cache_spec
    total_heads = vllm_config.model_config.get_total_num_kv_heads()
    # vLLM's CPU layout: [num_blocks, num_kv_heads (this rank's), block_size, 2 * head_size].
    block_shape = (spec.num_kv_heads, spec.block_size, 2 * spec.head_size)
    namespace = KVNamespace(fingerprint=settings.fingerprint, dtype=str(spec.dtype).removeprefix("torch."),
                            block_size=spec.block_size, splits=settings.splits,
                            layout=layout_tag(groups[0].layer_names, total_heads, spec.head_size, block_shape[1:]))
    return namespace, block_shape, None


def _tp_rank(vllm_config: "VllmConfig") -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank() if vllm_config.parallel_config.tensor_parallel_size > 1 else 0


def _rank_share(vllm_config: "VllmConfig", namespace: KVNamespace) -> RankShare:
    return RankShare.of(_tp_rank(vllm_config), vllm_config.parallel_config.tensor_parallel_size,
                        vllm_config.model_config.get_total_num_kv_heads(), namespace.splits)
