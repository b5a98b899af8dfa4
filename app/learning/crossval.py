"""Model selection for a head: stratified folds, C by cross-validation along the regularisation path, the
out-of-fold probabilities, and the one scikit-learn estimator every fit makes (:mod:`app.learning.training`
calls it; benchmarks measure with it).

Every scikit-learn call runs under :func:`sklearn_threads` (one BLAS/OpenMP thread per worker:
BLAS threads fighting ONNX Runtime and each other made one fit 9x slower on a busy 2-core
machine); each fold fits its C values along the path, warm-started from the previous C; the folds
of a C search run in worker processes only where that was measured to pay (:func:`fold_jobs`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.cpus import available_cpus
from app.core.errors import DatasetError
from app.core.progress import Meter
from app.core.recipe import SEED, VAL_FRACTION

DEFAULT_C = 0.1  # measured: see benchmarks/RESULTS.md ("choosing the features")
C_GRID = (0.01, 0.1, 1.0, 10.0)
FOLDS = 5
PARALLEL_MIN_WORK = 25_000_000
PARALLEL_MIN_CPUS = 4
"""A C search runs its folds in worker processes only with at least this much work (samples x features
x classes x C values; 25M is ~10 s serial here) and this many CPUs. Measured on 2 busy cores, two
workers never paid: 766x512 (weather) 1.5-2.1 s serial vs 3.0-7.0 s; 3,064x512 10.0-10.4 s vs
11.5-18.8 s; 6,128x512 28-35 s vs 30-31 s (process start-up and the other processes on the machine
eat the second core)."""


# --- scikit-learn ----------------------------------------------------------------------------
@contextmanager
def sklearn_threads(n: int = 1) -> Iterator[None]:
    """BLAS and OpenMP thread pools limited to ``n`` while scikit-learn runs (threadpoolctl)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n):
        yield


def make_estimator(c: float) -> Any:
    """Plain L2 logistic regression on the raw features: standardising them measured worse
    (224/avg: 97.2-97.7% vs 98.4-98.7% val; see benchmarks/RESULTS.md)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000, random_state=SEED)


def fit(x: np.ndarray, y: np.ndarray, c: float) -> Any:
    with sklearn_threads(1):
        return make_estimator(c).fit(x, y)


def fold_ids(y: np.ndarray, n_splits: int = FOLDS, seed: int = SEED) -> np.ndarray:
    """The stratified fold (0..n_splits-1) each sample is held out in."""
    from sklearn.model_selection import StratifiedKFold

    folds = np.empty(len(y), dtype=np.int64)
    for k, (_, test) in enumerate(StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(y, y)):
        folds[test] = k
    return folds


def n_folds(y: np.ndarray) -> int:
    """:data:`FOLDS`, or fewer when the smallest class has fewer photos (0: too few to cross-validate)."""
    smallest = int(np.bincount(y).min()) if len(y) else 0
    n = min(FOLDS, smallest)
    return n if n >= 2 else 0


def _fold_path(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, grid: tuple[float, ...]) -> list[np.ndarray]:
    """Held-out probabilities of one fold at each C, fitted along the path from the smallest C up
    (each fit starts where the previous one ended: the same optimum, fewer iterations)."""
    out = []
    with sklearn_threads(1):
        est = make_estimator(grid[0]).set_params(warm_start=True)
        for c in grid:
            est.set_params(C=c).fit(x[train], y[train])
            out.append(est.predict_proba(x[test]).astype(np.float32))
    return out


def fold_jobs(x: np.ndarray, n_classes: int, n_c: int, n_splits: int) -> int:
    """Worker processes for one search: parallel only where it pays (see :data:`PARALLEL_MIN_WORK`)."""
    work = x.shape[0] * x.shape[1] * n_classes * n_c
    cpus = available_cpus()
    return min(cpus, n_splits) if work >= PARALLEL_MIN_WORK and cpus >= PARALLEL_MIN_CPUS else 1


@dataclass
class CrossValidation:
    """Out-of-fold probabilities of every sample at each C (``oof[c]``: ``[n, classes]``)."""

    folds: np.ndarray
    n_splits: int
    oof: dict[float, np.ndarray]
    accuracy: dict[float, float]  # mean of the per-fold accuracies (what cross_val_score reports)

    @property
    def best(self) -> float:
        """The most accurate C; ties go to the smaller C (the stronger regularisation)."""
        return max(self.oof, key=lambda c: (self.accuracy[c], -c))


def cross_validate(x: np.ndarray, y: np.ndarray, grid: tuple[float, ...], n_classes: int, *, meter: Meter | None = None,
                   jobs: int | None = None) -> CrossValidation:  # fmt: skip
    from joblib import Parallel, delayed

    grid = tuple(sorted(grid))
    n_splits = n_folds(y)
    if not n_splits:
        raise DatasetError("too few photos a class to cross-validate (every class needs at least 2)")
    folds = fold_ids(y, n_splits)
    jobs = jobs or fold_jobs(x, n_classes, len(grid), n_splits)
    tasks = [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in range(n_splits)]
    oof = {c: np.zeros((len(y), n_classes), np.float32) for c in grid}
    per_fold: dict[float, list[float]] = {c: [] for c in grid}
    run = Parallel(n_jobs=jobs, return_as="generator") if jobs > 1 else None
    results = (
        run(delayed(_fold_path)(x, y, tr, te, grid) for tr, te in tasks)
        if run
        else (_fold_path(x, y, tr, te, grid) for tr, te in tasks)
    )
    for (_, test), probas in zip(tasks, results, strict=True):
        for c, proba in zip(grid, probas, strict=True):
            oof[c][test] = proba
            per_fold[c].append(float((proba.argmax(axis=1) == y[test]).mean()))
        if meter is not None:
            meter.advance(len(grid))
    return CrossValidation(folds, n_splits, oof, {c: float(np.mean(v)) for c, v in per_fold.items()})


def stratified_holdout(y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): :data:`VAL_FRACTION` of every class (at least one each), seed :data:`SEED`."""
    from sklearn.model_selection import train_test_split

    n_test = max(n_classes, math.ceil(VAL_FRACTION * len(y)))
    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=SEED)
    return np.sort(train), np.sort(test)
