"""The server's Prometheus metrics (prometheus_client, on a registry of the server's own), as GET /metrics shows them:

    maskrcnn_requests_total{endpoint, status}   requests answered, by endpoint and HTTP status
    maskrcnn_request_seconds{endpoint}          latency histogram, from the request's arrival to its answer
    maskrcnn_batch_size                         images per model call (histogram, buckets 1..max_batch)
    maskrcnn_model_seconds                      seconds per model call (histogram)
    maskrcnn_queue_depth                        requests waiting for the model (admitted, not yet in a batch)
    maskrcnn_ready                              1 once the model is loaded and warmed up
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """The server's metrics; `text()` is the exposition GET /metrics returns.

    Args:
        max_batch: the batcher's largest batch (the batch-size buckets are 1, 2, 4, ... up to it).
        queue_depth: the number of requests waiting, read at every scrape.
    """

    def __init__(self, max_batch: int, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("maskrcnn_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("maskrcnn_request_seconds", "Seconds from a request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        sizes = sorted({*(2**k for k in range(max_batch.bit_length()) if 2**k <= max_batch), max_batch})
        self.batch_size = Histogram("maskrcnn_batch_size", "Images per model call", buckets=sizes,
                                    registry=self.registry)
        self.model_seconds = Histogram("maskrcnn_model_seconds", "Seconds per model call", buckets=LATENCY_BUCKETS,
                                       registry=self.registry)
        self.queue_depth = Gauge("maskrcnn_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.ready = Gauge("maskrcnn_ready", "1 once the model is loaded and warmed up", registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Called by the model thread after each call."""
        self.batch_size.observe(size)
        self.model_seconds.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
