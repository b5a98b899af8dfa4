"""The training recipe's fixed numbers, each stated once: training (:mod:`app.learning.training`), the example
store (:mod:`app.storage.examples`), training jobs (:mod:`app.learning.jobs`) and the HTTP front read them here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SEED = 42
"""Every random choice of a training: folds, the held-out split, the example store's validation pick, the estimator."""
VAL_FRACTION = 0.2
"""Held out of each class for validation when no validation set is given (at least one photo a class)."""
MIN_IMAGES_PER_CLASS = 2
"""Fewest training photos a class may have: cross-validation needs two a class."""

# --- training-time views ---------------------------------------------------------------------
CROP_SCALE = 292 / 256
"""A crop view decodes the photo at this much the extractor's input size and keeps an input-size corner
(87.7% of each side): the photo slightly zoomed and shifted."""


def view_image(data: bytes, view: str, size: int, *, resample: str = "bilinear", max_pixels: int | None = None) -> Any:
    """``uint8 [size, size, 3]``: one of :data:`VIEWS` of the photo ``data``, through the one image loader."""
    from app.core.imaging import load_image
    from app.core.settings import DEFAULT_MAX_IMAGE_PIXELS

    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r} (views: {', '.join(VIEWS)})")
    limit = max_pixels or DEFAULT_MAX_IMAGE_PIXELS
    if view in ("orig", "flip"):
        img = load_image(data, size, resample=resample, max_pixels=limit)
    else:
        big = load_image(data, round(size * CROP_SCALE), resample=resample, max_pixels=limit)
        img = big[:size, :size] if view == "crop_tl" else big[-size:, -size:]
    if view in ("flip", "crop_br_flip"):
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


VIEWS = ("orig", "flip", "crop_tl", "crop_br_flip")
"""Views of a training photo: as served, mirrored, and two zoomed crops (top-left; bottom-right mirrored)."""


# --- recipes ---------------------------------------------------------------------------------
TRANSFORMS = ("none", "sqrt_l2")
"""Feature transforms a head may apply before its linear model (the card's ``recipe.transform``)."""
HEADS = ("logistic", "blend", "lda")


@dataclass(frozen=True)
class Recipe:
    """How a head is fitted: the transform its features get (at training and at serving, by the loaded head),
    the training-time views of each photo (answers are on the photo as served: no test-time views), and the
    linear model. Every candidate's model is stored as logistic-regression arrays (``coef_``, ``intercept_``):
    a blend of logits and an LDA are linear in the features, so the safe head format does not change."""

    name: str
    transform: str = "none"
    views: tuple[str, ...] = ("orig",)
    head: str = "logistic"
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    scales: tuple[float, ...] = (1.0, 3.0, 10.0)
    """``blend``: logit scales of the class-mean (cosine) classifier tried by cross-validation, with weight 1/2."""

    def as_card(self) -> dict[str, Any]:
        return {"name": self.name, "transform": self.transform, "views": list(self.views), "head": self.head}


LEGACY = Recipe("lr")
"""Today's recipe before the learning curve: raw features, the photo as served, L2 logistic regression."""
SQRT_L2_NORM = 10.0
"""``sqrt_l2`` rows have this length, not 1: a photo's raw features are ~58 long, and at 10 the C of today's grid
(and ``--C``) mean about the same regularisation on either (C on unit rows would need ~100x the C)."""
CANDIDATES: dict[str, Recipe] = {r.name: r for r in (
    LEGACY,
    Recipe("l2lr", "sqrt_l2"),
    Recipe("l2lr_flip", "sqrt_l2", ("orig", "flip")),
    Recipe("l2lr_aug", "sqrt_l2", VIEWS),
    Recipe("l2blend", "sqrt_l2", head="blend"),
    Recipe("l2blend_aug", "sqrt_l2", VIEWS, head="blend"),
    Recipe("l2lda_aug", "sqrt_l2", VIEWS, head="lda"),
)}  # fmt: skip
"""The candidates of ``benchmarks/learning_curve.py`` (RESULTS.md, "learning curve")."""


def transform(x: np.ndarray, kind: str) -> np.ndarray:
    """``none``: ``x`` itself (the very array: old heads answer exactly as before); ``sqrt_l2``: signed square
    root, then each row to length :data:`SQRT_L2_NORM`."""
    if kind == "none":
        return x
    if kind != "sqrt_l2":
        raise ValueError(f"unknown feature transform {kind!r} (known: {', '.join(TRANSFORMS)})")
    z = np.sign(x) * np.sqrt(np.abs(x, dtype=np.float64))
    return np.asarray(SQRT_L2_NORM * z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def transform_of(card: dict[str, Any], where: str) -> str:
    """A loaded head's feature transform: its card's ``recipe.transform``, ``none`` where it has no recipe."""
    from app.core.errors import ArtifactError

    recipe = card.get("recipe")
    if recipe is None:
        return "none"
    kind = recipe.get("transform") if isinstance(recipe, dict) else None
    if kind not in TRANSFORMS:
        raise ArtifactError(f"{where}: card's recipe.transform {str(kind)[:40]!r} is not one of {', '.join(TRANSFORMS)}")
    return str(kind)


def answer(estimator: Any, features: np.ndarray, kind: str, temperature: float) -> np.ndarray:
    """A head's probabilities: ``kind`` transform of the features, the estimator, the temperature
    (:func:`app.core.calibration.temper`). The one place, for loaded heads and heads being trained."""
    from app.core.calibration import temper

    proba = estimator.predict_proba(transform(features, kind))
    return temper(np.asarray(proba, dtype=np.float32), temperature)


# --- the default, chosen by the learning curve (benchmarks/RESULTS.md) ------------------------
FEW_PHOTOS = 50
"""At most this many photos in the smallest class: :data:`FEW_RECIPE`; more: :data:`MANY_RECIPE`."""
FEW_RECIPE = "l2lr_aug"
MANY_RECIPE = "l2lr"


def choose(smallest: int) -> tuple[list[Recipe], str]:
    """The recipes a training whose smallest class has ``smallest`` photos tries, best first, and the rule. The
    trainer keeps the first unless another is clearly more accurate by cross-validation (:func:`app.learning.fewshot.select`): the
    square-root transform suits ImageNet features and is measured on them, but not every extractor's features."""
    name = FEW_RECIPE if smallest <= FEW_PHOTOS else MANY_RECIPE
    rule = f"smallest class {smallest} {'<=' if smallest <= FEW_PHOTOS else '>'} {FEW_PHOTOS} photos: {name}"
    recipes = [CANDIDATES[name]] + ([LEGACY] if name != LEGACY.name else [])
    return recipes, rule + (
        f", or {LEGACY.name} where it is clearly more accurate by cross-validation" if len(recipes) > 1 else ""
    )
