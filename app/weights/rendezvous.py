"""How a replica waits for the one bringing its weights: the seed publishing them (its manifest), or
the first replica on its node fetching them across (a marker that replica sets, done or failed).
Waiting happens in the loader, so the waiting replica's engine starts in parallel."""

from __future__ import annotations

import time

from vllm.logger import init_logger

from app.weights.host_tier import HostTier, TierError
from app.weights.identity import WeightKeys
from app.weights.plan import WeightPlan

logger = init_logger("vllm.yrllm.loader")


def await_seed(tier: HostTier, keys: WeightKeys, seed: str, timeout_s: float) -> float:
    """Wait for the manifest of ``seed``, the replica seeding; returns the seconds waited."""
    started = time.perf_counter()
    logger.info("Waiting for the seed replica to publish %s", keys.prefix)
    while time.perf_counter() - started < timeout_s:
        complete, abandoned = tier.exists([keys.manifest, keys.abandoned(seed)])
        if abandoned:
            raise TierError(f"the seed replica {seed} failed before publishing")
        if complete:
            waited = time.perf_counter() - started
            logger.info("The seed published after %.2f s of waiting", waited)
            return waited
        time.sleep(0.05)
    raise TierError(f"the seed replica did not publish within {timeout_s:.0f} s")


def await_fetch(tier: HostTier, keys: WeightKeys, plan: WeightPlan) -> float:
    """Wait for the replica bringing this node its copy; returns the seconds waited."""
    assert plan.fetcher is not None
    started = time.perf_counter()
    logger.info("Waiting for %s to fetch the weights onto %s", plan.fetcher, plan.node)
    while time.perf_counter() - started < plan.await_fetch_s:
        landed, failed, entry = tier.exists([keys.landed(plan.node, plan.fetcher),
                                             keys.fetch_failed(plan.node, plan.fetcher), keys.manifest])
        if failed or not entry:
            raise TierError(f"{plan.fetcher} could not fetch the weights onto {plan.node}"
                            + ("" if entry else ", and the entry was retired"))
        if landed:
            waited = time.perf_counter() - started
            logger.info("%s's copy landed on %s after %.2f s of waiting", plan.fetcher, plan.node, waited)
            return waited
        time.sleep(0.05)
    raise TierError(f"{plan.fetcher} did not fetch the weights onto {plan.node} within {plan.await_fetch_s:.0f} s")


def mark_fetch(tier: HostTier, keys: WeightKeys, plan: WeightPlan, done: bool) -> None:
    """Tell the replicas of this node awaiting this fetch how it went (best effort: they also stop
    when the WeightCache retires the entry)."""
    marker = keys.landed(plan.node, plan.replica_id) if done else keys.fetch_failed(plan.node, plan.replica_id)
    try:
        tier.put([(marker, memoryview(b"1"))])
    except TierError as exc:
        logger.warning("could not mark the fetch onto %s as %s: %s", plan.node, "done" if done else "failed", exc)
