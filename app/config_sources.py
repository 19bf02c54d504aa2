"""Where configuration values come from, as pydantic-settings sources: the YAML file, the ``YRLLM_*``
variables and the original case's ``YR_SERVER_ADDRESS`` / ``DS_WORKER_ADDR``. pydantic-settings
merges them (nested sections field by field) in the order ``AppConfig`` gives.

pydantic-settings builds its sources in a classmethod that takes no per-call arguments, so the file
and the environment of one ``AppConfig.load`` call reach the sources through a context variable
(``LoadInputs.active``): two loads in two threads never see each other's inputs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, InitSettingsSource, PydanticBaseSettingsSource
from pydantic_settings.sources.utils import parse_env_vars

ENV_PREFIX = "YRLLM_"
NESTED_DELIMITER = "__"
#: The original case's runtime and serving variables (its deployment scripts set them) and the (dotted)
#: fields they fill.
ORIGINAL_CASE_VARIABLES = {"YR_SERVER_ADDRESS": "runtime.server_address", "DS_WORKER_ADDR": "runtime.ds_address",
                           "MODEL_PATH": "model", "SERVER_IP": "router.host", "SERVER_PORT": "router.port",
                           "USING_PREFIX_CONNECTOR": "kv.enabled"}
#: Its pool variables: instances and tensor parallel size of the prefill and decode pools.
ORIGINAL_CASE_POOLS = ("PREFILL_INS_NUM", "DECODE_INS_NUM", "PTP", "DTP")
#: Its data parallel sizes: 1 (or 0 for an empty pool) is what the App runs; more is refused.
ORIGINAL_CASE_DATA_PARALLEL = ("PDP", "DDP")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class LoadInputs:
    """The per-call inputs of one ``AppConfig.load``: the YAML file and the environment."""

    file: Path | None = None
    env: Mapping[str, str] | None = None  # None: os.environ

    @contextmanager
    def active(self) -> Iterator[None]:
        token = _INPUTS.set(self)
        try:
            yield
        finally:
            _INPUTS.reset(token)


_INPUTS: ContextVar[LoadInputs] = ContextVar("yrllm_config_inputs", default=LoadInputs())


def sources_for(settings_cls: type[BaseSettings]) -> tuple[PydanticBaseSettingsSource, ...]:
    """The sources below the command line, highest priority first."""
    inputs = _INPUTS.get()
    env = os.environ if inputs.env is None else inputs.env
    return (Environment(settings_cls, env), OriginalCaseVariables(settings_cls, env),
            YamlFile(settings_cls, inputs.file))


class Environment(EnvSettingsSource):
    """``YRLLM_<FIELD>`` and ``YRLLM_<SECTION>__<FIELD>``, case-insensitive.

    Lists and sections are read as YAML, a superset of JSON, so a shell can say
    ``YRLLM_ENGINE__EXTRA_ARGS='[--max-num-seqs, 8]'``. A ``YRLLM_`` variable that names no field is
    kept, so that validation rejects it: a typo is an error here as it is in the file."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = parse_env_vars(env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def decode_complex_value(self, field_name: str, field: FieldInfo | None, value: Any) -> Any:
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"{field_name}: not YAML or JSON: {exc}") from None

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        prefix, fields = ENV_PREFIX.lower(), self.settings_cls.model_fields
        unknown = {name[len(prefix):].replace(NESTED_DELIMITER, "."): value
                   for name, value in self.env_vars.items()
                   if name.startswith(prefix) and name[len(prefix):].split(NESTED_DELIMITER)[0] not in fields}
        return {**unflatten(unknown), **values}


class OriginalCaseVariables(PydanticBaseSettingsSource):
    """The original case's variables, kept so that its instructions work unchanged:

    - ``YR_SERVER_ADDRESS`` and ``DS_WORKER_ADDR``: the runtime (cluster mode);
    - ``MODEL_PATH``: the model; ``SERVER_IP`` / ``SERVER_PORT``: the Router's host and port;
      ``USING_PREFIX_CONNECTOR`` 1/0: ``kv.enabled``;
    - ``PREFILL_INS_NUM``, ``DECODE_INS_NUM``, ``PTP``, ``DTP``: the pools. As there, ``DECODE_INS_NUM``
      of 0 (or unset) means PD-merged: ``PREFILL_INS_NUM`` replicas, ``PTP`` their tensor parallel size,
      ``DTP`` unused; more than 0 means disaggregated;
    - ``PDP`` / ``DDP``: data parallel sizes. 1 (or 0, for an empty pool) is what every replica is; other
      values are refused until data parallelism exists.

    The ``YRLLM_*`` variables, more specific, win over them. Variables the original case sets for vLLM
    itself are documented in the README ("Running the original case's deployment")."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._values = unflatten({field: env[name] for name, field in ORIGINAL_CASE_VARIABLES.items() if env.get(name)})
        self._values.update(_pools(env))
        _check_data_parallel(env)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, True

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def _check_data_parallel(env: Mapping[str, str]) -> None:
    for name in ORIGINAL_CASE_DATA_PARALLEL:
        value = (env.get(name) or "").strip()
        if value not in ("", "0", "1"):
            raise ConfigError(f"{name}={value}: data parallelism is not supported yet; every replica is one "
                              "data parallel rank (1, or 0 for an empty pool). Scale out replicas instead "
                              "(PREFILL_INS_NUM / DECODE_INS_NUM, or POST /scaleout).")


def _pools(env: Mapping[str, str]) -> dict[str, Any]:
    prefill, decode, ptp, dtp = (env.get(name) or None for name in ORIGINAL_CASE_POOLS)
    if decode is None or decode.strip() == "0":
        values: dict[str, Any] = {"replicas": prefill} if prefill is not None else {}
        if ptp is not None:
            values["prefill"] = {"tensor_parallel": ptp}
        return values
    pools = {"prefill": {"replicas": prefill, "tensor_parallel": ptp},
             "decode": {"replicas": decode, "tensor_parallel": dtp}}
    return {"mode": "disaggregated",
            **{role: {k: v for k, v in pool.items() if v is not None} for role, pool in pools.items()}}


class YamlFile(InitSettingsSource):
    """The ``--config`` file: a YAML mapping of fields and sections. A file that is missing, unreadable
    or not a mapping is an error, not an empty source."""

    def __init__(self, settings_cls: type[BaseSettings], file: Path | None) -> None:
        super().__init__(settings_cls, {} if file is None else _read_yaml(file))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"router.port": 1}`` -> ``{"router": {"port": 1}}``."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
