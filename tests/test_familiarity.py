"""Familiarity (app/serving/familiarity.py): the score against a brute-force reference, out-of-fold
calibration, the arrays a trained head stores, the verdict over /v1 and /v2 under both policies,
heads without the data, prediction monitoring in /metrics and the alert rules (promtool)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.core.errors import ArtifactError
from app.serving import familiarity
from app.serving.familiarity import Familiarity, calibrate
from app.serving.metrics import OTHER, Metrics
from app.storage.heads import Head
from app.storage.registry import HeadKeys, HeadStore
from app.storage.store import ModelStore
from tests.helpers import REPO, image_bytes

RULES = REPO / "deploy" / "prometheus" / "rules.yml"


def _reference_knn(bank: np.ndarray, q: np.ndarray, k: int, center: np.ndarray) -> np.ndarray:
    """Mean cosine similarity to the k nearest rows, one query at a time, with plain Python sorting."""
    out = []
    b = [(row - center) / np.linalg.norm(row - center) for row in bank]
    for v in q:
        v = (v - center) / np.linalg.norm(v - center)
        sims = sorted((float(np.dot(v, r.astype(np.float16).astype(np.float32))) for r in b), reverse=True)
        out.append(sum(sims[:k]) / k)
    return np.array(out)


def test_knn_scores_match_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    bank, labels, q = rng.random((60, 16)), rng.integers(0, 3, 60), rng.random((5, 16))
    for method in ("knn", "knn_centered"):
        model = Familiarity.build(bank, labels, method, k=7)
        center = bank.mean(axis=0) if method == "knn_centered" else np.zeros(16)
        np.testing.assert_allclose(model.score(q), _reference_knn(bank, q, 7, center), atol=2e-3)
    # per class: only the training photos of the class the head answered count
    proba = np.eye(3)[[0, 1, 2, 2, 1]] * 0.8 + 0.0667
    model = Familiarity.build(bank, labels, "knn_class", k=4)
    want = [_reference_knn(bank[labels == c], q[i : i + 1], 4, np.zeros(16))[0] for i, c in enumerate(proba.argmax(1))]
    np.testing.assert_allclose(model.score(q, proba), want, atol=2e-3)


def test_per_class_score_ignores_bank_order_and_batch_company() -> None:
    """Rows are grouped by class once (a per-class score reads only its class's rows); a photo's score
    depends neither on the order the bank was stored in nor on which photos share its batch, even when
    one class has fewer than k photos."""
    rng = np.random.default_rng(1)
    bank, labels, q = rng.random((50, 8)), np.array([0] * 46 + [1] * 4), rng.random((6, 8))
    proba = np.eye(2)[[0, 1, 0, 1, 0, 0]] * 0.9 + 0.05
    model = Familiarity.build(bank, labels, "knn_class", k=5)
    shuffled = rng.permutation(50)
    again = Familiarity.build(bank[shuffled], labels[shuffled], "knn_class", k=5)
    together = model.score(q, proba)
    np.testing.assert_allclose(again.score(q, proba), together, atol=1e-6)
    alone = np.array([model.score(q[i : i + 1], proba[i : i + 1])[0] for i in range(6)])
    np.testing.assert_allclose(alone, together, atol=1e-6)
    want = [
        _reference_knn(bank[labels == c], q[i : i + 1], 5 if c == 0 else 4, np.zeros(8))[0]
        for i, c in enumerate([0, 1, 0, 1, 0, 0])
    ]
    np.testing.assert_allclose(together, want, atol=2e-3)
    unseen = np.array([[0.05, 0.05, 0.9]])  # a class with no stored photo is never familiar
    assert model.score(q[:1], unseen)[0] == -np.inf


def test_calibration_is_out_of_fold_and_accepts_the_rate() -> None:
    rng = np.random.default_rng(1)
    means = rng.normal(0, 1, (2, 32)) * 3
    y = np.repeat([0, 1], 150)
    x = means[y] + rng.normal(0, 1, (300, 32)) + 10
    folds = np.tile(np.arange(5), 60)
    proba = np.where(np.eye(2)[y] == 1, 0.9, 0.1)
    model, oof = calibrate(x, y, folds, proba, method="knn_centered", acceptance=0.9)
    assert abs(model.verdict(oof).mean() - 0.9) <= 1 / 300
    # each photo was scored against the other folds only (not against itself)
    part = Familiarity.build(x[folds != 2], y[folds != 2], "knn_centered")
    np.testing.assert_allclose(oof[folds == 2], part.score(x[folds == 2]), rtol=1e-6)
    # new photos from the same distribution: about 90% accepted; photos from elsewhere: flagged
    fresh_y = np.repeat([0, 1], 500)
    fresh = means[fresh_y] + rng.normal(0, 1, (1000, 32)) + 10
    assert 0.84 <= model.verdict(model.score(fresh)).mean() <= 0.96
    far = rng.normal(0, 1, (200, 32)) * 3 + 10
    assert model.verdict(model.score(far)).mean() < 0.2
    with pytest.raises(ValueError, match="acceptance"):
        calibrate(x, y, folds, proba, acceptance=1.0)


def test_margin_only_lowers_the_score() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.random((40, 8)), np.repeat([0, 1], 20)
    model = Familiarity.build(x, y, "knn_class_margin", standardize=(0.5, 0.1, 2.0, 1.0))
    q = rng.random((1, 8))
    sure, torn = np.array([[0.999, 0.001]]), np.array([[0.55, 0.45]])
    knn_only = Familiarity.build(x, y, "knn_class").score(q, sure)
    assert model.score(q, sure)[0] == pytest.approx((knn_only[0] - 0.5) / 0.1)
    assert model.score(q, torn)[0] < model.score(q, sure)[0]


def test_trained_head_stores_plain_arrays_covered_by_the_card(tiny_store: ModelStore, fresh_tiny_store: ModelStore) -> None:
    heads = HeadStore(tiny_store.root / "heads", HeadKeys())
    version = heads.get("colors")
    section = version.card["familiarity"]
    assert section["acceptance"] == 0.95 and section["calibration"]["folds"] == 5
    assert section["n"] == 24 and 0.9 <= section["calibration"]["accepted"] <= 1.0
    for file in section["files"].values():
        assert file in version.artifacts and file.endswith(".npy")
        np.load(version.folder / file, allow_pickle=False)  # plain arrays, no pickle inside
    model = familiarity.load(version, 2, 8)
    assert model is not None and model.bank.shape == (24, 8) and model.threshold == section["threshold"]
    # a changed bank is refused by its sha256, before it is used
    bad = HeadStore(fresh_tiny_store.root / "heads", HeadKeys()).get("colors")
    bank = np.load(bad.folder / familiarity.BANK_FILE)
    bank[0, 0] += 1
    np.save(bad.folder / familiarity.BANK_FILE, bank)
    with pytest.raises(ArtifactError, match="does not match its card"):
        familiarity.load(bad, 2, 8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _between() -> bytes:
    """Half red, half blue: the tiny head answers one colour, but it is like neither class's photos."""
    xx = np.mgrid[0:40, 0:40][1]
    return _png(np.where((xx < 20)[..., None], [210, 40, 40], [40, 40, 210]))


def _add_head_without_familiarity(store: ModelStore) -> None:
    """``plain``: the colors head as a head trained before familiarity existed (no section, no arrays)."""
    heads = HeadStore(store.root / "heads", HeadKeys())
    source = heads.get("colors")
    keep = [f for f in source.artifacts if not f.startswith("familiarity_")]
    card = {k: v for k, v in source.card.items() if k not in ("schema", "version", "artifacts", "name", "familiarity")}
    heads.save("plain", {f: source.read(f) for f in keep}, card)


def _v2(url: str, head: str, images: list[bytes], **extra: object) -> httpx.Response:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(b).decode() for b in images]}], **extra}  # fmt: skip
    return httpx.post(f"{url}/v2/models/{head}/infer", json=body, timeout=30)


def test_verdict_over_http_policies_old_heads_and_metrics(fresh_tiny_store: ModelStore, server_factory) -> None:
    _add_head_without_familiarity(fresh_tiny_store)
    server = server_factory(fresh_tiny_store, default_head="colors", metrics_class_answers=True)
    red, blue, between = image_bytes((210, 40, 40), seed=300), image_bytes((40, 40, 210), seed=301), _between()
    files = [("file", ("red.png", red)), ("file", ("blue.png", blue)), ("file", ("between.png", between))]
    r = httpx.post(f"{server.url}/v1/classify", files=files, timeout=30)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["in_distribution"] for x in res] == [True, True, False]
    assert res[0]["label"] == "red" and res[1]["label"] == "blue" and res[2]["label"] in ("red", "blue")  # report: named
    assert res[2]["familiarity"] < res[0]["familiarity"] and res[2]["familiarity"] < res[1]["familiarity"]

    refused = httpx.post(f"{server.url}/v1/classify?ood_policy=refuse", files=files, timeout=30).json()["results"]
    assert [x.get("label") for x in refused] == ["red", "blue", None] and "probabilities" not in refused[2]
    assert refused[2]["in_distribution"] is False
    as_json = {"images": [{"b64": base64.b64encode(between).decode()}], "ood_policy": "refuse", "top_k": 1}
    assert "label" not in httpx.post(f"{server.url}/v1/classify", json=as_json, timeout=30).json()["results"][0]
    wrong = httpx.post(f"{server.url}/v1/classify?ood_policy=unknown", files=files[:1], timeout=30)
    assert wrong.status_code == 422 and "ood_policy" in wrong.json()["error"]["message"]

    # /v2: the familiarity outputs come by default with such a head; refuse sends an empty label
    out = {o["name"]: o for o in _v2(server.url, "colors", [red, between]).json()["outputs"]}
    assert out["in_distribution"]["datatype"] == "BOOL" and out["in_distribution"]["data"] == [True, False]
    assert out["familiarity"]["shape"] == [2] and out["label"]["data"][0] == "red"
    refused_v2 = _v2(server.url, "colors", [red, between], parameters={"ood_policy": "refuse"}, outputs=[{"name": "label"}])
    assert refused_v2.json()["outputs"][0]["data"] == ["red", ""]
    meta = httpx.get(f"{server.url}/v2/models/colors", timeout=10).json()
    assert {"familiarity", "in_distribution"} <= {o["name"] for o in meta["outputs"]}

    # a head without familiarity data keeps working: no verdict, never refused, stated in /v1/models
    plain = httpx.post(f"{server.url}/v1/classify?head=plain&ood_policy=refuse", files=files, timeout=30).json()["results"]
    assert all("in_distribution" not in x and x["label"] in ("red", "blue") for x in plain)
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"]}
    assert models["colors"]["familiarity"]["available"] is True and models["colors"]["familiarity"]["acceptance"] == 0.95
    assert models["plain"]["familiarity"]["available"] is False and "retrain" in models["plain"]["familiarity"]["note"]
    assert [o["name"] for o in _v2(server.url, "plain", [red]).json()["outputs"]] == ["label", "probabilities"]
    asked = _v2(server.url, "plain", [red], outputs=[{"name": "in_distribution"}])
    assert asked.status_code == 400 and "no familiarity data" in asked.json()["error"]

    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    # colors: /v1 report (3 images), refuse (3), JSON (1), /v2 twice (2 + 2); one unfamiliar image in each
    checked = _sample(metrics, 'tlserve_familiarity_checked_total{head="colors"}')
    unfamiliar = _sample(metrics, 'tlserve_familiarity_unfamiliar_total{head="colors"}')
    assert checked == 3 + 3 + 1 + 2 + 2 and unfamiliar == 1 + 1 + 1 + 1 + 1
    assert _sample(metrics, 'tlserve_prediction_answers_total{class="red",head="plain"}') >= 1
    assert _sample(metrics, 'tlserve_familiarity_expected_unfamiliar_ratio{head="colors"}') == pytest.approx(0.05)
    assert 'tlserve_familiarity_margin_bucket{head="colors",le="0.0"}' in metrics
    assert 'tlserve_familiarity_checked_total{head="plain"}' not in metrics


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


def test_monitoring_label_cardinality_is_bounded() -> None:
    m = Metrics(max_heads=2, max_classes=3, class_answers=True)
    classes = tuple(f"c{i}" for i in range(10))
    for name in ("a", "b", "c", "d"):
        head = Head(name, 1, classes, None, {})
        m.observe_predictions(head, np.eye(10, dtype=np.float32), None, None, None)
    heads = {s.labels["head"] for metric in m.answers.collect() for s in metric.samples}
    names = {s.labels["class"] for metric in m.answers.collect() for s in metric.samples}
    assert heads == {"a", "b", OTHER} and names == {"c0", "c1", "c2", OTHER}
    other = [s.value for metric in m.answers.collect() for s in metric.samples
             if s.labels == {"head": OTHER, "class": OTHER} and s.name.endswith("_total")]  # fmt: skip
    assert other == [14.0]  # heads c and d, classes 3..9 each


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool absent (Debian package `prometheus`)")
def test_alert_rules_pass_promtool() -> None:
    done = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "rules found" in done.stdout
    tests = subprocess.run(["promtool", "test", "rules", str(RULES.with_name("promtool_tests.yml"))],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_dashboard_and_rules_use_only_series_that_exist() -> None:
    import json
    import re

    import yaml

    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    recorded = {r["record"] for r in rules if "record" in r}
    exported = set()
    for family in Metrics().registry.collect():
        suffixes = (
            ("_bucket", "_sum", "_count") if family.type == "histogram" else ("_total",) if family.type == "counter" else ("",)
        )
        exported |= {family.name + s for s in suffixes}
    dashboard = json.loads((REPO / "deploy" / "grafana" / "tlserve-predictions.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]] + [r["expr"] for r in rules]
    used = {name for e in exprs for name in re.findall(r"\b(tlserve[:_][a-z_:0-9]+)", e)}
    assert used and used <= exported | recorded, used - exported - recorded


def test_auroc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 30).round(1)  # rounded: ties count half
    pairs = [(x > y) + 0.5 * (x == y) for x in a for y in b]
    assert familiarity.auroc(a, b) == pytest.approx(sum(pairs) / len(pairs))


def test_predict_and_evaluate_ood_on_the_cli(tiny_store: ModelStore, tmp_path: Path) -> None:
    from tests.helpers import write_color_dataset

    val = write_color_dataset(tmp_path / "val", per_class=3)
    ood = tmp_path / "ood" / "any" / "layout"
    ood.mkdir(parents=True)
    (ood / "between.png").write_bytes(_between())
    env = {**os.environ, "TLSERVE_MODEL_STORE": str(tiny_store.root), "TLSERVE_DEFAULT_HEAD": "colors",
           "TLSERVE_FEATURE_CACHE_DIR": str(tmp_path / "cache"), "TLSERVE_INTRA_OP_THREADS": "1"}  # fmt: skip
    cli = [sys.executable, "-m", "app.cli"]
    (ood / ".hidden.png").write_bytes(_between())  # dot-files are skipped; the ``..`` of a relative path is not a dot-file
    relative = os.path.relpath(tmp_path / "ood", REPO)
    assert relative.startswith("..")
    done = subprocess.run([*cli, "evaluate", str(val), "--ood", relative, "--json", "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ood"]["n"] == 1 and report["ood"]["flagged"] == 1.0 and report["ood"]["auroc"] == 1.0
    assert report["in_distribution"] == report["ood"]["accepted"] == 1.0
    shown = subprocess.run([*cli, "predict", str(ood / "between.png"), str(val / "red" / "red_0.png"), "--no-progress"],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "NOT IN DISTRIBUTION" in lines[0] and "[in distribution" in lines[1]
