"""Heads: pickled scikit-learn classifiers with a JSON card, loaded only when their checksum matches.

On disk, ``model_store/heads/<name>/``:

- ``head-<sha12>.pkl``: the pickled estimator, named by its own sha256 prefix;
- ``card.json``: classes, extractor fingerprint, training summary, metrics, sklearn version,
  and the pickle's file name and full sha256; it is written last and atomically, so it is the
  commit point: a reader sees either the old (card, pickle) pair or the new one, never a mix;
- ``confusion_matrix.png``.

:func:`load_head` reads the card, checks the pickle's sha256 *before* unpickling, and refuses a
head whose extractor fingerprint differs from the extractor it will run with.
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import ArtifactError, HeadNotFound, IncompatibleHead
from app.hashing import sha256_bytes
from app.store import ModelStore, atomic_write, read_json, write_json

log = logging.getLogger(__name__)
CARD = "card.json"


@dataclass(frozen=True)
class Head:
    name: str
    classes: tuple[str, ...]
    estimator: Any
    card: dict[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.card["pickle_sha256"])

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """``[N, D]`` features → ``[N, classes]`` probabilities, columns in ``classes`` order."""
        proba = self.estimator.predict_proba(features)
        return np.asarray(proba, dtype=np.float32)


def save_head(store: ModelStore, name: str, estimator: Any, card: dict[str, Any], png: bytes | None = None) -> Path:
    """Write pickle, plot and (last) card atomically; old pickles of this head are removed after."""
    folder = store.head_dir(name)
    blob = pickle.dumps(estimator, protocol=5)
    sha = sha256_bytes(blob)
    pkl = folder / f"head-{sha[:12]}.pkl"
    atomic_write(pkl, blob)
    if png is not None:
        atomic_write(folder / "confusion_matrix.png", png)
    write_json(folder / CARD, {**card, "name": name, "pickle": pkl.name, "pickle_sha256": sha})
    for old in folder.glob("head-*.pkl"):
        if old != pkl:
            old.unlink(missing_ok=True)
    return folder


def read_card(store: ModelStore, name: str) -> dict[str, Any]:
    folder = store.head_dir(name)
    if not (folder / CARD).exists():
        raise HeadNotFound(f"no head named {name!r} (known: {', '.join(store.head_names()) or 'none'})")
    return read_json(folder / CARD)


def load_head(store: ModelStore, name: str, extractor_sha256: str | None = None) -> Head:
    """Verified load: card → sha256 of the pickle → extractor fingerprint → unpickle."""
    card = read_card(store, name)
    folder = store.head_dir(name)
    try:
        pkl_name, expected = str(card["pickle"]), str(card["pickle_sha256"])
        classes = tuple(str(c) for c in card["classes"])
        head_extractor = str(card["extractor"]["sha256"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"head {name!r}: card lacks {exc}") from None
    if "/" in pkl_name or not pkl_name.endswith(".pkl"):
        raise ArtifactError(f"head {name!r}: card names an invalid pickle file")
    if extractor_sha256 is not None and head_extractor != extractor_sha256:
        raise IncompatibleHead(
            f"head {name!r} was trained on extractor {head_extractor[:12]}, the loaded extractor is "
            f"{extractor_sha256[:12]}: retrain it with `tlserve train` (features differ between extractors)"
        )
    try:
        blob = (folder / pkl_name).read_bytes()
    except OSError:
        raise ArtifactError(f"head {name!r}: pickle {pkl_name} is missing or unreadable") from None
    actual = sha256_bytes(blob)
    if actual != expected:
        raise ArtifactError(
            f"head {name!r}: pickle sha256 {actual[:12]} does not match its card ({expected[:12]}); refusing to unpickle"
        )
    try:
        estimator = pickle.load(io.BytesIO(blob))  # noqa: S301 - checksum-verified artifact from our own store
    except Exception as exc:  # noqa: BLE001
        raise ArtifactError(f"head {name!r}: cannot unpickle ({type(exc).__name__})") from None
    n_out = len(getattr(estimator, "classes_", classes))
    if n_out != len(classes):
        raise ArtifactError(f"head {name!r}: estimator has {n_out} classes, card has {len(classes)}")
    return Head(name=name, classes=classes, estimator=estimator, card=card)


def describe(head: Head, proba: np.ndarray, top_k: int | None = None) -> dict[str, Any]:
    """One image's result: ``label``, ``confidence`` and all ``probabilities`` or the ``top_k`` list."""
    order = np.argsort(-proba, kind="stable")
    best = int(order[0])
    out: dict[str, Any] = {"label": head.classes[best], "confidence": round(float(proba[best]), 6)}
    if top_k:
        out["top_k"] = [{"label": head.classes[i], "probability": round(float(proba[i]), 6)} for i in order[:top_k]]
    else:
        out["probabilities"] = {c: round(float(p), 6) for c, p in zip(head.classes, proba, strict=True)}
    return out
