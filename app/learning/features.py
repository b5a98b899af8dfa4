"""Labelled image folders and their features: checked before any work, cached by the file's bytes.

1. :meth:`Dataset.from_folder` walks ``DATA_DIR/<class>/…`` by the labelled-folder rule
   (:mod:`app.core.labelled`, shared with batch sources and upload archives) and refuses, before any image
   is read, a folder that is not one sub-folder per class: a missing folder, an empty class folder, a
   class with too few files, sub-folders that look like a split (``train``/``test``/``val``…), and (for
   evaluation) class folders that differ from the head's classes. Images in sub-folders of a class
   folder belong to that class; they are counted per class (``nested``) so nothing is silent.
2. :func:`hash_files` reads every file once for its sha256 (content identity: duplicates across
   classes or between training and validation are found by it, see :func:`find_duplicates`).
3. :func:`extract_paths` looks each file up in the :class:`FeatureCache` *before* decoding: a hit
   costs one small ``.npy`` read; misses are decoded in a bounded thread pool while ONNX Runtime
   runs the previous batch.

Cache entries are keyed by sha256(extractor sha256, file sha256, input size, resample): renaming a
file costs nothing, and a change of extractor or of a loader setting that changes pixels is a miss.
Each extractor has its own cache folder, which records whose features it holds; features of
another extractor are refused (:class:`~app.core.errors.IncompatibleFeatures`), never mixed in. This
module is the one place that guard lives.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.core import labelled
from app.core.errors import ArtifactError, DatasetError, IncompatibleFeatures, InputError
from app.core.hashing import sha256_bytes
from app.core.imaging import DEFAULT_LIMITS, DecodeLimits
from app.core.progress import Meter, ProgressCallback, console, no_progress
from app.serving.extractor import Extractor
from app.storage.files import atomic_write, read_regular
from app.storage.heads import from_npy

log = logging.getLogger(__name__)

_MAX_NPY_HEADER = 4096  # np.save writes 128 bytes for a 1-d float32 vector


@dataclass
class Dataset:
    """A labelled folder: one sub-folder per class (``labels`` index ``classes``)."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    nested: dict[str, int] = field(default_factory=dict)  # class → files found below sub-folders of its folder
    loose: int = 0  # files directly in ``root`` (not in a class folder): ignored, counted

    @classmethod
    def from_folder(cls, root: Path, classes: Sequence[str] | None = None, *, allow_subset: bool = False,
                    min_per_class: int = 1, what: str = "DATA_DIR") -> Dataset:  # fmt: skip
        """Scan ``root`` by the labelled-folder rule (:mod:`app.core.labelled`). With ``classes`` (a head's), the
        class folders must be exactly those (``allow_subset``: some may be missing); ``what`` names the
        folder in messages."""
        root = Path(root)
        if not root.exists():
            raise DatasetError(f"{what} {root} does not exist")
        if not root.is_dir():
            raise DatasetError(f"{what} {root} is not a folder")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not labelled.ignored((p.name,)))
        walk = [p for p in root.iterdir() if p.is_file()] + [p for d in found for p in (root / d).rglob("*") if p.is_file()]
        files = labelled.group(walk, lambda p: p.relative_to(root).parts)  # a class folder may be a link: walked
        loose = len(files.loose)
        labelled.refuse_split(f"{what} {root}", found, lambda f: _holds_folders(root / f), lambda train, val: (
            f"Point at the folder that holds the class folders, e.g. `tlserve train {root / train}"
            + (f" --val-dir {root / val}`" if val else "`")))  # fmt: skip
        if classes is None:
            if len(found) < 2:
                hint = f"; it holds {loose} file(s) directly: put each class's images in its own sub-folder" if loose else ""
                raise DatasetError(f"{what} {root} needs at least two class sub-folders, found {found or 'none'}{hint}")
            classes, present = list(found), list(found)
        else:
            classes = list(classes)
            present = _match_classes(root, found, classes, allow_subset, what)
        paths: list[Path] = []
        labels: list[int] = []
        for name in present:
            folder = root / name
            in_class = sorted(files.by_class.get(name, []))
            if not in_class:
                raise DatasetError(f"class {name!r} has no files (folder {folder})")
            if len(in_class) < min_per_class:
                raise DatasetError(
                    f"class {name!r} has {len(in_class)} file(s) (folder {folder}); every class needs at least {min_per_class}"
                )
            paths += in_class
            labels += [classes.index(name)] * len(in_class)
        nested = {name: files.nested[name] for name in present if name in files.nested}
        return cls(root, classes, paths, np.asarray(labels, dtype=np.int64), nested, loose)

    def subset(self, idx: np.ndarray) -> Dataset:
        paths = [self.paths[int(i)] for i in idx]
        labels = self.labels[np.asarray(idx, dtype=np.int64)]
        nested = Counter(self.classes[k] for p, k in zip(paths, labels, strict=True) if p.parent != self.folder(int(k)))
        return Dataset(self.root, self.classes, paths, labels, dict(nested), self.loose)

    def folder(self, label: int) -> Path:
        return self.root / self.classes[label]

    def relative(self, i: int) -> str:
        return self.paths[i].relative_to(self.root).as_posix()


def hidden(path: Path, base: Path) -> bool:
    """A dot-file, junk, or anything in a dot-folder under ``base`` (the parts above ``base``, such as ``..``, do
    not count): :func:`app.core.labelled.ignored`."""
    return labelled.ignored(path.relative_to(base).parts)


def _holds_folders(folder: Path) -> bool:
    return any(p.is_dir() and not labelled.ignored((p.name,)) for p in folder.iterdir())


def _match_classes(root: Path, found: list[str], classes: list[str], allow_subset: bool, what: str) -> list[str]:
    """The class folders of ``root`` against a head's classes (exact, case included)."""
    unknown = [f for f in found if f not in classes]
    missing = [c for c in classes if c not in found]
    if unknown or (missing and not allow_subset):
        lower = {c.lower(): c for c in classes}
        case = [f"{f!r} vs {lower[f.lower()]!r}" for f in unknown if f.lower() in lower]
        parts = [f"the class folders of {what} {root} do not match the head's classes",
                 f"folders: {found}", f"head's classes: {classes}"]  # fmt: skip
        if unknown:
            parts.append(f"unknown folders: {unknown}" + (f" (differ only in case: {', '.join(case)})" if case else ""))
        if missing:
            parts.append(f"missing classes: {missing}" + ("" if allow_subset else " (--allow-subset accepts missing ones)"))
        raise DatasetError("; ".join(parts))
    if not found:
        raise DatasetError(f"{what} {root} has no class sub-folders (the head's classes: {classes})")
    return [c for c in classes if c in found]


# --- content hashes and duplicates -----------------------------------------------------------
def hash_files(paths: Sequence[Path], threads: int = 2) -> tuple[list[str | None], dict[int, str]]:
    """sha256 of each file's bytes (``None`` where it cannot be read) and why each unreadable one failed."""

    def one(path: Path) -> str:
        return sha256_bytes(path.read_bytes())

    hashes: list[str | None] = [None] * len(paths)
    errors: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = [pool.submit(one, p) for p in paths]
        for i, fut in enumerate(futures):
            try:
                hashes[i] = fut.result()
            except OSError as exc:
                errors[i] = f"unreadable: {exc.strerror or type(exc).__name__}"
    return hashes, errors


@dataclass(frozen=True)
class Duplicate:
    """The same bytes at several places: ``files`` as (where, relative path, class)."""

    sha256: str
    files: tuple[tuple[str, str, str], ...]

    @property
    def kind(self) -> str:
        wheres = {w for w, _, _ in self.files}
        if len(wheres) > 1:
            return "training and validation"
        return "classes" if len({c for _, _, c in self.files}) > 1 else "same class"

    def describe(self) -> str:
        classes = sorted({c for _, _, c in self.files})
        what = {"classes": f"under classes {' and '.join(map(repr, classes))}",
                "training and validation": "in both the training and the validation folder",
                "same class": f"twice in class {classes[0]!r}"}[self.kind]  # fmt: skip
        return f"same image {what}: " + ", ".join(f"{w}:{p}" for w, p, _ in self.files)

    def as_dict(self) -> dict[str, object]:
        return {"sha256": self.sha256, "kind": self.kind, "files": [{"in": w, "path": p, "class": c} for w, p, c in self.files]}


def find_duplicates(sets: Sequence[tuple[str, Dataset, Sequence[str | None]]]) -> list[Duplicate]:
    """Files with identical bytes, within and across ``(where, dataset, hashes)`` sets."""
    seen: dict[str, list[tuple[str, str, str]]] = {}
    for where, data, hashes in sets:
        for i, h in enumerate(hashes):
            if h is not None:
                seen.setdefault(h, []).append((where, data.relative(i), data.classes[data.labels[i]]))
    return [Duplicate(h, tuple(files)) for h, files in seen.items() if len(files) > 1]


# --- the cache -------------------------------------------------------------------------------
class FeatureCache:
    """Feature vectors on disk, one ``.npy`` per (extractor, file bytes, loader settings)."""

    OWNER = "extractor.json"

    def __init__(self, root: Path, extractor_sha: str) -> None:
        self.extractor_sha = extractor_sha
        self.dir = Path(root) / extractor_sha[:16]
        owner = self._owner()
        if owner is not None and owner != extractor_sha:
            raise IncompatibleFeatures(
                f"feature cache {self.dir} holds features of extractor {owner[:12]}, not of the loaded extractor "
                f"{extractor_sha[:12]}; features of two extractors are never mixed: remove it or set TLSERVE_FEATURE_CACHE_DIR"
            )

    def _owner(self) -> str | None:
        try:
            return str(json.loads((self.dir / self.OWNER).read_text())["sha256"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return "an unreadable extractor.json"

    def check(self, extractor: Extractor) -> None:
        """Refuse to serve ``extractor`` features cached for another one (both named)."""
        if extractor.sha256 and extractor.sha256 != self.extractor_sha:
            raise IncompatibleFeatures(
                f"feature cache {self.dir} is for extractor {self.extractor_sha[:12]}, the features asked for are of "
                f"extractor {extractor.sha256[:12]}; features of two extractors are never mixed"
            )

    def key(self, file_sha: str, size: int, resample: str) -> str:
        return sha256_bytes(f"{self.extractor_sha}\n{file_sha}\n{size}\n{resample}".encode())

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str, dim: int) -> np.ndarray | None:
        """The cached vector, or None (a miss) for anything else: absent, a link, a FIFO, over the size a
        ``dim`` float32 vector takes, a header that lies about its shape or dtype."""
        try:
            data = read_regular(self._path(key), _MAX_NPY_HEADER + 4 * dim)
            vec = from_npy(data, "feature cache", key[:12], (dim,))
        except (OSError, ArtifactError):
            return None
        return vec if vec.dtype == np.float32 else None

    def put(self, key: str, vec: np.ndarray) -> None:
        if not (self.dir / self.OWNER).exists():
            atomic_write(self.dir / self.OWNER, json.dumps({"sha256": self.extractor_sha}).encode())
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(vec, dtype=np.float32), allow_pickle=False)
        atomic_write(self._path(key), buf.getvalue())


# --- extraction ------------------------------------------------------------------------------
@dataclass
class Extracted:
    features: np.ndarray  # [n_ok, D]
    kept: np.ndarray  # indices into the input paths that gave features
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    cache_hits: int = 0
    hashes: list[str | None] = field(default_factory=list)  # sha256 of each input file's bytes


def _decode(path: Path, size: int, resample: str, limits: DecodeLimits) -> np.ndarray | str:
    try:
        return limits.load(path.read_bytes(), size, resample)
    except OSError as exc:
        return f"unreadable: {exc.strerror or type(exc).__name__}"
    except InputError as exc:
        return exc.message


def check_readable(data: Dataset, hashes: Sequence[str | None], read_errors: dict[int, str], cache: FeatureCache | None,
                   size: int, resample: str, *, minimum: int = 2, limits: DecodeLimits = DEFAULT_LIMITS,
                   what: str = "DATA_DIR") -> None:  # fmt: skip
    """Every class has ``minimum`` readable images, checked before extraction: a cached file counts
    without decoding, others are decoded until ``minimum`` succeed (a few decodes per class)."""
    for label, name in enumerate(data.classes):
        idx = [int(i) for i in np.flatnonzero(data.labels == label)]
        if not len(idx):
            continue
        ok, bad = 0, []
        for i in idx:
            h = hashes[i]
            if h is None:
                bad.append(f"{data.relative(i)}: {read_errors.get(i, 'unreadable')}")
                continue
            if cache is not None and cache.has(cache.key(h, size, resample)):
                ok += 1
            elif isinstance(reason := _decode(data.paths[i], size, resample, limits), str):
                bad.append(f"{data.relative(i)}: {reason}")
            else:
                ok += 1
            if ok >= minimum:
                break
        if ok < minimum:
            raise DatasetError(
                f"class {name!r} in {what} has {ok} readable image(s) (folder {data.folder(label)}); at least {minimum} "
                f"needed. Unreadable: {'; '.join(bad[:10])}" + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "")
            )


def extract_paths(
    paths: Sequence[Path],
    extractor: Extractor,
    *,
    resample: str,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    decode_threads: int = 2,
    limits: DecodeLimits = DEFAULT_LIMITS,
    progress: ProgressCallback | bool = True,
    phase: str = "features",
    hashes: tuple[list[str | None], dict[int, str]] | None = None,
) -> Extracted:
    """Features for ``paths``; unreadable images are skipped and returned (never logged here: the
    caller reports each once), never fatal. ``hashes`` (from :func:`hash_files`) saves a re-read."""
    report: ProgressCallback = progress if callable(progress) else (console() if progress else no_progress)
    if cache is not None:
        cache.check(extractor)
    size, dim = extractor.size, extractor.feature_dim
    keys, read_errors = hashes if hashes is not None else hash_files(paths, decode_threads)
    feats: dict[int, np.ndarray] = {}
    reasons: dict[int, str] = dict(read_errors)
    meter = Meter(report, phase, len(paths))
    misses: list[int] = []
    for i, h in enumerate(keys):
        if h is None:
            continue
        vec = cache.get(cache.key(h, size, resample), dim) if cache is not None else None
        if vec is None:
            misses.append(i)
        else:
            feats[i] = vec
    hits = len(feats)
    meter.advance(hits + len(reasons))

    def run(batch: list[tuple[int, np.ndarray]]) -> None:
        out = extractor.run(np.stack([img for _, img in batch]))
        for (i, _), vec in zip(batch, out, strict=True):
            feats[i] = vec
            if cache is not None:
                cache.put(cache.key(keys[i] or "", size, resample), vec)
        meter.advance(len(batch))

    _pipeline(misses, lambda i: _decode(paths[i], size, resample, limits), run, reasons, meter,
              batch_size=batch_size, threads=decode_threads)  # fmt: skip
    meter.finish()
    kept = np.array(sorted(feats), dtype=np.int64)
    features = np.stack([feats[i] for i in kept]) if len(kept) else np.zeros((0, dim), np.float32)
    skipped = [(paths[i], reasons[i]) for i in sorted(reasons)]
    return Extracted(features, kept, skipped, hits, list(keys))


def _pipeline(todo: list[int], decode: Callable[[int], np.ndarray | str], run: Callable[[list[tuple[int, np.ndarray]]], None],
              reasons: dict[int, str], meter: Meter, *, batch_size: int, threads: int) -> None:  # fmt: skip
    """Decode ``todo`` in a thread pool (at most two batches ahead) while ``run`` infers full batches."""
    if not todo:
        return
    ahead = 2 * batch_size
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode") as pool:
        pending: deque[tuple[int, Future[np.ndarray | str]]] = deque()
        upcoming = iter(todo)

        def fill() -> None:
            while len(pending) < ahead and (i := next(upcoming, None)) is not None:
                pending.append((i, pool.submit(decode, i)))

        fill()
        batch: list[tuple[int, np.ndarray]] = []
        while pending:
            i, fut = pending.popleft()
            fill()
            result = fut.result()
            if isinstance(result, str):
                reasons[i] = result
                meter.advance(1)
                continue
            batch.append((i, result))
            if len(batch) == batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
