"""Prometheus metrics of the service, in a registry of their own (one per engine, so several live in a process).

Names follow Prometheus' conventions (``_total`` counters, ``_seconds`` histograms); docs/serving.md
lists them with what to alert on.
"""

from __future__ import annotations

from collections.abc import Callable

#: ``osdface_request_errors_total`` reason of each refusal status
REASONS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
           415: "unsupported_format", 503: "overloaded", 504: "timeout", 500: "internal"}


class ServeMetrics:
    """The service's counters, histograms and gauges (``prometheus_client``).

    Args:
        max_batch: top of the batch-size buckets.
    """

    def __init__(self, max_batch: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("osdface_requests_total", "HTTP requests answered, by route and status code",
                                ["route", "code"], registry=r)
        self.latency = Histogram("osdface_request_duration_seconds", "time to answer a request, by route", ["route"],
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.errors = Counter("osdface_request_errors_total", "requests refused or failed, by reason", ["reason"],
                              registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch_size = Histogram("osdface_batch_size", "faces per model call",
                                    buckets=[float(s) for s in sizes if s <= max_batch], registry=r)
        self.batch_seconds = Histogram("osdface_batch_duration_seconds", "time of one model call",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.faces = Counter("osdface_faces_restored_total", "faces restored", registry=r)
        self.queue_faces = Gauge("osdface_queue_faces", "faces waiting for a model replica", registry=r)
        self.in_flight = Gauge("osdface_requests_in_flight", "restore requests admitted and not yet answered",
                               registry=r)
        self.replicas_busy = Gauge("osdface_replicas_busy", "model replicas running a batch now", registry=r)

    def refused(self, status: int) -> None:
        """Count one refused or failed request under its reason (:data:`REASONS`)."""
        self.errors.labels(REASONS.get(status, "other")).inc()

    def watch(self, queue_faces: Callable[[], float], replicas_busy: Callable[[], float]) -> None:
        """Read the queue length and busy replicas at scrape time."""
        self.queue_faces.set_function(queue_faces)
        self.replicas_busy.set_function(replicas_busy)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
