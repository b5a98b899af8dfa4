"""Batch jobs (app/batch): Parquet parts, errors as rows, familiarity columns equal to `tlserve predict`,
refusals, resume, train --features through the trainer's one path (equal to training on the folder);
and on a real local Ray (started here: 2 CPUs, a small object store, no dashboard, loopback only) with
the real VGG16 over real photos from ../shared: the actor pool, parity with `tlserve predict` and the
in-process engine, a driver killed mid-job and resumed, a head trained from the features."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.batch import BatchJob, run
from app.batch.parquet import Output, read_features
from app.cli import main
from app.core.errors import DatasetError, OutputConflict
from app.core.hashing import sha256_file
from app.core.settings import Settings, get_settings
from app.learning.features import Dataset
from app.storage.store import ModelStore
from tests.conftest import make_tiny_store
from tests.helpers import REPO, image_bytes, write_color_dataset
from tests.test_familiarity import _add_head_without_familiarity, _between

pq = pytest.importorskip("pyarrow.parquet")

CORRUPT = {"truncated.jpg": None, "notes.txt": b"not an image at all", "empty.jpg": b""}


def add_bad_files(folder: Path) -> None:
    jpeg = image_bytes((90, 120, 30), fmt="JPEG", size=(64, 48))
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "notes.txt").write_bytes(b"not an image at all")
    (folder / "empty.jpg").write_bytes(b"")


def rows(out: Path) -> list[dict]:
    return sorted(pq.read_table(out).to_pylist(), key=lambda r: r["path"])


def tiny_settings(store: ModelStore, **kw: object) -> Settings:
    return Settings(model_store=store.root, default_head="colors", intra_op_threads=1, decode_threads=2, **kw)


@pytest.fixture
def colors(tmp_path: Path) -> Path:
    src = write_color_dataset(tmp_path / "src", per_class=5)
    add_bad_files(src / "red")
    return src


def cli(args: list[str], store: Path, capsys, monkeypatch, default_head: str = "colors") -> tuple[int, str, str]:
    monkeypatch.setenv("TLSERVE_MODEL_STORE", str(store))
    monkeypatch.setenv("TLSERVE_DEFAULT_HEAD", default_head)
    monkeypatch.setenv("TLSERVE_INTRA_OP_THREADS", "1")
    get_settings.cache_clear()
    try:
        code = main(args)
    except SystemExit as exc:  # usage errors: argparse exits 2
        code = int(exc.code or 0)
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr()
    return code, out.out, out.err


# --- in-process, on the tiny real model ----------------------------------------------------------------


def test_inprocess_classifies_every_file_into_committed_parts(tiny_store: ModelStore, colors: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run(BatchJob(str(colors), str(out), part_rows=4, batch_size=3), tiny_settings(tiny_store), progress=False)
    got = rows(out)
    assert [r["path"] for r in got] == sorted(str(p.relative_to(colors)) for p in colors.rglob("*") if p.is_file())
    assert summary.images == len(got) == 13 and summary.errors == 3 and summary.total_rows == 13
    errors = {r["path"]: r["error"]["code"] for r in got if r["error"]}
    assert errors == {
        "red/truncated.jpg": "image_decode_error",
        "red/notes.txt": "unsupported_format",
        "red/empty.jpg": "empty_input",
    }
    for r in got:
        if r["error"]:
            assert r["label"] is None and r["probability"] is None and r["top_k"] is None
        else:  # the tiny head separates red from blue
            assert r["label"] == r["path"].split("/")[0]
            assert r["top_k"][0] == {"label": r["label"], "probability": r["probability"]} and len(r["top_k"]) == 2
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3  # 13 rows in batches of 3, a part once 4 rows are pending: 6 + 6 + 1
    meta = json.loads(pq.read_schema(parts[0]).metadata[b"tlserve"])
    info = tiny_store.extractor()
    assert meta["kind"] == "classify" and meta["head"]["name"] == "colors" and meta["head"]["version"] == 1
    assert meta["extractor"]["sha256"] == info.sha256 and meta["extractor"]["feature_space"] == info.feature_space
    assert json.loads((out / "_tlserve.json").read_text())["run"] in parts[0].name
    assert summary.stages["extractor"] > 0 and summary.stages["decode"] > 0


def test_features_mode_writes_class_and_vectors(tiny_store: ModelStore, colors: Path, tmp_path: Path) -> None:
    out = tmp_path / "feat"
    run(BatchJob(str(colors), str(out), features=True), tiny_settings(tiny_store), progress=False)
    table = pq.read_table(out)
    assert table.schema.names == ["path", "class", "features", "sha256", "error"]
    got = sorted(table.to_pylist(), key=lambda r: r["path"])
    dim = tiny_store.extractor().feature_dim
    for r in got:
        assert r["class"] == r["path"].split("/")[0]
        assert (r["features"] is None) == (r["error"] is not None)
        assert r["features"] is None or (len(r["features"]) == dim and np.isfinite(r["features"]).all())
        assert r["sha256"] == sha256_file(colors / r["path"])
    flat = tmp_path / "flat"  # not a labelled folder: no class
    flat.mkdir()
    (flat / "a.png").write_bytes(image_bytes())
    run(BatchJob(str(flat), str(tmp_path / "flat_out"), features=True), tiny_settings(tiny_store), progress=False)
    assert pq.read_table(tmp_path / "flat_out").to_pylist()[0]["class"] is None


def test_classify_rows_carry_the_familiarity_of_predict(fresh_tiny_store: ModelStore, tmp_path: Path, capsys,
                                                        monkeypatch) -> None:  # fmt: skip
    src = tmp_path / "mixed"
    src.mkdir()
    for name, data in {"red.png": image_bytes((210, 40, 40), seed=300), "blue.png": image_bytes((40, 40, 210), seed=301),
                       "between.png": _between(), "broken.jpg": b"not an image"}.items():  # fmt: skip
        (src / name).write_bytes(data)
    # one image a run, as predict does: the same features to the last bit, so the same score (predict rounds to 6 places)
    run(BatchJob(str(src), str(tmp_path / "out"), batch_size=1), tiny_settings(fresh_tiny_store), progress=False)
    got = rows(tmp_path / "out")
    code, out, _ = cli(["predict", *(str(src / r["path"]) for r in got), "--json"], fresh_tiny_store.root, capsys, monkeypatch)
    assert code == 1  # broken.jpg
    predicted = {Path(p["file"]).name: p for p in json.loads(out)["results"]}
    for r in got:
        p = predicted[r["path"]]
        if r["error"]:
            assert r["familiarity"] is None and r["in_distribution"] is None and "error" in p
            continue
        assert r["label"] == p["label"] and abs(r["familiarity"] - p["familiarity"]) < 1e-5
        assert r["in_distribution"] is p["in_distribution"]
    assert {r["path"]: r["in_distribution"] for r in got if not r["error"]} == {"red.png": True, "blue.png": True,
                                                                               "between.png": False}  # fmt: skip
    card = json.loads((fresh_tiny_store.root / "heads" / "colors" / "1" / "card.json").read_text())
    meta = json.loads(pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).metadata[b"tlserve"])
    assert meta["head"]["familiarity"] == {"method": card["familiarity"]["method"], "threshold": card["familiarity"]["threshold"]}
    _add_head_without_familiarity(fresh_tiny_store)  # a head trained before familiarity existed: no such columns
    run(BatchJob(str(src), str(tmp_path / "plain"), head="plain"), tiny_settings(fresh_tiny_store), progress=False)
    assert pq.read_table(tmp_path / "plain").schema.names == ["path", "label", "probability", "top_k", "error"]


def test_mistakes_are_refused_before_any_work(tiny_store: ModelStore, colors: Path, tmp_path: Path) -> None:
    s = tiny_settings(tiny_store)
    out = tmp_path / "out"
    run(BatchJob(str(colors), str(out), part_rows=100), s, progress=False)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputConflict, match=r"already holds a batch job.*--resume"):
        run(BatchJob(str(colors), str(out)), s, progress=False)
    with pytest.raises(OutputConflict, match=r"cannot resume .*its kind is 'classify', this job's is 'features'"):
        run(BatchJob(str(colors), str(out), features=True, resume=True), s, progress=False)
    with pytest.raises(OutputConflict, match=r"cannot resume .*top_k"):
        run(BatchJob(str(colors), str(out), top_k=1, resume=True), s, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.csv").write_text("a,b\n")
    with pytest.raises(OutputConflict, match="not empty and holds no tlserve batch job"):
        run(BatchJob(str(colors), str(foreign)), s, progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        run(BatchJob(str(tmp_path / "nope"), str(tmp_path / "o2")), s, progress=False)
    from app.core.errors import HeadNotFound

    with pytest.raises(HeadNotFound, match="no head named 'nope'"):
        run(BatchJob(str(colors), str(tmp_path / "o3"), head="nope"), s, progress=False)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_resume_skips_committed_parts_and_drops_unfinished_ones(tiny_store: ModelStore, colors: Path, tmp_path: Path) -> None:
    s = tiny_settings(tiny_store)
    out = tmp_path / "out"
    run(BatchJob(str(colors), str(out), part_rows=4, batch_size=4), s, progress=False)
    parts = sorted(out.glob("part-*.parquet"))
    lost = pq.read_table(parts[1]).column("path").to_pylist()
    parts[1].unlink()  # as if the job had died before committing it…
    (out / ".part-dead-0.parquet.abc.tmp").write_bytes(b"half a part")  # …while writing this one
    summary = run(BatchJob(str(colors), str(out), part_rows=4, batch_size=4, resume=True), s, progress=False)
    assert summary.images == len(lost) and summary.total_rows == 13
    paths = [r["path"] for r in rows(out)]
    assert len(paths) == len(set(paths)) == 13
    assert not list(out.glob(".*.tmp"))
    again = run(BatchJob(str(colors), str(out), resume=True), s, progress=False)
    assert again.images == 0 and again.total_rows == 13


def test_a_replaced_run_cannot_commit(tiny_store: ModelStore, colors: Path, tmp_path: Path) -> None:
    out = Output.open(str(tmp_path / "out"))
    out.write_job({"run": "new"})
    import pyarrow as pa

    table = pa.table({"path": ["a"]})
    assert out.commit(table, table.schema, "old") is False and out.parts() == []
    assert out.commit(table, table.schema, "new") is True and len(out.parts()) == 1


def test_actors_check_the_extractor_bytes_they_receive(tiny_store: ModelStore, tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from app.batch.compute import materialise
    from app.core.errors import ArtifactError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    info = tiny_store.extractor()
    model = info.path.read_bytes()
    copy = materialise(info, model).path
    assert copy.parent == tmp_path and copy.read_bytes() == model
    copy.write_bytes(b"x" * len(model))  # a same-sized impostor is not reused
    assert materialise(info, model).path.read_bytes() == model
    with pytest.raises(ArtifactError, match="do not match sha256"):
        materialise(info, model[:-1] + b"!")


def test_train_from_features_refuses_another_extractor(
    tiny_store: ModelStore, colors: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    feats = tmp_path / "feats"
    run(BatchJob(str(colors), str(feats), features=True), tiny_settings(tiny_store), progress=False)
    fs = read_features(str(feats), tiny_store.extractor().feature_space)
    data, ext = fs.data, fs.extracted
    assert data.classes == ["blue", "red"] and len(ext.features) == 10 and len(ext.skipped) == 3
    folder = Dataset.from_folder(colors)  # the rows come back as training reads the folder
    assert data.paths == folder.paths and data.labels.tolist() == folder.labels.tolist()
    assert [data.relative(int(i)) for i in ext.kept] == [str(p.relative_to(colors)) for c in data.classes
                                                        for p in sorted((colors / c).iterdir()) if p.name not in CORRUPT]  # fmt: skip
    other = make_tiny_store(tmp_path / "other", pooling="max")  # another extractor: another feature space
    code, _, err = cli(["train", "--features", str(feats), "--name", "x"], other.root, capsys, monkeypatch)
    theirs, ours = tiny_store.extractor().feature_space[:12], other.extractor().feature_space[:12]
    assert code == 1 and f"extracted by extractor {theirs}" in err and f"the model store's extractor is {ours}" in err
    code, _, err = cli(["train", "--name", "x"], other.root, capsys, monkeypatch)
    assert code == 2 and "DATA_DIR or --features DIR" in err
    code, _, err = cli(["train", str(colors), "--features", str(feats), "--name", "x"], other.root, capsys, monkeypatch)
    assert code == 2 and "DATA_DIR or --features DIR (one of them)" in err
    code, _, err = cli(["train", "--features", str(feats), "--name", "x", "--limit", "3"], other.root, capsys, monkeypatch)
    assert code == 2 and "--limit: only with a photo folder" in err
    classified = tmp_path / "classified"
    run(BatchJob(str(colors), str(classified)), tiny_settings(tiny_store), progress=False)
    code, _, err = cli(["train", "--features", str(classified), "--name", "x"], tiny_store.root, capsys, monkeypatch)
    assert code == 1 and "holds classify results, not features" in err


def test_train_features_equals_training_on_the_folder(fresh_tiny_store: ModelStore, colors: Path, tmp_path: Path) -> None:
    """The same trainer path from the features as from the photos: split, C by CV, out-of-fold artifacts,
    familiarity data, card; only where the features came from differs."""
    from app.learning.training import Trainer
    from app.storage.registry import load_head

    s = tiny_settings(fresh_tiny_store)
    (colors / "loose.png").write_bytes(image_bytes((40, 40, 210)))  # outside the class folders: ignored, counted
    run(BatchJob(str(colors), str(tmp_path / "f"), features=True, batch_size=4), s, progress=False)
    trainer = Trainer(s, progress=False)
    a = trainer.train_features(str(tmp_path / "f"), "from_features")
    b = trainer.train(colors, "from_folder")
    ca, cb = a.card, b.card
    assert ca["classes"] == cb["classes"] == ["blue", "red"]
    for key in ("train_per_class", "val_per_class", "split", "skipped", "data_dir", "ignored_outside_class_folders"):
        assert ca["training"][key] == cb["training"][key], key
    assert ca["estimator"]["C"] == cb["estimator"]["C"] and ca["estimator"]["C_source"] == cb["estimator"]["C_source"]
    assert "cross-validation" in ca["estimator"]["C_source"]  # C was chosen, not given
    assert ca["evaluation"]["cv"] == cb["evaluation"]["cv"] and ca["metrics"] == cb["metrics"]
    assert set(ca["artifacts"]) - {ca["pickle"]} == set(cb["artifacts"]) - {cb["pickle"]}
    folds_a, folds_b = (json.loads(t.version.read("folds.json")) for t in (a, b))
    assert folds_a["files"] == folds_b["files"] and all(f["sha256"] for f in folds_a["files"])  # same photos, folds, hashes
    fa, fb = ca["familiarity"], cb["familiarity"]
    assert (fa["method"], fa["n"]) == (fb["method"], fb["n"]) and abs(fa["threshold"] - fb["threshold"]) < 1e-4
    assert ca["training"]["features"] == {"dir": str(tmp_path / "f"), "source": str(colors),
                                          "extractor_sha256": fresh_tiny_store.extractor().sha256, "rows": 14}  # fmt: skip
    assert "features" not in cb["training"] and ca["training"]["ignored_outside_class_folders"] == 1
    x = trainer.features(sorted((colors / "red").glob("*.png"))).features
    pa_, pb = (load_head(trainer.heads, n, trainer.info.feature_space).predict_proba(x) for n in ("from_features", "from_folder"))
    assert np.abs(pa_ - pb).max() < 1e-4


def test_cli_batch_then_train_features(fresh_tiny_store: ModelStore, colors: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    store = fresh_tiny_store.root
    code, out, _ = cli(
        ["batch", str(colors), "--output", str(tmp_path / "c"), "--json", "--top-k", "1"], store, capsys, monkeypatch
    )
    summary = json.loads(out)
    assert code == 0 and summary["images"] == 13 and summary["errors"] == 3 and summary["engine"] == "in-process"
    assert all(len(r["top_k"]) == 1 for r in rows(tmp_path / "c") if not r["error"])
    code, out, _ = cli(["batch", str(colors), "--output", str(tmp_path / "f"), "--features"], store, capsys, monkeypatch)
    assert code == 0 and out.startswith("13 images")
    code, out, _ = cli(
        ["train", "--features", str(tmp_path / "f"), "--name", "from_feats", "--C", "1"], store, capsys, monkeypatch
    )
    assert code == 0 and "skipped 3 unreadable" in out
    card = json.loads((store / "heads" / "from_feats" / "1" / "card.json").read_text())
    assert card["classes"] == ["blue", "red"] and card["training"]["features"]["dir"] == str(tmp_path / "f")
    code, _, err = cli(["batch", str(colors), "--output", str(tmp_path / "c")], store, capsys, monkeypatch)
    assert code == 1 and "pass --resume" in err


def test_serving_imports_neither_ray_nor_pyarrow(tiny_store: ModelStore) -> None:
    code = (
        "import sys; from app.main import create_app; from app.core.settings import Settings; "
        f"create_app(Settings(model_store={str(tiny_store.root)!r}, default_head='colors')); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow')); print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_inprocess_path_needs_no_ray(tiny_store: ModelStore, colors: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None  # any `import ray` now fails\n"
        "from app.cli import main; sys.exit(main(['batch', sys.argv[1], '--output', sys.argv[2], '--no-progress']))"
    )
    env = {
        **os.environ,
        "TLSERVE_MODEL_STORE": str(tiny_store.root),
        "TLSERVE_DEFAULT_HEAD": "colors",
        "TLSERVE_INTRA_OP_THREADS": "1",
    }
    r = subprocess.run([sys.executable, "-c", code, str(colors), str(tmp_path / "o")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "13 images" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code.replace("'--no-progress'", "'--ray', 'local'"), str(colors), str(tmp_path / "o2")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "--ray needs Ray: pip install 'tlserve[ray]'" in r.stderr


# --- Ray, the real VGG16 and real photos -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A real local Ray for this module: 2 CPUs, a 256 MiB object store, no dashboard, on loopback."""
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def vgg_store(real_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """The real export (linked, not copied) with the default head, in a store these tests may write heads to."""
    root = tmp_path_factory.mktemp("vgg") / "store"
    root.mkdir()
    shutil.copy(real_store.manifest_path, root / "manifest.json")
    info = real_store.extractor(verify=False)
    (root / info.path.name).symlink_to(info.path)
    shutil.copytree(real_store.heads_dir / "cats_vs_dogs", root / "heads" / "cats_vs_dogs")
    return ModelStore(root)


@pytest.fixture(scope="module")
def photos(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real photos (20 a class) from ../shared, 2 generated images a class and 3 bad files."""
    src = tmp_path_factory.mktemp("photos")
    for label in ("cat", "dog"):
        (src / label).mkdir()
        for p in sorted((shared_data / "train" / label).iterdir())[:20]:
            shutil.copy(p, src / label / p.name)
        (src / label / f"gen_{label}.png").write_bytes(image_bytes((200, 180, 160), fmt="PNG", size=(300, 200), seed=1))
        (src / label / f"gen_{label}_grey.jpg").write_bytes(image_bytes((90, 90, 90), fmt="JPEG", size=(120, 160), seed=2))
    add_bad_files(src / "dog")
    return src


def vgg_settings(store: ModelStore) -> Settings:
    return Settings(model_store=store.root, intra_op_threads=2, decode_threads=2)


@pytest.fixture(scope="module")
def folder_head(vgg_store: ModelStore, photos: Path) -> str:
    """A head trained on the photos folder by `tlserve train`'s path (it has familiarity data)."""
    from app.learning.training import Trainer

    Trainer(vgg_settings(vgg_store), progress=False).train(photos, "from_folder")
    return "from_folder"


def ray_job(src: Path, out: Path, address: str, **kw: object) -> BatchJob:
    return BatchJob(str(src), str(out), ray=address, actors=2, actor_cpus=0.5, batch_size=4, part_rows=8, **kw)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.e2e
def test_ray_job_on_two_actors_equals_predict_and_inprocess(ray_cluster: str, vgg_store: ModelStore, photos: Path,
                                                            folder_head: str, tmp_path: Path, capsys, monkeypatch) -> None:  # fmt: skip
    summary = run(ray_job(photos, tmp_path / "ray", ray_cluster, head=folder_head), vgg_settings(vgg_store), progress=False)
    assert len(summary.actors) == 2 and all(n > 0 for n in summary.actors.values()), summary.actors  # a pool of 2, both used
    assert sum(summary.actors.values()) == summary.images == 47 and summary.errors == 3
    on_ray = rows(tmp_path / "ray")
    files = [str(photos / r["path"]) for r in on_ray]
    code, out, _ = cli(["predict", *files, "--json", "--top-k", "2"], vgg_store.root, capsys, monkeypatch, folder_head)
    predicted = json.loads(out)["results"]
    assert code == 1  # the bad files
    threshold = json.loads((vgg_store.root / "heads" / folder_head / "1" / "card.json").read_text())["familiarity"]["threshold"]
    for r, p in zip(on_ray, predicted, strict=True):
        assert p["file"] == str(photos / r["path"])
        if r["error"]:
            assert "error" in p and r["label"] is None
            continue
        assert r["label"] == p["label"] and abs(r["probability"] - p["confidence"]) < 1e-5
        assert [t["label"] for t in r["top_k"]] == [t["label"] for t in p["top_k"]]
        # the same score on features of another batch composition (ONNX Runtime's float sums differ in the last bits)
        assert abs(r["familiarity"] - p["familiarity"]) < 1e-4 * max(1.0, abs(p["familiarity"]))
        assert r["in_distribution"] is p["in_distribution"] or abs(p["familiarity"] - threshold) < 1e-3
    assert sum(r["label"] == r["path"].split("/")[0] for r in on_ray if r["path"].split("/")[1][:4] in ("cat.", "dog.")) >= 38
    local = run(BatchJob(str(photos), str(tmp_path / "local"), head=folder_head, part_rows=8, batch_size=4),
                vgg_settings(vgg_store), progress=False)  # fmt: skip
    assert local.images == 47
    for a, b in zip(on_ray, rows(tmp_path / "local"), strict=True):
        assert (a["path"], a["label"], a["error"], a["in_distribution"]) == (
            b["path"],
            b["label"],
            b["error"],
            b["in_distribution"],
        )
        assert a["probability"] is None or abs(a["probability"] - b["probability"]) < 1e-5
        assert a["familiarity"] is None or abs(a["familiarity"] - b["familiarity"]) < 1e-4 * max(1.0, abs(b["familiarity"]))


@pytest.mark.slow
@pytest.mark.e2e
def test_ray_features_job_killed_resumed_then_trained(ray_cluster: str, vgg_store: ModelStore, photos: Path, shared_data: Path,
                                                      folder_head: str, tmp_path: Path, capsys, monkeypatch) -> None:  # fmt: skip
    out = tmp_path / "feats"
    env = {**os.environ, "TLSERVE_MODEL_STORE": str(vgg_store.root), "TLSERVE_INTRA_OP_THREADS": "2"}
    cmd = [sys.executable, "-m", "app.cli", "batch", str(photos), "--features", "--output", str(out), "--ray", ray_cluster,
           "--actors", "2", "--actor-cpus", "0.5", "--batch-size", "4", "--part-rows", "4", "--no-progress"]  # fmt: skip
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not list(out.glob("part-*.parquet")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)  # the driver dies mid-job: no cleanup of any kind
    driver.wait(30)
    first = Output.open(str(out)).done_paths()
    assert 0 < first[1] < 47, f"the job was not killed midway ({first[1]} rows committed); {driver.stderr.read()[-2000:]!r}"
    summary = run(ray_job(photos, out, ray_cluster, features=True, resume=True), vgg_settings(vgg_store), progress=False)
    paths = [r["path"] for r in rows(out)]
    expected = sorted(str(p.relative_to(photos)) for p in photos.rglob("*") if p.is_file())
    assert sorted(paths) == expected  # every image exactly once
    assert summary.images == 47 - first[1] and summary.total_rows == 47
    # A head trained from these features equals one trained from the folder.
    store = vgg_store.root
    code, _, _ = cli(["train", "--features", str(out), "--name", "from_features"], store, capsys, monkeypatch, "cats_vs_dogs")
    assert code == 0
    from app.learning.training import Trainer
    from app.storage.registry import load_head

    trainer = Trainer(vgg_settings(vgg_store), progress=False)
    a, b = (load_head(trainer.heads, n, trainer.info.feature_space) for n in ("from_features", folder_head))
    assert a.classes == b.classes == ("cat", "dog")
    for key in ("train_per_class", "val_per_class", "skipped"):
        assert a.card["training"][key] == b.card["training"][key], key
    assert "familiarity" in a.card
    # a features output holds the photos as served, so its head trains on that view alone; the folder's few-photo
    # recipe adds mirrored and cropped views (app/core/recipe.py): same transform, same answers on val photos
    assert a.card["recipe"]["views"] == ["orig"] and a.card["recipe"]["transform"] == b.card["recipe"]["transform"]
    assert len(b.card["recipe"]["views"]) > 1
    val = [p for label in ("cat", "dog") for p in sorted((shared_data / "val" / label).iterdir())[:10]]
    x = trainer.features(val).features
    pa_, pb = a.predict_proba(x), b.predict_proba(x)
    assert (pa_.argmax(1) == pb.argmax(1)).all()


def test_jpegmem_follows_the_configured_pixel_limit(tiny_store: ModelStore, colors: Path, tmp_path: Path) -> None:
    """`tlserve batch` sets libjpeg's memory cap from max_image_pixels, as the service does, not from the default."""
    import os

    import app.core.imaging as imaging
    from app.core.settings import DEFAULT_MAX_IMAGE_PIXELS

    if imaging._OPERATOR_JPEGMEM is not None:
        pytest.skip("JPEGMEM set by the environment: an operator's value wins")
    try:
        run(BatchJob(str(colors), str(tmp_path / "out")), tiny_settings(tiny_store, max_image_pixels=200_000_000), progress=False)
        assert os.environ["JPEGMEM"] == "1664M"  # 8 bytes a pixel + 64 MB
    finally:
        imaging.configure(DEFAULT_MAX_IMAGE_PIXELS)
