"""Calibrated confidence (app/core/calibration.py): ECE, temperature fitted out of fold and kept only where it lowers
the ECE, applied by the loaded head in every path that answers probabilities, familiarity unchanged in meaning."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from app.core.calibration import calibrate, ece, fit_temperature, temper, temperature_of
from app.core.errors import ArtifactError
from app.core.imaging import load_image
from app.core.recipe import answer
from app.serving import familiarity
from app.serving.extractor import Extractor
from app.storage.registry import load_head, save_head
from app.storage.store import ModelStore
from tests.helpers import ServerProcess, image_bytes


def _overconfident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes, right 70% of the time, always ~97% sure."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.7, y, (y + 1 + rng.integers(0, 2, n)) % 3)
    logits = rng.normal(scale=0.3, size=(n, 3))
    logits[np.arange(n), pred] += 4.0
    e = np.exp(logits)
    return (e / e.sum(1, keepdims=True)).astype(np.float32), y


def test_ece_of_known_answers() -> None:
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]], np.float32)
    y = np.array([0, 1, 0, 0])
    # bin 0.9: accuracy 0.5 vs 0.9 (half the photos); bin 0.6: accuracy 1.0 vs 0.6 (half)
    assert ece(proba, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_temperature_lowers_an_overconfident_heads_error_and_keeps_its_answers() -> None:
    proba, y = _overconfident()
    t = fit_temperature(proba, y)
    assert t > 1.5
    calibrated = temper(proba, t)
    np.testing.assert_array_equal(calibrated.argmax(1), proba.argmax(1))
    assert ece(calibrated, y) < ece(proba, y) / 3
    section = calibrate(proba, y)
    assert section["applied"] and section["temperature"] == t and section["ece_after"] < section["ece_before"]
    assert sum(section["reliability"]["count"]) == len(y)


def test_temperature_is_not_applied_where_it_does_not_lower_the_error() -> None:
    y = np.array([0, 1, 1, 0, 1])
    proba = np.eye(2, dtype=np.float32)[y]  # sure and right: ECE 0 already
    section = calibrate(proba, y)
    assert not section["applied"] and section["temperature"] == 1.0 and section["ece_after"] == section["ece_before"]
    assert temper(proba, 1.0) is proba


def test_a_card_temperature_is_checked() -> None:
    assert temperature_of({}, "h") == 1.0
    assert temperature_of({"calibration": {"temperature": 2.5}}, "h") == 2.5
    for bad in ("2", -1.0, 0.0, 0.1, float("nan"), 1e9, None):
        with pytest.raises(ArtifactError, match=r"calibration\.temperature"):
            temperature_of({"calibration": {"temperature": bad}}, "h")


def test_familiarity_verdicts_mean_the_same_with_a_temperature() -> None:
    """The familiarity threshold is calibrated on the out-of-fold probabilities the head serves (calibrated): the
    verdicts on new photos are those an uncalibrated head would get from a model calibrated on uncalibrated ones."""
    rng = np.random.default_rng(7)
    n, d = 120, 16
    y = np.arange(n) % 3
    x = (rng.normal(size=(n, d)) + y[:, None]).astype(np.float32)
    folds = np.arange(n) % 5
    oof, _ = _overconfident(n, 1)
    new_x = (rng.normal(size=(40, d)) * 2).astype(np.float32)
    new_p, _ = _overconfident(40, 2)
    plain, _ = familiarity.calibrate(x, y, folds, oof, method="knn_class_margin")
    tempered, _ = familiarity.calibrate(x, y, folds, temper(oof, 3.0), method="knn_class_margin")
    a = plain.verdict(plain.score(new_x, new_p))
    b = tempered.verdict(tempered.score(new_x, temper(new_p, 3.0)))
    np.testing.assert_array_equal(a, b)
    assert 0 < a.sum() < len(a)  # the check can fail: some photos are accepted, some are not


def test_every_path_answers_the_calibrated_probabilities(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    """A version whose card says temperature 4: REST /v1 and OIP /v2 both answer the head's probabilities
    tempered by 4 (computed here from the head's own arrays), not the estimator's own."""
    store = fresh_tiny_store
    head = load_head(store.heads, "colors")
    card = {k: v for k, v in head.card.items() if k not in ("name", "signature", "familiarity")}
    card["calibration"] = {**card.get("calibration", {}), "temperature": 4.0, "applied": True}
    save_head(store.heads, "colors", head.estimator, card)
    images = [image_bytes((210, 40, 40), seed=11), image_bytes((40, 40, 210), seed=12), image_bytes((120, 90, 160), seed=13)]
    info = store.extractor()
    ext = Extractor(info, provider="cpu", threads=1)
    feats = ext.run(np.stack([load_image(b, info.size, resample=info.resample) for b in images]))
    expected = answer(head.estimator, feats, head.transform, 4.0)
    untempered = answer(head.estimator, feats, head.transform, 1.0)
    assert np.abs(expected - untempered).max() > 0.01  # the test can tell them apart

    server = server_factory(store, default_head="colors")
    files = [("files", (f"img{i}", b, "application/octet-stream")) for i, b in enumerate(images)]
    r = httpx.post(f"{server.url}/v1/classify", files=files, timeout=60)
    assert r.status_code == 200, r.text
    classes = list(head.classes)
    v1 = np.array([[res["probabilities"][c] for c in classes] for res in r.json()["results"]], np.float32)
    np.testing.assert_allclose(v1, expected, atol=2e-6)

    body = {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                        "data": [base64.b64encode(b).decode() for b in images]}],
            "outputs": [{"name": "probabilities"}]}  # fmt: skip
    r = httpx.post(f"{server.url}/v2/models/colors/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(len(images), -1), expected, atol=2e-6)
