"""Content hashes: the one place sha256 is computed (artifacts, manifest, feature cache, heads)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
