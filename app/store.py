"""The model store on disk: ``manifest.json`` + the exported extractor + ``heads/<name>/``.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the
target, so a reader never sees a half-written artifact (even if the writer is killed).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ArtifactError, HeadNotFound
from app.hashing import sha256_file

MANIFEST = "manifest.json"
HEAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide artifacts from other users


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


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} is not a JSON object")
    return obj


def valid_head_name(name: str) -> str:
    if not HEAD_NAME.match(name) or ".." in name:
        raise HeadNotFound(f"invalid head name {name[:80]!r}: use letters, digits, '_', '-', '.' (at most 64)")
    return name


@dataclass(frozen=True)
class ExtractorInfo:
    """What the manifest says about the exported extractor."""

    path: Path
    sha256: str
    size: int
    resample: str
    pooling: str
    feature_dim: int
    precision: str
    raw: dict[str, Any]

    @classmethod
    def from_entry(cls, root: Path, entry: dict[str, Any]) -> ExtractorInfo:
        """From a manifest entry (``extractor`` or one of ``variants``); KeyError/ValueError if incomplete."""
        return cls(
            path=root / entry["file"],
            sha256=entry["sha256"],
            size=int(entry["input_size"]),
            resample=entry["resample"],
            pooling=entry["pooling"],
            feature_dim=int(entry["feature_dim"]),
            precision=entry.get("precision", "fp32"),
            raw=entry,
        )

    @property
    def fingerprint(self) -> str:
        return self.sha256[:12]

    @property
    def feature_space(self) -> str:
        """The sha256 of the extractor whose features this one reproduces (itself, unless a quantized
        variant was measured to agree with its fp32 parent and says so in the manifest)."""
        return str(self.raw.get("feature_space") or self.sha256)


@dataclass(frozen=True)
class ModelStore:
    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def heads_dir(self) -> Path:
        return self.root / "heads"

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    def extractor(self, verify: bool = True) -> ExtractorInfo:
        """The exported extractor; with ``verify`` its sha256 is checked against the manifest."""
        if not self.manifest_path.exists():
            raise ArtifactError(f"no {self.manifest_path}: run `tlserve export` first")
        entry = read_json(self.manifest_path).get("extractor")
        if not isinstance(entry, dict):
            raise ArtifactError(f"{self.manifest_path} has no extractor entry")
        try:
            info = ExtractorInfo.from_entry(self.root, entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{self.manifest_path}: bad extractor entry ({exc})") from None
        if not info.path.exists():
            raise ArtifactError(f"{info.path} is missing: run `tlserve export`")
        if verify:
            actual = sha256_file(info.path)
            if actual != info.sha256:
                raise ArtifactError(f"{info.path} has sha256 {actual[:12]}…, the manifest says {info.sha256[:12]}…")
        return info

    def head_dir(self, name: str) -> Path:
        return self.heads_dir / valid_head_name(name)

    def head_names(self) -> list[str]:
        if not self.heads_dir.is_dir():
            return []
        return sorted(p.name for p in self.heads_dir.iterdir() if (p / "card.json").exists() and HEAD_NAME.match(p.name))
