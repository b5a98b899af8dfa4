"""Store files are read without following links, regular files only, never past their cap (issue 24,
item 6): a symlink to /dev/zero or a FIFO as an artifact, a ``current`` pointer or a job record is a
named ArtifactError, never a hang, a MemoryError or a dead poller. Each case runs in a subprocess
with a memory and time limit, so the old loader's endless read fails the test instead of the machine."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from app.storage.store import ModelStore
from tests.helpers import REPO

_RUN = """
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from pathlib import Path
from app.core.errors import TlserveError
from app.learning.jobstore import JobStore
from app.storage.registry import HeadRegistry, load_head
from app.storage.store import ModelStore
store, what = ModelStore(Path(sys.argv[1])), sys.argv[2]
try:
    if what == "head":
        load_head(store.heads, "colors", store.extractor().feature_space)
    elif what == "artifact":
        store.heads.get("colors").read(sys.argv[3])
    elif what == "cache":
        from app.learning.features import FeatureCache
        cache = FeatureCache(Path(sys.argv[3]), "ab" * 32)
        print("MISS" if cache.get(sys.argv[4], 8) is None else "HIT")
        raise SystemExit(0)
    elif what == "extractor":
        store.extractor()
    elif what == "job":
        job = sys.argv[3]
        JobStore(store.heads).read(job)
    elif what == "jobs":
        print("LISTED", len(JobStore(store.heads).list()))
        raise SystemExit(0)
    elif what == "poll":
        registry = HeadRegistry(store.heads, store.extractor().feature_space)
        registry.load_all()
        async def twice():
            task = asyncio.get_running_loop().create_task(registry.watch(0.05))
            await asyncio.sleep(0.5)
            alive = not task.done()
            task.cancel()
            return alive
        print("POLLER", "alive" if asyncio.run(twice()) else "dead", type(registry.errors.get("colors")).__name__)
        raise SystemExit(0)
except TlserveError as exc:
    print("REFUSED", exc.code, exc.message)
else:
    print("READ")
"""


def _run(store: ModelStore, *args: str) -> str:
    try:
        r = subprocess.run([sys.executable, "-c", _RUN, str(store.root), *args], cwd=REPO, capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args}: the read never ended (60 s)")
    assert r.returncode == 0, f"{args}: status {r.returncode}: {r.stderr[-1500:]}"
    return r.stdout.strip()


def _replace(path: Path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to a regular file":
        target = path.parent.parent / f"elsewhere-{path.name}"
        target.write_bytes(b"{}")
        path.symlink_to(target)


KINDS = ["link to /dev/zero", "fifo", "link to a regular file"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("file", ["head_coef.npy", "confusion_matrix.png"])
def test_an_artifact_that_is_not_a_regular_file_is_refused(kind: str, file: str, fresh_tiny_store: ModelStore) -> None:
    folder = fresh_tiny_store.heads.current_folder("colors")
    _replace(folder / file, kind)
    out = _run(fresh_tiny_store, "artifact", file)  # what every reader of a version's files goes through
    assert out.startswith("REFUSED artifact_error"), out
    assert ("symbolic link" if kind.startswith("link") else "not a regular file") in out, out
    if file == "head_coef.npy":  # served: the head is refused
        out = _run(fresh_tiny_store, "head")
        assert out.startswith("REFUSED artifact_error") and file in out, out


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo"])
def test_a_current_pointer_that_is_not_a_regular_file_is_refused_and_the_poller_lives(
    kind: str, fresh_tiny_store: ModelStore
) -> None:
    _replace(fresh_tiny_store.heads.folder("colors") / "current", kind)
    out = _run(fresh_tiny_store, "head")
    assert out.startswith("REFUSED artifact_error") and "current" in out, out
    assert _run(fresh_tiny_store, "poll") == "POLLER alive ArtifactError"


@pytest.mark.parametrize("kind", KINDS)
def test_a_job_record_that_is_not_a_regular_file_is_refused(kind: str, fresh_tiny_store: ModelStore) -> None:
    jobs = fresh_tiny_store.heads_dir / ".jobs"
    jobs.mkdir()
    job = uuid.uuid4().hex
    _replace(jobs / f"{job}.json", kind)
    out = _run(fresh_tiny_store, "job", job)
    assert out.startswith("REFUSED artifact_error"), out
    assert _run(fresh_tiny_store, "jobs") == "LISTED 0"  # the listing skips it


def test_a_file_over_its_cap_is_refused_without_reading_it(fresh_tiny_store: ModelStore) -> None:
    from app.core.errors import ArtifactError
    from app.storage.files import read_json, read_regular

    path = fresh_tiny_store.root / "big.json"
    with path.open("wb") as f:
        f.truncate(1 << 40)  # sparse 1 TiB: stat says so, nothing is read
    with pytest.raises(ArtifactError, match="over the limit of 67108864"):
        read_json(path)
    path.write_bytes(b"x" * 100)
    with pytest.raises(ArtifactError, match="over the limit of 99"):
        read_regular(path, 99)
    assert read_regular(path, 100) == b"x" * 100


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo"])
def test_an_extractor_that_is_not_a_regular_file_is_refused(kind: str, fresh_tiny_store: ModelStore) -> None:
    """A link to a real copy is allowed (the sha256 decides); a FIFO or a device never hangs the start."""
    _replace(fresh_tiny_store.extractor().path, kind)
    out = _run(fresh_tiny_store, "extractor")
    assert out.startswith("REFUSED artifact_error") and "not a regular file" in out, out


@pytest.mark.parametrize("kind", [*KINDS, "a header that lies"])
def test_a_feature_cache_entry_that_is_not_a_plain_vector_is_a_miss(kind: str, tmp_path: Path) -> None:
    import numpy as np

    from app.learning.features import FeatureCache

    cache = FeatureCache(tmp_path / "cache", "ab" * 32)
    key = cache.key("0" * 64, 32, "bilinear")
    cache.put(key, np.ones(8, np.float32))
    store = ModelStore(tmp_path / "store")
    assert _run(store, "cache", str(tmp_path / "cache"), key) == "HIT"
    path = cache._path(key)
    if kind == "a header that lies":
        path.write_bytes(path.read_bytes().replace(b"(8,)", b"(9,)"))  # 9 floats declared, 8 stored
    else:
        _replace(path, kind)
    assert _run(store, "cache", str(tmp_path / "cache"), key) == "MISS"
