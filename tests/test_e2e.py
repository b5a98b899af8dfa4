"""End to end with the real pinned VGG16 weights and real photos from ../shared (skipped without them)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.store import ModelStore
from app.weights import PYPI_WHEEL
from tests.helpers import REPO

pytestmark = pytest.mark.e2e


def tlserve(*args: str, store: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "TLSERVE_MODEL_STORE": str(store), **env}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=full, cwd=REPO, capture_output=True, text=True, timeout=900
    )


def photos(shared: Path, split: str, n: int) -> list[Path]:
    return [p for label in ("cat", "dog") for p in sorted((shared / split / label).iterdir())[:n]]


def test_export_train_evaluate_predict_from_pinned_weights(real_store: ModelStore, shared_data: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "downloads").mkdir(parents=True)
    shutil.copy(real_store.downloads_dir / PYPI_WHEEL, store / "downloads" / PYPI_WHEEL)  # checked again by sha256
    out = tlserve("export", store=store)
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stdout)
    assert entry["weights"]["imagenet"] is True and entry["feature_dim"] == 512
    assert entry["sha256"] == real_store.extractor().sha256  # the export is reproducible byte for byte

    out = tlserve("train", str(shared_data / "train"), "--name", "pets", "--val-dir", str(shared_data / "val"), "--limit", "15",
                  store=store)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "confusion matrix" in out.stdout and "precision" in out.stdout
    card = json.loads((ModelStore(store).heads.current_folder("pets") / "card.json").read_text())
    assert card["training"]["train_per_class"] == {"cat": 15, "dog": 15}
    assert card["metrics"]["accuracy"] >= 0.9  # 15 photos a class already separate cats from dogs

    out = tlserve("evaluate", str(shared_data / "val"), "--head", "pets", "--limit", "15", "--json", store=store)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n"] == 30 and report["accuracy"] == card["metrics"]["accuracy"]

    files = photos(shared_data, "val", 2)
    out = tlserve("predict", *map(str, files), "--head", "pets", "--json", store=store)
    assert out.returncode == 0, out.stderr
    labels = [r["label"] for r in json.loads(out.stdout)["results"]]
    assert labels.count("cat") >= 1 and labels.count("dog") >= 1


def test_default_head_meets_its_accuracy_target(real_store: ModelStore) -> None:
    card = json.loads((real_store.heads.current_folder("cats_vs_dogs") / "card.json").read_text())
    assert card["metrics"]["accuracy"] >= 0.98 and card["metrics"]["n"] == 1000
    assert card["extractor"]["sha256"] == real_store.extractor().feature_space


def test_http_service_equals_local_predict_in_all_three_forms(server_factory, real_store: ModelStore, shared_data: Path) -> None:
    files = photos(shared_data, "val", 3)
    out = tlserve("predict", *map(str, files), "--json", store=real_store.root)
    assert out.returncode == 0, out.stderr
    local = json.loads(out.stdout)["results"]

    srv = server_factory(real_store)
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        multi = c.post("/v1/classify", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in files]).json()["results"]
        raw = [
            c.post("/v1/classify", content=p.read_bytes(), headers={"content-type": "image/jpeg"}).json()["results"][0]
            for p in files
        ]
        body = {"images": [{"b64": base64.b64encode(p.read_bytes()).decode(), "name": p.name} for p in files]}
        js = c.post("/v1/classify", json=body).json()["results"]
    for i, p in enumerate(files):
        want = local[i]
        for got in (multi[i], raw[i], js[i]):
            assert got["label"] == want["label"] == p.name.split(".")[0]
            for cls, prob in want["probabilities"].items():
                assert got["probabilities"][cls] == pytest.approx(prob, abs=1e-4)
