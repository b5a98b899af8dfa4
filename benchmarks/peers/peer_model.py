"""What every peer serves: the same ONNX file, the same decode (``app.core.imaging.load_image``) and the same head.

Imported inside each peer's own virtualenv (``benchmarks/peers.py`` puts the repository and this folder on ``PYTHONPATH``; no ``__init__.py`` here, so
``benchmarks.peers`` stays the driver module);
``PEER_BUNDLE`` names a JSON file written by the driver: model path, threads, size, resample, head pickle.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from app.core.imaging import load_image
from app.serving.extractor import create_session
from app.storage.heads import Head, build_head, describe


class Model:
    def __init__(self) -> None:
        b = json.loads(Path(os.environ["PEER_BUNDLE"]).read_text())
        self.size, self.resample = int(b["size"]), str(b["resample"])
        self.session = create_session(Path(b["model"]), threads=int(b["threads"]), spinning=False)
        card = json.loads(Path(b["card"]).read_text())
        self.head: Head = build_head(b["head"], 1, tuple(card["classes"]), Path(b["pickle"]).read_bytes(), card, None)

    def decode(self, b64: str) -> np.ndarray:
        return load_image(base64.b64decode(b64), self.size, resample=self.resample)

    def infer(self, images: np.ndarray) -> list[dict[str, Any]]:
        (features,) = self.session.run(["features"], {"images": images})
        return [describe(self.head, row) for row in self.head.predict_proba(features)]


def knob(name: str, default: float) -> float:
    """A batching knob of the cell being measured (``PEER_<NAME>``)."""
    return float(os.environ.get(f"PEER_{name.upper()}", default))
