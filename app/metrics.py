"""Prometheus metrics, one registry per service instance (so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.request_duration = Histogram(
            "tlserve_request_duration_seconds", "HTTP request duration", ["route", "method", "status"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "tlserve_queue_wait_seconds", "Time images waited in the batch queue", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "tlserve_inference_seconds", "ONNX Runtime time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode = Histogram("tlserve_decode_seconds", "Decode + resize time per image", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("tlserve_batch_size_images", "Images per ONNX Runtime run", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("tlserve_queue_depth_images", "Images waiting in the batch queue", registry=r)
        self.in_flight = Gauge("tlserve_in_flight_requests", "HTTP requests being handled", registry=r)
        self.images = Counter("tlserve_images_total", "Images processed", ["endpoint", "head", "outcome"], registry=r)
        self.cache = Counter("tlserve_response_cache_total", "Response cache lookups, by result", ["result"], registry=r)
        self.rejections = Counter("tlserve_rejections_total", "Requests or images refused, by reason", ["reason"], registry=r)
        self.model_info = Info("tlserve_model", "Extractor and engine in use", registry=r)
        self.ready = Gauge("tlserve_ready", "1 when /readyz answers 200", registry=r)
