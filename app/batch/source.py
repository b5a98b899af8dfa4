"""Where a batch job reads and writes: a local folder or any URI pyarrow's file systems open.

``s3://bucket/prefix`` (credentials from the environment, as pyarrow's ``S3FileSystem`` reads them),
``gs://…``, ``hdfs://…`` and local paths all become a ``(FileSystem, path)`` pair; only local folders
are tested here. A *labelled* source follows the labelled-folder rule (:mod:`app.core.labelled`, as
:meth:`app.learning.features.Dataset.from_folder` does): at least two class sub-folders; every file under a class
folder is one image of that class (nothing hidden or junk on the way). Files directly in a labelled
source are classified too but have no class (training from the features ignores and counts them, as
training from the folder does). Any other folder is a flat collection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.core import labelled
from app.core.errors import DatasetError

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(file system, path inside it)`` for a local path or a URI (``s3://…``, ``file:///…``)."""
    import pyarrow.fs as pafs

    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


@dataclass(frozen=True)
class Source:
    """The images of one job: ``files`` are paths relative to ``root`` (posix), in a stable order."""

    uri: str
    fs: pafs.FileSystem
    root: str
    files: list[str]
    classes: list[str] | None
    """The class sub-folders when the source is labelled, else ``None``."""

    def full(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def relative(self, full: str) -> str:
        return full[len(self.root) + 1 :] if full.startswith(self.root + "/") else full


def open_source(uri: str) -> Source:
    """List every image under ``uri``; a missing or empty source is refused before any work."""
    import pyarrow.fs as pafs

    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"source {uri} does not exist")
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"source {uri} is not a folder")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    rels = [e.path[len(root) + 1 :] for e in entries if e.type == pafs.FileType.File]
    grouped = labelled.group(rels, _parts)  # hidden and junk files left out (.cache, .git, .DS_Store, __MACOSX)
    classes = grouped.classes if len(grouped.classes) >= 2 else None
    if classes is not None:  # Dataset.from_folder's order: class by class, paths sorted by component; loose files last
        files = labelled.order(grouped, _parts)
    else:
        files = sorted([rel for c in grouped.classes for rel in grouped.by_class[c]] + grouped.loose, key=_parts)
    if not files:
        raise DatasetError(f"source {uri} holds no files")
    return Source(uri, fs, root, files, classes)


def _parts(rel: str) -> list[str]:
    return rel.split("/")
