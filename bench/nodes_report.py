"""The cross-node weights benchmark's report (``bench.nodes``): one relay against the link rate, fan-out
star against chain, the targets, the plot of copies in place over time, and the BENCHMARKS.md section."""

from __future__ import annotations

from pathlib import Path

from bench.report import write_section
from bench.run import host_line

TITLE = "Weights across nodes"


def _span(run: dict | None) -> float | None:
    """From the first relay's start to the last copy complete: the transfer, without the engines' start."""
    if run is None or run["copies_in_place_s"] is None or run["relays_began_s"] is None:
        return None
    return run["copies_in_place_s"] - run["relays_began_s"]


def _s(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "n/a"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**MISSED**"


def _table(runs: list[dict], gbps: float | None) -> list[str]:
    link = f"links shaped to {gbps:g} Gbit/s both ways" if gbps else "unshaped links"
    lines = [f"**{link[0].upper()}{link[1:]}**", "",
             "| fan-out | plan | copies in place (since `scale()`) | transfer (first relay began → last copy) | "
             "every new replica serving | relays (from → to: GB/s) | tokens |", "|---|---|---|---|---|---|---|"]
    for run in sorted(runs, key=lambda r: (r["nodes"], r["fanout"] != "star")):
        relays = ", ".join(f"{r['fetched_from'] or 'disk'}→{r['node']}: {r['gbps'] or 0:.3f}"
                           + (f" ({len(r['failovers'])} failover)" if r["failovers"] else "")
                           for r in sorted(run["relays"], key=lambda r: r["node"]))
        tokens = "same as the seed" if run["identical_tokens"] else "DIFFER"
        lines.append(f"| 1 → {run['nodes']} | {run['fanout']} | {_s(run['copies_in_place_s'])} | {_s(_span(run))} | "
                     f"{_s(run['serving_s'])} | {relays} | {tokens} |")
    return lines + [""]


def _plot(result: dict, out: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -r requirements-bench.txt)")
        return None
    shaped = [r for r in result["runs"] if r["link_gbps"]]
    most = max((r["nodes"] for r in shaped), default=0)
    runs = [r for r in shaped if r["nodes"] == most]
    if not runs:
        return None
    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), sharey=True)
    for axis, run in zip(axes if len(runs) > 1 else [axes], runs):
        for node in sorted({k for s in run["samples"] for k in s if k != "t"}):
            axis.plot([s["t"] for s in run["samples"]], [(s.get(node) or 0) / 1e9 for s in run["samples"]],
                      label=node)
        axis.set_title(f"1 → {run['nodes']} nodes, {run['fanout']}, {run['link_gbps']:g} Gbit/s links")
        axis.set_xlabel("seconds since scale()")
        axis.grid(alpha=0.3)
        axis.legend()
    (axes[0] if len(runs) > 1 else axes).set_ylabel("GB of the node's copy sealed")
    figure.tight_layout()
    path = out / "nodes_fanout.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def _where_the_time_went(one: dict | None, chain: dict | None, unshaped: list[dict], most: int, link_gbs: float,
                         cores: int) -> list[str]:
    """From the relays' own split of their time (reading, the rest storing) and rates."""
    lines = []
    if one and one["relays"] and one["relays"][0]["read_s"]:
        relay = one["relays"][0]
        read_gbs = one["bytes"] / relay["read_s"] / 1e9
        lines.append(f"Where the time went: the single relay took {relay['relay_s']:.1f} s, {relay['read_s']:.1f} s of "
                     f"it reading ({read_gbs:.3f} GB/s, {read_gbs / link_gbs * 100:.0f} % of the link: a request per "
                     "64 MiB piece, beside its engine's start); the rest is storing into its node's worker that the "
                     "reads did not hide (a piece's copies overlap the next read; its create and seal wait for "
                     "it, as the data system client's read holds the GIL).")
    if chain and chain["relays"]:
        rates = [r["gbps"] for r in chain["relays"] if r["gbps"]]
        pair = {r["fanout"]: _span(r) for r in unshaped if r["nodes"] == most}
        lines.append(f"The 1 → {most} chain's relays ran at {min(rates):.3f}-{max(rates):.3f} GB/s each, beside "
                     f"{most - 1} engine starts on {cores} cores" + (
                         f"; unshaped, the chain took {_s(pair.get('chain'))} and the star {_s(pair.get('star'))}: "
                         "where the cores, not the links, bound a relay, the plan cannot help" if pair else "") + ".")
    return lines + [""] if lines else []


def report(result: dict, out: Path, publish: bool) -> None:
    runs, gbps = result["runs"], result["link_gbps"]
    shaped = [r for r in runs if r["link_gbps"]]
    unshaped = [r for r in runs if not r["link_gbps"]]
    one = next((r for r in shaped if r["nodes"] == 2 and r["fanout"] == "chain"), None)
    most = max((r["nodes"] for r in shaped), default=2)
    chain = next((r for r in shaped if r["nodes"] == most and r["fanout"] == "chain"), None)
    star = next((r for r in shaped if r["nodes"] == most and r["fanout"] == "star"), None)
    link_gbs = gbps / 8
    one_gbps = one["relays"][0]["gbps"] if one and one["relays"] and one["relays"][0]["gbps"] else 0.0
    ratio = _span(chain) / _span(one) if _span(chain) and _span(one) else None
    star_ratio = _span(star) / _span(one) if _span(star) and _span(one) else None
    plot = _plot(result, out)
    c = result["conditions"]
    lines = [
        f"Host: {host_line(c)}. {c['date']}. The {result['shape']} shape (demo, random weights, {c['dtype']}), "
        f"{(one or runs[0])['bytes'] / 1e9:.2f} GB of weights. Each node is a network namespace with its own "
        "address, a veth pair to a bridge and its own data system worker (`runtime.node_network=netns`); its "
        "replicas' engines run inside it. Per row: an App with N nodes and one replica (the seed, node1) "
        "scales to N, one new replica per new node, all at once; a sampler reads every 0.2 s how many bytes "
        "of each new node's copy are sealed. Seed from a warm page cache; nothing else was running. One run.", "",
        *_table(shaped, gbps), *_table(unshaped, None),
        "A star reads every copy from node1, so node1's link carries N-1 copies; the chain relays them "
        "from node1 to the first new node to ask, from it to the next, and so on (the relays column shows "
        "the order), each node passing on 64 MiB pieces as they are sealed (`app.weights.relay`).", "",
        *([f"![copies in place over time]({plot})", ""] if plot else []),
        "Targets (shaped links):", "",
        "| target | measured | |", "|---|---|---|",
        f"| one relay ≥ 85 % of the link rate ({link_gbs:.3f} GB/s) | {one_gbps:.3f} GB/s = "
        f"{one_gbps / link_gbs * 100:.0f} % | {_met(one_gbps >= 0.85 * link_gbs)} |",
        f"| fan-out 1 → {most} within 1.5× one relay's time (transfer: first relay began → last copy) | chain "
        f"{_s(_span(chain))} = {ratio or 0:.2f}× {_s(_span(one))}; star {_s(_span(star))} = {star_ratio or 0:.2f}× | "
        f"{_met(ratio is not None and ratio <= 1.5)} |",
        f"| identical greedy tokens on every node, every run | {sum(r['identical_tokens'] for r in runs)}/"
        f"{len(runs)} runs | {_met(all(r['identical_tokens'] for r in runs))} |",
        "", *_where_the_time_went(one, chain, unshaped, most, link_gbs, c["cores"]),
    ]
    write_section(out, "nodes", TITLE, "\n".join(lines), publish)
