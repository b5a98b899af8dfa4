"""Heads: checksum before unpickling, extractor fingerprint, atomic card-last writes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from app.core.errors import ArtifactError, HeadNotFound, IncompatibleHead
from app.storage.heads import ARRAY_FILES, describe
from app.storage.registry import load_head, save_head
from app.storage.store import ModelStore


def card_of(store: ModelStore, name: str = "colors") -> dict:
    return json.loads((store.heads.current_folder(name) / "card.json").read_text())


def test_load_verified_head(tiny_store: ModelStore) -> None:
    info = tiny_store.extractor()
    head = load_head(tiny_store.heads, "colors", info.feature_space)
    assert head.classes == ("blue", "red")
    proba = head.predict_proba(np.zeros((2, info.feature_dim), np.float32))
    assert proba.shape == (2, 2) and np.allclose(proba.sum(axis=1), 1)


def test_card_records_what_a_user_needs(tiny_store: ModelStore) -> None:
    card = card_of(tiny_store)
    assert card["extractor"]["sha256"] == tiny_store.extractor().sha256
    assert card["pickle_sha256"] and card["sklearn_version"]
    assert set(card["metrics"]) >= {"accuracy", "confusion_matrix", "per_class", "n"}
    assert card["training"]["train_per_class"] and card["training"]["split"]["kind"] == "stratified"
    assert (tiny_store.heads.current_folder("colors") / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_tampered_pickle_is_never_unpickled(fresh_tiny_store: ModelStore, tmp_path) -> None:
    card = card_of(fresh_tiny_store)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (fresh_tiny_store.heads.current_folder("colors") / card["pickle"]).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ArtifactError, match="does not match its card"):
        load_head(fresh_tiny_store.heads, "colors")
    assert not marker.exists()


def test_incompatible_extractor_is_refused(tiny_store: ModelStore) -> None:
    with pytest.raises(IncompatibleHead, match="retrain") as refused:
        load_head(tiny_store.heads, "colors", "0" * 64)
    info = tiny_store.extractor()  # both extractors named: the head's with its export, the loaded one's sha256
    assert f"{info.sha256[:12]} ({info.raw['file']}, {info.size}x{info.size}, {info.pooling} pooling)" in str(refused.value)
    assert "000000000000" in str(refused.value)


def test_unknown_and_invalid_names(tiny_store: ModelStore) -> None:
    with pytest.raises(HeadNotFound, match="known: colors"):
        load_head(tiny_store.heads, "nope")
    for bad in ("../colors", "a/b", "", "x" * 65, "héad", ".hidden"):
        with pytest.raises(HeadNotFound, match="invalid head name"):
            load_head(tiny_store.heads, bad)


def test_card_naming_a_path_outside_is_refused(fresh_tiny_store: ModelStore) -> None:
    path = fresh_tiny_store.heads.current_folder("colors") / "card.json"
    card = json.loads(path.read_text())
    card["pickle"] = "../../manifest.pkl"
    path.write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="invalid pickle"):
        load_head(fresh_tiny_store.heads, "colors")


def test_save_adds_a_version_and_keeps_the_old_one(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    head = load_head(heads, "colors")
    old = card_of(fresh_tiny_store)
    head.estimator.coef_ = head.estimator.coef_ * 2  # a different model → a different pickle
    version = save_head(
        heads, "colors", head.estimator, {k: v for k, v in head.card.items() if k not in ("artifacts", "familiarity")}
    )
    new = card_of(fresh_tiny_store)
    assert new["pickle"] != old["pickle"] and new["version"] == version.version == old["version"] + 1
    assert heads.versions("colors") == [old["version"], new["version"]] and heads.current_version("colors") == new["version"]
    assert new["schema"] == 2 and set(new["artifacts"]) == {new["pickle"], *ARRAY_FILES.values()}
    assert sorted(p.name for p in heads.current_folder("colors").glob("*.pkl")) == [new["pickle"]]
    assert not list(heads.current_folder("colors").glob(".*tmp"))
    assert load_head(heads, "colors").sha256 == new["pickle_sha256"]
    assert load_head(heads, "colors", version=old["version"]).sha256 == old["pickle_sha256"]  # still whole


def test_describe_probabilities_and_top_k(tiny_store: ModelStore) -> None:
    head = load_head(tiny_store.heads, "colors")
    out = describe(head, np.array([0.25, 0.75], np.float32))
    assert out == {"label": "red", "confidence": 0.75, "probabilities": {"blue": 0.25, "red": 0.75}}
    top = describe(head, np.array([0.25, 0.75], np.float32), top_k=1)
    assert top["top_k"] == [{"label": "red", "probability": 0.75}] and "probabilities" not in top
