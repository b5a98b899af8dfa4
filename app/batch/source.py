"""Where a batch job reads and writes: a local folder or any URI pyarrow's file systems open.

``s3://bucket/prefix`` (credentials from the environment, as pyarrow's ``S3FileSystem`` reads them),
``gs://…``, ``hdfs://…`` and local paths all become a ``(FileSystem, path)`` pair; only local folders
are tested here. A *labelled* source follows :meth:`app.features.Dataset.from_folder`'s rule: at
least two class sub-folders (not hidden); every file under a class folder is one image of that class
(nothing hidden: no name on the way starting with "."). Files directly in a labelled source are
classified too but have no class (training from the features ignores and counts them, as training
from the folder does). Any other folder is a flat collection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import DatasetError

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
    files = []
    for e in entries:
        rel = e.path[len(root) + 1 :]
        if e.type != pafs.FileType.File or any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files and folders (.cache, .git, .DS_Store)
        files.append(rel)
    if not files:
        raise DatasetError(f"source {uri} holds no files")
    top_dirs = sorted({rel.split("/", 1)[0] for rel in files if "/" in rel})
    classes = top_dirs if len(top_dirs) >= 2 else None
    if classes is not None:  # Dataset.from_folder's order: class by class, paths sorted by component; loose files last
        order = {c: i for i, c in enumerate(classes)}
        files.sort(key=lambda rel: (order[rel.split("/", 1)[0]] if "/" in rel else len(order), rel.split("/")))
    else:
        files.sort(key=lambda rel: rel.split("/"))
    return Source(uri, fs, root, files, classes)
