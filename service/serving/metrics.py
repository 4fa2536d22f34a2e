"""Prometheus metrics: each defined once, on a registry owned by one app instance.

With several worker processes (`recsys-serve --workers N` sets PROMETHEUS_MULTIPROC_DIR),
prometheus_client's multiprocess mode adds every worker's samples up, so a scrape that lands on
any worker sees the whole server; gauges then carry a `pid` label.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5)


MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def gauge(name: str, documentation: str, registry: CollectorRegistry,
          labels: tuple[str, ...] = ()) -> Gauge:
    # "liveall": one sample per live worker (a dead worker's values are dropped).
    return Gauge(name, documentation, labels, registry=registry, multiprocess_mode="liveall")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("recsys_requests", "HTTP requests served, by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("recsys_request_duration_seconds",
                                 "Time from request received to response sent",
                                 ["route", "method", "status"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.errors = Counter("recsys_errors", "Error responses, by stable error code",
                              ["code"], registry=r)
        self.model_info = gauge("recsys_model_info", "The model version being served (value 1)",
                                r, ("name", "version", "fingerprint"))
        self.items = gauge("recsys_model_items", "Items in the served model's catalog", r)
        self.item_matrix_loads = Counter(
            "recsys_item_matrix_loads", "Item matrices made ready, by where they came from "
            "(redis: read from the shared cache; computed: item tower run here)", ["source"],
            registry=r)
        self.item_matrix_seconds = Histogram(
            "recsys_item_matrix_load_seconds", "Time to make a version's item matrix ready",
            ["source"], buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.model_loads = Counter("recsys_model_loads", "Model versions loaded and switched to",
                                   registry=r)
        self.model_refusals = Counter("recsys_model_refusals",
                                      "Model versions refused as broken or incomplete",
                                      registry=r)
        self.batch_size = Histogram(
            "recsys_batch_size", "Requests computed together by the batch worker",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.redis_up = gauge("recsys_redis_up", "1 when Redis answered the last check", r)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's registry, or every worker's together."""
        if os.environ.get(MULTIPROCESS_DIR):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
