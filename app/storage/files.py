"""Files of the store, written so no reader ever sees half of one and read so no file can make a reader hang or
allocate past a cap: the one place that opens, locks, writes and reads them (:mod:`app.storage.store`, :mod:`app.storage.registry`,
:mod:`app.storage.examples`, :mod:`app.learning.jobs` and the caches build on it).

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target, so a
reader never sees a half-written artifact (even if the writer is killed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.core.errors import ArtifactError

MAX_JSON_BYTES = 64 * 1024 * 1024
"""Largest JSON file of the store read (a card or job record is a few KiB; an example store's labels ~200 B a photo)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide artifacts from other users


@contextlib.contextmanager
def locked(folder: Path, name: str = ".lock") -> Iterator[None]:
    """An exclusive ``flock`` on ``folder/name`` (made, with ``folder``, when missing) for the block: one
    writer at a time, across the processes and replicas that share the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_regular(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, never more than ``max_bytes``: opened without following a link (``O_NOFOLLOW``) and
    without waiting for a writer (``O_NONBLOCK``), read only if it is a regular file, and read to the cap
    + 1, so a link to ``/dev/zero``, a FIFO or a file growing under us is an :class:`ArtifactError`, never
    a hang or a MemoryError. FileNotFoundError passes through (callers name what is missing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if os.path.islink(path):
            raise ArtifactError(f"{path} is a symbolic link; the store reads regular files only") from None
        raise ArtifactError(f"{path} is unreadable: {type(exc).__name__}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(
                f"{path} is not a regular file (mode {stat.filemode(st.st_mode)}); the store reads regular files only"
            )
        if st.st_size > max_bytes:
            raise ArtifactError(f"{path} is {st.st_size} bytes, over the limit of {max_bytes}")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise ArtifactError(f"{path} grew past the limit of {max_bytes} bytes while it was read")
        return b"".join(chunks)
    except OSError as exc:
        raise ArtifactError(f"{path} is unreadable: {type(exc).__name__}") from None
    finally:
        os.close(fd)


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    try:
        obj = json.loads(read_regular(path, max_bytes))
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} is not a JSON object")
    return obj
