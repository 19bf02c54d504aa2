"""Placement of new replicas across nodes, and the loader's fetch batches (no engine, no worker)."""

from __future__ import annotations

import pytest

from app.control.placement import least_loaded
from app.replica import Node
from app.weights.identity import RankLayout, WeightKeys

NODES = [Node(name=f"node{i}", ds_address=f"127.0.0.1:{7000 + i}") for i in (1, 2, 3)]


def names(nodes: list[Node]) -> list[str]:
    return [node.name for node in nodes]


def test_replicas_fill_the_nodes_evenly_starting_with_node1():
    assert names(least_loaded(NODES, [], 4)) == ["node1", "node2", "node3", "node1"]


def test_new_replicas_go_where_there_are_fewest():
    assert names(least_loaded(NODES, ["node1", "node1", "node3"], 3)) == ["node2", "node2", "node3"]


def test_replicas_on_unknown_nodes_do_not_count_and_no_node_is_an_error():
    assert names(least_loaded(NODES[:1], [None, "elsewhere"], 2)) == ["node1", "node1"]
    with pytest.raises(ValueError, match="no node"):
        least_loaded([], [], 1)


def test_a_cluster_nodes_address_makes_valid_marker_keys():
    keys = WeightKeys("a" * 32, RankLayout())
    assert keys.landed("10.0.0.7:31501", "r2").endswith("_on_10-0-0-7:31501_by_r2")
    assert keys.landed("node2", "r2") != keys.fetch_failed("node2", "r2")


def test_a_fetch_reads_in_batches_of_bounded_bytes():
    from app.weights.host_tier import batches_by_bytes

    mb = 1 << 20
    batches = batches_by_bytes(["a", "b", "c", "d", "e"], [100 * mb, 100 * mb, 100 * mb, 600 * mb, mb], limit=256 * mb)
    # A value over the limit is a batch of its own (its call gets a longer timeout).
    assert batches == [(["a", "b"], 200 * mb), (["c"], 100 * mb), (["d"], 600 * mb), (["e"], mb)]
    assert batches_by_bytes([], [], limit=mb) == []
    assert batches_by_bytes(["a", "b"], [0, 0], limit=mb) == [(["a", "b"], 0)]
