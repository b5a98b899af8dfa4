"""``tlserve classify IMAGE... --url URL`` (on tlserve_client) as a subprocess against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.storage.store import ModelStore
from tests.helpers import REPO, ServerProcess, free_port, image_bytes

RED, BLUE = (210, 40, 40), (40, 40, 210)


@pytest.fixture(scope="module")
def server(tiny_store: ModelStore, module_server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return module_server_factory(tiny_store, default_head="colors")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i, (color, fmt) in enumerate([(RED, "PNG"), (BLUE, "JPEG"), (RED, "JPEG"), (BLUE, "PNG"), (RED, "PNG")]):
        path = tmp_path / f"img{i}.{fmt.lower()}"
        path.write_bytes(image_bytes(color, fmt, size=(40 + i, 36 + i), seed=i))
        paths.append(path)
    return paths


# The command must use tlserve_client: importing the deprecated app.client alias turns into an error here.
NO_ALIAS = "error:app.client is deprecated:DeprecationWarning"


def tlserve(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", NO_ALIAS, "-m", "app.cli", "classify", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip


def v1_labels(server: ServerProcess, paths: list[Path]) -> list[str]:
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return [r["label"] for r in httpx.post(server.url + "/v1/classify", files=files, timeout=30).json()["results"]]


def test_json_output_matches_v1_across_batches(server: ServerProcess, images: list[Path]) -> None:
    run = tlserve(*images, "--url", server.url, "--json", "--batch", "2")  # 3 requests: 2 + 2 + 1
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["head"] == "colors"
    assert [r["file"] for r in doc["results"]] == [str(p) for p in images]
    assert [r["label"] for r in doc["results"]] == v1_labels(server, images) == ["red", "blue", "red", "blue", "red"]
    assert all(set(r["probabilities"]) == {"blue", "red"} for r in doc["results"])


def test_text_output_and_top_k(server: ServerProcess, images: list[Path]) -> None:
    run = tlserve(images[0], images[1], "--url", server.url, "--head", "colors")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{images[0]}: red (") and lines[1].startswith(f"{images[1]}: blue (")
    run = tlserve(images[0], "--url", server.url, "--top-k", "1", "--json")
    (result,) = json.loads(run.stdout)["results"]
    assert run.returncode == 0 and [t["label"] for t in result["top_k"]] == ["red"]


def test_bad_and_missing_images_fail_the_exit_code_not_the_others(
    server: ServerProcess, images: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    missing = tmp_path / "missing.png"
    run = tlserve(images[0], bad, missing, images[1], "--url", server.url, "--json", "--batch", "4")
    assert run.returncode == 1, run.stderr
    results = json.loads(run.stdout)["results"]
    assert [r["file"] for r in results] == [str(images[0]), str(bad), str(missing), str(images[1])]
    assert results[0]["label"] == "red" and results[3]["label"] == "blue"
    assert "not a recognised image" in results[1]["error"] and "cannot read" in results[2]["error"]
    only_bad = tlserve(bad, "--url", server.url)  # the server refuses a request whose every image failed
    assert only_bad.returncode == 1 and f"{bad}: ERROR" in only_bad.stdout


def test_refused_or_unreachable_is_exit_2(server: ServerProcess, images: list[Path]) -> None:
    run = tlserve(images[0], "--url", server.url, "--head", "no_such_head")
    assert run.returncode == 2 and "head_not_found" in run.stderr and "no_such_head" in run.stderr
    run = tlserve(images[0], "--url", f"http://127.0.0.1:{free_port()}", "--retries", "0")
    assert run.returncode == 2 and "ConnectError" in run.stderr
    run = tlserve(images[0], "--url", server.url, "--top-k", "0")
    assert run.returncode == 2 and "at least 1" in run.stderr  # argparse refuses before any request
