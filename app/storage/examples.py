"""A head's example store: every labelled photo uploaded for it, content-addressed, and its fixed validation set.

Layout, in the shared store next to the head's versions (where: :meth:`app.storage.registry.HeadStore.examples_dir`)::

    model_store/heads/<name>/examples/
        objects/<sha[:2]>/<sha256>   the photo's bytes, named by their sha256 (the same bytes are stored once)
        labels.json                  {"examples": {sha256: {"label", "name" (as uploaded), "added_at"}}}
        validation.json              the fixed validation set: {"sha256": [...], "val_fraction", "seed", "chosen_at"}
        .lock                        flock'ed while the two JSON files change

- **Deduplicated**: a photo already stored is a ``duplicate``; sent again under another label it is
  *relabelled* (a correction: the newest label wins). The same bytes under two labels in one upload
  are refused, naming both files.
- **The fixed validation set** is chosen once, at the head's first training over HTTP (stratified:
  ``val_fraction`` of each class, at least one photo, seed 42) and reused by every later training
  and by ``compare``, so two versions are scored on the same photos. Its photos never train a version.
  A class added later has no validation photos (its report rows count 0 until the set is re-chosen,
  which needs a new head).
- Every change happens under the lock and is written atomically (``labels.json``/``validation.json``
  replaced, objects renamed into place), so replicas sharing the store see one consistent state.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.core.errors import ArtifactError, DatasetError, InvalidLabel
from app.core.hashing import sha256_file
from app.core.names import HEAD_NAME, valid_head_name
from app.core.recipe import MIN_IMAGES_PER_CLASS, SEED
from app.storage.files import atomic_write, locked, read_json, write_json
from app.storage.registry import HeadStore

OBJECTS = "objects"
LABELS = "labels.json"
VALIDATION = "validation.json"


def valid_label(label: str, where: str) -> str:
    """A class label is named like a head (it becomes a folder name, a card entry, a metrics label)."""
    if not HEAD_NAME.fullmatch(label) or ".." in label:
        raise InvalidLabel(
            f"invalid class label {label[:80]!r} ({where}): use letters, digits, '_', '-', '.' (at most 64, not starting with '.')"
        )
    return label


@dataclass(frozen=True)
class Example:
    sha256: str
    label: str
    name: str
    added_at: str | None = None


@dataclass(frozen=True)
class Incoming:
    """A photo to add: a spooled file (moved into the store), its label, the name it was uploaded as."""

    path: Path
    label: str
    name: str


@dataclass
class Snapshot:
    """The store as one change left it: every example, the validation set, what this change brought."""

    examples: dict[str, Example]
    validation: list[str] | None
    upload: list[str]  # sha256 of this change's photos, in order (duplicates included)
    added: int = 0
    duplicates: int = 0
    relabelled: int = 0
    validation_chosen: bool = False
    validation_info: dict[str, Any] | None = None

    def counts(self, shas: Sequence[str] | None = None) -> dict[str, int]:
        keys = self.examples if shas is None else shas
        return dict(sorted(Counter(self.examples[s].label for s in keys if s in self.examples).items()))


class ExampleStore:
    """The example store of one head (see the module docstring)."""

    def __init__(self, heads: HeadStore, head: str) -> None:
        self.head = valid_head_name(head)
        self.folder = heads.examples_dir(self.head)

    def path(self, sha: str) -> Path:
        return self.folder / OBJECTS / sha[:2] / sha

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.folder)

    # --- reading ---------------------------------------------------------------------------
    def _read_labels(self) -> dict[str, Example]:
        path = self.folder / LABELS
        if not path.exists():
            return {}
        doc = read_json(path).get("examples")
        if not isinstance(doc, dict):
            raise ArtifactError(f"head {self.head!r}: {LABELS} has no examples map")
        return {sha: Example(sha, str(e["label"]), str(e.get("name", "")), e.get("added_at")) for sha, e in doc.items()}

    def _read_validation(self) -> tuple[list[str] | None, dict[str, Any] | None]:
        path = self.folder / VALIDATION
        if not path.exists():
            return None, None
        doc = read_json(path)
        return [str(s) for s in doc.get("sha256", [])], {k: v for k, v in doc.items() if k != "sha256"}

    def snapshot(self) -> Snapshot:
        validation, info = self._read_validation()
        return Snapshot(self._read_labels(), validation, [], validation_info=info)

    # --- writing ---------------------------------------------------------------------------
    def add(self, photos: Sequence[Incoming], *, choose_validation: float | None = None,
            check: Callable[[Snapshot], None] | None = None) -> Snapshot:  # fmt: skip
        """Add ``photos`` (their spooled files are moved into the store). With ``choose_validation`` (a
        fraction) and no validation set yet, choose it. ``check`` sees the resulting snapshot first and may
        raise: then nothing is written."""
        shas = [sha256_file(p.path) for p in photos]  # before the lock: hashing is the slow part
        first: dict[str, Incoming] = {}
        for sha, photo in zip(shas, photos, strict=True):
            seen = first.setdefault(sha, photo)
            if seen.label != photo.label:
                raise DatasetError(
                    f"the same photo is labelled {seen.label!r} ({seen.name}) and {photo.label!r} ({photo.name}) in this "
                    "upload: keep one"
                )
        if check is not None:  # first without the lock (nothing created when it refuses), then again under it
            check(self._merge(shas, first, choose_validation)[0])
        with self._locked():
            snap, new = self._merge(shas, first, choose_validation)
            if check is not None:
                check(snap)
            for sha, photo in new.items():
                _move(photo.path, self.path(sha))
            if new or snap.relabelled:
                write_json(self.folder / LABELS, {"examples": {
                    sha: {"label": e.label, "name": e.name, "added_at": e.added_at}
                    for sha, e in sorted(snap.examples.items())}})  # fmt: skip
            if snap.validation_chosen and snap.validation is not None:
                write_json(self.folder / VALIDATION, {**(snap.validation_info or {}), "sha256": snap.validation})
        return snap

    def _merge(
        self, shas: list[str], first: dict[str, Incoming], choose_validation: float | None
    ) -> tuple[Snapshot, dict[str, Incoming]]:
        """The snapshot adding ``first`` would make, and which of its photos are new (nothing written)."""
        examples = self._read_labels()
        validation, info = self._read_validation()
        snap = Snapshot(dict(examples), validation, shas, validation_info=info)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        new: dict[str, Incoming] = {}
        for sha, photo in first.items():
            old = examples.get(sha)
            if old is None:
                new[sha] = photo
                snap.added += 1
                snap.examples[sha] = Example(sha, photo.label, photo.name, now)
            else:
                snap.duplicates += 1
                snap.relabelled += old.label != photo.label
                snap.examples[sha] = Example(sha, photo.label, old.name, old.added_at)
        snap.duplicates += len(shas) - len(first)  # repeats within this upload
        if choose_validation is not None and snap.validation is None:
            snap.validation = stratified_choice(snap.examples, choose_validation)
            snap.validation_info = {"val_fraction": choose_validation, "seed": SEED, "chosen_at": now}
            snap.validation_chosen = True
        return snap, new

    def delete(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _move(src: Path, dst: Path) -> None:
    """Into the store atomically: a rename on one file system, else a copy that is renamed into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:
        atomic_write(dst, src.read_bytes())


def stratified_choice(examples: dict[str, Example], fraction: float, seed: int = SEED) -> list[str]:
    """``fraction`` of each class (at least one), leaving at least :data:`MIN_IMAGES_PER_CLASS` to train on;
    a class with fewer photos than that plus one gets none. Deterministic: the class's sha256s, sorted,
    permuted by ``seed``."""
    by_label: dict[str, list[str]] = {}
    for sha, e in sorted(examples.items()):
        by_label.setdefault(e.label, []).append(sha)
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for label in sorted(by_label):
        shas = by_label[label]
        k = min(max(1, math.ceil(fraction * len(shas))), len(shas) - MIN_IMAGES_PER_CLASS)
        if k > 0:
            chosen += [shas[int(i)] for i in rng.permutation(len(shas))[:k]]
    return sorted(chosen)
