"""Config precedence (defaults < YAML < env < CLI) and errors that name the field."""

import json

import pytest

from app.config import AppConfig, ConfigError, RuntimeMode, ServingMode
from app.replica import Role


def test_defaults_are_safe():
    config = AppConfig.load(env={})
    assert config.router.host == "127.0.0.1"
    assert config.router.port == 9000
    assert config.engine.host == "127.0.0.1"
    assert config.runtime.resolved_mode is RuntimeMode.LOCAL
    assert config.model is None


def test_precedence_yaml_then_env_then_cli(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("replicas: 2\nrouter: {port: 9100, host: 127.0.0.2}\nengine: {kv_cache_gib: 2}\n")
    env = {"YRLLM_ROUTER__PORT": "9200", "YRLLM_ENGINE__DTYPE": "float32"}
    config = AppConfig.load(file, env=env, overrides={"router.port": 9300, "replicas": None})
    assert config.router.port == 9300  # CLI beats env beats YAML
    assert config.router.host == "127.0.0.2"  # YAML beats defaults
    assert config.engine.dtype == "float32"  # env beats defaults
    assert config.engine.kv_cache_gib == 2
    assert config.replicas == 2  # an unset CLI flag (None) does not mask the YAML


def test_env_lists_and_original_case_variables():
    env = {"YRLLM_ENGINE__EXTRA_ARGS": "[--max-num-seqs, '8']",
           "YR_SERVER_ADDRESS": "10.0.0.1:31501", "DS_WORKER_ADDR": "10.0.0.1:11373"}
    config = AppConfig.load(env=env)
    assert config.engine.extra_args == ["--max-num-seqs", "8"]
    assert config.runtime.resolved_mode is RuntimeMode.CLUSTER
    assert config.runtime.ds_address == "10.0.0.1:11373"


@pytest.mark.parametrize("source, field", [
    ({"overrides": {"router.port": 70000}}, "router.port"),
    ({"env": {"YRLLM_ENGINE__KV_CACHE_GIB": "-1"}}, "engine.kv_cache_gib"),
    ({"overrides": {"replicas": "many"}}, "replicas"),
    ({"overrides": {"router.prot": 1}}, "router.prot"),  # typo: extra="forbid"
    ({"env": {"DS_WORKER_ADDR": "nohost"}}, "runtime.ds_address"),
])
def test_bad_values_name_the_field(source, field):
    env = source.get("env", {})
    with pytest.raises(ConfigError) as info:
        AppConfig.load(env=env, overrides=source.get("overrides"))
    assert field in str(info.value)


def test_cluster_mode_needs_both_addresses():
    with pytest.raises(ConfigError, match="DS_WORKER_ADDR"):
        AppConfig.load(env={"YR_SERVER_ADDRESS": "10.0.0.1:31501"})


def test_model_must_be_a_model_directory(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        AppConfig.load(env={}, overrides={"model": str(tmp_path)})
    (tmp_path / "config.json").write_text("{}")
    assert AppConfig.load(env={}, overrides={"model": str(tmp_path)}).model == tmp_path.resolve()


def test_unreadable_yaml_is_a_config_error(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        AppConfig.load(file, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        AppConfig.load(tmp_path / "missing.yaml", env={})


def test_an_unknown_variable_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="replicaz"):
        AppConfig.load(env={"YRLLM_REPLICAZ": "2"})
    with pytest.raises(ConfigError, match=r"router\.prot"):
        AppConfig.load(env={"YRLLM_ROUTER__PROT": "1"})


def test_environment_values_null_sections_and_precedence_over_the_original_case_variables():
    env = {"YRLLM_ENGINE__MAX_MODEL_LEN": "null", "YRLLM_ROUTER": "{port: 9100, host: 127.0.0.3}",
           "YRLLM_SERVED_MODEL_NAME": "123", "YR_SERVER_ADDRESS": "10.0.0.1:31501",
           "DS_WORKER_ADDR": "10.0.0.1:11373", "YRLLM_RUNTIME__DS_ADDRESS": "10.0.0.2:11373"}
    config = AppConfig.load(env=env)
    assert config.engine.max_model_len is None
    assert (config.router.host, config.router.port) == ("127.0.0.3", 9100)  # a whole section as YAML
    assert config.served_model_name == "123"  # strings stay strings
    assert config.runtime.server_address == "10.0.0.1:31501"
    assert config.runtime.ds_address == "10.0.0.2:11373"  # YRLLM_* is more specific, and wins


def test_one_load_does_not_leak_into_the_next():
    assert AppConfig.load(env={"YRLLM_REPLICAS": "3"}).replicas == 3
    assert AppConfig.load(env={}).replicas == 1


def test_an_undecodable_environment_value_names_the_field():
    with pytest.raises(ConfigError, match="extra_args: not YAML or JSON"):
        AppConfig.load(env={"YRLLM_ENGINE__EXTRA_ARGS": "[unclosed"})


def test_kv_capacity_defaults_to_a_quarter_of_a_sized_local_worker_and_must_fit_in_it():
    assert AppConfig.load(env={}).kv_capacity_gb == 1.0  # the worker is then sized from the model, for it
    assert AppConfig.load(env={}, overrides={"runtime.ds_shared_memory_mb": 256}).kv_capacity_gb == 0.064
    assert AppConfig.load(env={}, overrides={"kv.capacity_gb": 2}).kv_capacity_gb == 2
    cluster = {"runtime.server_address": "10.0.0.1:31222", "runtime.ds_address": "10.0.0.1:31501"}
    assert AppConfig.load(env={}, overrides=cluster).kv_capacity_gb == 1.0
    with pytest.raises(ConfigError, match="kv.capacity_gb .* must leave room for the weights"):
        AppConfig.load(env={}, overrides={"kv.capacity_gb": 5, "runtime.ds_shared_memory_mb": 4096})
    # Off, a capacity is not checked: it is not used.
    assert not AppConfig.load(env={}, overrides={"kv.enabled": False, "kv.capacity_gb": 40}).kv.enabled


def test_disaggregated_pools_and_the_original_case_variables():
    config = AppConfig.load(env={"YRLLM_MODE": "disaggregated", "YRLLM_DECODE__REPLICAS": "3"})
    assert config.pools == {Role.PREFILL: 1, Role.DECODE: 3}
    # The original case: DECODE_INS_NUM 0 is PD-merged (its DTP=0 means no decode pool)...
    merged = AppConfig.load(env={"PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "0", "PTP": "1", "DTP": "0"})
    assert merged.mode is ServingMode.MERGED and merged.pools == {Role.MERGED: 2}
    # ... and more than 0 is disaggregated.
    split = AppConfig.load(env={"PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "4", "PTP": "1", "DTP": "1"})
    assert split.mode is ServingMode.DISAGGREGATED and split.pools == {Role.PREFILL: 2, Role.DECODE: 4}
    assert AppConfig.load(env={"PREFILL_INS_NUM": "2", "DECODE_INS_NUM": "4",
                               "YRLLM_DECODE__REPLICAS": "1"}).pools[Role.DECODE] == 1  # YRLLM_* wins


@pytest.mark.parametrize("env, message", [
    ({"PTP": "0"}, "prefill.tensor_parallel"),
    ({"PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "1", "DTP": "0"}, "decode.tensor_parallel"),
    ({"PDP": "2"}, "PDP=2: data parallelism is not supported yet"),
    ({"DDP": "4"}, "DDP=4: data parallelism is not supported yet"),
    ({"PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "two"}, "decode.replicas"),
    ({"YRLLM_MODE": "disaggregated", "YRLLM_REPLICAS": "2"}, "'replicas' counts merged replicas"),
    ({"YRLLM_DECODE__REPLICAS": "2"}, "apply to mode: disaggregated"),
    ({"YRLLM_MODE": "disaggregated", "YRLLM_KV__ENABLED": "false"}, "needs kv.enabled"),
    ({"YRLLM_MODE": "split"}, "mode"),
])
def test_pools_that_do_not_fit_the_mode_are_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        AppConfig.load(env=env)


def test_local_nodes_are_for_local_mode_only():
    assert AppConfig.load(env={}, overrides={"runtime.local_nodes": 3}).runtime.local_nodes == 3
    with pytest.raises(ConfigError, match="runtime.local_nodes is for local mode"):
        AppConfig.load(env={"YR_SERVER_ADDRESS": "10.0.0.1:31222", "DS_WORKER_ADDR": "10.0.0.1:31501"},
                       overrides={"runtime.local_nodes": 2})
    with pytest.raises(ConfigError, match="local_nodes"):
        AppConfig.load(env={}, overrides={"runtime.local_nodes": 0})


def test_the_entrypoint_takes_the_number_of_local_nodes():
    from entrypoint import parse_args

    _, overrides = parse_args(["--local-nodes", "3"])
    assert AppConfig.load(env={}, overrides=overrides).runtime.local_nodes == 3


ORIGINAL_CASE_BLOCK = {  # the original case's environment block, verbatim (../shared/seed/)
    "SERVER_IP": "127.0.0.1", "SERVER_PORT": "9000", "MODEL_PATH": "/workspace/models/qwen2.5_7B",
    "VLLM_USE_V1": "1", "VLLM_WORKER_MULTIPROC_METHOD": "spawn", "vLLM_MODEL_MEMORY_USE_GB": "20",
    "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python", "USING_PREFIX_CONNECTOR": "1",
    "PREFILL_INS_NUM": "1", "DECODE_INS_NUM": "0", "PTP": "2", "DTP": "0", "PDP": "1", "DDP": "0"}


def test_the_original_case_block_configures_model_router_kv_and_tensor_parallel(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    env = {**ORIGINAL_CASE_BLOCK, "MODEL_PATH": str(tmp_path), "SERVER_IP": "127.0.0.2", "SERVER_PORT": "9123",
           "USING_PREFIX_CONNECTOR": "0"}
    config = AppConfig.load(env=env)
    assert config.model == tmp_path.resolve() and (config.router.host, config.router.port) == ("127.0.0.2", 9123)
    assert not config.kv.enabled and config.mode is ServingMode.MERGED and config.pools == {Role.MERGED: 1}
    assert config.tensor_parallel(Role.MERGED) == 2
    assert AppConfig.load(env={**env, "USING_PREFIX_CONNECTOR": "1"}).kv.enabled
    # YRLLM_* variables still win over them.
    assert AppConfig.load(env={**env, "YRLLM_ROUTER__PORT": "9200", "YRLLM_PREFILL__TENSOR_PARALLEL": "1"}
                          ).router.port == 9200
    with pytest.raises(ConfigError, match="model: .*qwen2.5_7B is not a model directory"):
        AppConfig.load(env=ORIGINAL_CASE_BLOCK)  # its MODEL_PATH is not on this machine


@pytest.mark.parametrize("config, size, message", [
    ({"num_attention_heads": 4, "num_key_value_heads": 2}, 3, "4 attention heads do not split over 3 ranks"),
    ({"num_attention_heads": 12, "num_key_value_heads": 4}, 6, "4 KV heads neither split over 6 ranks"),
    ({"num_attention_heads": 64, "num_key_value_heads": 64}, 64, "each rank needs a core of its own"),
])
def test_tensor_parallel_sizes_that_do_not_fit_the_model_or_the_host_are_clear_errors(tmp_path, config, size, message):
    from app.engine.tensor_parallel import check_tensor_parallel

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        check_tensor_parallel(tmp_path, size, field="prefill.tensor_parallel")
    check_tensor_parallel(tmp_path, 1, field="prefill.tensor_parallel")  # 1 always fits


def test_pools_share_kv_objects_of_the_largest_tensor_parallel_size_or_are_refused(tmp_path):
    from app.engine.tensor_parallel import kv_splits

    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 12, "num_key_value_heads": 6}))
    assert kv_splits(tmp_path, {1}) == 1 and kv_splits(tmp_path, {1, 2}) == 2 and kv_splits(tmp_path, {2, 6}) == 6
    with pytest.raises(ConfigError, match=r"\(2 and 3\) cannot share KV blocks"):
        kv_splits(tmp_path, {2, 3})


def test_a_tensor_parallel_size_the_model_cannot_take_stops_entrypoint_before_anything_starts(model_dir):
    """The demo model has 4 attention heads: PTP=3 is refused with the numbers, exit code 2."""
    import subprocess
    import sys
    from pathlib import Path

    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "MODEL_PATH": str(model_dir), "PTP": "3",
           "SERVER_PORT": "0"}
    done = subprocess.run([sys.executable, "entrypoint.py"], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: prefill.tensor_parallel=3: the model's 4 attention heads do not split over 3 ranks" in done.stderr


def test_the_removed_standby_setting_is_refused_with_what_replaced_it():
    with pytest.raises(ConfigError, match="engine.standby_processes was removed: every engine process is forked"):
        AppConfig.load(env={}, overrides={"engine.standby_processes": 1})
