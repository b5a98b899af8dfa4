"""The labelled-folder rule, once: which files under a root are photos, and of which class.

The same rule reads a folder on disk (:meth:`app.learning.features.Dataset.from_folder`: training, evaluation),
a batch job's source on any pyarrow file system (:func:`app.batch.source.open_source`) and the
archives of a training upload (:mod:`app.learning.uploads`), over each file's path relative to the root:

- a path with a part that starts with ``.`` (``.git/``, ``.DS_Store``, macOS's ``._photo.jpg``) or is
  one of :data:`JUNK_NAMES` (``__MACOSX/``, ``Thumbs.db``, ``desktop.ini``) is not a photo: ignored
  (:func:`ignored`);
- the first folder of a path is its class; files deeper in it count for that class and are counted
  (``nested``), so nothing is silent;
- a file directly in the root belongs to no class (``loose``): training ignores and counts it, a batch
  job classifies it without a class, an upload refuses it (each caller says so in its own words);
- sub-folders named like a split (:data:`SPLIT_NAMES`: ``train``, ``test``, ``val``…), two of them or
  one that holds folders, are a dataset split, not classes: refused by :func:`refuse_split`, naming the
  folders and what to point at instead;
- the canonical order (:func:`order`) is class by class, each class's files by path component, loose
  files last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.core.errors import DatasetError

SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation"})
"""Folder names (any case) that mean "a split of a dataset", not "a class"."""
JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
"""Names an archiver or a file manager leaves behind: never photos, never classes."""

T = TypeVar("T")


def ignored(parts: Sequence[str]) -> bool:
    """A path (its parts, relative to the root) that is hidden or junk somewhere along the way."""
    return any(p.startswith(".") or p in JUNK_NAMES for p in parts)


@dataclass
class Grouped(Generic[T]):
    """Files by class folder, in the order they were given (:func:`group`)."""

    by_class: dict[str, list[T]] = field(default_factory=dict)
    """Class folder → its files (directly in it or deeper)."""
    loose: list[T] = field(default_factory=list)
    """Files directly in the root."""
    nested: dict[str, int] = field(default_factory=dict)
    """Class folder → files below a sub-folder of it (they count for the class)."""
    ignored: int = 0
    """Hidden and junk files left out."""

    @property
    def classes(self) -> list[str]:
        """The class folders that hold files, sorted."""
        return sorted(self.by_class)


def group(items: Iterable[T], parts: Callable[[T], Sequence[str]]) -> Grouped[T]:
    """``items`` (files) by their class folder; ``parts`` gives an item's path parts relative to the root."""
    out: Grouped[T] = Grouped()
    for item in items:
        p = parts(item)
        if not p:
            continue
        if ignored(p):
            out.ignored += 1
        elif len(p) == 1:
            out.loose.append(item)
        else:
            out.by_class.setdefault(p[0], []).append(item)
            if len(p) > 2:
                out.nested[p[0]] = out.nested.get(p[0], 0) + 1
    return out


def order(grouped: Grouped[T], parts: Callable[[T], Sequence[str]]) -> list[T]:
    """The canonical order: class by class (sorted), each class's files by path component; loose files last."""

    def key(item: T) -> tuple[str, ...]:
        return tuple(parts(item))

    return [f for c in grouped.classes for f in sorted(grouped.by_class[c], key=key)] + sorted(grouped.loose, key=key)


def split_folders(folders: Sequence[str], holds_folders: Callable[[str], bool]) -> list[str]:
    """The split-named ``folders`` when they make the root a dataset split (two of them, or one holding
    folders), else ``[]``."""
    split = [f for f in folders if f.lower() in SPLIT_NAMES]
    return split if len(split) >= 2 or any(holds_folders(f) for f in split) else []


def refuse_split(
    where: str, folders: Sequence[str], holds_folders: Callable[[str], bool], fix: Callable[[str, str | None], str]
) -> None:
    """Refuse a root whose class folders are split names; ``fix(train, val)`` says what to do instead."""
    split = split_folders(folders, holds_folders)
    if split:
        train = next((f for f in split if f.lower() == "train"), split[0])
        val = next((f for f in split if f.lower() != train.lower()), None)
        raise DatasetError(
            f"{where} looks like a dataset split, not one folder per class: its sub-folders {split} are split "
            f"names. {fix(train, val)}"
        )
