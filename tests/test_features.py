"""Folder checks before any work, content-keyed feature cache, duplicates, nested folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.core.errors import DatasetError, IncompatibleFeatures
from app.core.settings import Settings
from app.learning.features import Dataset, FeatureCache, extract_paths, hash_files
from app.learning.training import Trainer
from app.storage.registry import load_head
from app.storage.store import ModelStore
from tests.helpers import image_bytes, write_color_dataset


def trainer(store: ModelStore, tmp_path: Path, **settings) -> Trainer:
    s = Settings(model_store=store.root, feature_cache_dir=tmp_path / "cache", intra_op_threads=1, **settings)
    return Trainer(s, progress=False)


def cached(tmp_path: Path) -> list[Path]:
    """Feature vectors in the cache: none means no image went through the model."""
    return sorted((tmp_path / "cache").rglob("*.npy"))


def write_val(root: Path, per_class: int = 2) -> Path:
    """Like ``write_color_dataset`` but other pixels (that one is deterministic: its images would be duplicates)."""
    for label, color in (("red", (210, 40, 40)), ("blue", (40, 40, 210))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / label / f"v{i}.png").write_bytes(image_bytes(color, seed=1000 + i))
    return root


def refused(t: Trainer, tmp_path: Path, data: Path, match: str, **kw) -> DatasetError:
    with pytest.raises(DatasetError, match=match) as info:
        t.train(data, "h", **kw)
    assert cached(tmp_path) == []  # caught before feature extraction
    return info.value


# --- the training folder ---------------------------------------------------------------------
def test_a_class_with_one_image_is_refused_before_extraction(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=6)
    (data / "green").mkdir()
    (data / "green" / "only.png").write_bytes(image_bytes((40, 210, 40)))
    err = refused(trainer(fresh_tiny_store, tmp_path), tmp_path, data, "class 'green' has 1 file")
    assert str(data / "green") in err.message


def test_a_class_with_one_readable_image_is_refused_before_extraction(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=6)
    (data / "green").mkdir()
    (data / "green" / "ok.png").write_bytes(image_bytes((40, 210, 40)))
    (data / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    err = refused(trainer(fresh_tiny_store, tmp_path), tmp_path, data, "class 'green' in DATA_DIR has 1 readable image")
    assert str(data / "green") in err.message and "broken.jpg" in err.message


def test_an_empty_class_folder_is_refused(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=6)
    (data / "green").mkdir()
    err = refused(trainer(fresh_tiny_store, tmp_path), tmp_path, data, "class 'green' has no files")
    assert str(data / "green") in err.message


@pytest.mark.parametrize("names", [("train", "val"), ("Train", "TEST"), ("training_set", "validation")])
def test_split_folders_are_not_classes(fresh_tiny_store: ModelStore, tmp_path: Path, names: tuple[str, str]) -> None:
    root = tmp_path / "data"
    for split in names:
        write_color_dataset(root / split, per_class=3)
    split_names = [n for n in names if n.lower() in {"train", "test", "val", "valid", "validation"}]
    err = refused(trainer(fresh_tiny_store, tmp_path), tmp_path, root, "looks like a dataset split")
    assert all(n in err.message for n in split_names) and "`tlserve train " in err.message


def test_a_class_named_like_a_split_is_still_a_class() -> None:
    """One class called "train" (CIFAR-100 has one) holding images, not class folders, is fine."""
    import tempfile

    root = Path(tempfile.mkdtemp())
    for name in ("train", "bus"):
        (root / name).mkdir()
        for i in range(2):
            (root / name / f"{i}.png").write_bytes(image_bytes(seed=i))
    assert Dataset.from_folder(root).classes == ["bus", "train"]


def test_missing_folder_and_single_class(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"DATA_DIR .*nope does not exist"):
        Dataset.from_folder(tmp_path / "nope")
    (tmp_path / "one" / "cats").mkdir(parents=True)
    (tmp_path / "one" / "cats" / "a.png").write_bytes(image_bytes())
    (tmp_path / "one" / "loose.png").write_bytes(image_bytes())
    with pytest.raises(DatasetError, match=r"at least two class sub-folders, found \['cats'\]; it holds 1 file"):
        Dataset.from_folder(tmp_path / "one")


def test_a_mistyped_val_dir_is_refused_before_extracting_the_training_set(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=6)
    refused(trainer(fresh_tiny_store, tmp_path), tmp_path, data, "--val-dir .*vall does not exist", val_dir=tmp_path / "vall")


def test_val_dir_class_names_must_match(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=6)
    val = write_color_dataset(tmp_path / "val", per_class=2)
    (val / "red").rename(val / "Red")
    t = trainer(fresh_tiny_store, tmp_path)
    err = refused(t, tmp_path, data, "do not match the head's classes", val_dir=val)
    assert "['Red', 'blue']" in err.message and "['blue', 'red']" in err.message and "'Red' vs 'red'" in err.message
    (val / "Red").rename(val / "red")
    (val / "blue").rename(tmp_path / "blue_elsewhere")
    refused(t, tmp_path, data, r"missing classes: \['blue'\]", val_dir=val)
    done = t.train(data, "subset", val_dir=val, allow_subset=True, c=1.0)  # --allow-subset relaxes missing ones
    assert done.card["training"]["val_per_class"] == {"blue": 0, "red": 2}


def test_nested_sub_folders_are_counted_per_class(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=6)
    deep = data / "red" / "2019" / "summer"
    deep.mkdir(parents=True)
    for i in range(3):
        (deep / f"r{i}.png").write_bytes(image_bytes((210, 40, 40), seed=70 + i))
    (data / "red" / ".thumbs").mkdir()
    (data / "red" / ".thumbs" / "x.png").write_bytes(image_bytes(seed=80))  # hidden: not a photo of the set
    (data / "stray.png").write_bytes(image_bytes(seed=81))  # outside any class folder: ignored, counted
    done = trainer(fresh_tiny_store, tmp_path).train(data, "nested", c=1.0)
    assert done.nested == {"red": 3} and done.card["training"]["nested_per_class"] == {"red": 3}
    assert done.loose == 1 and done.card["training"]["ignored_outside_class_folders"] == 1
    assert done.card["training"]["train_per_class"] == {"blue": 6, "red": 9}


def test_duplicate_bytes_across_classes_and_train_val_are_reported(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=6)
    (data / "blue" / "copy_of_red.png").write_bytes((data / "red" / "red_2.png").read_bytes())
    val = write_val(tmp_path / "val")
    (val / "blue" / "leak.png").write_bytes((data / "blue" / "blue_4.png").read_bytes())
    done = trainer(fresh_tiny_store, tmp_path).train(data, "dups", val_dir=val, c=1.0)
    described = sorted(d.describe() for d in done.duplicates)
    assert "same image under classes 'blue' and 'red': train:blue/copy_of_red.png, train:red/red_2.png" in described
    assert "same image in both the training and the validation folder: train:blue/blue_4.png, val:blue/leak.png" in described
    assert len(done.card["training"]["duplicates"]) == 2


# --- the evaluation folder -------------------------------------------------------------------
def test_evaluate_refuses_class_folders_that_differ_from_the_head(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    t = trainer(fresh_tiny_store, tmp_path)
    head = load_head(t.heads, "colors", t.info.feature_space)
    other = write_color_dataset(tmp_path / "other", per_class=2)
    (other / "green").mkdir()
    (other / "green" / "g.png").write_bytes(image_bytes((40, 210, 40)))
    with pytest.raises(DatasetError, match=r"unknown folders: \['green'\]") as info:
        t.evaluate(head, other)
    assert "['blue', 'green', 'red']" in info.value.message and "['blue', 'red']" in info.value.message
    only_red = tmp_path / "only_red"
    write_color_dataset(only_red, per_class=3)
    for p in (only_red / "blue").iterdir():
        p.unlink()
    (only_red / "blue").rmdir()
    with pytest.raises(DatasetError, match=r"missing classes: \['blue'\] \(--allow-subset"):
        t.evaluate(head, only_red)
    ev = t.evaluate(head, only_red, allow_subset=True)
    assert ev.report.n == 3 and ev.report.accuracy == 1.0
    assert cached(tmp_path) and len(cached(tmp_path)) == 3  # only the accepted run extracted anything


def test_evaluate_refuses_an_empty_folder(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    t = trainer(fresh_tiny_store, tmp_path)
    head = load_head(t.heads, "colors", t.info.feature_space)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no class sub-folders"):
        t.evaluate(head, tmp_path / "empty", allow_subset=True)
    with pytest.raises(DatasetError, match="missing classes"):
        t.evaluate(head, tmp_path / "empty")
    (tmp_path / "bad" / "red").mkdir(parents=True)
    (tmp_path / "bad" / "red" / "x.jpg").write_text("not an image")
    with pytest.raises(DatasetError, match="class 'red' in evaluation folder has 0 readable image"):
        t.evaluate(head, tmp_path / "bad", allow_subset=True)
    assert cached(tmp_path) == []


# --- the cache -------------------------------------------------------------------------------
def test_a_cache_hit_does_not_decode(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    data = write_color_dataset(tmp_path / "data", per_class=4)
    paths = Dataset.from_folder(data).paths
    first = trainer(fresh_tiny_store, tmp_path).features(paths)
    assert first.cache_hits == 0 and len(first.kept) == 8
    # a loader that would refuse every image: hits never reach it, misses do
    strict = trainer(fresh_tiny_store, tmp_path, max_image_pixels=1)
    again = strict.features(paths)
    assert again.cache_hits == 8 and again.skipped == [] and np.array_equal(again.features, first.features)
    (data / "red" / "new.png").write_bytes(image_bytes((200, 30, 30), seed=123))
    fresh = strict.features([*paths, data / "red" / "new.png"])
    assert fresh.cache_hits == 8 and [p.name for p, _ in fresh.skipped] == ["new.png"]
    assert "over the limit of 1" in fresh.skipped[0][1]


def test_cache_key_is_the_bytes_and_the_loader_settings(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    t = trainer(fresh_tiny_store, tmp_path)
    data = write_color_dataset(tmp_path / "data", per_class=2)
    paths = Dataset.from_folder(data).paths
    t.features(paths)
    moved = tmp_path / "renamed.png"
    moved.write_bytes(paths[0].read_bytes())
    assert t.features([moved]).cache_hits == 1  # same bytes, another name: a hit
    other = extract_paths([moved], t.extractor, resample="nearest", cache=t.cache, progress=False)
    assert other.cache_hits == 0  # another resize filter changes the pixels: a miss
    (h,), _ = hash_files([moved])
    assert len({t.cache.key(h, 32, "bilinear"), t.cache.key(h, 32, "nearest"), t.cache.key(h, 64, "bilinear")}) == 3
    assert FeatureCache(tmp_path / "cache", "f" * 64).key(h, 32, "bilinear") != t.cache.key(h, 32, "bilinear")


def test_features_of_another_extractor_are_never_mixed_in(fresh_tiny_store: ModelStore, tmp_path: Path) -> None:
    t = trainer(fresh_tiny_store, tmp_path)
    t.features(Dataset.from_folder(write_color_dataset(tmp_path / "data", per_class=2)).paths)
    mine = t.info.sha256
    owner = t.cache.dir / FeatureCache.OWNER
    owner.write_text(owner.read_text().replace(mine, "0" * 64))  # the folder now says: another extractor's features
    with pytest.raises(IncompatibleFeatures) as info:
        FeatureCache(tmp_path / "cache", mine)
    assert "0" * 12 in info.value.message and mine[:12] in info.value.message
    with pytest.raises(IncompatibleFeatures, match=f"{'a' * 12}.*{mine[:12]}"):
        extract_paths([], t.extractor, resample="bilinear", cache=FeatureCache(tmp_path / "c2", "a" * 64), progress=False)
