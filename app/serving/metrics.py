"""Prometheus metrics, one registry per service instance (so tests can run several apps).

**Prediction monitoring** (:meth:`Metrics.observe_predictions`), per head (the version being served):
answers per class, a confidence histogram, a familiarity-score histogram (the score minus the head's
threshold, so 0 is the line and every head shares the buckets), and the answers judged not in
distribution, next to the share the calibration expects (``1 - acceptance``). What an operator
watches for drift; alert rules in ``deploy/prometheus/rules.yml``. Label cardinality is bounded:
at most ``max_heads`` head names (further heads count as ``_other``) and ``max_classes`` class
names a head (further classes as ``_other``). The answers per class are counted only with
``class_answers`` (setting ``metrics_class_answers``, off by default): ``/metrics`` is open with
``open_probes``, and those series tell anyone what everyone's photos showed.

**The review queue** (:mod:`app.serving.review`), per head with the queue on: the answers sampled and what became
of them (``tlserve_review_sampled_total{outcome}``: ``queued``, ``again`` (those bytes were queued already),
``known`` (already an example), ``too_large``, ``dropped_full`` (the writer was behind: dropped, never
waited for), ``failed``), the photos leaving the queue (``tlserve_review_outcomes_total{outcome}``:
``confirmed``, ``corrected``, ``dismissed``, ``expired``, ``evicted``), and the queue's size in photos
and bytes as this replica last saw it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

if TYPE_CHECKING:
    from app.serving.familiarity import Familiarity
    from app.storage.heads import Head

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
MARGIN_BUCKETS = (-2.0, -1.0, -0.5, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5, 1.0, 2.0)
OTHER = "_other"


class Metrics:
    def __init__(self, max_heads: int = 20, max_classes: int = 30, class_answers: bool = False) -> None:
        self.registry = r = CollectorRegistry()
        self.max_heads, self.max_classes, self.class_answers = max_heads, max_classes, class_answers
        self._heads: set[str] = set()
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
        self.training_share = Gauge(
            "tlserve_training_engine_share", "Training jobs' part of the engine's recent time (bounded by training_share)",
            registry=r,
        )  # fmt: skip
        self.training_images = Counter(
            "tlserve_training_images_total", "Images a training job extracted through the engine", registry=r
        )
        self.in_flight = Gauge("tlserve_in_flight_requests", "HTTP requests being handled", registry=r)
        self.images = Counter("tlserve_images_total", "Images processed", ["endpoint", "head", "outcome"], registry=r)
        self.cache = Counter("tlserve_response_cache_total", "Response cache lookups, by result", ["result"], registry=r)
        self.rejections = Counter("tlserve_rejections_total", "Requests or images refused, by reason", ["reason"], registry=r)
        self.model_info = Info("tlserve_model", "Extractor and engine in use", registry=r)
        self.ready = Gauge("tlserve_ready", "1 when /readyz answers 200", registry=r)
        self.store_stale = Gauge(
            "tlserve_store_stale_seconds",
            "Seconds since the object store (head_store) was first found unreachable; 0 while it answers",
            registry=r,
        )
        self.answers = Counter(
            "tlserve_prediction_answers_total", "Classification answers by the head's top class (refused ones too)",
            ["head", "class"], registry=r,
        )  # fmt: skip
        self.confidence = Histogram(
            "tlserve_prediction_confidence", "Probability of the top class per answer", ["head"],
            buckets=CONFIDENCE_BUCKETS, registry=r,
        )  # fmt: skip
        self.familiarity = Histogram(
            "tlserve_familiarity_margin", "Familiarity score minus the head's threshold per answer (< 0: not in distribution)",
            ["head"], buckets=MARGIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.checked = Counter("tlserve_familiarity_checked_total", "Answers given a familiarity verdict", ["head"], registry=r)
        self.unfamiliar = Counter(
            "tlserve_familiarity_unfamiliar_total", "Answers judged not in distribution (in_distribution false)", ["head"],
            registry=r,
        )  # fmt: skip
        self.expected_unfamiliar = Gauge(
            "tlserve_familiarity_expected_unfamiliar_ratio",
            "Share of training-like photos the head's calibration flags (1 - acceptance)", ["head"], registry=r,
        )  # fmt: skip
        self.review_sampled = Counter(
            "tlserve_review_sampled_total", "Answers sampled for a head's review queue, by what became of them",
            ["head", "outcome"], registry=r,
        )  # fmt: skip
        self.review_outcomes = Counter(
            "tlserve_review_outcomes_total", "Photos leaving a head's review queue: confirmed, corrected, dismissed, "
            "expired, evicted", ["head", "outcome"], registry=r,
        )  # fmt: skip
        self.review_items = Gauge("tlserve_review_queue_items", "Photos in a head's review queue", ["head"], registry=r)
        self.review_bytes = Gauge("tlserve_review_queue_bytes", "Photo bytes in a head's review queue", ["head"], registry=r)
        self.review_pending = Gauge(
            "tlserve_review_pending_photos", "Sampled photos waiting for the review queue's writer thread", registry=r
        )
        self.head_version = Gauge("tlserve_head_version", "Version of the head that answered last", ["head"], registry=r)

    def head_label(self, name: str) -> str:
        """``name`` for the first ``max_heads`` heads seen, ``_other`` after (bounded cardinality)."""
        if name in self._heads:
            return name
        if len(self._heads) < self.max_heads:
            self._heads.add(name)
            return name
        return OTHER

    def observe_predictions(self, head: Head, proba: np.ndarray, scores: np.ndarray | None, verdicts: np.ndarray | None,
                            known: Familiarity | None) -> None:  # fmt: skip
        if not len(proba):
            return
        h = self.head_label(head.name)
        best = proba.argmax(axis=1)
        if self.class_answers:
            counts = np.bincount(best, minlength=len(head.classes))
            for i in np.flatnonzero(counts):
                name = head.classes[i] if i < self.max_classes else OTHER
                self.answers.labels(h, name).inc(int(counts[i]))
        conf = self.confidence.labels(h)
        for p in proba[np.arange(len(best)), best]:
            conf.observe(float(p))
        self.head_version.labels(h).set(head.version)
        if scores is None or verdicts is None or known is None:
            return
        fam = self.familiarity.labels(h)
        for v in scores - known.threshold:
            fam.observe(float(v))
        self.checked.labels(h).inc(len(verdicts))
        self.unfamiliar.labels(h).inc(int((~verdicts).sum()))
        acceptance = (head.familiarity or {}).get("acceptance")
        if isinstance(acceptance, float):
            self.expected_unfamiliar.labels(h).set(1 - acceptance)
