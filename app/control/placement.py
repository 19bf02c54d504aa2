"""Where new replicas go: the node with the fewest replicas, the first such node in order on a tie.

Nodes then fill evenly, and node1 (whose worker is not the metastore's, see ``app.runtime``) takes
the first replica, the seed the other nodes fetch from."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from app.replica import Node


def least_loaded(nodes: list[Node], placed: Iterable[str | None], count: int) -> list[Node]:
    """Nodes for ``count`` new replicas, given the nodes of the replicas there are (``placed``)."""
    if not nodes:
        raise ValueError("there is no node to place replicas on")
    load = Counter(placed)
    chosen = []
    for _ in range(count):
        node = min(nodes, key=lambda candidate: load[candidate.name])
        load[node.name] += 1
        chosen.append(node)
    return chosen
