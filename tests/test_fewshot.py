"""The training recipe (app/core/recipe.py, app/learning/fewshot.py): views, transform, linear heads stored as plain
logistic-regression arrays, folds of photos, the default by data size, and heads trained before recipes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from app.core.recipe import (
    CANDIDATES,
    FEW_PHOTOS,
    FEW_RECIPE,
    LEGACY,
    MANY_RECIPE,
    SQRT_L2_NORM,
    VIEWS,
    answer,
    choose,
    view_image,
)
from app.core.recipe import transform as feature_transform
from app.learning import fewshot
from app.learning.features import Dataset
from app.storage.heads import ARRAY_FILES
from app.storage.registry import load_head, save_head
from app.storage.store import ModelStore
from tests.helpers import REPO, SHARED_DATA, image_bytes, write_color_dataset
from tests.test_training import add_green, trainer


def test_transforms() -> None:
    x = np.abs(np.random.default_rng(0).normal(size=(5, 8))).astype(np.float32)
    assert feature_transform(x, "none") is x  # the very array: an old head's features are not touched
    z = feature_transform(x, "sqrt_l2")
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), SQRT_L2_NORM, rtol=1e-5)
    np.testing.assert_allclose(z[0] / z[0, 0], np.sqrt(x[0]) / np.sqrt(x[0, 0]), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown feature transform"):
        feature_transform(x, "pca")


def test_the_default_depends_on_the_smallest_class_and_is_checked_against_lr() -> None:
    few, rule = choose(FEW_PHOTOS)
    assert [r.name for r in few] == [FEW_RECIPE, LEGACY.name] and f"<= {FEW_PHOTOS}" in rule
    many, rule = choose(FEW_PHOTOS + 1)
    assert many[0].name == MANY_RECIPE and f"> {FEW_PHOTOS}" in rule


def test_views_are_the_photo_mirrored_and_cropped() -> None:
    data = image_bytes((200, 30, 30), seed=3, size=(50, 40))
    orig, flip = view_image(data, "orig", 32), view_image(data, "flip", 32)
    assert orig.shape == (32, 32, 3) and orig.dtype == np.uint8
    np.testing.assert_array_equal(flip, orig[:, ::-1])
    tl, br = view_image(data, "crop_tl", 32), view_image(data, "crop_br_flip", 32)
    assert tl.shape == br.shape == (32, 32, 3) and not np.array_equal(tl, orig)
    with pytest.raises(ValueError, match="unknown view"):
        view_image(data, "rotate", 32)


@pytest.mark.parametrize("name", ["l2blend_aug", "l2lda_aug", "l2lr", "lr"])
def test_every_head_is_a_plain_logistic_regression(name: str) -> None:
    """A blend of logits and an LDA are linear: stored as LogisticRegression arrays, they answer as fitted."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    n, d = 30, 12
    y = np.arange(n) % 3
    xv = np.abs(rng.normal(size=(n, len(VIEWS), d)) + y[:, None, None] * 0.7).astype(np.float32)
    recipe = CANDIDATES[name]
    cols = fewshot.views_of(xv, recipe, VIEWS)
    est = fewshot.fit(cols, y, recipe, 3, 1.0, 3.0)
    assert type(est) is LogisticRegression and set(ARRAY_FILES) <= set(vars(est))
    z = feature_transform(cols[:, 0], recipe.transform)
    np.testing.assert_allclose(est.predict_proba(z), fewshot.proba_of(z @ est.coef_.T + est.intercept_), rtol=1e-6)
    if name == "l2blend_aug":  # half the regression's logits, half the class means' (times the scale)
        zz = feature_transform(cols.reshape(-1, d), recipe.transform)
        lr = LogisticRegression(C=1.0, max_iter=5000, random_state=42).fit(zz, np.repeat(y, len(VIEWS)))
        means = np.stack([zz[np.repeat(y, len(VIEWS)) == k].mean(0) for k in range(3)])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        np.testing.assert_allclose(est.coef_, 0.5 * lr.coef_ + 0.5 * 3.0 * means, rtol=1e-4, atol=1e-6)


def test_folds_are_of_photos_a_photos_views_never_straddle_one() -> None:
    """Random labels, and every view of a photo the same vector: a fold that trained on a held-out photo's other
    views would memorise it (near 100% out of fold). Folds of photos leave chance."""
    rng = np.random.default_rng(2)
    n, d = 60, 200
    y = rng.permutation(np.arange(n) % 2)
    x = rng.normal(size=(n, d)).astype(np.float32)
    xv = np.repeat(x[:, None, :], 2, axis=1)
    recipe = CANDIDATES["l2lr_flip"]
    search = fewshot.cross_validate(xv, y, recipe, 2, (10.0,))
    assert search.accuracy[10.0] < 0.75
    memorised = fewshot.fit(xv, y, recipe, 2, 10.0).predict(feature_transform(x, recipe.transform))
    assert (memorised == y).mean() == 1.0  # the control: these labels can be memorised


def test_select_keeps_the_default_unless_lr_is_more_accurate() -> None:
    rng = np.random.default_rng(3)
    y = np.arange(40) % 2
    # the class is in the features' magnitude only: sqrt + L2 removes it, plain regression keeps it
    base = np.abs(rng.normal(size=(1, 16))).astype(np.float32)
    x = base * (1 + y[:, None] * 0.5) + rng.normal(scale=0.01, size=(40, 16)).astype(np.float32)
    recipes, _ = choose(20)
    winner, search, scores = fewshot.select(np.repeat(x[:, None], len(VIEWS), axis=1), y, VIEWS, recipes, 2)
    assert winner.name == LEGACY.name and scores[LEGACY.name] > scores[FEW_RECIPE] and search is not None


def test_a_trained_head_records_its_recipe_and_answers_through_it(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=8)
    add_green(data, 8)
    done = trainer(fresh_tiny_store, tmp_path).train(data, "three")
    card = done.card
    recipe = card["recipe"]
    assert recipe["name"] in CANDIDATES and recipe["rule"].startswith("smallest class 8 <= ")
    assert set(recipe["cv_accuracy_by_recipe"]) == {FEW_RECIPE, LEGACY.name}
    assert set(card["calibration"]) >= {"temperature", "ece_before", "ece_after", "applied", "reliability"}
    assert "reliability.png" in card["artifacts"] and card["artifacts"]["reliability.png"]
    head = load_head(fresh_tiny_store.heads, "three", fresh_tiny_store.extractor().feature_space)
    assert head.transform == recipe["transform"] and head.temperature == card["calibration"]["temperature"]
    version = fresh_tiny_store.heads.get("three")
    genuine = pickle.loads(version.read(card["pickle"]))  # the test's own pickle: trusted here
    x = np.abs(np.random.default_rng(0).normal(size=(6, genuine.coef_.shape[1]))).astype(np.float32)
    np.testing.assert_array_equal(head.predict_proba(x), answer(genuine, x, head.transform, head.temperature))
    # every training-time view of every photo went through the feature cache (its key names the view)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 24 * len(VIEWS)


def test_a_head_from_before_recipes_answers_exactly_as_before(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    head = load_head(heads, "colors")
    card = {k: v for k, v in head.card.items() if k not in ("name", "signature", "recipe", "calibration")}
    old = save_head(heads, "old", head.estimator, card).version
    served = load_head(heads, "old", fresh_tiny_store.extractor().feature_space, version=old)
    assert served.transform == "none" and served.temperature == 1.0
    x = np.random.default_rng(4).normal(size=(9, head.estimator.coef_.shape[1])).astype(np.float32)
    np.testing.assert_array_equal(served.predict_proba(x), head.estimator.predict_proba(x).astype(np.float32))


def test_the_shipped_head_loads_and_answers_as_its_logistic_regression() -> None:
    """The shipped cats_vs_dogs head (no recipe, no calibration in its card, served from its pickle) is unchanged:
    its answers are its logistic regression's on the features as they are, bit for bit."""
    heads = ModelStore(REPO / "model_store").heads  # committed: always here
    card = heads.get("cats_vs_dogs").card
    assert "recipe" not in card and "calibration" not in card
    head = load_head(heads, "cats_vs_dogs")
    assert head.transform == "none" and head.temperature == 1.0
    x = np.abs(np.random.default_rng(5).normal(scale=3, size=(16, head.estimator.coef_.shape[1]))).astype(np.float32)
    logit = x.astype(np.float64) @ head.estimator.coef_[0] + head.estimator.intercept_[0]
    expected = np.stack([1 / (1 + np.exp(logit)), 1 / (1 + np.exp(-logit))], axis=1).astype(np.float32)
    got = head.predict_proba(x)
    np.testing.assert_array_equal(got, head.estimator.predict_proba(x).astype(np.float32))
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.skipif(not (SHARED_DATA.parent / "weather" / "train").is_dir(), reason="no ../shared photos")
def test_views_of_real_photos_decode(tmp_path: Path) -> None:
    folder = SHARED_DATA.parent / "weather" / "train"
    path = Dataset.from_folder(folder).paths[0]
    for view in VIEWS:
        assert view_image(path.read_bytes(), view, 256).shape == (256, 256, 3)
