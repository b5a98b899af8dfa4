"""BentoML 1.4 service: ``POST /classify {"images": [base64, ...]}``; adaptive batching on the API
(``batchable=True``, ``max_batch_size``, ``max_latency_ms``: the documented knobs), one worker per the
docs' CPU advice for a model that uses every core itself (ONNX Runtime's intra-op threads)."""

from __future__ import annotations

import bentoml
import numpy as np
from peer_model import Model, knob


@bentoml.service(workers=int(knob("workers", 1)), traffic={"timeout": 300, "max_concurrency": 1024})
class Classifier:
    def __init__(self) -> None:
        self.model = Model()

    @bentoml.api(batchable=True, max_batch_size=int(knob("max_batch_size", 16)), max_latency_ms=int(knob("max_latency_ms", 100)))
    def classify(self, images: list[str]) -> list[dict]:
        return self.model.infer(np.stack([self.model.decode(b) for b in images]))
