"""The one offline inference core (app/serving/predict.py): `tlserve predict`, `tlserve batch` and `/v1/classify` give
the same answer for the same photo, field by field, on the tiny real model and a real server; and the core's
own rows (familiarity present or not, refused rows, empty batches)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.batch import BatchJob, run
from app.core.imaging import DEFAULT_LIMITS, DecodeLimits
from app.core.settings import Settings
from app.serving.familiarity import for_head
from app.serving.predict import answer
from app.storage.heads import describe
from app.storage.registry import load_head
from app.storage.store import ModelStore
from tests.helpers import ServerProcess, image_bytes
from tests.test_batch import cli
from tests.test_familiarity import _between

pq = pytest.importorskip("pyarrow.parquet")

PHOTOS = {"red.png": image_bytes((210, 40, 40), seed=300), "blue.jpg": image_bytes((40, 40, 210), fmt="JPEG", seed=301),
          "between.png": _between()}  # fmt: skip


def test_predict_batch_and_http_answer_a_photo_alike(tiny_store: ModelStore, tmp_path: Path, capsys, monkeypatch,
                                                     server_factory: Callable[..., ServerProcess]) -> None:  # fmt: skip
    src = tmp_path / "photos"
    src.mkdir()
    for name, data in PHOTOS.items():
        (src / name).write_bytes(data)
    files = [src / n for n in sorted(PHOTOS)]

    code, out, _ = cli(["predict", *map(str, files), "--json", "--top-k", "2"], tiny_store.root, capsys, monkeypatch)
    assert code == 0
    predicted = {Path(r.pop("file")).name: r for r in json.loads(out)["results"]}

    settings = Settings(model_store=tiny_store.root, default_head="colors", intra_op_threads=1)
    run(BatchJob(str(src), str(tmp_path / "out"), top_k=2, batch_size=1), settings, progress=False)
    batched = {r["path"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}

    server = server_factory(tiny_store, default_head="colors", intra_op_threads=1)
    served = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in files:  # one image a request, as predict and batch_size=1 run them: the same features to the bit
            resp = client.post("/v1/classify", params={"top_k": 2}, files=[("file", (path.name, path.read_bytes()))])
            assert resp.status_code == 200, resp.text
            served[path.name] = {k: v for k, v in resp.json()["results"][0].items() if k not in ("index", "file")}

    assert set(predicted) == set(batched) == set(served) == set(PHOTOS)
    for name in PHOTOS:
        p, b = predicted[name], batched[name]
        assert served[name] == p  # every field: label, confidence, top_k, familiarity, in_distribution
        assert set(p) == {"label", "confidence", "top_k", "familiarity", "in_distribution"}
        top = [{"label": t["label"], "probability": round(t["probability"], 6)} for t in b["top_k"]]  # float32 columns
        assert (b["label"], round(b["probability"], 6), top) == (p["label"], p["confidence"], p["top_k"])
        assert (round(b["familiarity"], 6), b["in_distribution"]) == (p["familiarity"], p["in_distribution"])
    assert {n: p["in_distribution"] for n, p in predicted.items()} == {"red.png": True, "blue.jpg": True, "between.png": False}


def test_the_core_rows_are_describe_plus_familiarity(tiny_store: ModelStore) -> None:
    heads = tiny_store.heads
    info = tiny_store.extractor()
    head = load_head(heads, "colors", info.feature_space)
    known = for_head(heads, head, info.feature_dim)
    assert known is not None
    features = np.random.default_rng(0).random((3, info.feature_dim), dtype=np.float32)
    got = answer(head, features, known)
    proba = head.predict_proba(features)
    score = known.score(features, proba)
    assert np.array_equal(got.proba, proba) and np.array_equal(got.familiarity, score)
    for i in range(3):
        expected = {**describe(head, proba[i], 1), "familiarity": round(float(score[i]), 6),
                    "in_distribution": bool(score[i] >= known.threshold)}  # fmt: skip
        assert got.row(i, 1) == expected
        assert got.row(i, named=False) == {k: expected[k] for k in ("familiarity", "in_distribution")}  # refused
    plain = answer(head, features)  # a head without familiarity data: no such fields
    assert plain.familiarity is None and set(plain.row(0)) == {"label", "confidence", "probabilities"}
    empty = answer(head, features[:0], known)
    assert empty.proba.shape == (0, len(head.classes)) and empty.familiarity is not None and len(empty) == 0


def test_decode_limits_come_from_the_settings(tmp_path: Path) -> None:
    s = Settings(model_store=tmp_path, max_image_pixels=1234, allowed_formats="PNG,JPEG")
    assert DecodeLimits.from_settings(s) == DecodeLimits(1234, ("JPEG", "PNG"))
    assert DecodeLimits.from_settings(Settings(model_store=tmp_path)) == DEFAULT_LIMITS
    from app.core.errors import ImageTooLarge, UnsupportedFormat

    with pytest.raises(ImageTooLarge, match="1234"):
        DecodeLimits.from_settings(s).load(image_bytes(size=(64, 48)), 32, "bilinear")
    with pytest.raises(UnsupportedFormat):
        DecodeLimits(formats=("JPEG",)).load(image_bytes(), 32, "bilinear")
