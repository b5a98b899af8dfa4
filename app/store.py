"""The model store on disk: ``manifest.json`` + the exported extractor + ``heads/`` (see :mod:`app.registry`).

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the
target, so a reader never sees a half-written artifact (even if the writer is killed).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import ArtifactError
from app.hashing import sha256_file

if TYPE_CHECKING:
    from app.registry import HeadStore

MANIFEST = "manifest.json"


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

    @property
    def heads(self) -> HeadStore:
        """The versioned head store under ``heads/`` (its layout is :mod:`app.registry`'s alone)."""
        from app.registry import HeadStore

        return HeadStore(self.heads_dir)
