"""Features for folders of images: parallel decode, batched extraction, an on-disk cache.

The cache key is (extractor sha256, image content sha256): renaming or moving a file costs
nothing, a second run over the same images does no model work, and a new extractor never
reads another extractor's features.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.errors import InputError
from app.extractor import Extractor
from app.imaging import is_image_file, load_image
from app.settings import DEFAULT_MAX_IMAGE_PIXELS
from app.store import atomic_write

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """A labelled folder: one sub-folder per class."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray

    @classmethod
    def from_folder(cls, root: Path, classes: Sequence[str] | None = None) -> Dataset:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = list(classes) if classes is not None else found
        if len(classes) < 2:
            raise ValueError(f"{root} needs at least two class sub-folders, found {found}")
        paths, labels = [], []
        for i, name in enumerate(classes):
            folder = root / name
            files = sorted(p for p in folder.rglob("*") if is_image_file(p)) if folder.is_dir() else []
            paths += files
            labels += [i] * len(files)
        return cls(root, classes, paths, np.asarray(labels, dtype=np.int64))


@dataclass
class Extracted:
    features: np.ndarray  # [n_ok, D]
    kept: np.ndarray  # indices into the input paths that gave features
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    cache_hits: int = 0


class FeatureCache:
    def __init__(self, root: Path, extractor_sha: str) -> None:
        self.dir = Path(root) / extractor_sha[:16]

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        try:
            return np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError):
            return None

    def put(self, key: str, vec: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, vec.astype(np.float32), allow_pickle=False)
        atomic_write(self._path(key), buf.getvalue())


def _load(path: Path, size: int, resample: str, max_pixels: int) -> tuple[str, np.ndarray | str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return "", f"unreadable: {exc.strerror or type(exc).__name__}"
    key = hashlib.sha256(data).hexdigest()
    try:
        return key, load_image(data, size, resample=resample, max_pixels=max_pixels)
    except InputError as exc:
        return key, exc.message


def extract_paths(
    paths: Sequence[Path],
    extractor: Extractor,
    *,
    resample: str,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    decode_threads: int = 2,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = True,
) -> Extracted:
    """Features for ``paths``; unreadable images are skipped and reported, never fatal."""
    from tqdm import tqdm

    size = extractor.size
    feats: dict[int, np.ndarray] = {}
    skipped: list[tuple[Path, str]] = []
    hits = 0
    bar = tqdm(total=len(paths), unit="img", disable=not progress, desc="features", smoothing=0.1)
    with ThreadPoolExecutor(max_workers=max(1, decode_threads)) as pool:
        loaded = pool.map(lambda p: _load(p, size, resample, max_pixels), paths)
        for chunk in _chunks(enumerate(loaded), batch_size):
            todo: list[tuple[int, str, np.ndarray]] = []
            for i, (key, result) in chunk:
                if isinstance(result, str):
                    skipped.append((paths[i], result))
                    continue
                cached = cache.get(key) if cache else None
                if cached is not None and cached.shape == (extractor.feature_dim,):
                    feats[i] = cached
                    hits += 1
                else:
                    todo.append((i, key, result))
            if todo:
                out = extractor.run(np.stack([img for _, _, img in todo]))
                for (i, key, _), vec in zip(todo, out, strict=True):
                    feats[i] = vec
                    if cache:
                        cache.put(key, vec)
            bar.update(len(chunk))
    bar.close()
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    kept = np.array(sorted(feats), dtype=np.int64)
    dim = extractor.feature_dim
    features = np.stack([feats[i] for i in kept]) if len(kept) else np.zeros((0, dim), np.float32)
    return Extracted(features, kept, skipped, hits)


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    chunk: list = []
    for item in it:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
