"""Training and evaluation on a real (tiny) extractor: which data each number comes from, the
shipped head, out-of-fold artifacts, versions, progress, threads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from app.core.calibration import temper
from app.core.progress import Progress
from app.core.recipe import CANDIDATES, VIEWS
from app.core.settings import Settings
from app.learning.crossval import C_GRID, cross_validate, sklearn_threads
from app.learning.features import Dataset
from app.learning.fewshot import grid_of
from app.learning.report import make_report
from app.learning.training import Trainer, out_of_fold
from app.storage.registry import load_head
from app.storage.store import ModelStore
from tests.helpers import image_bytes, write_color_dataset


def trainer(store: ModelStore, tmp_path: Path, progress=False) -> Trainer:
    return Trainer(Settings(model_store=store.root, feature_cache_dir=tmp_path / "cache", intra_op_threads=1), progress=progress)


def features_of(t: Trainer, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a folder, in the trainer's order (an independent reference fits on them)."""
    ds = Dataset.from_folder(data)
    ext = t.features(ds.paths)
    return ext.features, ds.labels[ext.kept]


def add_green(data: Path, n: int, seed: int = 0) -> None:
    (data / "green").mkdir(exist_ok=True)
    for i in range(n):
        (data / "green" / f"g{i}.png").write_bytes(image_bytes((40, 210, 40), seed=seed + i, size=(40 + i, 38)))


def test_train_any_classes_with_val_dir_and_cache(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=8)
    add_green(data, 8)
    val = write_color_dataset(tmp_path / "val", per_class=3)
    add_green(val, 1, seed=99)
    t = trainer(fresh_tiny_store, tmp_path)
    done = t.train(data, "three", val_dir=val, c=1.0)
    card = done.card
    assert card["classes"] == ["blue", "green", "red"]
    assert card["training"]["split"]["kind"] == "val_dir"
    assert done.report.n == 7 and done.report.accuracy == 1.0
    # with --val-dir the report is the shipped head's, and it equals `evaluate` of that head on the same folder
    head = load_head(t.heads, "three", t.info.feature_space)
    assert t.evaluate(head, val).report.as_dict() == card["metrics"]
    # a second run over the same images does no model work: every feature comes from the cache
    ext = t.features(sorted(data.rglob("*.png")))
    assert ext.cache_hits == 24


def test_unreadable_files_are_skipped_and_reported(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=10)
    (data / "red" / "empty.png").write_bytes(b"")
    (data / "red" / "notes.txt").write_text("not an image")
    (data / "blue" / "cut.png").write_bytes((data / "blue" / "blue_0.png").read_bytes()[:60])
    done = trainer(fresh_tiny_store, tmp_path).train(data, "colors2", c=1.0)
    card = done.card
    assert card["training"]["skipped"] == 3 and len(done.skipped) == 3
    assert any("empty.png" in s for s in card["training"]["skipped_files"])
    assert sum(card["training"]["train_per_class"].values()) == 20  # the shipped head: every readable photo
    assert done.report.n == math.ceil(0.2 * 20)


def test_without_val_dir_the_shipped_head_is_fitted_on_all_photos(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    data = write_color_dataset(tmp_path / "data", per_class=10)
    t = trainer(fresh_tiny_store, tmp_path)
    done = t.train(data, "all", c=0.5)
    x, y = features_of(t, data)
    head = load_head(t.heads, "all", t.info.feature_space)
    with sklearn_threads(1):
        reference = LogisticRegression(C=0.5, max_iter=5000).fit(x, y)
    np.testing.assert_allclose(head.estimator.coef_, reference.coef_, rtol=1e-4, atol=1e-5)
    card = done.card
    assert card["training"]["train_per_class"] == {"blue": 10, "red": 10}
    assert "all 20 labelled photos" in card["estimator"]["fitted_on"] and "refitted on all" in card["evaluation"]["metrics"]
    # the held-out report comes from a head fitted on the other 80% only, scored on the 20% it never saw
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=4, stratify=y, random_state=42)
    with sklearn_threads(1):
        held_pred = LogisticRegression(C=0.5, max_iter=5000).fit(xtr, ytr).predict(xte)
    assert card["metrics"] == make_report(yte, held_pred, ["blue", "red"]).as_dict()
    assert card["training"]["val_per_class"] == {"blue": 2, "red": 2}


def test_regularisation_chosen_by_cross_validation(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split

    data = write_color_dataset(tmp_path / "data", per_class=16)
    t = trainer(fresh_tiny_store, tmp_path)
    card = t.train(data, "cv").card
    scores = card["estimator"]["cv_accuracy_by_C"]
    assert set(scores) == {str(c) for c in C_GRID} and card["estimator"]["C_source"] == "5-fold cross-validation"
    assert scores[str(card["estimator"]["C"])] == max(scores.values())
    # the search ran on the 80% training part only, exactly as scikit-learn's own CV would score it
    x, y = features_of(t, data)
    xtr, _, ytr, _ = train_test_split(x, y, test_size=7, stratify=y, random_state=42)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=42)
    with sklearn_threads(1):  # the reference too: unlimited BLAS threads are slow on a busy machine, not wrong
        want = {c: cross_val_score(LogisticRegression(C=c, max_iter=5000), xtr, ytr, cv=folds).mean() for c in C_GRID}
    assert scores == pytest.approx({str(c): v for c, v in want.items()}, abs=1e-4)


def test_out_of_fold_predictions_and_folds_are_artifacts_of_the_version(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    data = write_color_dataset(tmp_path / "data", per_class=10)
    add_green(data, 10)
    t = trainer(fresh_tiny_store, tmp_path)
    done = t.train(data, "oof", c=1.0)
    version = t.heads.get("oof")
    assert {"oof_proba.npy", "folds.json", done.card["pickle"], "confusion_matrix.png"} <= set(version.artifacts)
    proba, folds = out_of_fold(version)
    files = folds["files"]
    assert proba.shape == (30, 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert folds["n_splits"] == 5 and sorted({f["fold"] for f in files}) == [0, 1, 2, 3, 4]
    ds = Dataset.from_folder(data)
    assert [f["path"] for f in files] == [p.relative_to(data).as_posix() for p in ds.paths]
    from app.core.hashing import sha256_file

    assert all(f["sha256"] == sha256_file(data / f["path"]) for f in files)
    # each photo's probabilities come from a head that never saw it: refit fold 0 independently
    x, y = features_of(t, data)
    assert [f["label"] for f in files] == y.tolist()
    fold = np.array([f["fold"] for f in files])
    # the tiny extractor's colours are in the features' size, which sqrt + L2 removes: plain regression wins the CV
    assert done.card["recipe"]["name"] == "lr"
    with sklearn_threads(1):
        ref = LogisticRegression(C=1.0, max_iter=5000).fit(x[fold != 0], y[fold != 0]).predict_proba(x[fold == 0])
    # oof_proba.npy holds what the head serves: calibrated by the card's temperature (app/core/calibration.py)
    np.testing.assert_allclose(proba[fold == 0], temper(ref, done.card["calibration"]["temperature"]), atol=1e-4)
    assert done.card["evaluation"]["cv"]["accuracy"] == pytest.approx(
        np.mean([(proba[fold == k].argmax(1) == y[fold == k]).mean() for k in range(5)]), abs=1e-4
    )
    # the artifacts are covered by the card: a changed file is refused
    (version.folder / "oof_proba.npy").write_bytes((version.folder / "oof_proba.npy").read_bytes()[:-4] + b"\0\0\0\0")
    from app.core.errors import ArtifactError

    with pytest.raises(ArtifactError, match="does not match its card"):
        out_of_fold(version)


def test_parallel_folds_give_the_same_search(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=10)
    x, y = features_of(trainer(fresh_tiny_store, tmp_path), data)
    serial = cross_validate(x, y, C_GRID, 2, jobs=1)
    parallel = cross_validate(x, y, C_GRID, 2, jobs=2)  # real worker processes
    assert serial.accuracy == parallel.accuracy and serial.best == parallel.best
    for c in C_GRID:
        np.testing.assert_allclose(serial.oof[c], parallel.oof[c], atol=1e-6)


def test_sklearn_runs_with_explicit_blas_threads() -> None:
    from threadpoolctl import threadpool_info

    with sklearn_threads(1):
        pools = threadpool_info()
        assert pools and all(p["num_threads"] == 1 for p in pools)


def test_retraining_a_name_writes_a_new_version_and_keeps_the_old(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    t = trainer(fresh_tiny_store, tmp_path)
    first = t.train(write_color_dataset(tmp_path / "a", per_class=6), "kept", c=1.0)
    second = t.train(write_color_dataset(tmp_path / "b", per_class=9), "kept", c=0.5)
    assert second.version.version == first.version.version + 1
    assert t.heads.versions("kept") == [first.version.version, second.version.version]
    assert t.heads.current_version("kept") == second.version.version
    old = load_head(t.heads, "kept", t.info.feature_space, version=first.version.version)
    assert old.sha256 == first.card["pickle_sha256"] != second.card["pickle_sha256"]


def test_progress_is_one_callback_for_every_phase(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    events: list[Progress] = []
    data = write_color_dataset(tmp_path / "data", per_class=10)
    card = trainer(fresh_tiny_store, tmp_path, progress=events.append).train(data, "progress").card
    phases = list(dict.fromkeys(e.phase for e in events))
    # the training-time views of the photos: extracted for the recipes tried (the few-photo default needs them)
    assert phases == ["features", *[f"{v} view features" for v in VIEWS[1:]], "model selection", "final fits"]
    for phase in phases:
        seen = [e for e in events if e.phase == phase]
        assert [e.done for e in seen] == sorted(e.done for e in seen) and seen[-1].finished
    feats = [e for e in events if e.phase == "features"]
    assert feats[-1].total == 20 and feats[-1].unit == "img" and feats[-1].rate > 0
    # 5 folds of the 80% training part (8 photos a class), every C of each recipe tried (the default and lr)
    tried = [CANDIDATES[r] for r in card["recipe"]["cv_accuracy_by_recipe"]]
    assert [e for e in events if e.phase == "model selection"][-1].total == 5 * sum(len(grid_of(r)) for r in tried)
    assert set(feats[-1].as_dict()) == {"phase", "done", "total", "unit", "rate", "elapsed_s", "eta_s"}


def test_report_matches_sklearn_definitions() -> None:
    r = make_report(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), ["a", "b"])
    assert r.accuracy == 0.6 and r.confusion == [[1, 1], [1, 2]]
    assert r.per_class["b"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert "accuracy" in r.render() and "precision" in r.render()


def test_evaluate_lists_mistakes_worst_first(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    t = trainer(fresh_tiny_store, tmp_path)
    t.train(write_color_dataset(tmp_path / "data", per_class=8), "mist", c=1.0)
    test = write_color_dataset(tmp_path / "test", per_class=4)
    (test / "red" / "really_blue.png").write_bytes(image_bytes((40, 40, 210), seed=50))
    (test / "red" / "purple.png").write_bytes(image_bytes((125, 40, 125), seed=51))
    ev = t.evaluate(load_head(t.heads, "mist", t.info.feature_space), test)
    wrong = [m for m in ev.mistakes if m.file == "red/really_blue.png"]
    assert wrong and wrong[0].true == "red" and wrong[0].predicted == "blue" and wrong[0].probability > 0.5
    assert [m.probability for m in ev.mistakes] == sorted((m.probability for m in ev.mistakes), reverse=True)
    assert len(ev.mistakes) == ev.report.n - round(ev.report.accuracy * ev.report.n)
    assert json.dumps([m.as_dict() for m in ev.mistakes])
