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
import numpy as np
import pytest

from app.core.imaging import load_image
from app.learning.weights import PYPI_WHEEL
from app.serving.extractor import Extractor
from app.storage.heads import describe
from app.storage.registry import load_head
from app.storage.store import ModelStore
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
    assert "fp32 only, no INT8 copy:" in out.stderr and "int8_calibration.json is missing" in out.stderr  # no table
    entry = json.loads(out.stdout)
    assert entry["weights"]["imagenet"] is True and entry["feature_dim"] == 512
    assert entry["sha256"] == real_store.extractor().sha256  # the export is reproducible byte for byte

    out = tlserve("train", str(shared_data / "train"), "--name", "pets", "--val-dir", str(shared_data / "val"), "--limit", "15",
                  store=store)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "confusion matrix" in out.stdout and "precision" in out.stdout
    card = ModelStore(store).heads.get("pets").card
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


@pytest.fixture(params=["auto", "fp32"], ids=["served", "fp32"])
def precision(request: pytest.FixtureRequest) -> str:
    """Each real-model test runs on what the service serves by default (``auto``: int8 where the export made a
    variant that passed its gate and is faster here) and on fp32; the fp32 leg is skipped only when ``auto``
    resolves to the fp32 export already (no int8 variant, or its gate failed), as the served leg then ran it."""
    return str(request.param)


@pytest.mark.parametrize("wanted", ["auto", "fp32", "int8"])
def test_default_head_meets_its_accuracy_target(real_store: ModelStore, wanted: str) -> None:
    card = json.loads((real_store.heads.current_folder("cats_vs_dogs") / "card.json").read_text())
    assert card["metrics"]["accuracy"] >= 0.98 and card["metrics"]["n"] == 1000
    if wanted == "int8" and "int8" not in real_store.read_manifest()["variants"]:
        pytest.skip("the export made no int8 variant (no calibration photos when it ran)")
    info = real_store.extractor(precision=wanted)
    assert card["extractor"]["sha256"] == info.feature_space, info.precision_reason  # int8 only after its gate passed


@pytest.fixture(scope="module")
def cli_labels(real_store: ModelStore, shared_data: Path) -> tuple[list[Path], list[str]]:
    """Six val photos and their labels from ``tlserve predict`` (the fp32 extractor), run once for both legs."""
    files = photos(shared_data, "val", 3)
    out = tlserve("predict", *map(str, files), "--json", store=real_store.root)
    assert out.returncode == 0, out.stderr
    return files, [r["label"] for r in json.loads(out.stdout)["results"]]


def test_http_service_equals_local_predict_in_all_three_forms(
    server_factory, real_store: ModelStore, cli_labels: tuple[list[Path], list[str]], precision: str
) -> None:
    files, fp32_labels = cli_labels
    auto = real_store.extractor(verify=False, precision="auto")
    if precision == "fp32" and auto.precision == "fp32":  # the answer cannot differ: the served leg ran fp32
        pytest.skip(f"the served leg already ran the fp32 export ({auto.precision_reason})")
    srv = server_factory(real_store, precision=precision)
    served = httpx.get(srv.url + "/v1/info").json()["extractor"]
    info = real_store.extractor(precision=served["precision"])  # the reference runs the very file the service runs
    assert info.sha256 == served["sha256"] and served["precision_reason"].startswith(f"precision={precision}")
    assert served["precision"] == "fp32" or precision == "auto"
    head = load_head(real_store.heads, "cats_vs_dogs", info.feature_space)
    images = np.stack([load_image(p, info.size, resample=info.resample) for p in files])
    proba = head.predict_proba(Extractor(info, provider="cpu", threads=1).run(images))
    local = [describe(head, row, None) for row in proba]
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
            assert got["label"] == want["label"] == fp32_labels[i] == p.name.split(".")[0]
            for cls, prob in want["probabilities"].items():
                assert got["probabilities"][cls] == pytest.approx(prob, abs=1e-4)
