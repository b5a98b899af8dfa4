"""INT8 quantization on the tiny real store (and, marked e2e, on the real VGG16 with ../shared photos)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.errors import ArtifactError, IncompatibleHead
from app.export import build_graph
from app.extractor import Extractor
from app.hashing import sha256_file
from app.imaging import load_image
from app.quantize import image_files, quantize_int8, use_variant
from app.registry import load_head
from app.store import ModelStore
from tests.helpers import REPO, image_bytes, tiny_weights, write_color_dataset


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    return write_color_dataset(tmp_path / "calib", per_class=10)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_image_files_interleave_classes(calib: Path) -> None:
    files = image_files(calib)
    assert len(files) == 20
    assert [label for _, label in files[:4]] == ["blue", "red", "blue", "red"]


def test_quantize_writes_a_new_model_and_records_both(fresh_tiny_store: ModelStore, calib: Path) -> None:
    store = fresh_tiny_store
    fp32 = json.loads(store.manifest_path.read_text())["extractor"]
    entry = quantize_int8(store, calib, limit=8, check_limit=12)

    manifest = json.loads(store.manifest_path.read_text())
    assert manifest["extractor"] == entry
    assert manifest["variants"] == {"fp32": fp32, "int8": entry}
    assert entry["precision"] == "int8" and entry["file"] != fp32["file"]
    assert entry["sha256"] == sha256_file(store.root / entry["file"]) != fp32["sha256"]
    assert sha256_file(store.root / fp32["file"]) == fp32["sha256"]  # the fp32 file is untouched
    assert entry["quantization"]["format"] == "QDQ" and entry["quantization"]["reduce_range"] is True
    assert entry["calibration"]["images"] == 8
    assert entry["check"]["images"] == 12 and entry["check"]["heads"]["colors"]["checked"]
    assert entry["check"]["heads"]["colors"]["agreement"] >= 0.995
    assert entry["feature_space"] == fp32["sha256"]

    info = store.extractor(verify=True)
    assert info.precision == "int8" and info.feature_space == fp32["sha256"]
    img = np.stack([load_image(p, info.size, resample=info.resample) for p, _ in image_files(calib)])
    f8 = Extractor(info, provider="cpu", threads=1).run(img)
    f32 = Extractor(store.root / fp32["file"], provider="cpu", threads=1).run(img)
    assert f8.shape == f32.shape == (len(img), info.feature_dim) and np.isfinite(f8).all()
    assert _cosine(f8, f32).min() > 0.99
    head = load_head(store.heads, "colors", info.feature_space)  # the fp32-trained head is accepted
    assert (head.predict_proba(f8).argmax(1) == head.predict_proba(f32).argmax(1)).all()


def test_disagreeing_quantization_refuses_fp32_heads(fresh_tiny_store: ModelStore, calib: Path) -> None:
    store = fresh_tiny_store
    entry = quantize_int8(store, calib, limit=8, check_limit=12, min_agreement=1.01)  # a bar no model can pass
    assert entry["check"]["heads_agree"] is False
    assert "feature_space" not in entry
    info = store.extractor()
    assert info.feature_space == info.sha256
    with pytest.raises(IncompatibleHead):
        load_head(store.heads, "colors", info.feature_space)


def test_use_variant_switches_back_and_forth(fresh_tiny_store: ModelStore, calib: Path) -> None:
    store = fresh_tiny_store
    fp32_sha = store.extractor().sha256
    int8 = quantize_int8(store, calib, limit=8, check_limit=4)
    assert use_variant(store, "fp32")["sha256"] == fp32_sha
    assert store.extractor().precision == "fp32"
    assert use_variant(store, "int8")["sha256"] == int8["sha256"]
    again = quantize_int8(store, calib, limit=8, check_limit=4)  # re-quantizing from an int8 manifest uses the fp32 parent
    assert again["parent_sha256"] == fp32_sha


def test_use_variant_without_variants_is_a_clear_error(fresh_tiny_store: ModelStore) -> None:
    with pytest.raises(ArtifactError, match="no int8 variant"):
        use_variant(fresh_tiny_store, "int8")


def test_calibration_dir_without_images_is_refused(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        quantize_int8(fresh_tiny_store, tmp_path / "empty")


def test_export_int8_cli_and_service(fresh_tiny_store: ModelStore, calib: Path, tmp_path: Path, server_factory) -> None:
    """``tlserve export --int8 --calibration-dir``, then the real service serves the int8 model with the fp32 head."""
    store = fresh_tiny_store
    fp32 = store.extractor()
    weights = tiny_weights()
    kernel, bias = weights["block1_conv1"]
    weights["block1_conv1"] = (kernel[:, ::-1], bias)  # build_graph flips it back: the file holds tiny_weights() as-is
    src = tmp_path / "tiny.onnx"
    src.write_bytes(build_graph(weights, fp32.size, "avg"))
    env = {**os.environ, "TLSERVE_MODEL_STORE": str(store.root), "TLSERVE_INTRA_OP_THREADS": "1"}
    cmd = [sys.executable, "-m", "app.cli", "export", "--weights", "onnx", str(src), "--size", str(fp32.size),
           "--int8", "--calibration-dir", str(calib), "--calibration-images", "8"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = json.loads(proc.stdout)
    assert entry["parent_sha256"] == fp32.sha256  # the same fp32 graph again, so the head trained on it is checked
    assert entry["precision"] == "int8" and entry["feature_space"] == fp32.sha256

    server = server_factory(store, default_head="colors")
    info = httpx.get(server.url + "/v1/info").json()
    assert info["extractor"]["precision"] == "int8" and info["extractor"]["sha256"] == entry["sha256"]
    r = httpx.post(server.url + "/v1/classify", content=image_bytes((210, 40, 40)), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["label"] == "red"


@pytest.mark.e2e
def test_real_vgg16_int8_agrees_with_fp32(real_store: ModelStore, shared_data: Path, tmp_path: Path) -> None:
    """Small version of the RESULTS.md measurement: 32 calibration images, 100 val images."""
    if not real_store.heads.names():
        pytest.skip("the repository store has no trained head yet (make test trains cats_vs_dogs)")
    store = ModelStore(tmp_path / "store")
    store.root.mkdir()
    fp32 = real_store.extractor(verify=False)
    shutil.copy(fp32.path, store.root / fp32.path.name)
    shutil.copy(real_store.manifest_path, store.manifest_path)
    shutil.copytree(real_store.heads_dir, store.heads_dir)
    entry = quantize_int8(store, shared_data / "train", limit=32, check_dir=shared_data / "val", check_limit=100)
    check = entry["check"]
    assert check["cosine_mean"] > 0.99
    checked = {k: v for k, v in check["heads"].items() if v["checked"]}
    assert checked, check
    for row in checked.values():
        assert row["agreement"] >= 0.97
        assert abs(row["accuracy_int8"] - row["accuracy_fp32"]) <= 0.03
