"""The versioned head store (app/storage/registry.py): layout, legacy flat heads, version ids, promotion, and
the serving registry's errors (stored as exceptions), polling and deletion."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.core.errors import ArtifactError, HeadNotFound, VersionConflict, VersionNotFound
from app.storage.heads import ARRAY_FILES
from app.storage.registry import CARD, CURRENT, HeadKeys, HeadStore, load_head, save_head
from app.storage.store import ModelStore
from tests.helpers import ADMIN, REPO, ServerProcess, image_bytes

RED = image_bytes((210, 40, 40), "PNG", size=(32, 32), noise=15)


def make_flat(store: ModelStore, name: str, source: str = "colors") -> Path:
    """A head in the layout from before versions: card.json and the pickle straight in heads/<name>/."""
    version = store.heads.get(source)
    flat = store.heads_dir / name
    flat.mkdir()
    card = {k: v for k, v in version.card.items() if k not in ("schema", "version", "artifacts", "familiarity")}
    shutil.copy(version.folder / card["pickle"], flat / card["pickle"])
    shutil.copy(version.folder / "confusion_matrix.png", flat / "confusion_matrix.png")
    (flat / CARD).write_text(json.dumps({**card, "name": name}))
    return flat


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


def test_trained_head_is_version_1_with_artifacts_and_current(tiny_store: ModelStore) -> None:
    heads = tiny_store.heads
    assert heads.versions("colors") == [1] and heads.current_version("colors") == 1
    assert (heads.folder("colors") / CURRENT).read_text().strip() == "1"
    card = heads.get("colors").card
    assert card["schema"] == 2 and card["version"] == 1
    assert set(card["artifacts"]) == {card["pickle"], "confusion_matrix.png", "reliability.png", "oof_proba.npy", "folds.json", "familiarity_bank.npy",
                                      "familiarity_labels.npy", "familiarity_center.npy", *ARRAY_FILES.values()}  # fmt: skip
    for file, sha in card["artifacts"].items():
        assert heads.get("colors").read(file) and len(sha) == 64


def test_flat_head_reads_as_version_1_and_is_never_rewritten(fresh_tiny_store: ModelStore) -> None:
    store, heads = fresh_tiny_store, fresh_tiny_store.heads
    flat = make_flat(store, "legacy")
    before = snapshot(flat)
    assert "legacy" in heads.names() and heads.versions("legacy") == [1]
    head = load_head(heads, "legacy", store.extractor().feature_space)
    assert head.version == 1 and head.classes == ("blue", "red")
    assert snapshot(flat) == before  # reading wrote nothing

    # a new training of a flat head adds version 2 beside it; the flat files stay as they were
    v2 = save_head(heads, "legacy", head.estimator, {k: v for k, v in head.card.items() if k not in ("name", "familiarity")})
    assert v2.version == 2 and heads.current_version("legacy") == 2 and heads.versions("legacy") == [1, 2]
    assert {k: v for k, v in snapshot(flat).items() if "/" not in k and k not in (CURRENT, ".lock", "2")} == before
    assert heads.rollback("legacy") == 1 and load_head(heads, "legacy").card.get("schema") is None


def test_repository_default_head_is_version_1_with_current() -> None:
    folder = REPO / "model_store" / "heads" / "cats_vs_dogs"
    assert (folder / CURRENT).read_text() == "1\n" and (folder / "1" / CARD).is_file()
    assert not (folder / CARD).exists()  # the shipped head is in the versioned layout, not flat
    heads = ModelStore(REPO / "model_store").heads
    assert heads.versions("cats_vs_dogs") == [1] and heads.current_version("cats_vs_dogs") == 1
    head = load_head(heads, "cats_vs_dogs", heads.get("cats_vs_dogs").info.extractor.sha256)
    assert head.classes == ("cat", "dog") and head.info is not None and head.info.name == "cats_vs_dogs"


def test_migrate_moves_a_flat_head_into_1_keeping_its_card_bytes(fresh_tiny_store: ModelStore) -> None:
    store, heads = fresh_tiny_store, fresh_tiny_store.heads
    flat = make_flat(store, "legacy")
    card = (flat / CARD).read_bytes()
    before = load_head(heads, "legacy", store.extractor().feature_space)
    assert heads.migrate("legacy") is True
    assert (flat / "1" / CARD).read_bytes() == card and not (flat / CARD).exists()  # same bytes: a signature holds
    assert sorted(p.name for p in flat.iterdir() if p.is_file()) == [".lock", CURRENT]
    after = load_head(heads, "legacy", store.extractor().feature_space)
    assert after.version == 1 and after.sha256 == before.sha256 and heads.versions("legacy") == [1]
    assert heads.migrate("legacy") is False  # nothing flat left
    assert heads.migrate("colors") is False  # a versioned head is left as it is


def test_saving_without_promotion_keeps_serving_the_highest_version_when_there_is_no_pointer(
    fresh_tiny_store: ModelStore,
) -> None:
    """ "No ``current``: the highest version" must not make an unpromoted version current."""
    store, heads = fresh_tiny_store, fresh_tiny_store.heads
    make_flat(store, "legacy")
    head = load_head(heads, "legacy", store.extractor().feature_space)
    assert not (heads.folder("legacy") / CURRENT).exists()
    v2 = save_head(heads, "legacy", head.estimator, {k: v for k, v in head.card.items() if k != "name"}, promote=False)
    assert v2.version == 2 and heads.current_version("legacy") == 1


def test_a_card_that_does_not_parse_is_refused_naming_its_field(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    version = heads.get("colors")
    broken = {**version.card, "classes": "blue,red"}
    (version.folder / CARD).write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match=r"card field 'classes'"):
        load_head(heads, "colors")
    broken = {k: v for k, v in version.card.items() if k != "pickle"}
    (version.folder / CARD).write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match=r"card lacks 'pickle'"):
        heads.get("colors").info  # noqa: B018


def test_promote_is_compare_and_swap_and_rollback_moves_back(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    head = load_head(heads, "colors")
    card = {k: v for k, v in head.card.items() if k not in ("name", "familiarity")}
    v2 = save_head(heads, "colors", head.estimator, card, promote=False)
    assert heads.current_version("colors") == 1  # written, not promoted
    with pytest.raises(VersionConflict, match="current version is 1, not 2"):
        heads.promote("colors", v2.version, expected=2)
    assert heads.current_version("colors") == 1
    heads.promote("colors", v2.version, expected=1)
    assert heads.current_version("colors") == 2
    with pytest.raises(VersionNotFound, match=r"versions: 1, 2"):
        heads.promote("colors", 7)
    with pytest.raises(VersionConflict, match="is current"):
        heads.delete_version("colors", 2)
    assert heads.rollback("colors") == 1
    with pytest.raises(VersionNotFound, match="oldest"):
        heads.rollback("colors")
    heads.delete_version("colors", 2)
    assert heads.versions("colors") == [1]
    with pytest.raises(VersionNotFound, match=r"no version 2 \(versions: 1\)"):
        heads.get("colors", 2)


def test_current_pointer_that_lies_is_an_artifact_error(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    for text, match in (("9", "points to version 9"), ("../1", "not a version id")):
        (heads.folder("colors") / CURRENT).write_text(text)
        with pytest.raises(ArtifactError, match=match):
            heads.get("colors")


def test_unfinished_version_is_invisible_and_its_id_never_reused(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    (heads.folder("colors") / "2").mkdir()  # a training that died before its card
    assert heads.versions("colors") == [1] and heads.current_version("colors") == 1
    head = load_head(heads, "colors")
    assert (
        save_head(
            heads, "colors", head.estimator, {k: v for k, v in head.card.items() if k not in ("name", "familiarity")}
        ).version
        == 3
    )
    assert HeadStore(heads.root / "nope", HeadKeys()).names() == []


def test_version_ids_never_collide_across_processes(fresh_tiny_store: ModelStore) -> None:
    """Two writers (as two replicas training at once) each add 8 versions of one head."""
    code = (
        "import sys; from app.storage.store import ModelStore; from app.storage.registry import load_head, save_head\n"
        "heads = ModelStore(__import__('pathlib').Path(sys.argv[1])).heads\n"
        "head = load_head(heads, 'colors', version=1)\n"
        "card = {k: v for k, v in head.card.items() if k not in ('name', 'familiarity')}\n"
        "print(' '.join(str(save_head(heads, 'colors', head.estimator, card).version) for _ in range(8)))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(fresh_tiny_store.root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    ids = [int(v) for p in procs for v in p.communicate(timeout=120)[0].split()]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(ids) == list(range(2, 18))  # 16 distinct versions, none lost
    assert fresh_tiny_store.heads.versions("colors") == list(range(1, 18))


def test_incompatible_head_answers_409_at_start_up_and_on_reload(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    store = fresh_tiny_store
    flat = make_flat(store, "other")
    card = json.loads((flat / CARD).read_text())
    card["extractor"]["sha256"] = "0" * 64
    (flat / CARD).write_text(json.dumps(card))
    server = server_factory(store, default_head="colors")
    r = httpx.post(f"{server.url}/v1/classify?head=other", content=RED, headers={"content-type": "image/png"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "incompatible_head", r.text
    listed = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert listed["other"]["loaded"] is False and listed["other"]["error_code"] == "incompatible_head"
    r = httpx.post(f"{server.url}/v1/models/other/reload", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "incompatible_head"


def test_classify_answers_carry_the_version_and_embed_counts_images(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(fresh_tiny_store, default_head="colors")
    r = httpx.post(f"{server.url}/v1/classify", content=RED, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["version"] == 1
    files = [("file", (f"{i}.png", RED, "image/png")) for i in range(3)]
    assert httpx.post(f"{server.url}/v1/embed", files=files).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'tlserve_images_total{endpoint="embed",head="",outcome="ok"} 3.0' in metrics
    assert 'tlserve_images_total{endpoint="classify",head="colors",outcome="ok"} 1.0' in metrics


def test_poller_serves_promotions_and_stops_serving_deleted_heads(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    store, heads = fresh_tiny_store, fresh_tiny_store.heads
    make_flat(store, "extra")
    server = server_factory(store, default_head="colors", head_poll_interval_s="0.2")

    def classify(head: str) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/classify?head={head}", content=RED, headers={"content-type": "image/png"})

    assert classify("extra").status_code == 200
    head = load_head(heads, "colors")
    save_head(heads, "colors", head.estimator, {k: v for k, v in head.card.items() if k not in ("name", "familiarity")})
    wait_for(lambda: classify("colors").json().get("version") == 2)
    heads.promote("colors", 1)
    wait_for(lambda: classify("colors").json().get("version") == 1)

    shutil.rmtree(heads.folder("extra"))
    wait_for(lambda: classify("extra").status_code == 404)
    assert classify("extra").json()["error"]["code"] == "head_not_found"
    assert "extra" not in {m["name"] for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert "was deleted from the model store" in server.log_text()


def test_deleting_a_head(fresh_tiny_store: ModelStore) -> None:
    heads = fresh_tiny_store.heads
    make_flat(fresh_tiny_store, "gone")
    heads.delete("gone")
    with pytest.raises(HeadNotFound, match="known: colors"):
        heads.get("gone")


def wait_for(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_names_are_matched_whole_not_up_to_a_trailing_newline(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    """'$' accepts "name\\n": the issue's look-alike head "cats_vs_dogs\\n" took three photos with 200 (item 7)."""
    from app.core.errors import InvalidLabel, JobNotFound
    from app.core.names import valid_head_name
    from app.learning.jobstore import JobStore
    from app.storage.examples import valid_label
    from app.storage.registry import valid_artifact_name

    heads = fresh_tiny_store.heads
    for bad in ("colors\n", "colors\n\n"):
        with pytest.raises(HeadNotFound, match="invalid head name"):
            valid_head_name(bad)
        with pytest.raises(InvalidLabel):
            valid_label(bad, "a form field")
        with pytest.raises(ArtifactError, match="invalid artifact file name"):
            valid_artifact_name(bad)
    with pytest.raises(JobNotFound, match="32 hex digits"):
        JobStore(heads).path("0" * 32 + "\n")
    (heads.folder("colors") / CURRENT).write_text(f"{heads.current_version('colors')}\n")  # a newline *around* it is fine
    assert heads.current_version("colors") == 1

    server = server_factory(fresh_tiny_store, default_head="colors")
    photo = image_bytes((210, 40, 40), "PNG", size=(32, 32), noise=15)
    r = httpx.post(
        f"{server.url}/v1/heads/colors%0A/examples", files=[("red", (f"{i}.png", photo)) for i in range(3)], headers=ADMIN
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "head_not_found", r.text
    assert sorted(p.name for p in heads.root.iterdir() if not p.name.startswith(".")) == ["colors"]
