"""The Router's Prometheus metrics, in a registry of its own so that several Routers (tests) or a
vLLM engine in the same process never collide on collector names."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.kv.ledger import KVStats

PREFIX = "yrllm_router"
KV_PREFIX = "yrllm_kv"


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "Requests answered, by route and HTTP status.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds",
                                 "Time from request to the last byte of the answer.", ["route"],
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
                                 registry=self.registry)
        self.first_byte = Histogram(f"{PREFIX}_time_to_first_byte_seconds",
                                    "Time from request to the first byte from the replica (TTFT for "
                                    "streams).", ["route"],
                                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
                                    registry=self.registry)
        self.in_flight = Gauge(f"{PREFIX}_in_flight_requests", "Requests in flight, per replica.",
                               ["replica"], registry=self.registry)
        self.retries = Counter(f"{PREFIX}_retries", "Requests sent to a second replica because the first "
                               "failed before any byte reached the client, by failure (connect, "
                               "disconnect).", ["reason"], registry=self.registry)
        self.broken_streams = Counter(f"{PREFIX}_broken_streams", "Answers cut by their replica's failure "
                                      "after bytes reached the client (they end with an error event).",
                                      ["route"], registry=self.registry)
        self.supervision_events = Counter(f"{PREFIX}_supervision_events", "What the App's supervision "
                                          "noticed and did, by kind (see /status 'events').", ["kind"],
                                          registry=self.registry)
        self.replicas = Gauge(f"{PREFIX}_replicas", "Replicas known to the Router, by role and state.",
                              ["role", "state"], registry=self.registry)
        self.prefill_legs = Counter(f"{PREFIX}_prefill_legs", "Disaggregated requests' prefill legs, by "
                                    "outcome: handed_over (KV parameters for the decode leg), no_handoff (the "
                                    "prefill engine returned none: the decode leg computes the prompt), "
                                    "failed (answered to the client as the error; no decode leg).",
                                    ["outcome"], registry=self.registry)
        self.held = Gauge(f"{PREFIX}_held_requests", "Requests waiting for a ready replica of their pool "
                          "(scaled to zero, or every replica starting), by role.", ["role"], registry=self.registry)
        self.holds = Counter(f"{PREFIX}_holds", "Requests that had to wait for a ready replica, by role and "
                             "outcome: released (to a replica that became ready), timeout, full (refused: "
                             "router.queue_max), gone (the client left), closed (the App shut down).",
                             ["role", "outcome"], registry=self.registry)
        self.wakes = Counter(f"{PREFIX}_wakes", "Wake-ups asked of the App: a request found no ready replica "
                             "and none was asked for yet, by the role of the empty pool.", ["role"],
                             registry=self.registry)

        self.autoscale_target = Gauge(f"{PREFIX}_autoscale_target_replicas",
                                      "Replica count the autoscaler last decided on, per role.", ["role"],
                                      registry=self.registry)
        self.autoscale_decisions = Counter(f"{PREFIX}_autoscale_decisions", "Autoscaling decisions, by "
                                           "role and direction.", ["role", "direction"], registry=self.registry)

        self.kv = KVMetrics()
        self.registry.register(self.kv)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class KVMetrics:
    """The App's KV totals (``KVStats``, over every replica), rendered from the latest snapshot the
    App handed over: the totals are counted by the App, which reads the replicas' journals."""

    def __init__(self) -> None:
        self.stats = KVStats()

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        lookups = CounterMetricFamily(f"{KV_PREFIX}_lookups", "Prompts looked up in the data system, by "
                                      "result (hit: at least one block found).", labels=["result"])
        lookups.add_metric(["hit"], stats.hits)
        lookups.add_metric(["miss"], stats.misses)
        yield lookups
        yield CounterMetricFamily(f"{KV_PREFIX}_hit_tokens", "Prompt tokens loaded instead of computed.",
                                  value=stats.hit_tokens)
        blocks = CounterMetricFamily(f"{KV_PREFIX}_blocks", "KV blocks, by what happened to them (not_stored: "
                                     "data system full or gone; load_failed: recomputed).", labels=["op"])
        for op in ("stored", "not_stored", "loaded", "load_failed", "evicted"):
            blocks.add_metric([op], getattr(stats, f"blocks_{op}"))
        yield blocks
        moved = CounterMetricFamily(f"{KV_PREFIX}_bytes", "Bytes of KV blocks stored and loaded.", labels=["op"])
        for op in ("stored", "loaded"):
            moved.add_metric([op], getattr(stats, f"bytes_{op}"))
        yield moved
        seconds = CounterMetricFamily(f"{KV_PREFIX}_seconds", "Time engines spent on the data system for KV, "
                                      "by operation.", labels=["op"])
        for op in ("lookup", "store", "load"):
            seconds.add_metric([op], getattr(stats, f"{op}_seconds"))
        yield seconds
        yield GaugeMetricFamily(f"{KV_PREFIX}_resident_bytes", "Bytes of KV blocks in the data system, as the "
                                "App accounts them.", value=stats.resident_bytes)
        yield GaugeMetricFamily(f"{KV_PREFIX}_capacity_bytes", "kv.capacity_gb, in bytes.",
                                value=stats.capacity_bytes)
        handoffs = CounterMetricFamily(f"{KV_PREFIX}_handoffs", "Decode legs by what they found of the KV "
                                       "their prefill leg stored: complete, partial or missed (the rest is "
                                       "recomputed); load_failed counts those whose load then failed "
                                       "(recomputed).", labels=["result"])
        for result, count in stats.handoffs.items():
            handoffs.add_metric([result], count)
        yield handoffs
