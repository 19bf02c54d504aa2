"""The Router's Prometheus metrics, in a registry of its own so that several Routers (tests) or a
vLLM engine in the same process never collide on collector names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "yrllm_router"


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
        self.replicas = Gauge(f"{PREFIX}_replicas", "Replicas known to the Router, by state.", ["state"],
                              registry=self.registry)

        self.autoscale_target = Gauge(f"{PREFIX}_autoscale_target_replicas",
                                      "Replica count the autoscaler last decided on.", registry=self.registry)
        self.autoscale_decisions = Counter(f"{PREFIX}_autoscale_decisions", "Autoscaling decisions, by "
                                           "direction.", ["direction"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
