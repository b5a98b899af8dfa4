"""Faults, made real: tampered heads, an unreadable store, ONNX Runtime failing on a batch, and
``tlserve train`` killed (or out of space) in the middle of writing a head.

Nothing is mocked: the pickles are really overwritten, the extractor really fails inside ONNX
Runtime (a graph with a data-dependent out-of-bounds Gather), and the trainer is really killed by
the kernel in the middle of a ``write()`` (``RLIMIT_FSIZE``: SIGXFSZ, or EFBIG when that is ignored,
the same ``OSError``-from-``write`` path as a full disk).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from app.core.hashing import sha256_file
from app.storage.files import write_json
from app.storage.registry import load_head
from app.storage.store import ModelStore
from tests.helpers import ADMIN, REPO, ServerProcess, image_bytes, write_color_dataset

RED = (210, 40, 40)
GOOD = image_bytes(RED, "PNG", size=(32, 32), noise=15)


def classify(server: ServerProcess, data: bytes = GOOD) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/classify", content=data, headers={"content-type": "image/png"}, timeout=30)


def assert_error(r: httpx.Response, status: int, code: str, store: ModelStore | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message", "request_id"} and err["code"] == code, err
    assert "Traceback" not in r.text
    if store is not None:
        assert str(store.root) not in r.text and str(store.root.resolve()) not in r.text
    return err["message"]


def card_of(store: ModelStore, name: str = "colors") -> dict:
    return json.loads((store.heads.current_folder(name) / "card.json").read_text())


# --- a tampered or corrupt head: reload refused, the previous head keeps serving -------------
class Touch:
    """A pickle that, if it were ever unpickled, would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[Path]]:
        return pathlib.Path.touch, (self.marker,)


def test_tampered_head_is_refused_and_the_previous_head_keeps_serving(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    store = fresh_tiny_store
    server = server_factory(store, default_head="colors")
    before = classify(server).json()["results"][0]
    card = card_of(store)
    pkl = store.heads.current_folder("colors") / card["pickle"]
    original, card_text = pkl.read_bytes(), (store.heads.current_folder("colors") / "card.json").read_text()
    marker = tmp_path / "unpickled"
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    other = pickle.dumps({"classes_": ["blue", "red"]}, protocol=5)
    tampered_pickles = {
        "truncated": original[: len(original) // 2],
        "one-bit-flipped": bytes(flipped),
        "malicious": pickle.dumps(Touch(marker), protocol=5),
        "another-valid-pickle": other,
        "empty": b"",
    }
    for what, blob in tampered_pickles.items():
        pkl.write_bytes(blob)
        r = httpx.post(f"{server.url}/v1/models/colors/reload", headers=ADMIN)
        message = assert_error(r, 500, "artifact_error", store)
        assert "does not match" in message and "refusing to unpickle" in message, (what, message)
        assert not marker.exists(), "a tampered pickle was unpickled"
        assert classify(server).json()["results"][0] == before, what  # the verified head still answers
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    pkl.write_bytes(original)

    bad_cards = {
        "not-json": "{ this is not json",
        "not-an-object": "[]",
        "pickle-outside-the-store": json.dumps({**card, "pickle": "../../../../etc/passwd.pkl"}),
        "missing-checksum": json.dumps({k: v for k, v in card.items() if k != "pickle_sha256"}),
        "other-extractor": json.dumps({**card, "extractor": {**card["extractor"], "sha256": "0" * 64}}),
    }
    for what, text in bad_cards.items():
        (store.heads.current_folder("colors") / "card.json").write_text(text)
        r = httpx.post(f"{server.url}/v1/models/colors/reload", headers=ADMIN)
        assert r.status_code in (409, 500), (what, r.text)
        assert_error(r, r.status_code, "incompatible_head" if what == "other-extractor" else "artifact_error", store)
        assert classify(server).json()["results"][0] == before, what
    (store.heads.current_folder("colors") / "card.json").write_text(card_text)

    listed = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert listed["colors"]["loaded"] is True
    r = httpx.post(f"{server.url}/v1/models/colors/reload", headers=ADMIN)  # the genuine pair loads again
    assert r.status_code == 200 and r.json()["pickle_sha256"] == card["pickle_sha256"] and r.json().get("error") is None
    assert "Traceback" not in server.log_text()
    assert server.log_text().count("reload of head colors refused") == len(tampered_pickles) + len(bad_cards)


# --- the model store unreadable at start: alive, not ready, a clear log line -----------------
def _missing(store: ModelStore) -> None:
    shutil.rmtree(store.root)


def _a_file(store: ModelStore) -> None:
    shutil.rmtree(store.root)
    store.root.write_bytes(b"not a folder")


def _manifest_garbage(store: ModelStore) -> None:
    store.manifest_path.write_bytes(b"\x00\xff{{{")


def _extractor_tampered(store: ModelStore) -> None:
    info = store.extractor()
    info.path.write_bytes(info.path.read_bytes()[:-100])


def _extractor_garbage_with_matching_checksum(store: ModelStore) -> None:
    info = store.extractor()
    info.path.write_bytes(b"this is not an onnx model" * 100)
    manifest = json.loads(store.manifest_path.read_text())
    manifest["extractor"]["sha256"] = sha256_file(info.path)
    write_json(store.manifest_path, manifest)


def _default_head_tampered(store: ModelStore) -> None:
    card = card_of(store)
    (store.heads.current_folder("colors") / card["pickle"]).write_bytes(b"\x80\x05N.")


UNREADABLE = {
    "store-missing": (_missing, "manifest.json"),
    "store-is-a-file": (_a_file, "manifest.json"),
    "manifest-garbage": (_manifest_garbage, "unreadable"),
    "extractor-tampered": (_extractor_tampered, "sha256"),
    "extractor-not-onnx": (_extractor_garbage_with_matching_checksum, "cannot load"),
    "default-head-tampered": (_default_head_tampered, "does not match"),
}


@pytest.mark.parametrize("fault", sorted(UNREADABLE))
def test_unreadable_store_means_alive_but_not_ready(
    fault: str, fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]
) -> None:
    breaks, says = UNREADABLE[fault]
    breaks(fresh_tiny_store)
    server = server_factory(fresh_tiny_store, wait_ready=False, default_head="colors")
    assert httpx.get(f"{server.url}/livez").status_code == 200
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
    assert says in ready.json()["reason"], ready.json()
    message = assert_error(classify(server), 503, "not_ready", fresh_tiny_store)
    assert says in message
    log = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    errors = [e["msg"] for e in log if e["level"] == "error"]
    assert any(m.startswith("not ready: ") and says in m for m in errors), errors
    assert "Traceback" not in server.log_text()
    assert server.proc is not None and server.proc.poll() is None


# --- ONNX Runtime raising inside a batch ----------------------------------------------------
POISON_FROM = 250  # a batch fails when any image's top-left red value is at least this


def make_poisoned_extractor(store: ModelStore) -> None:
    """Rewrite the extractor so that ONNX Runtime itself fails on some batches and not others.

    ``features = features_raw + Gather(zeros[POISON_FROM], red(0, 0))``: the same features for every
    image (the gathered value is 0), but a red value >= POISON_FROM is an out-of-bounds Gather index,
    which ONNX Runtime rejects at run time for the whole batch. The head still fits: the manifest
    says these features are the original extractor's (``feature_space``).
    """
    info = store.extractor()
    model = onnx.load(str(info.path))
    graph = model.graph
    images = graph.input[0].name
    for node in graph.node:
        node.output[:] = ["features_raw" if o == "features" else o for o in node.output]
    consts = [
        helper.make_tensor("p_starts", TensorProto.INT64, [4], [0, 0, 0, 0]),
        helper.make_tensor("p_ends", TensorProto.INT64, [4], [2**62, 1, 1, 1]),
        helper.make_tensor("p_shape", TensorProto.INT64, [2], [-1, 1]),
        helper.make_tensor("p_table", TensorProto.FLOAT, [POISON_FROM], [0.0] * POISON_FROM),
    ]
    graph.initializer.extend(consts)
    graph.node.extend([
        helper.make_node("Slice", [images, "p_starts", "p_ends"], ["p_pixel"]),
        helper.make_node("Reshape", ["p_pixel", "p_shape"], ["p_column"]),
        helper.make_node("Cast", ["p_column"], ["p_index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["p_table", "p_index"], ["p_zero"], axis=0),
        helper.make_node("Add", ["features_raw", "p_zero"], ["features"]),
    ])  # fmt: skip
    onnx.checker.check_model(model)
    onnx.save(model, str(info.path))
    manifest = json.loads(store.manifest_path.read_text())
    manifest["extractor"].update(sha256=sha256_file(info.path), feature_space=info.feature_space)
    write_json(store.manifest_path, manifest)


def poisoned_image() -> bytes:
    arr = np.full((32, 32, 3), RED, np.uint8)
    arr[0, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_a_batch_failing_inside_onnx_runtime(fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess]) -> None:
    make_poisoned_extractor(fresh_tiny_store)
    server = server_factory(fresh_tiny_store, default_head="colors", max_queue_delay_ms=400, max_batch_size=16)
    good = classify(server)
    assert good.status_code == 200 and good.json()["results"][0]["label"] == "red"
    message = assert_error(classify(server, poisoned_image()), 500, "inference_error", fresh_tiny_store)
    assert "ONNX Runtime failed on a batch of 1" in message
    assert classify(server).json()["results"][0] == good.json()["results"][0]  # the next batch works

    # one poisoned image among six concurrent requests: the batch they share fails for all of them
    start = threading.Barrier(6)

    def send(data: bytes) -> httpx.Response:
        start.wait()
        return classify(server, data)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, [poisoned_image(), GOOD, GOOD, GOOD, GOOD, GOOD]))
    assert_error(answers[0], 500, "inference_error", fresh_tiny_store)
    for r in answers[1:]:
        assert r.status_code == 200 or assert_error(r, 500, "inference_error")
    assert sum(r.status_code == 500 for r in answers) >= 2  # the error reached its batch-mates too
    with ThreadPoolExecutor(6) as pool:  # and the next batch is fine
        assert all(r.status_code == 200 for r in pool.map(lambda _: classify(server), range(6)))
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert "batch of 1 images failed" in server.log_text()
    assert "Traceback" not in server.log_text()


# --- `tlserve train` killed mid-write, or out of space: no half-written head is ever loaded ----
# Python ignores SIGXFSZ; with the default action restored, the kernel kills the process in the very
# write() that crosses RLIMIT_FSIZE (no Python cleanup runs: the same as a SIGKILL at that instant).
DIE_AT_LIMIT = "import signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); from app.cli import main; sys.exit(main())"
EFBIG_AT_LIMIT = "import sys; from app.cli import main; sys.exit(main())"  # write() fails with EFBIG, like ENOSPC


def quiet_env(tmp: Path) -> dict[str, str]:
    """An environment in which the only files a run writes are its own: no bytecode, matplotlib's font
    cache (built here, once) only read, and ONNX Runtime's usage database under ``~/.cache/Microsoft``
    (which onnxruntime 1.31 writes on import) made impossible by a file in the way."""
    import matplotlib
    from matplotlib import font_manager  # noqa: F401 - builds the font cache now, so the child only reads it

    home = tmp / "home"
    (home / ".cache").mkdir(parents=True, exist_ok=True)
    (home / ".cache" / "Microsoft").touch()
    return {**os.environ, "HOME": str(home), "MPLCONFIGDIR": matplotlib.get_cachedir(), "PYTHONDONTWRITEBYTECODE": "1"}


def run_limited(args: list[str], env: dict[str, str], max_file_bytes: int | None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit
    )


def run_train(
    store: ModelStore, data: Path, name: str, env: dict[str, str], *, max_file_bytes: int | None = None, die: bool = True
):
    env = {**env, "TLSERVE_MODEL_STORE": str(store.root), "TLSERVE_INTRA_OP_THREADS": "1"}
    code = DIE_AT_LIMIT if die else EFBIG_AT_LIMIT
    return run_limited(["-c", code, "train", str(data), "--name", name, "--C", "1.0"], env, max_file_bytes)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp")) if folder.is_dir() else []


def test_train_killed_mid_write_or_out_of_space_never_leaves_a_half_written_head(
    fresh_tiny_store: ModelStore, server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    store = fresh_tiny_store
    heads = store.heads
    data = write_color_dataset(tmp_path / "data", per_class=8)
    folder = heads.current_folder("colors")
    old = card_of(store)
    pkl_size = (folder / old["pickle"]).stat().st_size
    png_size = (folder / "confusion_matrix.png").stat().st_size
    assert pkl_size < png_size  # the order of writes is pickle, plot, card (the commit point)
    server = server_factory(store, default_head="colors")
    feature_space = store.extractor().feature_space
    env = quiet_env(tmp_path)

    def newest(name: str = "colors") -> Path:
        """The version folder the last training run allocated (committed or not)."""
        return max((p for p in heads.folder(name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))

    def still_the_old_head() -> None:
        assert heads.versions("colors") == [old["version"]] and card_of(store) == old
        assert load_head(store.heads, "colors", feature_space).sha256 == old["pickle_sha256"]
        r = httpx.post(f"{server.url}/v1/models/colors/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["pickle_sha256"] == old["pickle_sha256"]
        assert classify(server).json()["results"][0]["label"] == "red"

    # 1. killed by the kernel half-way through writing the pickle: its version folder has no card
    r = run_train(store, data, "colors", env, max_file_bytes=pkl_size // 2)
    assert r.returncode == -signal.SIGXFSZ, r.stderr[-2000:]
    staged = newest()
    assert staged != folder and not (staged / "card.json").exists()
    (partial,) = leftovers(staged)
    assert partial.startswith(".head-") and (staged / partial).stat().st_size == pkl_size // 2
    still_the_old_head()

    # 2. killed half-way through the plot: the new pickle is complete, but no card names it
    r = run_train(store, data, "colors", env, max_file_bytes=(pkl_size + png_size) // 2)
    assert r.returncode == -signal.SIGXFSZ, r.stderr[-2000:]
    staged2 = newest()
    assert staged2 != staged  # an interrupted version id is never reused
    assert any(p.startswith(".confusion_matrix.png.") for p in leftovers(staged2))
    assert len(list(staged2.glob("head-*.pkl"))) == 1 and not (staged2 / "card.json").exists()
    still_the_old_head()

    # 3. no room for the pickle (EFBIG): the error is reported, the temporary file removed
    r = run_train(store, data, "colors", env, max_file_bytes=pkl_size // 2, die=False)
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-2000:]
    assert leftovers(newest()) == []
    still_the_old_head()

    # 4. a new head killed mid-write is invisible: not listed, not loadable
    r = run_train(store, data, "fresh", env, max_file_bytes=pkl_size // 2)
    assert r.returncode == -signal.SIGXFSZ
    assert "fresh" not in store.heads.names()
    assert_error(httpx.post(f"{server.url}/v1/models/fresh/reload", headers=ADMIN), 404, "head_not_found", store)

    # 5. the card itself, the commit point, interrupted half-way: the old card stays whole
    card_text = (folder / "card.json").read_text()
    code = (
        "import pathlib, signal; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); from app.storage.files import write_json; "
        f"write_json(pathlib.Path({str(folder / 'card.json')!r}), {{'x': 'y' * 100000}})"
    )
    killed = run_limited(["-c", code], env, len(card_text) // 2)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-2000:]
    assert any(p.startswith(".card.json.") for p in leftovers(folder))
    assert (folder / "card.json").read_text() == card_text
    still_the_old_head()

    # 6. and a training run that is left alone does add a new current version (so the checks above
    #    can fail), while the old version stays whole for a rollback
    r = run_train(store, data, "colors", env)
    assert r.returncode == 0, r.stderr[-2000:]
    new = card_of(store)
    assert new["pickle_sha256"] != old["pickle_sha256"] and new["version"] > int(staged2.name)
    assert heads.versions("colors") == [old["version"], new["version"]]
    assert sorted(heads.current_folder("colors").glob("head-*.pkl")) == [heads.current_folder("colors") / new["pickle"]]
    assert load_head(heads, "colors", feature_space, old["version"]).sha256 == old["pickle_sha256"]
    r = httpx.post(f"{server.url}/v1/models/colors/reload", headers=ADMIN)
    assert r.status_code == 200 and r.json()["pickle_sha256"] == new["pickle_sha256"]
    assert r.json()["version"] == new["version"]
    assert "Traceback" not in server.log_text()
