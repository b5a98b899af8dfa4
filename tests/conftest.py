"""Fixtures: a tiny real model store (fast), the real exported store, ../shared photos, live servers."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core.settings import Settings
from app.learning.export import export
from app.learning.training import Trainer
from app.storage.store import ModelStore
from tests.helpers import REPO, SHARED_DATA, ServerProcess, server_pool, tiny_weights, write_color_dataset

TINY_SIZE = 32


def make_tiny_store(root: Path, *, pooling: str = "avg", head: str = "colors") -> ModelStore:
    """A real ONNX extractor (VGG16 topology, few channels) and a real trained head on red/blue images."""
    store = ModelStore(root)
    export(store, tiny_weights(), {"name": "test", "artifact": "tiny"}, size=TINY_SIZE, pooling=pooling)  # type: ignore[arg-type]
    data = write_color_dataset(root.parent / f"{root.name}_data")
    settings = Settings(model_store=root, default_head=head, intra_op_threads=1)
    Trainer(settings, progress=False).train(data, head, c=1.0)
    return store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """Session-wide tiny store; do not modify it (use ``fresh_tiny_store`` for that)."""
    return make_tiny_store(tmp_path_factory.mktemp("tiny") / "store")


@pytest.fixture
def fresh_tiny_store(tmp_path: Path, tiny_store: ModelStore) -> ModelStore:
    """A private copy of the tiny store, free to modify."""
    dst = tmp_path / "store"
    shutil.copytree(tiny_store.root, dst)
    return ModelStore(dst)


def _quantized(tiny_store: ModelStore, root: Path, calib: Path, **kwargs: float) -> ModelStore:
    from app.learning.quantize import quantize_int8

    store = ModelStore(root / "store")
    shutil.copytree(tiny_store.root, store.root)
    quantize_int8(store, calib, limit=8, check_limit=12, **kwargs)  # type: ignore[arg-type]
    return store


@pytest.fixture(scope="session")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_color_dataset(tmp_path_factory.mktemp("calib") / "calib", per_class=10)


@pytest.fixture(scope="session")
def int8_store(tiny_store: ModelStore, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """The tiny store plus an int8 variant that passed its accuracy gate; do not modify it."""
    return _quantized(tiny_store, tmp_path_factory.mktemp("int8"), calib)


@pytest.fixture(scope="session")
def refused_store(tiny_store: ModelStore, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """The tiny store plus an int8 variant that failed its gate (a bar no model can pass); do not modify it."""
    return _quantized(tiny_store, tmp_path_factory.mktemp("refused"), calib, min_agreement=1.01)


@pytest.fixture
def tiny_settings(tiny_store: ModelStore) -> Settings:
    return Settings(model_store=tiny_store.root, default_head="colors", intra_op_threads=1, head_poll_interval_s=0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real photos live in ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_store() -> ModelStore:
    """The repository's model store: the real VGG16 export (``make test`` exports it) and the default head.
    Its manifest's ``extractor`` is the fp32 export even when an int8 variant was added."""
    store = ModelStore(REPO / "model_store")
    if not store.manifest_path.exists():
        pytest.skip("model_store/manifest.json is absent: run `tlserve export` (make test does)")
    return store


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Real ``tlserve serve`` processes for one test: ``server_factory(store, **settings)``."""
    with server_pool(tmp_path) as start:
        yield lambda store, wait_ready=True, **settings: start(store.root, wait_ready, **settings)


@pytest.fixture(scope="module")
def module_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """The same, shared by a module's tests (each module's ``server`` fixture is one line over it)."""
    with server_pool(tmp_path_factory.mktemp("servers")) as start:
        yield lambda store, wait_ready=True, **settings: start(store.root, wait_ready, **settings)


# --- what this run did not cover ------------------------------------------------------------------
# A skipped test is a part of the product this run did not check: the summary below groups them by the missing
# tool or data, so a green run on a bare machine (no nginx, no ../shared photos) is never read as full coverage.
_MISSING = (
    ("nginx", "nginx (load-balancer drills): apt-get install nginx"),
    ("podman", "podman (the container image): apt-get install podman runc debootstrap"),
    ("chromium", "Chromium (the console in a real browser): apt-get install chromium chromium-driver"),
    ("chromedriver", "Chromium (the console in a real browser): apt-get install chromium chromium-driver"),
    ("promtool", "promtool (the alert rules): apt-get install prometheus"),
    ("shared", "the ../shared photos (end-to-end accuracy on real photos)"),
    ("int8 variant", "the INT8 variant (`tlserve export` made none)"),
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    groups: dict[str, int] = {}
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        lowered = reason.lower()
        group = next((what for key, what in _MISSING if key in lowered), reason.removeprefix("Skipped: "))
        groups[group] = groups.get(group, 0) + 1
    terminalreporter.section("not covered by this run (skipped, and why)", sep="=", bold=True)
    for group, n in sorted(groups.items(), key=lambda kv: -kv[1]):
        terminalreporter.line(f"{n:5d} test(s) skipped: {group}")
    terminalreporter.line(f"{sum(groups.values()):5d} in all: install what is named above for full coverage (.ci/run does)")
