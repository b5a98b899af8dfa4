"""LitServe service: ``POST /predict {"image": base64}``; batching by ``max_batch_size`` / ``batch_timeout``
(the documented knobs), ``accelerator="cpu"``, one worker (ONNX Runtime uses every core itself)."""

from __future__ import annotations

import os

import litserve as ls
import numpy as np
from peer_model import Model, knob


class API(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = Model()

    def decode_request(self, request: dict) -> np.ndarray:
        return self.model.decode(request["image"])

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> list[dict]:
        return self.model.infer(x if x.ndim == 4 else x[np.newaxis])

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict | list[dict]) -> dict:
        return output[0] if isinstance(output, list) else output


if __name__ == "__main__":
    batch = {"max_batch_size": int(knob("max_batch_size", 1)), "batch_timeout": knob("batch_timeout", 0.0)}
    try:  # litserve >= 0.2.11: the batching knobs belong to the API
        server = ls.LitServer(API(**batch), accelerator="cpu", workers_per_device=1, timeout=300)
    except TypeError:
        server = ls.LitServer(API(), accelerator="cpu", workers_per_device=1, timeout=300, **batch)
    server.run(port=int(os.environ["PEER_PORT"]), host="127.0.0.1", generate_client_file=False)
