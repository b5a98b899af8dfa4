"""The labelled-folder rule (app/core/labelled.py): a folder on disk, the same tree as a batch source and as a zip
upload read the same classes and photos, leave out the same hidden and junk files, and refuse a dataset split
with the same words."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from app.batch import BatchJob, run
from app.batch.parquet import read_features
from app.batch.source import open_source
from app.core.errors import DatasetError
from app.core.labelled import group, ignored, order
from app.core.settings import Settings
from app.learning.features import Dataset
from app.learning.uploads import Upload, admit
from app.storage.store import ModelStore
from tests.helpers import image_bytes

PNG = image_bytes(size=(16, 16))
TREE = {
    "red/a.png": PNG, "red/deep/b.png": PNG, "blue/c.png": PNG, "blue/d.png": PNG,
    "red/.hidden.png": PNG, ".git/x.png": PNG, "__MACOSX/red/._a.png": PNG, "blue/Thumbs.db": b"junk",
}  # fmt: skip
PHOTOS = {("blue", "blue/c.png"), ("blue", "blue/d.png"), ("red", "red/a.png"), ("red", "red/deep/b.png")}


def write(root: Path, tree: dict[str, bytes]) -> Path:
    for rel, data in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def upload_of(tmp_path: Path, tree: dict[str, bytes]) -> Upload:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rel, data in tree.items():
            zf.writestr(rel, data)
    folder = tmp_path / "spool"
    folder.mkdir()
    upload = Upload(folder)
    upload.archive("photos.zip").write_bytes(buf.getvalue())
    return admit(upload, Settings(model_store=tmp_path))


def test_a_folder_a_source_and_an_archive_read_the_same_photos(tmp_path: Path) -> None:
    root = write(tmp_path / "data", TREE)
    data = Dataset.from_folder(root)
    from_folder = {(data.classes[k], data.relative(i)) for i, k in enumerate(data.labels)}
    source = open_source(str(root))
    from_source = {(rel.split("/", 1)[0], rel) for rel in source.files}
    from_archive = {(p.label, p.name) for p in upload_of(tmp_path, TREE).photos}
    assert from_folder == from_source == from_archive == PHOTOS
    assert data.classes == source.classes == ["blue", "red"] and data.nested == {"red": 1}
    assert source.files == [data.relative(i) for i in range(len(data.paths))]  # one order: class by class, by component


def test_a_split_is_refused_alike_in_a_folder_an_archive_and_features(tiny_store: ModelStore, tmp_path: Path) -> None:
    split = {f"{s}/{c}/x.png": PNG for s in ("train", "val") for c in ("red", "blue")}
    words = r"looks like a dataset split, not one folder per class: its sub-folders \['train', 'val'\] are split names"
    root = write(tmp_path / "data", split)
    with pytest.raises(DatasetError, match=words):
        Dataset.from_folder(root)
    with pytest.raises(DatasetError, match=words):
        upload_of(tmp_path, split)
    pytest.importorskip("pyarrow")
    settings = Settings(model_store=tiny_store.root, default_head="colors", intra_op_threads=1)
    run(BatchJob(str(root), str(tmp_path / "features"), features=True), settings, progress=False)  # classifying a split is fine
    with pytest.raises(DatasetError, match=words):  # training on its classes is not
        read_features(str(tmp_path / "features"), tiny_store.extractor().feature_space)


def test_the_rule_itself() -> None:
    assert ignored(("red", ".x.png")) and ignored(("__MACOSX", "a.png")) and ignored(("Thumbs.db",))
    assert not ignored(("red", "a.png"))
    paths = [("b", "z.png"), ("a", "y", "1.png"), ("loose.png",), ("a", "0.png"), (".git", "h")]
    g = group(paths, lambda p: p)
    assert g.classes == ["a", "b"] and g.loose == [("loose.png",)] and g.nested == {"a": 1} and g.ignored == 1
    assert order(g, lambda p: p) == [("a", "0.png"), ("a", "y", "1.png"), ("b", "z.png"), ("loose.png",)]
