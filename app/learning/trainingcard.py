"""A training's card: what :class:`app.learning.training.Trainer` records about a new version — its classes, the
extractor it was trained on, the photos (trained, held out, skipped, duplicated), the estimator and its C, the
held-out report and how each number was made. Typed on reading by :class:`app.storage.card.Card`, which
``HeadStore.save`` checks it against before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core.recipe import SEED, VAL_FRACTION
from app.learning.crossval import C_GRID

if TYPE_CHECKING:
    from app.learning.features import Dataset, Duplicate
    from app.learning.report import Report
    from app.learning.training import _Fitted, _Held
    from app.storage.store import ExtractorInfo

OOF_FILE = "oof_proba.npy"
FOLDS_FILE = "folds.json"


def training_card(info: ExtractorInfo, data: Dataset, val: Dataset | None, y: np.ndarray, held: _Held,
                  skipped: list[tuple[Path, str]], duplicates: list[Duplicate], fitted: _Fitted,
                  report: Report) -> dict[str, Any]:  # fmt: skip
    """The card a training writes (before the store adds what it vouches for: :meth:`app.storage.registry.HeadStore.committed_card`):
    which photos trained and held out the head, the estimator and its C, the report, how every number was made."""
    import sklearn

    n = len(y)
    stratified = held.train_idx is not None
    n_train = len(held.train_idx) if held.train_idx is not None else n
    held_desc = (f"{len(held.y)} photos of --val-dir {val.root}" if val is not None
                 else f"a stratified {VAL_FRACTION:.0%} of DATA_DIR ({len(held.y)} photos, seed {SEED})")  # fmt: skip
    train_desc = f"the other {n_train} photos of DATA_DIR" if stratified else f"all {n} labelled photos of DATA_DIR"
    search = fitted.search
    split = (
        {"kind": "val_dir", "val_dir": str(val.root)}
        if val is not None
        else {"kind": "stratified", "val_fraction": VAL_FRACTION, "seed": SEED}
    )
    selection = f"{search.n_splits}-fold stratified CV over C in {list(C_GRID)} on {train_desc}" if search else None
    return {
        "classes": data.classes,
        "extractor": {
            **{k: info.raw[k] for k in ("file", "input_size", "resample", "pooling", "feature_dim")},
            "sha256": info.feature_space,
        },
        "training": {
            "data_dir": str(data.root),
            "split": split,
            "train_per_class": _counts(y, data.classes),
            "val_per_class": _counts(held.y, data.classes),
            "nested_per_class": dict(data.nested),
            "ignored_outside_class_folders": data.loose,
            "skipped": len(skipped),
            "skipped_files": [f"{p}: {why}" for p, why in skipped[:50]],
            "duplicates": [d.as_dict() for d in duplicates[:50]],
        },
        "estimator": {
            "kind": "LogisticRegression (L2, lbfgs)",
            "C": fitted.c,
            "C_source": fitted.source,
            "cv_accuracy_by_C": {str(c): round(a, 4) for c, a in search.accuracy.items()} if search else {},
            "fitted_on": f"all {n} labelled photos of DATA_DIR",
        },
        "metrics": report.as_dict(),
        "evaluation": {
            "metrics": f"held out: {held_desc}; scored with a head fitted on {train_desc} at C={fitted.c}"
            + ("; the shipped head was then refitted on all photos of DATA_DIR" if stratified else " (the shipped head)"),
            "model_selection": selection,
            "cv": {
                "data": f"all {n} labelled photos of DATA_DIR",
                "folds": fitted.oof.n_splits,
                "seed": SEED,
                "C": fitted.c,
                "accuracy": round(fitted.oof.accuracy[fitted.c], 4),
                "artifacts": [OOF_FILE, FOLDS_FILE],
            },
            "shipped_head": f"fitted on all {n} labelled photos of DATA_DIR at C={fitted.c}",
        },
        "sklearn_version": sklearn.__version__,
    }


def _counts(y: np.ndarray, classes: list[str]) -> dict[str, int]:
    return dict(zip(classes, np.bincount(y, minlength=len(classes)).tolist(), strict=True))
