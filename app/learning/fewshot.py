"""Fitting a head by a :class:`app.core.recipe.Recipe`: views, transform, linear model, C by cross-validation.

The one fit code of ``tlserve train``, HTTP training (both through :class:`app.learning.training.Trainer`) and
``benchmarks/learning_curve.py``. Inputs are features ``xv [n, V, D]``: each photo under the recipe's views
(``xv[:, 0]`` is the photo as served). Cross-validation folds are of photos: a photo's views are never on both
sides of a fold, and a held-out photo is scored on its served view only.

Every model is returned as a scikit-learn ``LogisticRegression`` carrying the arrays that answer
(:func:`app.storage.heads.fresh_estimator`): ``logistic`` is one; ``blend`` is the logit average (weight 1/2) of a
logistic regression and a nearest-class-mean classifier (the features' dot product with the unit-length
class means, times a scale chosen by cross-validation), which is linear in the features too; ``lda`` is a shrinkage (Ledoit-Wolf)
linear discriminant, whose probabilities are the softmax (two classes: the sigmoid) of a linear function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.core.recipe import Recipe, transform
from app.learning.crossval import fold_ids, make_estimator, n_folds

BLEND_WEIGHT = 0.5
SELECT_MARGIN = 0.1
"""Another recipe replaces the default only when it is more accurate by cross-validation by more than this: the
default's gain over plain regression measured on photos is 1-3 points and a CV on 20 photos moves by 5 a photo,
so a closer call is noise (it cost the default 1.5 points at 5 photos a class); a transform that does not suit an
extractor's features loses far more (30 points on the tests' tiny extractor)."""


def prepare(xv: np.ndarray, recipe: Recipe) -> np.ndarray:
    """``[n, V, D]`` raw features → the recipe's transform of each row."""
    n, v, d = xv.shape
    return transform(xv.reshape(n * v, d), recipe.transform).reshape(n, v, d)


def _flat(zv: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, v, d = zv.shape
    return zv.reshape(n * v, d), np.repeat(y, v)


def _means(z: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    m = np.stack([z[y == k].mean(axis=0) for k in range(n_classes)])
    return np.asarray(m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12))


def _proto_coef(means: np.ndarray, scale: float) -> np.ndarray:
    """The class-mean classifier's logits as ``coef_`` rows (two classes: one row, class 1 against class 0)."""
    coef = scale * means
    return coef[1:] - coef[:1] if len(means) == 2 else coef


def proba_of(decision: np.ndarray) -> np.ndarray:
    """Probabilities from a linear model's decision values, as ``LogisticRegression.predict_proba`` makes them."""
    d = np.asarray(decision, dtype=np.float64)
    if d.ndim == 1 or d.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-d.reshape(-1)))
        return np.stack([1 - p1, p1], axis=1)
    e = np.exp(d - d.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _estimator(coef: np.ndarray, intercept: np.ndarray, n_classes: int, c: float) -> Any:
    from app.storage.heads import fresh_estimator

    return fresh_estimator(np.asarray(coef, np.float64), np.asarray(intercept, np.float64).reshape(-1),
                           np.arange(n_classes), c=c)  # fmt: skip


def fit_prepared(zv: np.ndarray, y: np.ndarray, recipe: Recipe, n_classes: int, c: float, scale: float = 0.0) -> Any:
    """The recipe's model on transformed features ``zv [n, V, D]``."""
    from app.learning.crossval import sklearn_threads

    z, yy = _flat(zv, y)
    with sklearn_threads(1):
        if recipe.head == "lda":
            from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

            lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(z, yy)
            return _estimator(lda.coef_, lda.intercept_, n_classes, c)
        lr = make_estimator(c).fit(z, yy)
    if recipe.head == "blend":
        coef = (1 - BLEND_WEIGHT) * lr.coef_ + BLEND_WEIGHT * _proto_coef(_means(z, yy, n_classes), scale)
        return _estimator(coef, (1 - BLEND_WEIGHT) * lr.intercept_, n_classes, c)
    return _estimator(lr.coef_, lr.intercept_, n_classes, c)


def fit(xv: np.ndarray, y: np.ndarray, recipe: Recipe, n_classes: int, c: float, scale: float = 0.0) -> Any:
    return fit_prepared(prepare(xv, recipe), y, recipe, n_classes, c, scale)


@dataclass
class Search:
    """Out-of-fold probabilities of every photo (served view) at each C (``oof[c]``), at the best scale for that C."""

    folds: np.ndarray
    n_splits: int
    oof: dict[float, np.ndarray]
    accuracy: dict[float, float]  # mean of the per-fold accuracies
    scale: dict[float, float] = field(default_factory=dict)  # blend: the scale chosen with each C

    @property
    def best(self) -> float:
        """The most accurate C; ties go to the smaller C (the stronger regularisation)."""
        return max(self.oof, key=lambda c: (self.accuracy[c], -c))


def _fold(zv: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, recipe: Recipe, n_classes: int,
          grid: tuple[float, ...], scales: tuple[float, ...]) -> dict[tuple[float, float], np.ndarray]:  # fmt: skip
    """Held-out (served view) probabilities of one fold at each (C, scale); C along a warm-started path."""
    from app.learning.crossval import sklearn_threads

    z, yy = _flat(zv[train], y[train])
    zt = zv[test, 0]
    out: dict[tuple[float, float], np.ndarray] = {}
    if recipe.head == "lda":
        est = fit_prepared(zv[train], y[train], recipe, n_classes, grid[0])
        return {(grid[0], 0.0): est.predict_proba(zt).astype(np.float32)}
    protos = _proto_coef(_means(z, yy, n_classes), 1.0) if recipe.head == "blend" else None
    with sklearn_threads(1):
        est = make_estimator(grid[0]).set_params(warm_start=True)
        for c in grid:
            est.set_params(C=c).fit(z, yy)
            d = zt @ est.coef_.T + est.intercept_
            if protos is None:
                out[(c, 0.0)] = proba_of(d).astype(np.float32)
                continue
            for s in scales:
                mixed = (1 - BLEND_WEIGHT) * d + BLEND_WEIGHT * s * (zt @ protos.T)
                out[(c, s)] = proba_of(mixed).astype(np.float32)
    return out


def cross_validate(xv: np.ndarray, y: np.ndarray, recipe: Recipe, n_classes: int, grid: tuple[float, ...] | None = None,
                   scales: tuple[float, ...] | None = None, *, prepared: bool = False,
                   on_fold: Any = None) -> Search:  # fmt: skip
    """Stratified folds of photos (:func:`n_folds`, seed :data:`SEED`); each fold fitted on its training photos'
    views, scored on the held-out photos' served view."""
    zv = xv if prepared else prepare(xv, recipe)
    grid = tuple(sorted(grid or recipe.c_grid))
    scales = tuple(scales or recipe.scales) if recipe.head == "blend" else (0.0,)
    if recipe.head == "lda":
        grid, scales = grid[:1], (0.0,)
    n_splits = n_folds(y)
    if not n_splits:
        raise ValueError("too few photos a class to cross-validate (every class needs at least 2)")
    folds = fold_ids(y, n_splits)
    oof = {(c, s): np.zeros((len(y), n_classes), np.float32) for c in grid for s in scales}
    per_fold: dict[tuple[float, float], list[float]] = {k: [] for k in oof}
    for k in range(n_splits):
        train, test = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        for key, proba in _fold(zv, y, train, test, recipe, n_classes, grid, scales).items():
            oof[key][test] = proba
            per_fold[key].append(float((proba.argmax(axis=1) == y[test]).mean()))
        if on_fold is not None:
            on_fold(len(grid))
    acc = {key: float(np.mean(v)) for key, v in per_fold.items()}
    best_scale = {c: max(scales, key=lambda s: (acc[(c, s)], -_logloss(oof[(c, s)], y))) for c in grid}
    return Search(folds, n_splits, {c: oof[(c, best_scale[c])] for c in grid}, {c: acc[(c, best_scale[c])] for c in grid},
                  {c: best_scale[c] for c in grid} if recipe.head == "blend" else {})  # fmt: skip


def _logloss(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0)).mean())


class Model:
    """A head being trained: the estimator with its recipe's transform and temperature, answering as the loaded
    head will (:func:`app.core.recipe.answer`). What is saved is ``estimator`` (a plain ``LogisticRegression``)."""

    def __init__(self, estimator: Any, kind: str, temperature: float = 1.0) -> None:
        self.estimator, self.kind, self.temperature = estimator, kind, temperature

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        from app.core.recipe import answer

        return answer(self.estimator, features, self.kind, self.temperature)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.predict_proba(features).argmax(axis=1))


@dataclass
class Fit:
    """What :func:`fit_parts` produced (the trainer's steps 4-6 and 8)."""

    head: Model
    c: float
    source: str
    search: Search | None
    oof: Search
    held_pred: np.ndarray
    report_head: Model | None
    scale: float


def views_of(xv: np.ndarray, recipe: Recipe, views: tuple[str, ...]) -> np.ndarray:
    return xv[:, [views.index(v) for v in recipe.views]]


def grid_of(recipe: Recipe, c: float | None = None) -> tuple[float, ...]:
    """The C values a cross-validation of ``recipe`` fits (``c``: that one)."""
    return (c,) if c is not None else recipe.c_grid[:1] if recipe.head == "lda" else recipe.c_grid


def select(xv: np.ndarray, y: np.ndarray, views: tuple[str, ...], recipes: list[Recipe], n_classes: int,
           c: float | None = None, on_fold: Any = None) -> tuple[Recipe, Search | None, dict[str, float]]:  # fmt: skip
    """``recipes[0]`` (the default), unless another is more accurate by cross-validation on ``xv`` (its columns:
    ``views``) by more than :data:`SELECT_MARGIN`; each with its own C (``c``: at that C). Returns the winner, its
    search (to reuse), every recipe's accuracy."""
    if len(recipes) == 1 or not n_folds(y):
        return recipes[0], None, {}
    scores: dict[str, float] = {}
    best: tuple[float, int, Recipe, Search] | None = None
    for i, recipe in enumerate(recipes):
        grid = (c,) if c is not None else None
        search = cross_validate(views_of(xv, recipe, views), y, recipe, n_classes, grid, on_fold=on_fold)
        scores[recipe.name] = round(search.accuracy[search.best], 4)
        if best is None or search.accuracy[search.best] > best[0] + SELECT_MARGIN:
            best = (search.accuracy[search.best], i, recipe, search)
    assert best is not None
    return best[2], best[3], scores


def fit_parts(xv: np.ndarray, y: np.ndarray, train_idx: np.ndarray | None, held_x: np.ndarray, recipe: Recipe,
              n_classes: int, c: float | None, default_c: float, meter: Any = None,
              search: Search | None = None) -> Fit:  # fmt: skip
    """The trainer's fits by ``recipe``: C (and the blend's scale) by cross-validation on the training part
    (all photos with ``train_idx`` None, i.e. ``--val-dir``; ``search``: that cross-validation, done already),
    the report head on the training part, the out-of-fold probabilities of all photos at that C, the shipped
    head on all photos."""
    zv = prepare(xv, recipe)
    tz, ty = (zv, y) if train_idx is None else (zv[train_idx], y[train_idx])
    advance = (lambda _n: meter.advance(1)) if meter is not None else None  # one fit a fold
    scale = recipe.scales[len(recipe.scales) // 2] if recipe.head == "blend" else 0.0
    if search is not None and c is None:
        c, source = search.best, f"{search.n_splits}-fold cross-validation"
        scale = search.scale.get(c, scale)
    elif c is None and n_folds(ty) and recipe.head != "lda":
        search = cross_validate(tz, ty, recipe, n_classes, prepared=True, on_fold=advance)
        c, source = search.best, f"{search.n_splits}-fold cross-validation"
        scale = search.scale.get(c, scale)
    elif c is None:
        c = recipe.c_grid[0] if recipe.head == "lda" else default_c
        source = "not used (LDA)" if recipe.head == "lda" else "default (too few photos a class to cross-validate)"
    else:
        search, source = None, "--C"
    report = Model(fit_prepared(tz, ty, recipe, n_classes, c, scale), recipe.transform) if train_idx is not None else None
    if report is not None and meter is not None:
        meter.advance(1)
    if search is not None and train_idx is None:
        oof = Search(search.folds, search.n_splits, {c: search.oof[c]}, {c: search.accuracy[c]}, search.scale)
    else:
        oof = cross_validate(zv, y, recipe, n_classes, (c,), (scale,), prepared=True, on_fold=advance)
    head = Model(fit_prepared(zv, y, recipe, n_classes, c, scale), recipe.transform)
    if meter is not None:
        meter.advance(1)
    return Fit(head, c, source, search, oof, (report or head).predict(held_x), report, scale)


def describe(recipe: Recipe) -> str:
    """The card's ``estimator.kind``."""
    model = {"logistic": "LogisticRegression (L2, lbfgs)",
             "blend": "logit blend (1/2 each) of LogisticRegression (L2, lbfgs) and nearest class means (cosine)",
             "lda": "shrinkage LDA (Ledoit-Wolf), stored as LogisticRegression arrays"}[recipe.head]  # fmt: skip
    return model + ("" if recipe.transform == "none" else f" on {recipe.transform} features")


def view_features(paths: list[Any], hashes: list[str | None], view: str, extractor: Any, cache: Any, *, resample: str,
                  max_pixels: int, fallback: np.ndarray, batch_size: int = 16, meter: Any = None) -> np.ndarray:  # fmt: skip
    """``[n, D]`` features of one training-time view (:data:`app.core.recipe.VIEWS`) of each photo, through the feature
    cache (keyed by the view as well: ``<resample>/<view>``). A photo whose view cannot be made keeps its
    served-view row of ``fallback`` (it was readable, so this is not expected)."""
    from app.core.errors import InputError
    from app.core.recipe import view_image

    size, dim = extractor.size, extractor.feature_dim
    key = f"{resample}/{view}"
    out = np.array(fallback, dtype=np.float32, copy=True)
    todo: list[int] = []
    for i, h in enumerate(hashes):
        vec = cache.get(cache.key(h, size, key), dim) if h is not None else None
        if vec is None and h is not None:
            todo.append(i)
        elif vec is not None:
            out[i] = vec
    if meter is not None:
        meter.advance(len(hashes) - len(todo))
    for start in range(0, len(todo), batch_size):
        idx, imgs = [], []
        for i in todo[start : start + batch_size]:
            try:
                imgs.append(view_image(paths[i].read_bytes(), view, size, resample=resample, max_pixels=max_pixels))
                idx.append(i)
            except (OSError, InputError):
                continue
        if imgs:
            for i, vec in zip(idx, extractor.run(np.stack(imgs)), strict=True):
                out[i] = vec
                cache.put(cache.key(hashes[i] or "", size, key), vec)
        if meter is not None:
            meter.advance(len(todo[start : start + batch_size]))
    return out
