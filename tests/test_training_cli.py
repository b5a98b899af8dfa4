"""``tlserve train / evaluate / predict`` as a user runs them: output, errors, progress, help."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.core.progress import LineProgress, Progress, console
from app.storage.store import ModelStore
from tests.helpers import image_bytes, write_color_dataset


@pytest.fixture
def cli_env(fresh_tiny_store: ModelStore, tmp_path: Path, monkeypatch) -> Iterator[ModelStore]:
    from app.core.settings import get_settings

    monkeypatch.setenv("TLSERVE_MODEL_STORE", str(fresh_tiny_store.root))
    monkeypatch.setenv("TLSERVE_DEFAULT_HEAD", "colors")
    monkeypatch.setenv("TLSERVE_INTRA_OP_THREADS", "1")
    monkeypatch.setenv("TLSERVE_FEATURE_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    yield fresh_tiny_store
    get_settings.cache_clear()


def test_cli_train_evaluate_predict(cli_env: ModelStore, tmp_path: Path, capsys) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=6)
    assert main(["train", str(data), "--name", "cli_head", "--C", "1"]) == 0
    out = capsys.readouterr().out
    assert "confusion matrix" in out and "fitted on all 12 labelled photos" in out and "held-out report" in out
    assert main(["evaluate", str(data), "--head", "cli_head", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n"] == 12 and rep["accuracy"] == 1.0 and set(rep["per_class"]) == {"blue", "red"}
    assert rep["confusion_matrix"] == [[6, 0], [0, 6]] and rep["mistakes"] == []
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    code = main(["predict", str(data / "red" / "red_0.png"), str(bad), "--head", "cli_head", "--json"])
    res = json.loads(capsys.readouterr().out)["results"]
    assert code == 1  # one image failed
    assert res[0]["label"] == "red" and "not a recognised image" in res[1]["error"]
    assert main(["train", str(data), "--name", "../evil"]) == 1


def test_each_unreadable_file_is_reported_once(cli_env: ModelStore, tmp_path: Path, capsys, caplog) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=5)
    (data / "red" / "broken_photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    caplog.set_level(logging.DEBUG)
    assert main(["train", str(data), "--name", "once", "--C", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    everything = captured.out + captured.err + caplog.text
    assert everything.count("broken_photo.jpg") == 1, everything
    assert "skipped 1 unreadable file(s)" in captured.out


def test_dataset_mistakes_are_one_line_errors_before_any_work(cli_env: ModelStore, tmp_path: Path, capsys) -> None:
    root = tmp_path / "split"
    write_color_dataset(root / "train", per_class=3)
    write_color_dataset(root / "val", per_class=3)
    assert main(["train", str(root), "--name", "split"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "looks like a dataset split" in err and "Traceback" not in err
    data = write_color_dataset(tmp_path / "data", per_class=3)
    assert main(["train", str(data), "--name", "x", "--val-dir", str(tmp_path / "typo")]) == 1
    assert "--val-dir" in capsys.readouterr().err and not (tmp_path / "cache").exists()
    mixed = write_color_dataset(tmp_path / "mixed", per_class=2)
    (mixed / "red").rename(mixed / "Red")
    assert main(["evaluate", str(mixed), "--head", "colors"]) == 1
    err = capsys.readouterr().err
    assert "head's classes: ['blue', 'red']" in err and "folders: ['Red', 'blue']" in err


def test_evaluate_errors_and_plot(cli_env: ModelStore, tmp_path: Path, capsys) -> None:
    test = write_color_dataset(tmp_path / "test", per_class=3)
    (test / "red" / "really_blue.png").write_bytes(image_bytes((40, 40, 210), seed=50))
    plot = tmp_path / "cm.png"
    assert main(["evaluate", str(test), "--head", "colors", "--errors", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "misclassified: 1 of 7 (worst first)" in out and "red/really_blue.png: true red, predicted blue" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", str(test), "--head", "colors", "--json"]) == 0
    (mistake,) = json.loads(capsys.readouterr().out)["mistakes"]
    assert mistake["file"] == "red/really_blue.png" and mistake["true"] == "red" and mistake["predicted"] == "blue"
    assert mistake["probability"] > 0.5 and mistake["probability"] + mistake["true_probability"] == pytest.approx(1, abs=1e-5)
    assert main(["evaluate", str(test), "--head", "colors", "--plot", str(tmp_path / "no" / "cm.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_top_k_is_validated_and_shown(cli_env: ModelStore, tmp_path: Path, capsys) -> None:
    img = tmp_path / "r.png"
    img.write_bytes(image_bytes((210, 40, 40)))
    assert main(["predict", str(img), "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    # (the colors head is calibrated sharper: its out-of-fold answers were all right, so red may show as 1.0000)
    assert line.startswith(f"{img}: red (") and re.search(r"top-2: red [01]\.\d{4}, blue 0\.\d{4}", line)
    assert main(["predict", str(img), "--top-k", "3"]) == 2
    assert "--top-k 3 is more than head 'colors''s 2 classes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["predict", str(img), "--top-k", "0"])
    assert info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_progress_lines_when_stderr_is_not_a_terminal(cli_env: ModelStore, tmp_path: Path, capsys) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=10)
    assert main(["train", str(data), "--name", "lines"]) == 0  # capsys: stderr is not a terminal
    err = capsys.readouterr().err
    assert "features: 20/20 img, " in err and " img/s, done" in err and "model selection: 40/40 fit" in err
    assert "crop_tl view features: 20/20 img" in err  # model selection: 5 folds x 4 C, two recipes
    assert "\r" not in err  # no bar redraws in a log

    stream = io.StringIO()
    lines = LineProgress(stream, interval_s=0)
    for done in (0, 10, 40):
        lines(Progress("features", done, 40, elapsed_s=done / 20))
    assert stream.getvalue().splitlines() == ["features: 10/40 img, 20.0 img/s, ETA 2s", "features: 40/40 img, 20.0 img/s, done"]
    assert isinstance(console("auto", io.StringIO()), LineProgress)


def test_every_option_has_help_and_the_top_level_help_is_plain_text(capsys) -> None:
    parser = build_parser()
    missing = []

    def walk(p: argparse.ArgumentParser, where: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")

    walk(parser, "tlserve")
    assert missing == []
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text and "tlserve train DATA_DIR" in text
