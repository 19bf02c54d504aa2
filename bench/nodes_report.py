"""The cross-node weights benchmark's report (``bench.nodes``): fetch against memcpy and a cold disk read,
the map after it, the fan-out, which worker flags pay off, and the BENCHMARKS.md section."""

from __future__ import annotations

from pathlib import Path

from bench.report import write_section

TITLE = "Weights across nodes"


def _seconds(row: dict, key: str = "weights_s") -> str:
    value = row.get(key)
    return f"{value:.3f} s" if value is not None else f"failed: {row.get('error') or row.get('fallback')}"


def _rate(row: dict, nbytes: int) -> str:
    seconds = row.get("weights_s")
    return f"{_seconds(row)} ({nbytes / seconds / 1e9:.2f} GB/s)" if seconds else _seconds(row)


def _replica_row(replica: dict) -> str:
    weights = replica.get("weights") or {}
    origin = f"{weights.get('plan')} from {weights.get('source')}"
    if weights.get("fetched_from"):
        origin += f", fetched from {weights['fetched_from']}"
    seconds = weights.get("seconds") or 0.0
    gbps = weights.get("bytes", 0) / seconds / 1e9 if seconds else 0.0
    span = f"{replica.get('fetch_began_s', 0):.2f} / {replica.get('fetch_ended_s', 0):.2f}"
    return f"| {replica['replica_id']} | {replica.get('node')} | {origin} | {span} | {seconds:.3f} | {gbps:.2f} |"


def report(result: dict, out: Path, publish: bool) -> None:
    nbytes, arms, fan = result["weight_bytes"], result["arms"], result["fan_out"]
    default, populate = arms["default"], arms["populate"]
    cold = result["cold_disk"]

    def starts(arm: dict) -> str:
        times = arm["worker_start_s"]
        return f"{times['node2']:.1f} s head, {times['node1']:.1f} s joining"

    def seed(arm: dict) -> str:
        row = arm["seed"]
        return f"{_seconds(row)} + {row['publish_s']:.2f} s publish" if row.get("publish_s") is not None \
            else _seconds(row)

    def bytes_from(arm: dict, step: str) -> str:
        row = arm[step]
        where = f"{row.get('source')} on {row.get('node')}" + (
            f", fetched from {row['fetched_from']}" if row.get("fetched_from") else "")
        return where + (f"; FELL BACK: {row['fallback']}" if row.get("fallback") else "")

    fetch_s, map_s = default["fetch"].get("weights_s"), default["map"].get("weights_s")
    cold_s = cold.get("weights_s")
    replicas = [r for r in fan["replicas"] if r["action"] == "added"]
    lines = [
        f"{result['model']}, {nbytes / 1e9:.2f} GB of weights, on this {result['cpus']}-core {result['machine']} "
        f"machine ({result['date']}). The nodes are simulated: data system workers in one cluster on this "
        "machine (`runtime.local_nodes`), so the bytes cross loopback, not a network. Each load runs in a fresh "
        "vLLM process; the times are the load format's own (LoadReport), vLLM's start-up not included. "
        "Nothing else was running.", "",
        "| | default workers | pre-faulted workers (`runtime.ds_populate`) |", "|---|---|---|",
        f"| worker start | {starts(default)} | {starts(populate)} |",
        f"| seed on node1 (disk, warm page cache, then publish) | {seed(default)} | {seed(populate)} |",
        f"| **first replica on node2: fetch from node1, then map** | **{_rate(default['fetch'], nbytes)}** | "
        f"**{_rate(populate['fetch'], nbytes)}** |",
        f"| second replica on node2: map its copy | {_seconds(default['map'])} | {_seconds(populate['map'])} |",
        f"| a replica on node1 (the seed's node): map | {_seconds(default['map_home'])} | "
        f"{_seconds(populate['map_home'])} |",
        f"| where the second replica's bytes came from | {bytes_from(default, 'map')} | "
        f"{bytes_from(populate, 'map')} |", "",
        "For comparison, in the same run:", "",
        f"- vLLM's safetensors loader, cold page cache: {_rate(cold, nbytes)}.",
        f"- memcpy between touched buffers: {result['memcpy_gbps']:.2f} GB/s; into fresh pages: "
        f"{result['fresh_memcpy_gbps']:.2f} GB/s. A fetch writes into the receiving worker's shared memory, "
        "fresh pages unless the worker pre-faulted them: that first touch is what bounds it here.", "",
        "**Fan-out from 1 node to 3**, end to end: an App with three nodes and one replica (node1), then "
        "`scale(3)`, both new replicas forked from the zygote at once (one engine "
        f"thread each): r2 and r3 fetch onto node2 and node3 at the same time. `scale()` took "
        f"**{fan['scale_s']:.2f} s** until both served (engine start-up included); both copies were in place "
        f"{fan['copies_s']:.2f} s after the first fetch began. The WeightCache counted {fan['fetches']} "
        f"cross-node fetches; the replicas answered {'with' if fan['identical_tokens'] else 'WITHOUT'} the "
        "seed's greedy tokens.", "",
        "| replica | node | weights | fetch began / ended (s after `scale()`) | seconds | GB/s |",
        "|---|---|---|---|---|---|",
        *[_replica_row(replica) for replica in replicas], "",
        "Checks:", "",
        "| check | measured | met |", "|---|---|---|",
        f"| one cross-node fetch per new node (fan-out) | {fan['fetches']} fetches for 2 nodes | "
        f"{'yes' if fan['fetches'] == 2 else 'no'} |",
        f"| identical greedy tokens on every node | {fan['identical_tokens']} | "
        f"{'yes' if fan['identical_tokens'] else 'no'} |",
        f"| the first fetch beats a cold disk read | {fetch_s or 0:.2f} s against {cold_s or 0:.2f} s | "
        f"{'yes' if fetch_s and cold_s and fetch_s < cold_s else 'no'} |",
        f"| the second replica on the node maps in ≤ 0.1 s | {map_s or 0:.3f} s | "
        f"{'yes' if map_s is not None and map_s <= 0.1 else 'no'} |",
        "",
    ]
    write_section(out, "nodes", TITLE, "\n".join(lines), publish)
