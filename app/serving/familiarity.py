"""How familiar a photo is to a head: a score against the head's own training features, and a
calibrated verdict (``in_distribution``) so that a photo of rain is not answered "dog" without a word.

A head trained by ``tlserve train`` stores, as plain arrays in its version (``.npy``, read with
``allow_pickle=False``, listed in the card's ``artifacts`` map so its sha256 and signature cover them):

- ``familiarity_bank.npy``: the training photos' features, centred on their mean and L2-normalised,
  float16 ``[n, D]`` (1 KiB a photo at D=512);
- ``familiarity_labels.npy``: each photo's class, int16 ``[n]``;
- ``familiarity_center.npy``: the mean that was subtracted, float32 ``[D]``.

The score (higher = more familiar) is one of :data:`METHODS`:

- ``knn``: mean cosine similarity to the ``k`` nearest training features (Sun et al., "Out-of-Distribution
  Detection with Deep Nearest Neighbors", ICML 2022, on raw L2-normalised features);
- ``knn_centered``: the same after subtracting the training mean (average-pooled ReLU features all point
  into one orthant, so raw cosines are all high and crowd together);
- ``knn_class``: centred, and only against the training photos of the class the head answered;
- ``knn_class_margin``: ``knn_class``'s z-score plus the z-score of the head's log-odds margin (top
  probability against the runner-up) where that is below its mean, both standardised by their
  out-of-fold distributions on the training photos (no out-of-distribution photo sets anything). Only
  a hesitant head lowers the score: a linear head is most sure far from its data, so a sure answer
  never makes a photo more familiar.

The threshold is calibrated out of fold (:func:`calibrate`): every training photo is scored against the
features of the folds it was not in (the trainer's folds), with the head's out-of-fold probabilities, and
the threshold is the ``1 - acceptance`` quantile of those scores, so about ``acceptance`` of photos like
the training photos are accepted. The card's ``familiarity`` section records the method, threshold and
calibration numbers. Method choice and measurements: ``benchmarks/ood.py`` (README, "Knows what it does
not know").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core.errors import ArtifactError
from app.core.settings import DEFAULT_ACCEPTANCE as DEFAULT_ACCEPTANCE  # the settings' defaults, defined there
from app.core.settings import DEFAULT_METHOD as DEFAULT_METHOD
from app.core.settings import METHODS as METHODS
from app.core.settings import Method as Method
from app.storage.heads import from_npy, to_npy

if TYPE_CHECKING:
    from app.storage.heads import Head
    from app.storage.registry import HeadStore, Version

DEFAULT_K = 10
BANK_FILE = "familiarity_bank.npy"
LABELS_FILE = "familiarity_labels.npy"
CENTER_FILE = "familiarity_center.npy"
MAX_BANK_BYTES = 1024 * 1024 * 1024
"""Largest bank read (1 GiB: about a million photos at D=512 in float16)."""
_EPS = 1e-12


def _normalize(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS))


def _top_k_mean(sims: np.ndarray, k: int) -> np.ndarray:
    """Mean of the ``k`` largest values of each row (``-inf`` entries are never among them if avoidable)."""
    k = max(1, min(k, sims.shape[1]))
    top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
    return np.asarray(top.mean(axis=1))


def _margin(proba: np.ndarray) -> np.ndarray:
    """Log-odds of the top class against the runner-up (large: the head is sure)."""
    p = np.sort(np.clip(proba.astype(np.float64), 1e-7, 1.0), axis=1)
    return np.log(p[:, -1]) - np.log(p[:, -2])


@dataclass(frozen=True)
class Familiarity:
    """A head's familiarity model: what :meth:`score` compares against, and the verdict's threshold."""

    method: str
    k: int
    bank: np.ndarray
    """``[n, D]`` float32 L2-normalised training features (centred first for ``knn_centered``)."""
    labels: np.ndarray
    """``[n]`` class index of each bank row."""
    center: np.ndarray
    """``[D]`` float32 mean subtracted before normalising (zeros except for ``knn_centered``)."""
    threshold: float = float("-inf")
    standardize: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)
    """``*_margin``: (mean, std) of the kNN score, then of the margin, out of fold."""

    def __post_init__(self) -> None:
        """Bank rows grouped by class (stable), so a per-class score reads only that class's rows."""
        order = np.argsort(self.labels, kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            object.__setattr__(self, "bank", np.ascontiguousarray(self.bank[order]))
            object.__setattr__(self, "labels", self.labels[order])
        bounds = np.searchsorted(self.labels, np.arange(int(self.labels.max(initial=-1)) + 2))
        object.__setattr__(self, "_bounds", bounds)

    def _rows(self, label: int) -> np.ndarray:
        bounds: np.ndarray = object.__getattribute__(self, "_bounds")
        if label + 1 >= len(bounds):
            return self.bank[:0]
        return self.bank[bounds[label] : bounds[label + 1]]

    @classmethod
    def build(cls, features: np.ndarray, labels: np.ndarray, method: str = DEFAULT_METHOD, k: int = DEFAULT_K,
              **kw: Any) -> Familiarity:  # fmt: skip
        if method not in METHODS:
            raise ValueError(f"unknown familiarity method {method!r} (known: {', '.join(METHODS)})")
        x = np.asarray(features, np.float32)
        center = x.mean(axis=0).astype(np.float32) if method == "knn_centered" else np.zeros(x.shape[1], np.float32)
        bank = _normalize(x - center).astype(np.float16).astype(np.float32)  # what is stored is what is scored
        return cls(method, k, bank, np.asarray(labels, np.int64), center, **kw)

    def components(self, features: np.ndarray, proba: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The raw kNN similarity of each row and, for the ``*_margin`` methods, the head's margin."""
        q = _normalize(np.asarray(features, np.float32) - self.center)
        margin = self.method.endswith("_margin")
        if proba is None and (margin or "class" in self.method):
            raise ValueError(f"familiarity method {self.method!r} needs the head's probabilities")
        if "class" not in self.method:
            return _top_k_mean(q @ self.bank.T, self.k), (_margin(proba) if margin and proba is not None else None)
        assert proba is not None
        pred = np.asarray(proba).argmax(axis=1)
        knn = np.full(len(q), -np.inf)
        for label in np.unique(pred):  # only the rows of the class the head answered: no full-bank product
            rows, members = self._rows(int(label)), pred == label
            if len(rows):
                knn[members] = _top_k_mean(q[members] @ rows.T, self.k)
        return knn, (_margin(proba) if margin else None)

    def combine(self, knn: np.ndarray, margin: np.ndarray | None) -> np.ndarray:
        if margin is None:
            return knn
        km, ks, mm, ms = self.standardize
        return (knn - km) / ks + np.minimum((margin - mm) / ms, 0.0)  # a sure head never makes a photo more familiar

    def score(self, features: np.ndarray, proba: np.ndarray | None = None) -> np.ndarray:
        """``[N]`` familiarity scores (higher: more like the training photos); float64."""
        return self.combine(*self.components(features, proba)).astype(np.float64)

    def verdict(self, scores: np.ndarray) -> np.ndarray:
        """``[N]`` bool: at or above the calibrated threshold."""
        return np.asarray(scores) >= self.threshold

    # --- artifacts ---------------------------------------------------------------------------
    def files(self) -> dict[str, bytes]:
        out = {BANK_FILE: to_npy(self.bank.astype(np.float16)), LABELS_FILE: to_npy(self.labels.astype(np.int16))}
        return {**out, CENTER_FILE: to_npy(self.center.astype(np.float32))}


def _load_npy(version: Version, file: str) -> np.ndarray:
    data = version.read(file, max_bytes=MAX_BANK_BYTES)  # sha256 against the (signed) card first
    return from_npy(data, f"head {version.name!r} version {version.version}", file)  # header checked before any allocation


# --- calibration -------------------------------------------------------------------------------
def calibrate(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, oof_proba: np.ndarray, *,
              method: str = DEFAULT_METHOD, k: int = DEFAULT_K, acceptance: float = DEFAULT_ACCEPTANCE,
              n_classes: int | None = None) -> tuple[Familiarity, np.ndarray]:  # fmt: skip
    """The familiarity model of all ``features`` with its threshold set out of fold, and the
    out-of-fold scores: each photo scored against the photos of the other folds (with its
    out-of-fold probabilities), the threshold their ``1 - acceptance`` quantile."""
    if not 0 < acceptance < 1:
        raise ValueError(f"acceptance must be between 0 and 1 (exclusive), not {acceptance}")
    x, y = np.asarray(features, np.float32), np.asarray(labels, np.int64)
    knn = np.zeros(len(y))
    margin = np.zeros(len(y)) if method.endswith("_margin") else None
    for f in np.unique(folds):
        held, rest = folds == f, folds != f
        part = Familiarity.build(x[rest], y[rest], method, k)
        kn, mg = part.components(x[held], oof_proba[held])
        knn[held] = kn
        if margin is not None and mg is not None:
            margin[held] = mg
    standardize = (0.0, 1.0, 0.0, 1.0)
    if margin is not None:
        standardize = (float(knn.mean()), float(knn.std() or 1.0), float(margin.mean()), float(margin.std() or 1.0))
    full = Familiarity.build(x, y, method, k, standardize=standardize)
    scores = full.combine(knn, margin)
    threshold = float(np.quantile(scores, 1 - acceptance, method="lower"))
    return Familiarity.build(x, y, method, k, standardize=standardize, threshold=threshold), scores


def card_section(model: Familiarity, oof_scores: np.ndarray, labels: np.ndarray, classes: list[str], n_splits: int,
                 acceptance: float, held_out: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The card's ``familiarity`` entry: what to load, the threshold, how it was calibrated."""
    accepted = model.verdict(oof_scores)
    q = np.quantile(oof_scores, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "method": model.method,
        "k": model.k,
        "files": {"bank": BANK_FILE, "labels": LABELS_FILE, "center": CENTER_FILE},
        "n": len(model.labels),
        "dim": int(model.bank.shape[1]),
        "bank_dtype": "float16",
        "standardize": list(model.standardize),
        "threshold": model.threshold,
        "acceptance": acceptance,
        "calibration": {
            "data": f"out of fold: each of the {len(labels)} training photos scored against the photos of the other "
            f"{n_splits - 1} folds, with the head's out-of-fold probabilities",
            "folds": n_splits,
            "threshold_rule": f"the {1 - acceptance:.0%} quantile of the out-of-fold scores",
            "accepted": round(float(accepted.mean()), 4),
            "accepted_per_class": {
                c: round(float(accepted[labels == i].mean()), 4) if (labels == i).any() else None for i, c in enumerate(classes)
            },
            "score_quantiles": {p: round(float(v), 4) for p, v in zip(("1%", "5%", "25%", "50%", "75%", "95%"), q, strict=True)},
        },
        **({"held_out": held_out} if held_out else {}),
    }


def load(version: Version, classes: int, feature_dim: int | None) -> Familiarity | None:
    """A version's familiarity model, checked; ``None`` when its card has none (trained before it existed)."""
    section = version.info.familiarity
    if section is None:
        return None
    where = f"head {version.name!r} version {version.version}"
    try:
        files = section["files"]
        method, k, threshold = str(section["method"]), int(section["k"]), float(section["threshold"])
        standardize = tuple(float(v) for v in section.get("standardize", (0.0, 1.0, 0.0, 1.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: card's familiarity section is malformed ({exc})") from None
    if method not in METHODS or k < 1 or len(standardize) != 4 or not np.isfinite([threshold, *standardize]).all():
        raise ArtifactError(f"{where}: card's familiarity section names method {method[:40]!r}, k={k}, threshold {threshold}")
    bank = _load_npy(version, str(files["bank"]))
    labels = _load_npy(version, str(files["labels"]))
    center = _load_npy(version, str(files["center"]))
    n = len(labels)
    ok = (
        bank.ndim == 2 and bank.dtype.kind == "f" and labels.shape == (bank.shape[0],) and labels.dtype.kind in "iu"
        and center.shape == (bank.shape[1],) and center.dtype.kind == "f" and n > 0
        and (feature_dim is None or bank.shape[1] == feature_dim)
    )  # fmt: skip
    if not ok or not np.isfinite(bank).all() or not np.isfinite(center).all() or labels.min() < 0 or labels.max() >= classes:
        raise ArtifactError(
            f"{where}: familiarity arrays have wrong shapes, types or values (bank {bank.shape}, labels {labels.shape})"
        )
    return Familiarity(method, k, bank.astype(np.float32), labels.astype(np.int64), center.astype(np.float32), threshold,
                       standardize)  # fmt: skip


def for_head(heads: HeadStore, head: Head, feature_dim: int | None) -> Familiarity | None:
    """``head``'s familiarity model, its arrays checked against the card ``head`` was verified with."""
    from app.storage.registry import Version

    folder = heads.version_folder(head.name, head.version)
    return load(Version(head.name, head.version, folder, head.card), len(head.classes), feature_dim)


def auroc(familiar: np.ndarray, unfamiliar: np.ndarray) -> float:
    """Area under the ROC curve of telling ``familiar`` scores (positives) from ``unfamiliar`` ones
    (the probability that a random familiar photo scores above a random unfamiliar one; ties count half):
    scikit-learn's ``roc_auc_score``."""
    from sklearn.metrics import roc_auc_score  # imported here: settings import this module

    a, b = np.asarray(familiar, np.float64).ravel(), np.asarray(unfamiliar, np.float64).ravel()
    truth = np.concatenate([np.ones(len(a)), np.zeros(len(b))])
    return float(roc_auc_score(truth, np.concatenate([a, b])))
