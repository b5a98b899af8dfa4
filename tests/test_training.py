"""Training, evaluation and the feature cache on a real (tiny) extractor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import main
from app.settings import Settings
from app.store import ModelStore
from app.training import Trainer, make_report
from tests.helpers import write_color_dataset


def trainer(store: ModelStore, tmp_path: Path) -> Trainer:
    return Trainer(Settings(model_store=store.root, feature_cache_dir=tmp_path / "cache", intra_op_threads=1), progress=False)


def test_train_any_classes_with_val_dir_and_cache(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=8)
    (data / "green").mkdir()
    from tests.helpers import image_bytes

    for i in range(8):
        (data / "green" / f"g{i}.png").write_bytes(image_bytes((40, 210, 40), seed=i))
    val = write_color_dataset(tmp_path / "val", per_class=3)
    (val / "green").mkdir()
    (val / "green" / "g.png").write_bytes(image_bytes((40, 210, 40), seed=99))
    t = trainer(fresh_tiny_store, tmp_path)
    report, card = t.train(data, "three", val_dir=val, c=1.0)
    assert card["classes"] == ["blue", "green", "red"]
    assert card["training"]["split"]["kind"] == "val_dir"
    assert report.n == 7 and report.accuracy == 1.0
    # a second run over the same images does no model work: every feature comes from the cache
    ext = t.features(sorted(data.rglob("*.png")))
    assert ext.cache_hits == 24


def test_unreadable_files_are_skipped_and_reported(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=10)
    (data / "red" / "empty.png").write_bytes(b"")
    (data / "red" / "notes.txt").write_text("not an image")
    (data / "blue" / "cut.png").write_bytes((data / "blue" / "blue_0.png").read_bytes()[:60])
    report, card = trainer(fresh_tiny_store, tmp_path).train(data, "colors2", c=1.0)
    assert card["training"]["skipped"] == 3
    assert any("empty.png" in s for s in card["training"]["skipped_files"])
    assert sum(card["training"]["train_per_class"].values()) + report.n == 20


def test_regularisation_chosen_by_cross_validation(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=32)
    _, card = trainer(fresh_tiny_store, tmp_path).train(data, "cv")
    scores = card["estimator"]["cv_accuracy_by_C"]
    assert set(scores) == {"0.01", "0.1", "1.0", "10.0"}
    assert scores[str(card["estimator"]["C"])] == max(scores.values())


def test_report_matches_sklearn_definitions() -> None:
    import numpy as np

    r = make_report(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), ["a", "b"])
    assert r.accuracy == 0.6 and r.confusion == [[1, 1], [1, 2]]
    assert r.per_class["b"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert "accuracy" in r.render() and "precision" in r.render()


def test_cli_train_evaluate_predict(fresh_tiny_store: ModelStore, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TLSERVE_MODEL_STORE", str(fresh_tiny_store.root))
    monkeypatch.setenv("TLSERVE_DEFAULT_HEAD", "colors")
    monkeypatch.setenv("TLSERVE_INTRA_OP_THREADS", "1")
    from app.settings import get_settings

    get_settings.cache_clear()
    try:
        data = write_color_dataset(tmp_path / "data", per_class=6)
        assert main(["train", str(data), "--name", "cli_head", "--C", "1"]) == 0
        assert "confusion matrix" in capsys.readouterr().out
        assert main(["evaluate", str(data), "--head", "cli_head", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["n"] == 12 and out["accuracy"] == 1.0 and set(out["per_class"]) == {"blue", "red"}
        assert out["confusion_matrix"] == [[6, 0], [0, 6]]
        bad = tmp_path / "bad.jpg"
        bad.write_text("nope")
        code = main(["predict", str(data / "red" / "red_0.png"), str(bad), "--head", "cli_head", "--json"])
        res = json.loads(capsys.readouterr().out)["results"]
        assert code == 1  # one image failed
        assert res[0]["label"] == "red" and "not a recognised image" in res[1]["error"]
        assert main(["train", str(data), "--name", "../evil"]) == 1
    finally:
        get_settings.cache_clear()
