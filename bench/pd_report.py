"""The prefill/decode benchmark's report (``bench.pd``): TTFT, TPOT and throughput per arm, the handoff's
transfer rates, what they mean on shared cores, and the BENCHMARKS.md section."""

from __future__ import annotations

from pathlib import Path

from bench.report import write_section

TITLE = "Disaggregated prefill/decode against merged serving"


def report_name(ptp: int, dtp: int) -> str:
    """The run's file name: ``pd``, or with the pools' tensor parallel sizes where either is not 1."""
    return "pd" if ptp == dtp == 1 else f"pd-ptp{ptp}-dtp{dtp}"


def report(result: dict, out: Path, publish: bool) -> None:
    s, kv = result["summary"], result["kv"]
    merged, split = s["merged"], s["disaggregated"]
    store_gbps = kv["bytes_stored"] / kv["store_seconds"] / 1e9 if kv["store_seconds"] else 0.0
    load_gbps = kv["bytes_loaded"] / kv["load_seconds"] / 1e9 if kv["load_seconds"] else 0.0
    handoffs = kv["handoffs"]
    handoff_mib = result["prompt_tokens"] * 12_288 / 2**20

    def row(name: str, key: str, scale: float, unit: str, digits: int) -> str:
        ratio = split[key] / merged[key]
        return (f"| {name} | {merged[key] * scale:.{digits}f} {unit} | {split[key] * scale:.{digits}f} {unit} | "
                f"{ratio:.2f}x |")

    lines = [
        f"{result['model']}, on this {result['cpus']}-core machine. Two Apps side by side (`python entrypoint.py` "
        "each, their own data system worker), two engines each: MERGED (2 replicas) and DISAGGREGATED (1 prefill "
        "+ 1 decode). The same load goes to each Router in turns, "
        f"{len(result['rounds']['merged'])} rounds: {merged['requests'] // len(result['rounds']['merged'])} "
        f"streamed completions per round, {result['concurrency']} at a time, each with a {result['prompt_tokens']}-"
        f"token prompt of its own and {result['output_tokens']} generated tokens; measured by the client, "
        f"nothing else running. `engine.threads`: {result.get('threads') or 'all cores'} per engine"
        + (f" (per rank of a tensor-parallel engine). Tensor parallel: the disaggregated App's prefill engine "
           f"{result['ptp']}, decode {result['dtp']}; the merged replicas 1. With a size above 1 a KV block "
           "is stored as objects of whole KV heads, one per rank of the larger pool: the block counts below "
           "count those objects." if result.get("ptp", 1) != 1 or result.get("dtp", 1) != 1 else "."), "",
        "| | merged | disaggregated | disaggregated / merged |", "|---|---|---|---|",
        row("TTFT p50", "ttft_p50_s", 1, "s", 2),
        row("TTFT p90", "ttft_p90_s", 1, "s", 2),
        row("time per output token p50", "tpot_p50_s", 1e3, "ms", 0),
        row("time per output token p90", "tpot_p90_s", 1e3, "ms", 0),
        row("throughput (generated tokens)", "tokens_per_s", 1, "tok/s", 1), "",
        f"- **KV handoff**: {handoffs['complete']} of {split['requests']} decode legs found the whole prompt's "
        f"KV ({handoffs['partial']} partial, {handoffs['missed']} missed, {handoffs['load_failed']} failed "
        f"loads). Prefill stored {kv['blocks_stored']} blocks at **{store_gbps:.2f} GB/s**, decode loaded "
        f"{kv['blocks_loaded']} at **{load_gbps:.2f} GB/s** (the engines' own timing: checksum, copy and data "
        f"system calls); one prompt's KV is {handoff_mib:.0f} MiB, and memcpy of that size in one process runs "
        f"at {result['memcpy_gbps']:.2f} GB/s.",
        f"- **What this is on {result['cpus']} shared cores**: both arms run two engines on the same cores, so "
        "disaggregation adds no compute. A disaggregated request's TTFT also holds the prefill leg, its "
        "stores, the Router's second leg, the decode engine's load and its one-token step; its decode engine "
        "batches every stream and is never stopped for a prompt, while each merged engine interleaves the "
        "prompts it is given with its streams.",
        "- **On separate devices** (a prefill pool and a decode pool on accelerators of their own) prefill "
        "bursts no longer stall the decode streams, so TPOT stays flat under prompt load, and each pool is "
        "sized (and autoscaled) for its own work. The handoff then costs the data system's transfer rate "
        "between the pools' nodes, not measured here (one node; issue 13 brings cross-node reads).",
        "",
    ]
    name = report_name(result.get("ptp", 1), result.get("dtp", 1))
    title = TITLE if name == "pd" else f"{TITLE}, PTP={result['ptp']} DTP={result['dtp']}"
    write_section(out, name, title, "\n".join(lines), publish)
