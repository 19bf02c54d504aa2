"""The autoscaling policy on synthetic signal sequences."""

import pytest

from app.config import AppConfig, AutoscaleConfig, ConfigError
from app.control.autoscale_policy import AutoscalePolicy, Signals
from app.control.autoscaler import pool_config
from app.replica import Role

CONFIG = AutoscaleConfig(enabled=True, min_replicas=1, max_replicas=4, target_in_flight=4, quiet_period_s=10)


def run(policy, sequence, step_s=1.0):
    """Feed (ready, in_flight) pairs one second apart; apply each decision at once."""
    ready, targets = sequence[0][0], []
    for second, (_, in_flight) in enumerate(sequence):
        decision = policy.evaluate(Signals(ready=ready, in_flight=in_flight), now=second * step_s)
        if decision is not None:
            ready = decision.target
        targets.append(ready)
    return targets


def test_scales_up_at_the_first_evaluation_with_pressure_to_what_the_load_needs():
    policy = AutoscalePolicy(CONFIG)
    decision = policy.evaluate(Signals(ready=1, in_flight=11), now=0)
    assert decision.target == 3  # ceil(11 / 4), in one step
    assert decision.reason.startswith("scale up") and "11 in flight" in decision.reason
    assert decision.as_dict()["signals"]["in_flight"] == 11


def test_holds_during_the_quiet_period_then_steps_down_one_at_a_time():
    policy = AutoscalePolicy(CONFIG)
    targets = run(policy, [(3, 0)] * 25)
    assert targets[:10] == [3] * 10  # quiet period: hold
    assert targets[10] == 2  # after 10 s of calm, one step down
    assert targets[11:20] == [2] * 9  # a full quiet period again before the next step
    assert targets[-1] == 1 and min(targets) == 1  # never below min_replicas


def test_pressure_resets_the_quiet_clock():
    policy = AutoscalePolicy(CONFIG)
    targets = run(policy, [(2, 0)] * 8 + [(2, 8)] + [(2, 0)] * 8)
    assert targets == [2] * 17  # the load at second 8 needed both replicas: no step down yet


def test_bounds_are_respected():
    policy = AutoscalePolicy(CONFIG)
    assert policy.evaluate(Signals(ready=4, in_flight=100), now=0) is None  # at max: nothing to do
    assert policy.evaluate(Signals(ready=0, in_flight=0), now=0).target == 1  # below min
    assert policy.evaluate(Signals(ready=6, in_flight=0), now=0).target == 4  # above max
    assert policy.evaluate(Signals(ready=2, in_flight=50), now=0).target == 4  # capped at max


ZERO = CONFIG.model_copy(update={"min_replicas": 0, "idle_s": 60})


def test_with_min_replicas_zero_the_quiet_path_stops_at_one_and_idleness_goes_to_zero():
    policy = AutoscalePolicy(ZERO)
    # Calm but not idle: one replica at a time, down to one, never zero.
    targets = run(policy, [(3, 0)] * 40)
    assert targets[-1] == 1 and min(targets) == 1
    calm = Signals(ready=1, in_flight=0, since_request_s=59)
    assert policy.evaluate(calm, now=100) is None
    # No request for idle_s: straight to zero, from any size.
    decision = policy.evaluate(Signals(ready=3, in_flight=0, since_request_s=61), now=101)
    assert decision.target == 0 and decision.reason == "scale to zero: no request for 61 s (idle_s 60)"
    assert policy.evaluate(Signals(ready=0, in_flight=0, since_request_s=500), now=102) is None  # stays
    # A request in flight is not idleness, whatever the clock says (a stream longer than idle_s).
    assert policy.evaluate(Signals(ready=1, in_flight=1, since_request_s=61), now=103) is None


def test_idleness_means_nothing_while_min_replicas_is_above_zero():
    assert AutoscalePolicy(CONFIG).evaluate(Signals(ready=1, in_flight=0, since_request_s=10**6), now=0) is None


def test_requests_held_at_zero_are_load():
    decision = AutoscalePolicy(ZERO).evaluate(Signals(ready=0, in_flight=0, held=9, since_request_s=0), now=0)
    assert decision.target == 3 and decision.reason == "scale up: 0 in flight + 9 held > 4 per replica x 0"


def test_no_flapping_on_a_noisy_steady_load():
    policy = AutoscalePolicy(CONFIG)
    noisy = [5, 7, 6, 8, 4, 7, 6, 5, 8, 6] * 6  # 4..8 in flight: two replicas' worth, never more
    targets = run(policy, [(2, load) for load in noisy])
    assert set(targets) == {2}


def test_starting_replicas_count_as_capacity():
    policy = AutoscalePolicy(CONFIG)
    assert policy.evaluate(Signals(ready=1, starting=2, in_flight=11), now=0) is None
    assert policy.evaluate(Signals(ready=1, starting=2, in_flight=0), now=100) is None  # no step down


def test_slow_first_tokens_are_pressure():
    policy = AutoscalePolicy(CONFIG.model_copy(update={"ttft_target_s": 1.0}))
    decision = policy.evaluate(Signals(ready=2, in_flight=3, ttft_p50_s=2.5), now=0)
    assert decision.target == 3 and "TTFT" in decision.reason
    assert policy.evaluate(Signals(ready=2, in_flight=0, ttft_p50_s=2.5), now=0) is None  # stale TTFT, idle


def test_min_above_max_is_a_config_error():
    with pytest.raises(ConfigError, match="min_replicas"):
        AppConfig.load(env={}, overrides={"autoscale.min_replicas": 5, "autoscale.max_replicas": 2})


def test_each_pool_follows_its_own_signal():
    config = CONFIG.model_copy(update={"ttft_target_s": 1.0, "target_decode_streams": 8.0})
    prefill = AutoscalePolicy(pool_config(config, Role.PREFILL), Role.PREFILL)
    decode = AutoscalePolicy(pool_config(config, Role.DECODE), Role.DECODE)
    # Slow first tokens are the prefill pool's pressure, not the decode pool's.
    slow = Signals(ready=1, in_flight=1, ttft_p50_s=3.0)
    assert prefill.evaluate(slow, now=0).as_dict()["role"] == "prefill"
    assert decode.evaluate(slow, now=0) is None
    # Decode replicas hold more streams each before it is pressure.
    assert decode.evaluate(Signals(ready=1, in_flight=8), now=0) is None
    up = decode.evaluate(Signals(ready=1, in_flight=17), now=0)
    assert (up.role, up.target) == (Role.DECODE, 3) and "17 in flight > 8 per replica" in up.reason
