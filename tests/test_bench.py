"""``python -m benchmarks.bench --quick`` on the tiny store: it runs end to end and writes what it says (never
timings); the product CLI and package carry no benchmark code."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from app.cli import build_parser
from app.learning.export import build_graph
from app.learning.quantize import quantize_int8
from app.serving.batching import Batcher
from app.storage.files import atomic_write
from app.storage.store import ModelStore
from benchmarks.bench import model_gflops, percentile
from benchmarks.int8_speed import run as int8_speed
from tests.helpers import REPO, TINY_CHANNELS, image_bytes, tiny_weights, write_color_dataset


def _bench(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "TLSERVE_INTRA_OP_THREADS": "1", "TLSERVE_DECODE_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "benchmarks.bench", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_the_product_cli_lists_product_commands_only() -> None:
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    assert set(sub.choices or ()) == {
        "export",
        "train",
        "evaluate",
        "predict",
        "classify",
        "serve",
        "heads",
        "keys",
        "sign",
        "batch",
        "settings",
    }
    assert importlib.util.find_spec("app.bench") is None  # the benchmark lives in benchmarks/, outside the package


def test_quick_bench_writes_table_json_and_plot(tiny_store: ModelStore, tmp_path: Path) -> None:
    data = tmp_path / "photos"
    for label, color in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
        (data / label).mkdir(parents=True)
        for i in range(3):
            (data / label / f"{i}.jpg").write_bytes(image_bytes(color, fmt="JPEG", size=(120 + i, 90), seed=i))
    out = tmp_path / "out"
    proc = _bench(["--quick", "--sweep", "--model-store", str(tiny_store.root), "--out", str(out), "--data", str(data)],
                  TLSERVE_DEFAULT_HEAD="colors")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads((out / "bench.json").read_text())
    assert result["quick"] is True and result["inputs"].startswith("6 JPEGs from")
    assert result["model"]["file"] == "vgg16_32_avg.onnx" and result["model"]["convs"] == 13
    assert result["model"]["precision"] == "fp32" and result["model"]["precision_reason"].startswith("precision=auto: fp32")
    assert result["ceiling"]["gflops"] > 0
    assert [r["batch"] for r in result["bare"]] == [1, 4]
    assert [r["batch"] for r in result["in_process"]["rows"]] == [1, 4] and result["in_process"]["head"] == "colors"
    assert [r["concurrency"] for r in result["http"]] == [1, 4, 16, 64]
    for row in result["http"]:
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert row["images_s"] > 0 and row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["mean_batch_size"] >= 1 and row["ratio_to_bare"] > 0
    assert result["service"]["extractor"]["sha256"] == result["model"]["sha256"]
    for row in result["http"]:
        assert row["server_cpu_ms_per_image"] > 0 and row["client_cpu_ms_per_image"] > 0 and row["cpu_ratio"] > 0
        assert row["bare_after"]["batch1"]["batch"] == 1 and row["bare_images_s"] > 0
    assert set(result["targets"]) == {
        "http_c>=4_ratio>=0.90",
        "http_c>=4_cpu_ratio>=0.90",
        "p50_c1<=bare_b1+10ms",
        "fraction_of_ceiling>=0.80",
        "fraction_of_ceiling_cpu>=0.80",
    }
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    assert len(result["sweep"]) == 2 and all(len(s["levels"]) == 2 for s in result["sweep"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("bare ORT batch 1", "Extractor+head batch 4", "HTTP concurrency 64", "FLOP ceiling", "target "):
        assert label in proc.stdout


def test_bench_without_a_store_says_so(tmp_path: Path) -> None:
    proc = _bench(["--quick", "--model-store", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert proc.returncode == 1
    assert "run `tlserve export` first" in proc.stderr
    assert not (tmp_path / "out" / "bench.json").exists()


def test_int8_speed_measures_both_variants(tiny_store: ModelStore, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    shutil.copytree(tiny_store.root, store.root)
    quantize_int8(store, write_color_dataset(tmp_path / "calib", per_class=6), limit=6, check_limit=6)
    result = int8_speed(store, tmp_path / "no-photos", images=4, batch=2, seconds=0.2)
    assert (result["fp32"], result["int8"]) == ("vgg16_32_avg.onnx", "vgg16_32_avg.int8.onnx")
    assert result["inputs"].startswith("4 synthetic")
    assert result["runs"]["fp32"] >= 2 * 3 and result["runs"]["int8"] >= 2 * 3  # at least 2 runs a round, 3 rounds
    for key in ("fp32_images_s", "int8_images_s", "speedup", "fp32_cpu_ms_per_image", "int8_cpu_ms_per_image"):
        assert result[key] > 0


def test_int8_speed_without_a_variant_says_so(tiny_store: ModelStore, tmp_path: Path) -> None:
    from app.core.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no int8 variant"):
        int8_speed(tiny_store, tmp_path, seconds=0.1)


def test_model_gflops_counts_every_conv(tmp_path: Path) -> None:
    size = 64
    path = tmp_path / "m.onnx"
    atomic_write(path, build_graph(tiny_weights(), size, "avg"))
    expected, side, cin = 0, size, 3
    for i, cout in enumerate(TINY_CHANNELS):
        expected += 2 * side * side * cout * cin * 9
        cin = cout
        if i in (1, 3, 6, 9):  # block1..4 end with a 2x2 max-pool
            side //= 2
    got = model_gflops(path)
    assert got["convs"] == 13
    assert got["flop_per_image"] == expected


def test_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 100) == 2.0
    assert np.isnan(percentile([], 50))


def test_batcher_runs_images_that_already_waited_without_a_second_delay() -> None:
    """Images queued while a batch runs have already waited: once the engine is free they run at once, not
    after another ``max_queue_delay_ms`` (the idle gap between batches the benchmark found)."""
    gate, batches = threading.Event(), []

    def engine(images: np.ndarray) -> np.ndarray:
        gate.wait(10)
        batches.append(len(images))
        return images.reshape(len(images), -1)[:, :1].astype(np.float32)

    one = np.zeros((1, 2, 2, 3), np.uint8)

    async def main() -> None:
        b = Batcher(engine, max_batch_size=2, max_queue_delay_ms=1500, max_queue_size=16)
        b.start()
        first = asyncio.ensure_future(b.submit(np.zeros((2, 2, 2, 3), np.uint8)))  # a full batch: runs at once, held at the gate
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(b.submit(one))  # queued while the engine is busy
        await asyncio.sleep(1.6)  # it has now waited longer than max_queue_delay_ms
        gate.set()
        await first
        await asyncio.sleep(0.3)
        third = asyncio.ensure_future(b.submit(one))  # would join `second` if that were held back for another delay
        await asyncio.gather(second, third)
        await b.stop()

    asyncio.run(main())
    assert batches == [2, 1, 1]
