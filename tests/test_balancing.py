"""Least-outstanding-requests balancing."""

from collections import Counter

import pytest

from app.router.balancing import BalancingPolicy


def test_picks_the_replica_with_fewest_in_flight():
    policy = BalancingPolicy.create("least_outstanding")
    assert policy.select(["a", "b", "c"], {"a": 3, "b": 1, "c": 2}) == "b"


def test_unknown_replicas_count_as_idle():
    policy = BalancingPolicy.create("least_outstanding")
    assert policy.select(["a", "new"], {"a": 1}) == "new"


def test_ties_are_shared_not_always_first():
    policy = BalancingPolicy.create("least_outstanding")
    picks = Counter(policy.select(["a", "b"], {}) for _ in range(200))
    assert set(picks) == {"a", "b"}


def test_no_ready_replica_gives_none():
    assert BalancingPolicy.create("least_outstanding").select([], {"a": 0}) is None


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="least_outstanding"):
        BalancingPolicy.create("round_robbin")
