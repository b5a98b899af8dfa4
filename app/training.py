"""Train and evaluate heads: the seed's recipe (features → logistic regression → report), for any classes."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.extractor import Extractor
from app.features import Dataset, Extracted, FeatureCache, extract_paths
from app.heads import Head
from app.registry import HeadStore, save_head, valid_head_name
from app.settings import Settings
from app.store import ExtractorInfo, ModelStore

log = logging.getLogger(__name__)

SEED = 42
DEFAULT_C = 0.1  # measured: see benchmarks/RESULTS.md ("choosing the features")
C_GRID = (0.01, 0.1, 1.0, 10.0)


@dataclass
class Report:
    accuracy: float
    n: int
    classes: list[str]
    confusion: list[list[int]]
    per_class: dict[str, dict[str, float]]
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "classes": self.classes,
                "confusion_matrix": self.confusion, "per_class": self.per_class}  # fmt: skip

    def render(self) -> str:
        width = max(len(c) for c in self.classes)
        lines = [f"accuracy: {self.accuracy:.4f}  (n={self.n})", "", "confusion matrix (rows: true, columns: predicted):"]
        lines.append(" " * (width + 2) + " ".join(f"{c[:8]:>8}" for c in self.classes))
        for name, row in zip(self.classes, self.confusion, strict=True):
            lines.append(f"{name:>{width}}  " + " ".join(f"{v:>8}" for v in row))
        return "\n".join([*lines, "", self.text])


def make_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> Report:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    labels = list(range(len(classes)))
    d = classification_report(y_true, y_pred, labels=labels, target_names=classes, output_dict=True, zero_division=0)
    per_class = {c: {k: round(float(d[c][k]), 4) for k in ("precision", "recall", "f1-score", "support")} for c in classes}
    text = classification_report(y_true, y_pred, labels=labels, target_names=classes, digits=4, zero_division=0)
    return Report(
        accuracy=round(float(accuracy_score(y_true, y_pred)), 4),
        n=len(y_true),
        classes=classes,
        confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        per_class=per_class,
        text=text,
    )


def confusion_png(report: Report, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.classes)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * n, 1.6 + 0.6 * n), dpi=100)
    cm = np.asarray(report.confusion)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), report.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), report.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {report.accuracy:.4f} (n={report.n})", fontsize=9)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def make_estimator(c: float) -> Any:
    """Plain L2 logistic regression on the raw features: standardising them measured worse
    (224/avg: 97.2-97.7% vs 98.4-98.7% val; see benchmarks/RESULTS.md)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000, random_state=SEED)


def choose_c(x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
    """C by 5-fold stratified cross-validation over :data:`C_GRID`."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)
    scores = {str(c): float(cross_val_score(make_estimator(c), x, y, cv=folds).mean()) for c in C_GRID}
    best = max(C_GRID, key=lambda c: scores[str(c)])
    return best, scores


class Trainer:
    """Everything ``train``/``evaluate``/``predict`` share: store, extractor, cache."""

    def __init__(self, settings: Settings, *, progress: bool = True) -> None:
        self.settings = settings
        self.store = ModelStore(settings.model_store)
        self.heads = HeadStore.from_settings(settings)
        self.info: ExtractorInfo = self.store.extractor()
        self.extractor = Extractor(self.info, provider=settings.provider, threads=settings.intra_op_threads)
        self.cache = FeatureCache(settings.cache_dir, self.info.sha256)
        self.progress = progress

    def features(self, paths: list[Path]) -> Extracted:
        return extract_paths(
            paths,
            self.extractor,
            resample=self.info.resample,
            cache=self.cache,
            decode_threads=self.settings.decoders,
            max_pixels=self.settings.max_image_pixels,
            progress=self.progress,
        )

    def train(
        self, data_dir: Path, name: str, *, val_dir: Path | None = None, c: float | None = None, limit: int = 0
    ) -> tuple[Report, dict[str, Any]]:
        from sklearn.model_selection import train_test_split

        valid_head_name(name)  # before any work
        data = Dataset.from_folder(data_dir)
        idx = np.arange(len(data.paths))
        if limit:
            idx = _per_class_subset(data.labels, limit)
        ext = self.features([data.paths[i] for i in idx])
        x, y = ext.features, data.labels[idx][ext.kept]
        if val_dir is not None:
            val = Dataset.from_folder(val_dir, classes=data.classes)
            vidx = _per_class_subset(val.labels, limit) if limit else np.arange(len(val.paths))
            vext = self.features([val.paths[i] for i in vidx])
            xtr, ytr, xva, yva = x, y, vext.features, val.labels[vidx][vext.kept]
            skipped = ext.skipped + vext.skipped
            split = {"kind": "val_dir", "val_dir": str(val_dir)}
        else:
            xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)
            skipped = ext.skipped
            split = {"kind": "stratified", "val_fraction": 0.2, "seed": SEED}
        if min(np.bincount(ytr, minlength=len(data.classes))) == 0:
            raise ValueError("every class needs at least one readable training image")
        cv_scores: dict[str, float] = {}
        if c is None:
            c, cv_scores = choose_c(xtr, ytr) if len(ytr) >= 50 else (DEFAULT_C, {})
        estimator = make_estimator(c).fit(xtr, ytr)
        report = make_report(yva, estimator.predict(xva), data.classes)
        card = self._card(data, ytr, yva, skipped, split, c, cv_scores, report)
        png = confusion_png(report, f"{name} ({split['kind']} split)")
        version = save_head(self.heads, name, estimator, card, {"confusion_matrix.png": png})
        return report, version.card

    def train_features(
        self, name: str, features: np.ndarray, labels: np.ndarray, classes: list[str], *, source: str,
        skipped: list[tuple[str, str]] | None = None, c: float | None = None, provenance: dict[str, Any] | None = None,
    ) -> tuple[Report, dict[str, Any]]:  # fmt: skip
        """Train from features already extracted (``tlserve train --features DIR``), in
        :meth:`Dataset.from_folder` order: the same split, C and fit as :meth:`train` on that folder."""
        from sklearn.model_selection import train_test_split

        valid_head_name(name)
        skipped = skipped or []
        xtr, xva, ytr, yva = train_test_split(features, labels, test_size=0.2, stratify=labels, random_state=SEED)
        if min(np.bincount(ytr, minlength=len(classes))) == 0:
            raise ValueError("every class needs at least one readable training image")
        cv_scores: dict[str, float] = {}
        if c is None:
            c, cv_scores = choose_c(xtr, ytr) if len(ytr) >= 50 else (DEFAULT_C, {})
        estimator = make_estimator(c).fit(xtr, ytr)
        report = make_report(yva, estimator.predict(xva), classes)
        split = {"kind": "stratified", "val_fraction": 0.2, "seed": SEED}
        data = Dataset(Path(source), classes, [], labels)
        card = self._card(data, ytr, yva, [(Path(p), why) for p, why in skipped], split, c, cv_scores, report)
        card["training"]["features"] = provenance or {}
        png = confusion_png(report, f"{name} ({split['kind']} split)")
        version = save_head(self.heads, name, estimator, card, {"confusion_matrix.png": png})
        return report, version.card

    def _card(self, data: Dataset, ytr: np.ndarray, yva: np.ndarray, skipped: list, split: dict, c: float,
              cv_scores: dict, report: Report) -> dict[str, Any]:  # fmt: skip
        import sklearn

        n = len(data.classes)
        return {
            "classes": data.classes,
            "extractor": {
                **{k: self.info.raw[k] for k in ("file", "input_size", "resample", "pooling", "feature_dim")},
                "sha256": self.info.feature_space,
            },
            "training": {
                "data_dir": str(data.root),
                "split": split,
                "train_per_class": dict(zip(data.classes, np.bincount(ytr, minlength=n).tolist(), strict=True)),
                "val_per_class": dict(zip(data.classes, np.bincount(yva, minlength=n).tolist(), strict=True)),
                "skipped": len(skipped),
                "skipped_files": [f"{p}: {why}" for p, why in skipped[:50]],
            },
            "estimator": {"kind": "LogisticRegression (L2, lbfgs)", "C": c, "cv_accuracy_by_C": cv_scores},
            "metrics": report.as_dict(),
            "sklearn_version": sklearn.__version__,
        }

    def evaluate(self, head: Head, data_dir: Path, *, limit: int = 0) -> tuple[Report, list[tuple[Path, str]]]:
        data = Dataset.from_folder(data_dir, classes=list(head.classes))
        idx = _per_class_subset(data.labels, limit) if limit else np.arange(len(data.paths))
        ext = self.features([data.paths[i] for i in idx])
        pred = head.predict_proba(ext.features).argmax(axis=1) if len(ext.kept) else np.zeros(0, np.int64)
        return make_report(data.labels[idx][ext.kept], pred, list(head.classes)), ext.skipped


def _per_class_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """The first ``limit`` items of every class (deterministic)."""
    return np.concatenate([np.flatnonzero(labels == k)[:limit] for k in np.unique(labels)])
