"""A head: a pickled scikit-learn classifier that can never run code, checked before it serves.

Pickles are loaded by :func:`safe_unpickle` alone: an allowlist ``Unpickler`` that resolves only
the globals a head written by ``tlserve train`` needs, so a pickle whose ``__reduce__`` calls
``os.system`` (or anything else) is refused before any object is built. Then
:func:`build_head` checks the estimator itself, not just that it unpickled: ``predict_proba``,
coefficient shapes against the extractor's feature size, finite values, and classes in card order.
Where heads live on disk and how versions work is :mod:`app.registry`'s business.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import ArtifactError

MAX_PICKLE_BYTES = 64 * 1024 * 1024
"""Largest head pickle read (a 1,000-class head on 512-d features is about 4 MB)."""

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("sklearn.linear_model._logistic", "LogisticRegression"),
    ("numpy._core.numeric", "_frombuffer"),  # numpy >= 2
    ("numpy.core.numeric", "_frombuffer"),  # the same function, as numpy 1.x pickles name it
    ("numpy", "dtype"),
})  # fmt: skip
"""Every global a head written by ``tlserve train`` resolves (protocol 5: arrays by ``_frombuffer``)."""


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise ArtifactError(
                f"pickle refers to {module}.{name}, which a head may not use (allowed: LogisticRegression and numpy arrays)"
            )
        return super().find_class(module, name)


def safe_unpickle(blob: bytes, where: str) -> Any:
    """The one place tlserve unpickles: only :data:`ALLOWED_GLOBALS` can be resolved."""
    if len(blob) > MAX_PICKLE_BYTES:
        raise ArtifactError(f"{where}: pickle is {len(blob)} bytes, over the limit of {MAX_PICKLE_BYTES}")
    try:
        return _AllowlistUnpickler(io.BytesIO(blob)).load()
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is one refused artifact
        raise ArtifactError(f"{where}: cannot unpickle ({type(exc).__name__})") from None


@dataclass(frozen=True)
class Head:
    name: str
    version: int
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


def check_estimator(estimator: Any, classes: tuple[str, ...], feature_dim: int | None, where: str) -> None:
    """A fitted linear classifier over ``feature_dim`` features with ``len(classes)`` outputs in card order."""
    if not callable(getattr(estimator, "predict_proba", None)):
        raise ArtifactError(f"{where}: the estimator ({type(estimator).__name__}) has no predict_proba")
    shadowed = sorted(k for k in vars(estimator) if callable(getattr(type(estimator), k, None)))
    if shadowed:  # a state payload that replaces a method with something else
        raise ArtifactError(f"{where}: the estimator's state overrides its methods {shadowed[:5]}")
    n = len(classes)
    try:
        coef = np.asarray(estimator.coef_)
        intercept = np.asarray(estimator.intercept_)
        fitted = np.asarray(estimator.classes_)
    except AttributeError as exc:
        raise ArtifactError(f"{where}: the estimator is not fitted ({exc.name} missing)") from None
    rows = 1 if n == 2 else n
    dim = coef.shape[1] if coef.ndim == 2 else -1
    if coef.ndim != 2 or coef.shape[0] != rows or (feature_dim is not None and dim != feature_dim):
        raise ArtifactError(f"{where}: coef_ has shape {coef.shape}, expected ({rows}, {feature_dim or 'D'})")
    if intercept.shape != (rows,):
        raise ArtifactError(f"{where}: intercept_ has shape {intercept.shape}, expected ({rows},)")
    for label, arr in (("coef_", coef), ("intercept_", intercept)):
        if arr.dtype.kind != "f" or not np.isfinite(arr).all():
            raise ArtifactError(f"{where}: {label} must hold finite floats")
    if fitted.shape != (n,) or fitted.dtype.kind not in "iu" or not np.array_equal(fitted, np.arange(n)):
        raise ArtifactError(f"{where}: estimator classes_ {fitted.tolist()[:10]} do not match the card's {n} classes")


def build_head(name: str, version: int, classes: tuple[str, ...], blob: bytes, card: dict[str, Any],
               feature_dim: int | None) -> Head:  # fmt: skip
    where = f"head {name!r} version {version}"
    estimator = safe_unpickle(blob, where)
    check_estimator(estimator, classes, feature_dim, where)
    return Head(name=name, version=version, classes=classes, estimator=estimator, card=card)


def dump_estimator(estimator: Any) -> bytes:
    return pickle.dumps(estimator, protocol=5)


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
