"""The one validated configuration of the App. It is long because every field is documented where it
is declared, in the sections of the App's parts.

Sources, each overriding the one before (``app.config_sources`` reads them, pydantic-settings merges
them): defaults < YAML file (``--config``) < environment variables < command-line flags.

Environment variables are ``YRLLM_<SECTION>__<FIELD>`` (for example ``YRLLM_ROUTER__PORT=9100``);
top-level fields are ``YRLLM_<FIELD>`` (``YRLLM_REPLICAS=2``). The original case's variables are
honoured too: ``YR_SERVER_ADDRESS`` and ``DS_WORKER_ADDR`` select cluster mode, ``PREFILL_INS_NUM``,
``DECODE_INS_NUM``, ``PTP`` and ``DTP`` size the pools (``config_sources``).
"""

from __future__ import annotations

from enum import Enum
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from app.config_sources import ENV_PREFIX, NESTED_DELIMITER, ConfigError, LoadInputs, sources_for, unflatten
from app.replica import Role

#: The most replicas one App runs (a bound on config, scaling calls and HTTP scaling requests).
MAX_REPLICAS = 64
#: The largest tensor parallel size accepted (a bound; the model and the host usually bound it lower).
MAX_TENSOR_PARALLEL = 64


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


def _host_port(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{field} must be HOST:PORT, got {value!r}")
    return value


class RouterConfig(_Section):
    """The HTTP front door."""

    host: str = Field("127.0.0.1", description="Address the Router binds to. Loopback by default; "
                      "set 0.0.0.0 only behind a firewall or with an admin token for scaling.")
    port: int = Field(9000, ge=0, le=65535, description="Router port (0 picks a free one). "
                      "9000 is the original case's port.")
    admin_token: SecretStr | None = Field(None, description="If set, callers of the scaling endpoints "
                                          "must send 'Authorization: Bearer <token>'; if unset, only "
                                          "loopback callers may scale.")
    request_timeout_s: float = Field(600.0, gt=0, description="Upper bound on one proxied request.")
    scale_timeout_s: float = Field(900.0, gt=0, description="Upper bound on one /scaleout or /scalein "
                                   "call; the scaling itself goes on if the caller gives up.")
    drain_timeout_s: float = Field(300.0, gt=0, description="Scale-in waits this long for a replica's "
                                   "in-flight requests before stopping it anyway.")
    queue_max: int = Field(256, ge=0, description="Requests held at once while their pool has no ready "
                           "replica (scaled to zero, or every replica starting); past it, 503 with Retry-After. "
                           "Each held request costs the Router a connection and its body. 0: never hold "
                           "(a request at zero is refused, but still wakes the pool).")
    queue_timeout_s: float = Field(30.0, gt=0, description="Longest a request is held waiting for a "
                                   "ready replica; then 503 with Retry-After. A start from zero takes about "
                                   "one forked replica start (BENCHMARKS.md, 'Scale to zero and back').")


class EngineConfig(_Section):
    """How each vLLM engine (one per replica) is configured."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight and activation dtype. float32 is fastest on CPUs without AVX-512 BF16.")
    max_model_len: int | None = Field(None, gt=0, description="Context length. Unset: the model's own, or "
                                      "less if one request of that length does not fit in kv_cache_gib (vLLM's "
                                      "'auto').")
    kv_cache_gib: float = Field(0.25, gt=0, description="CPU KV cache per engine in GiB; fractions are "
                                "fine (passed as --kv-cache-memory-bytes). 0.25 GiB holds about 21k "
                                "tokens of the 0.5B shape and allocates in ~0.1 s. VLLM_CPU_KVCACHE_SPACE "
                                "is removed from the engines' environment: it would override this.")
    threads: int = Field(0, ge=0, description="Torch/OpenMP threads per engine, and per rank of a tensor-"
                         "parallel engine; 0 means all cores (shared among a tensor-parallel engine's ranks).")
    enforce_eager: bool = Field(True, description="Skip graph compilation: faster start-up, the point of "
                                "elastic replicas.")
    host: str = Field("127.0.0.1", description="Address each engine's HTTP server binds to. Engines are "
                      "internal: only the Router talks to them.")
    start_timeout_s: float = Field(600.0, gt=0, description="Give up on an engine that is not ready "
                                   "after this many seconds.")
    extra_args: list[str] = Field(default_factory=list, description="Extra vLLM server flags passed "
                                  "verbatim, for example ['--max-num-seqs', '8'].")
    launcher: Literal["fork", "spawn"] = Field("fork", description="How an engine process starts vLLM's "
                                               "EngineCore: 'fork' (the pre-imported engine process forks "
                                               "it: no second import) or 'spawn' (vLLM's standard path). fork falls back "
                                               "to spawn, with the reason, where its prerequisites fail.")
    tp_workers: Literal["fork", "spawn"] = Field("fork", description="Tensor parallel > 1: how the EngineCore "
                                                 "starts one worker per rank: 'fork' (from the pre-imported core: "
                                                 "no import) or 'spawn' (vLLM's own mp executor: each worker "
                                                 "imports torch and vLLM again, ~7 s on 2 cores). fork falls back "
                                                 "to spawn, with the reason, where its prerequisites fail.")

    @model_validator(mode="before")
    @classmethod
    def _no_standbys(cls, values: Any) -> Any:
        if isinstance(values, Mapping) and "standby_processes" in values:
            raise ValueError("engine.standby_processes was removed: every engine process is forked from its "
                             "node's zygote, in milliseconds, so none is kept standing by; delete the setting")
        return values


class WeightsConfig(_Section):
    """How replicas get their weights: the first from disk, the others from the data system."""

    enabled: bool = Field(True, description="Use the WeightCache. Off: every replica loads from disk "
                          "with vLLM's default loader.")
    tier: Literal["host", "npu"] = Field("host", description="Where cached weights live: 'host' (the "
                                         "data system's shared memory; every device) or 'npu' (device "
                                         "objects, Ascend only, NOT verified on hardware).")
    cpu_mode: Literal["map", "pull"] = Field("map", description="CPU replicas: 'map' makes parameters "
                                             "views of the data system's shared memory (no copy, one "
                                             "physical copy per host); 'pull' copies them.")
    verify: Literal["off", "sampled", "full"] = Field("sampled", description="Checksums checked when a "
                                                      "replica takes cached weights: 'sampled' reads 12 KiB "
                                                      "of each tensor, 'full' every byte (about 1 s/GB).")
    timeout_ms: int = Field(5000, gt=0, description="Data system request timeout; a stopped worker "
                            "fails a load in this long, and the replica loads from disk.")
    fanout: Literal["chain", "star"] = Field("chain", description="Where a node's first replica relays the "
                                             "weights from: 'chain' (the copy fewest relays read from now, the "
                                             "newest on a tie: nodes at once line up one behind the other, "
                                             "pipelined) or 'star' (always the seed's node: its link carries "
                                             "every copy; for comparison, make nodes).")


class KVConfig(_Section):
    """KV cache blocks shared between replicas through the data system (section ``kv``): a prefix that
    one replica computed is loaded, not recomputed, by every other replica."""

    enabled: bool = Field(True, description="Store every full block of each prompt's KV in the data "
                          "system and load the blocks other replicas stored. Off: each replica has only "
                          "vLLM's own prefix cache.")
    capacity_gb: float | None = Field(None, gt=0, description="Most GB of KV blocks kept in the data system; "
                                      "the least recently stored or loaded blocks are deleted beyond it. Unset: "
                                      "a quarter of runtime.ds_shared_memory_mb if that is set, 1 GB otherwise. "
                                      "Weights are never evicted for KV: a data system that is full stores "
                                      "no more KV.")
    ttl_s: int = Field(3600, ge=0, description="A block nobody stored or loaded for this long expires "
                       "(0: never). Catches blocks whose replica died before the App accounted for them.")
    timeout_ms: int = Field(1000, gt=0, description="Data system request timeout for KV calls; a "
                            "worker that does not answer costs a request at most this long, then recompute.")
    accounting_interval_s: float = Field(1.0, gt=0, description="Seconds between two reads of the "
                                         "replicas' KV journals (evictions and /metrics follow them).")


class ServingMode(str, Enum):
    """How replicas split the work of a request."""

    MERGED = "merged"  # every replica serves whole requests (the original case's DECODE_INS_NUM=0)
    DISAGGREGATED = "disaggregated"  # a prefill pool computes prompts, a decode pool generates

    @property
    def roles(self) -> tuple[Role, ...]:
        """The pools of this mode."""
        return (Role.MERGED,) if self is ServingMode.MERGED else (Role.PREFILL, Role.DECODE)


class PoolConfig(_Section):
    """One pool of engine replicas (sections ``prefill`` and ``decode``)."""

    replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="Disaggregated mode: replicas of this "
                          "pool started by App.start() (env PREFILL_INS_NUM / DECODE_INS_NUM). Merged "
                          "mode counts its replicas in the top-level 'replicas'.")
    tensor_parallel: int = Field(1, ge=1, le=MAX_TENSOR_PARALLEL, description="Tensor parallel size of "
                                 "each engine of the pool (env PTP / DTP; prefill's applies to merged replicas "
                                 "too): one engine process per rank, each with its shard of the weights and "
                                 "its KV heads. It must divide the model's attention heads and fit the host's "
                                 "cores (checked at start).")


class AutoscaleConfig(_Section):
    """Autoscaling knobs (section ``autoscale`` of AppConfig). In disaggregated mode each pool is
    scaled on its own signal, within the same bounds: prefill on the prompts in flight per replica
    (``target_in_flight``, queueing) and the TTFT, decode on the streams in flight per replica."""

    enabled: bool = Field(False, description="Follow the traffic (also --autoscale).")
    min_replicas: int = Field(1, ge=0, description="Never fewer replicas than this. 0: the App scales to "
                              "zero after idle_s without a request, and the next request wakes it.")
    max_replicas: int = Field(4, ge=1, le=MAX_REPLICAS, description="Never more replicas than this.")
    target_in_flight: float = Field(4.0, gt=0, description="Requests in flight per ready replica the "
                                    "App aims for; above it is pressure.")
    ttft_target_s: float | None = Field(None, gt=0, description="Median time to first token above "
                                        "this is pressure too (unset: in-flight only).")
    quiet_period_s: float = Field(30.0, ge=0, description="Scale down only after the load has fitted "
                                  "in fewer replicas for this long.")
    interval_s: float = Field(1.0, gt=0, description="Seconds between evaluations.")
    idle_s: float = Field(300.0, gt=0, description="With min_replicas 0: scale every pool to zero once no "
                          "request has arrived for this long. The first request after it waits for a "
                          "replica to start (held by the Router, see router.queue_timeout_s).")
    target_decode_streams: float = Field(8.0, gt=0, description="Disaggregated mode: streams in flight "
                                         "per decode replica the App aims for (decoding batches well, so "
                                         "more than target_in_flight).")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscaleConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class SupervisionConfig(_Section):
    """How the App keeps itself as configured (section ``supervision``): replicas that die or stop
    answering are taken out of the Router and replaced, a local data system worker that dies is
    restarted."""

    enabled: bool = Field(True, description="Watch the replicas and the data system worker, and heal.")
    interval_s: float = Field(0.25, gt=0, le=1.0, description="Seconds between checks of the replicas' "
                              "processes (a dead engine is noticed within this long) and of the worker.")
    health_check_interval_s: float = Field(1.0, gt=0, description="Seconds between two /health checks "
                                           "of one replica.")
    health_check_timeout_s: float = Field(1.0, gt=0, description="A /health answer slower than this is "
                                          "a failed check.")
    health_check_failures: int = Field(3, ge=1, description="Failed /health checks in a row that declare "
                                       "a live but unresponsive replica failed (a hung or stopped engine).")
    replace_backoff_max_s: float = Field(30.0, gt=0, description="A replacement that fails to start is "
                                         "retried after 1 s, then twice as long each time, up to this.")


class RuntimeMode(str, Enum):
    """Where the actors and the data system come from."""

    LOCAL = "local"  # yr local mode; the App starts its own data system worker on loopback.
    CLUSTER = "cluster"  # an existing openYuanrong cluster and its data system; the App starts nothing.


class NodeNetworkMode(str, Enum):
    """How simulated local nodes (runtime.local_nodes) are connected."""

    LOOPBACK = "loopback"  # every worker on this host's loopback: one address, no link to shape or cut
    NETNS = "netns"  # each node a network namespace with its own address, on a bridge (root and iproute2)


class RuntimeConfig(_Section):
    """The openYuanrong runtime: embedded (local) or an existing cluster."""

    mode: RuntimeMode | None = Field(None, description="local or cluster. Unset: cluster if "
                                     "server_address is set, local otherwise.")
    server_address: str | None = Field(None, description="Cluster mode: the openYuanrong master "
                                       "HOST:PORT (env YR_SERVER_ADDRESS).")
    ds_address: str | None = Field(None, description="Cluster mode: the data system worker HOST:PORT "
                                   "(env DS_WORKER_ADDR, the 'ds_master_port' printed by 'yr start').")
    ds_shared_memory_mb: int | None = Field(None, ge=64, description="Local mode: shared memory of each "
                                            "data system worker the App starts. Unset: sized from the model at "
                                            "start, to hold the weights (once per rank layout the pools use), "
                                            "the KV blocks (kv.capacity_gb), over the 83% of its size a worker fills, "
                                            "plus 256 MB; unused, the size costs nothing. Set: a size that cannot "
                                            "hold those is an error at start.")
    ds_home: Path | None = Field(None, description="Local mode: the worker's home (logs, sockets). A "
                                 "fresh temporary folder if unset, removed on shutdown.")
    ds_start_timeout_s: float = Field(60.0, gt=0, description="Local mode: wait this long for the "
                                      "worker to accept clients.")
    local_nodes: int = Field(1, ge=1, le=8, description="Local mode: simulated nodes, one data system "
                             "worker each, in one cluster (one metastore). Replicas go to the node with "
                             "the fewest and use its worker; the first replica on a node fetches the "
                             "weights across once, later ones map that node's copy. Each worker gets "
                             "ds_shared_memory_mb. For tests and benchmarks: a real cluster has a worker "
                             "per host (DS_WORKER_ADDR in each engine's environment).")
    node_network: NodeNetworkMode = Field(NodeNetworkMode.LOOPBACK, description="Local mode: loopback "
                                          "puts every node's worker on this host's loopback. netns makes each "
                                          "node a network namespace with its own address on a bridge the App "
                                          "creates (no route out, no NAT); its worker and its replicas' engines run "
                                          "inside it, and the Router reaches them at that address. Needs root and "
                                          "iproute2 (ip, tc). Everything it made is removed on stop, and what a "
                                          "killed App left behind at the next start.")
    node_subnet: IPv4Network = Field(IPv4Network("10.213.0.0/24"), description="netns: the private subnet of "
                                     "the bridge (.1, in the driver's namespace) and the nodes (.11, .12, ...). "
                                     "Refused at start if something here routes it already.")
    link_gbps: float | None = Field(None, gt=0, description="netns: shape each node's link to this rate, both "
                                    "ways (tc tbf, burst 256 kB; 94% of a 1 Gbit/s link measured usable). Unset: "
                                    "unshaped.")
    ds_populate: bool = Field(False, description="Local mode: pre-fault each worker's shared memory at "
                              "start (with the allocator settings that requires). Writes into it then skip "
                              "first-touch page faults: for the 1.5B shape here a first fetch onto a node ran "
                              "at 1.05 instead of 0.60 GB/s and the seed published in 4.3 instead of 10.1 s "
                              "(make nodes), but a joining worker started in 15.5 s instead of 0.6 s and "
                              "every worker holds all of ds_shared_memory_mb resident from the start.")

    @field_validator("server_address", "ds_address")
    @classmethod
    def _check_address(cls, value: str | None, info: Any) -> str | None:
        return _host_port(value, info.field_name)

    @property
    def resolved_mode(self) -> RuntimeMode:
        if self.mode is not None:
            return self.mode
        return RuntimeMode.CLUSTER if self.server_address else RuntimeMode.LOCAL

    @model_validator(mode="after")
    def _cluster_needs_addresses(self) -> "RuntimeConfig":
        if self.resolved_mode is RuntimeMode.CLUSTER and not (self.server_address and self.ds_address):
            raise ValueError("cluster mode needs both runtime.server_address (YR_SERVER_ADDRESS) and "
                             "runtime.ds_address (DS_WORKER_ADDR)")
        if self.node_network is NodeNetworkMode.LOOPBACK and self.link_gbps is not None:
            raise ValueError("runtime.link_gbps shapes the links of runtime.node_network=netns; loopback has none")
        if self.resolved_mode is RuntimeMode.CLUSTER and self.node_network is NodeNetworkMode.NETNS:
            raise ValueError("runtime.node_network=netns is for local mode's simulated nodes; a cluster's nodes "
                             "have networks of their own")
        if self.resolved_mode is RuntimeMode.CLUSTER and self.local_nodes != 1:
            raise ValueError("runtime.local_nodes is for local mode; a cluster's nodes are its hosts, each "
                             "with its own data system worker (DS_WORKER_ADDR)")
        return self


class AppConfig(BaseSettings):
    """Everything the App needs. Every field is documented; unknown keys are errors."""

    model_config = SettingsConfigDict(extra="forbid", validate_assignment=True, frozen=True,
                                      env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER,
                                      env_parse_none_str="null")

    model: Path | None = Field(None, description="A local model directory vLLM supports. Unset: a small "
                               "demo Qwen2 model with RANDOM weights is built once and cached.")
    served_model_name: str | None = Field(None, description="The model name clients send. Defaults to "
                                          "the model directory's name.")
    mode: ServingMode = Field(ServingMode.MERGED, description="merged: every replica serves whole "
                              "requests. disaggregated: Prefill replicas compute the prompt and store its KV "
                              "in the data system, Decode replicas load it and generate (needs kv.enabled).")
    replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="Merged mode: replicas started by "
                          "App.start(). Disaggregated mode uses prefill.replicas and decode.replicas.")
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)
    demo_cache_dir: Path = Field(Path.home() / ".cache" / "yrllm", description="Where the demo model "
                                 "is built, and model content digests and the modules an engine start "
                                 "imports (per vLLM version) are cached.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    router: RouterConfig = Field(default_factory=RouterConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    kv: KVConfig = Field(default_factory=KVConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("model")
    @classmethod
    def _model_dir_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser().resolve()
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} is not a model directory (no config.json)")
        return value

    @property
    def kv_capacity_gb(self) -> float:
        """``kv.capacity_gb``, or its default for this runtime."""
        if self.kv.capacity_gb is not None:
            return self.kv.capacity_gb
        sized = self.runtime.resolved_mode is RuntimeMode.LOCAL and self.runtime.ds_shared_memory_mb is not None
        return self.runtime.ds_shared_memory_mb / 4 / 1000 if sized else 1.0

    def tensor_parallel(self, role: Role) -> int:
        """The tensor parallel size of ``role``'s engines (merged replicas take the prefill pool's)."""
        return self.decode.tensor_parallel if role is Role.DECODE else self.prefill.tensor_parallel

    @property
    def pools(self) -> dict[Role, int]:
        """The replicas each role starts with."""
        if self.mode is ServingMode.MERGED:
            return {Role.MERGED: self.replicas}
        return {Role.PREFILL: self.prefill.replicas, Role.DECODE: self.decode.replicas}

    @model_validator(mode="after")
    def _pools_match_the_mode(self) -> "AppConfig":
        if self.mode is ServingMode.DISAGGREGATED:
            if not self.kv.enabled:
                raise ValueError("mode: disaggregated hands the KV over through the data system: it needs "
                                 "kv.enabled")
            if "replicas" in self.model_fields_set:
                raise ValueError("'replicas' counts merged replicas; mode: disaggregated takes "
                                 "prefill.replicas and decode.replicas")
        elif "replicas" in self.prefill.model_fields_set or "decode" in self.model_fields_set:
            raise ValueError("prefill.replicas and the decode section apply to mode: disaggregated; merged "
                             "mode takes 'replicas' (and prefill.tensor_parallel)")
        return self

    @model_validator(mode="after")
    def _kv_fits(self) -> "AppConfig":
        if (self.kv.enabled and self.runtime.resolved_mode is RuntimeMode.LOCAL
                and self.runtime.ds_shared_memory_mb is not None
                and self.kv_capacity_gb * 1000 >= self.runtime.ds_shared_memory_mb):
            raise ValueError(f"kv.capacity_gb ({self.kv.capacity_gb}) must leave room for the weights in "
                             f"runtime.ds_shared_memory_mb ({self.runtime.ds_shared_memory_mb})")
        return self

    @classmethod
    def load(cls, file: str | Path | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> "AppConfig":
        """Build the config from defaults < YAML ``file`` < ``env`` (``os.environ`` if None) <
        ``overrides`` (CLI flags).

        ``overrides`` uses dotted names for sections (``{"router.port": 9100}``); ``None`` values are
        ignored so that unset CLI flags do not mask the other sources.
        """
        flags = unflatten({name: value for name, value in (overrides or {}).items() if value is not None})
        try:
            with LoadInputs(None if file is None else Path(file), env).active():
                return cls(**flags)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None
        except SettingsError as exc:  # a value that could not be decoded (YAML or JSON)
            raise ConfigError(f"invalid configuration: {exc}: {exc.__cause__}") from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: keyword arguments (the command line, through load) beat the
        # environment, which beats the YAML file. No .env file and no secrets directory are read.
        return (init_settings, *sources_for(settings_cls))


def _describe(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {field}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)
