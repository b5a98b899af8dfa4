"""Training uploads: labelled photos streamed to a spool folder on disk, bounded, hostile until checked.

``POST /v1/heads/{name}/train`` and ``/examples`` send ``multipart/form-data``: every file part's field
name is its class label, a file part named ``archive`` is a zip or tar (``.tar``, ``.tar.gz``, ``.tgz``,
bz2, xz) of class folders, and a few text fields are options. The HTTP side, step 1, is
:func:`app.api.uploads.receive` (it parses the body and spools each part through :meth:`Upload.photo` /
:meth:`Upload.archive`); this module holds the rest, and knows no HTTP: :func:`admit` runs steps 2-4 on
what was spooled.

1. **Streamed to disk**, never held in memory: each file part is written to ``<spool>/<upload id>/``
   as it arrives. Bounded while it streams: ``max_training_bytes`` of body (413 ``body_too_large``),
   ``max_training_images`` photos (413 ``too_many_images``), a label is checked when its part's headers
   arrive (422 ``invalid_label``), before any of its bytes are written.
2. **Archives are checked from their headers before one byte is extracted** (:func:`check_archive`):
   every member name is relative and stays inside (no absolute path, no drive, no ``..``, no
   backslash: 422 ``unsafe_archive`` naming the member), only regular files and folders (no symlink,
   hard link, device, fifo: 422 ``unsafe_archive``), at most ``max_archive_members`` members, at most
   ``max_archive_bytes`` uncompressed in all the upload's archives, and no archive or zip member
   expanding more than ``max_archive_ratio`` times (413 ``archive_too_large``). Encrypted zip
   members are refused. What the archive libraries would read into memory is budgeted from the raw
   bytes first (``max_archive_header_bytes``, 413 ``archive_too_large``): a zip's central directory
   size and entry count are read from its end records and walked before ``zipfile`` builds one
   ``ZipInfo``; a tar member's GNU long-name/long-link and pax headers are checked by their declared
   sizes before ``tarfile`` reads them (a 939-byte ``.tar.bz2`` declaring a 1 GiB name is refused
   without inflating it), and GNU sparse members are refused. Extraction then writes each member's bytes to a spool file of *our* naming
   (``a<k>-<n>``), never to the member's path, and stops at the size its header declared.
3. **Layout**, by the labelled-folder rule of folders and batch sources (:mod:`app.core.labelled`):
   ``<class>/<photo>`` (deeper files count for their class folder; one folder wrapping all class
   folders is unwrapped); hidden files, ``__MACOSX/``, ``Thumbs.db``, ``desktop.ini`` are ignored; a
   file outside any class folder, or split folders (``train/``, ``val/``…) in place of classes, are
   refused (422 ``invalid_dataset``). Class labels are
   validated like head names (letters, digits, ``_ - .``, at most 64).
4. **Photos**: each must be a non-empty file whose bytes Pillow recognises as an allowed format
   (sniffed from the header, nothing decoded: 415 ``unsupported_format`` / 422 ``empty_input``
   naming the files). Decoding, with :func:`app.core.imaging.load_image` and its limits (pixels, formats),
   happens in the training job, which skips a photo that fails it and reports it by name.

The spool folder is removed when the request ends (:func:`spool`), whatever happened; folders left by
a killed process are swept when older than :data:`SPOOL_MAX_AGE_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import lzma
import re
import shutil
import stat
import struct
import tarfile
import time
import uuid
import warnings
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from app.core import labelled
from app.core.errors import (
    ArchiveTooLarge,
    DatasetError,
    EmptyInput,
    MalformedRequest,
    TooManyImages,
    UnsafeArchive,
    UnsupportedFormat,
)
from app.core.settings import Settings
from app.storage.examples import valid_label

ARCHIVE_FIELD = "archive"
OPTION_FIELDS = ("c", "val_fraction", "promote", "use_examples")
MAX_OPTION_BYTES = 1024
MAX_ARCHIVES = 16
RATIO_FLOOR_BYTES = 1024 * 1024
"""The compression-ratio bound applies to archives and zip members expanding to at least this much
(a small PNG or a tar's headers may legitimately compress far)."""
SPOOL_MAX_AGE_S = 3600.0
"""A spool folder this old belongs to no request still running (a process killed mid-upload): swept."""
_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1024 * 1024
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError,
            NotImplementedError, RuntimeError)  # fmt: skip
"""What reading a corrupt or exotic archive raises (compressed streams, unknown zip methods): a 422, never a 500."""


@dataclass(frozen=True)
class Photo:
    """One uploaded photo, spooled: ``name`` is what the client called it (file name or archive member)."""

    path: Path
    label: str
    name: str


@dataclass
class Upload:
    """One upload being spooled into ``folder``: its photos, archives (``(path, name)``, unpacked by
    :func:`admit`) and options; the spool's files are named by us, never by the client."""

    folder: Path
    photos: list[Photo] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    ignored: int = 0  # hidden or junk archive members
    archives: list[tuple[Path, str]] = field(default_factory=list)

    def photo(self, label: str, filename: str, settings: Settings) -> Path:
        """Where a photo part labelled ``label`` is spooled: the label and ``max_training_images`` checked first."""
        valid_label(label, f"field name of file {filename[:80]!r}")
        limit = settings.max_training_images
        if len(self.photos) >= limit:
            raise TooManyImages(f"more than {limit} photos in one upload (max_training_images)")
        path = self.folder / f"p-{len(self.photos)}"
        self.photos.append(Photo(path, label, filename or label))
        return path

    def archive(self, filename: str) -> Path:
        """Where an archive part is spooled (at most :data:`MAX_ARCHIVES` an upload)."""
        if len(self.archives) >= MAX_ARCHIVES:
            raise TooManyImages(f"more than {MAX_ARCHIVES} archives in one upload")
        path = self.folder / f"archive-{len(self.archives)}"
        self.archives.append((path, filename))
        return path


def admit(upload: Upload, settings: Settings) -> Upload:
    """Steps 2-4 on a spooled upload: its archives checked from their headers and unpacked, then every photo
    checked by its header. Blocking (file I/O): a request runs it in a worker thread."""
    if upload.archives:
        _unpack_all(upload, upload.archives, settings)
    check_photos(upload.photos, settings.formats)
    return upload


# --- the spool -------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def spool(settings: Settings) -> AsyncIterator[Path]:
    """A fresh folder for one upload under the spool root, removed when the request ends."""
    root = settings.spool
    await asyncio.to_thread(sweep, root)
    folder = root / uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        await asyncio.to_thread(shutil.rmtree, folder, True)


def sweep(root: Path, max_age_s: float = SPOOL_MAX_AGE_S) -> int:
    """Remove spool folders older than ``max_age_s`` (left by a process killed mid-upload)."""
    removed, cutoff = 0, time.time() - max_age_s
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    removed += 1
    return removed


# --- archives --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    """A regular file of an archive, by its checked relative path."""

    parts: tuple[str, ...]
    size: int
    key: zipfile.ZipInfo | tarfile.TarInfo

    @property
    def name(self) -> str:
        return "/".join(self.parts)


def _member_parts(name: str, archive: str) -> tuple[str, ...]:
    where = f"archive {archive!r}: member {name[:120]!r}"
    if "\x00" in name or "\\" in name:
        raise UnsafeArchive(f"{where} has a backslash or NUL in its path; use '/' between folders")
    if name.startswith("/") or _DRIVE.match(name):
        raise UnsafeArchive(f"{where} is an absolute path; members must be relative (class/photo.jpg)")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive(f"{where} climbs out of the archive ('..'); members must stay inside it")
    return parts


_EXTENDED = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                       tarfile.SOLARIS_XHDTYPE})  # fmt: skip
"""Tar header types whose data ``tarfile`` reads whole into memory (a long name, pax records)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended headers are budgeted by their declared size before ``tarfile`` reads them.

    ``tarfile`` reads a GNU long-name or pax header's data with one ``read(size)`` (and chains the next
    header recursively); the size is in the 512-byte header just parsed, so it is checked here, the
    chain's sizes together, against ``limit`` (set per archive by :func:`_open_tar`)."""

    limit = 0
    archive = ""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        where = f"archive {self.archive!r}"
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchive(f"{where} has a GNU sparse member; only files and folders are accepted")
        if self.type in _EXTENDED:
            spent = getattr(tar, "_tlserve_header_bytes", 0) + self.size
            tar._tlserve_header_bytes = spent  # type: ignore[attr-defined]
            if spent > self.limit:
                raise ArchiveTooLarge(
                    f"{where}: a member's extended (long-name or pax) headers declare {spent} bytes, over the limit "
                    f"of {self.limit} bytes (max_archive_header_bytes)"
                )
        else:
            tar._tlserve_header_bytes = 0  # type: ignore[attr-defined]
        return super()._proc_member(tar)  # type: ignore[misc,no-any-return]


def _open_tar(path: Path, archive: str, settings: Settings) -> tarfile.TarFile:
    bounded = type("_Bounded", (_BoundedTarInfo,), {"limit": settings.max_archive_header_bytes, "archive": archive})
    return tarfile.open(path, mode="r:*", tarinfo=bounded)


_ZIP_ENTRY = struct.Struct("<4s4B4HL2L5H2L")  # a central directory file header (46 bytes), as zipfile reads it


def _zip_precheck(path: Path, archive: str, settings: Settings) -> None:
    """The central directory's size and its entries counted from the raw bytes, before ``zipfile`` reads it
    whole and builds a ``ZipInfo`` per entry (its end record's count is not what zipfile trusts: it walks
    the bytes, so they are walked here too)."""
    limit = settings.max_archive_header_bytes
    with path.open("rb") as fp:
        try:
            end = zipfile._EndRecData(fp)  # type: ignore[attr-defined]  # the end records, found as zipfile finds them
        except OSError:
            end = None
        if not end:
            raise MalformedRequest(f"archive {archive!r} is not a readable zip: no end of central directory record")
        size_cd, offset_cd = end[zipfile._ECD_SIZE], end[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
        if size_cd > limit:
            raise ArchiveTooLarge(
                f"archive {archive!r}: its central directory is {size_cd} bytes, over the limit of {limit} bytes "
                "(max_archive_header_bytes)"
            )
        start = end[zipfile._ECD_LOCATION] - size_cd  # type: ignore[attr-defined]
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
        if start < 0 or offset_cd < 0:
            raise MalformedRequest(f"archive {archive!r} is not a readable zip: bad central directory offset")
        fp.seek(start)
        data = fp.read(size_cd)
    total, n = 0, 0
    while total + _ZIP_ENTRY.size <= len(data):
        fields = _ZIP_ENTRY.unpack_from(data, total)
        if fields[0] != zipfile.stringCentralDir:  # type: ignore[attr-defined]
            break  # zipfile names the corruption
        n += 1
        _count(n, archive, settings)
        total += _ZIP_ENTRY.size + fields[12] + fields[13] + fields[14]  # file name, extra field, comment


def check_archive(path: Path, archive: str, settings: Settings, budget: list[int]) -> tuple[str, list[Member], int]:
    """The archive's regular files, every member checked from its header (nothing extracted); ``budget``
    holds the uncompressed bytes the upload's archives may still use. Returns (kind, files, ignored)."""
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        _zip_precheck(path, archive, settings)
        return "zip", *_check_zip(path, archive, settings, budget, size)
    try:
        with _open_tar(path, archive, settings) as tar:
            return "tar", *_check_tar(tar, archive, settings, budget, size)
    except _CORRUPT:
        raise MalformedRequest(
            f"archive {archive!r} is neither a zip nor a tar (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz) it can read"
        ) from None


def _ratio_check(expanded: int, packed: int, what: str, settings: Settings) -> None:
    if expanded >= RATIO_FLOOR_BYTES and expanded > settings.max_archive_ratio * max(packed, 1):
        raise ArchiveTooLarge(
            f"{what} expands {expanded} bytes from {packed} ({expanded / max(packed, 1):.0f}x), over the ratio limit of "
            f"{settings.max_archive_ratio:g}x (max_archive_ratio): refused as a zip bomb"
        )


def _spend(budget: list[int], n: int, archive: str, settings: Settings) -> None:
    budget[0] -= n
    if budget[0] < 0:
        raise ArchiveTooLarge(
            f"archive {archive!r}: the upload's archives hold over {settings.max_archive_bytes} uncompressed bytes "
            "(max_archive_bytes), by their headers"
        )


def _count(n: int, archive: str, settings: Settings) -> None:
    if n > settings.max_archive_members:
        raise ArchiveTooLarge(f"archive {archive!r} has over {settings.max_archive_members} members (max_archive_members)")


def _check_zip(path: Path, archive: str, settings: Settings, budget: list[int], size: int) -> tuple[list[Member], int]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except _CORRUPT as exc:
        raise MalformedRequest(f"archive {archive!r} is not a readable zip: {exc}") from None
    _count(len(infos), archive, settings)
    files: list[Member] = []
    ignored, total = 0, 0
    for info in infos:
        parts = _member_parts(info.filename, archive)
        mode = info.external_attr >> 16
        where = f"archive {archive!r}: member {info.filename[:120]!r}"
        if stat.S_ISLNK(mode):
            raise UnsafeArchive(f"{where} is a symbolic link; only files and folders are accepted")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no Unix type recorded (a plain file)
            raise UnsafeArchive(f"{where} is a device, fifo or socket; only files and folders are accepted")
        if info.flag_bits & 0x1:
            raise UnsafeArchive(f"{where} is encrypted; send it unencrypted")
        if info.is_dir() or not parts:
            continue
        _ratio_check(info.file_size, info.compress_size, where, settings)
        total += info.file_size
        ignored += _admit(files, Member(parts, info.file_size, info), archive, settings, budget)
    _ratio_check(total, size, f"archive {archive!r}", settings)
    return files, ignored


def _admit(files: list[Member], member: Member, archive: str, settings: Settings, budget: list[int]) -> int:
    """Spend a member's size on the archive's budget and keep it, unless the labelled-folder rule ignores it
    (junk such as ``__MACOSX``): then 1, for the count of ignored files."""
    _spend(budget, member.size, archive, settings)
    if labelled.ignored(member.parts):
        return 1
    files.append(member)
    return 0


_TAR_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
              tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a fifo"}  # fmt: skip


def _check_tar(tar: tarfile.TarFile, archive: str, settings: Settings, budget: list[int], size: int) -> tuple[list[Member], int]:
    files: list[Member] = []
    ignored, total, n = 0, 0, 0
    while True:
        try:
            info = tar.next()  # reads one header (a compressed stream is decompressed up to it, never stored)
        except _CORRUPT as exc:
            raise MalformedRequest(f"archive {archive!r} is not a readable tar: {exc}") from None
        if info is None:
            break
        n += 1
        _count(n, archive, settings)
        parts = _member_parts(info.name, archive)
        where = f"archive {archive!r}: member {info.name[:120]!r}"
        if info.type in _TAR_KINDS:
            raise UnsafeArchive(f"{where} is {_TAR_KINDS[info.type]}; only files and folders are accepted")
        if info.isdir() or not parts:
            continue
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise UnsafeArchive(f"{where} is not a regular file (tar type {info.type!r}); only files and folders are accepted")
        total += info.size
        ignored += _admit(files, Member(parts, info.size, info), archive, settings, budget)
    _ratio_check(total, size, f"archive {archive!r}", settings)
    return files, ignored


def _layout(files: list[Member], archive: str) -> list[tuple[str, Member]]:
    """(label, member) for each file, in archive order, by the labelled-folder rule (:mod:`app.core.labelled`):
    ``class/photo`` (deeper files count for the class); one folder wrapping every class folder is unwrapped;
    no file outside a class folder; no split folders (train/test/val) in place of classes."""
    strip = 0
    if files and all(len(m.parts) >= 3 for m in files) and len({m.parts[0] for m in files}) == 1:
        strip = 1
    grouped = labelled.group(files, lambda m: m.parts[strip:])
    if grouped.loose:
        m = grouped.loose[0]
        raise DatasetError(
            f"archive {archive!r}: {m.name!r} is not inside a class folder; lay the archive out as class/photo.jpg"
        )
    deep = {c for c, n in grouped.nested.items() if n}
    labelled.refuse_split(f"archive {archive!r}", grouped.classes, deep.__contains__, lambda train, _: (
        f"Send the class folders of one split (those in {train}/) as the archive"))  # fmt: skip
    return [(valid_label(m.parts[strip], f"folder of {m.name[:80]!r} in archive {archive!r}"), m) for m in files]


def _copy(src: IO[bytes], dst: Path, limit: int, what: str) -> None:
    written = 0
    with dst.open("wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise UnsafeArchive(f"{what} holds more bytes than its header declares ({limit})")
            out.write(chunk)


@contextlib.contextmanager
def _members(kind: str, path: Path, archive: str, settings: Settings) -> Iterator[Callable[[Member], IO[bytes] | None]]:
    """The archive at ``path`` open: a function giving a checked member's bytes (None: not a regular file)."""
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            yield lambda m: zf.open(m.key) if isinstance(m.key, zipfile.ZipInfo) else None
    else:
        with _open_tar(path, archive, settings) as tar:
            yield lambda m: tar.extractfile(m.key) if isinstance(m.key, tarfile.TarInfo) else None


def _unpack_all(upload: Upload, archives: list[tuple[Path, str]], settings: Settings) -> None:
    budget = [settings.max_archive_bytes]
    checked = [(path, name, *check_archive(path, name, settings, budget)) for path, name in archives]  # every check first
    total = len(upload.photos) + sum(len(files) for *_, files, _ in checked)
    if total > settings.max_training_images:
        raise TooManyImages(
            f"{total} photos in this upload, over the limit of {settings.max_training_images} (max_training_images)"
        )
    for k, (path, name, kind, files, ignored) in enumerate(checked):
        upload.ignored += ignored
        photos = _layout(files, name)
        with _members(kind, path, name, settings) as open_member:
            for n, (label, m) in enumerate(photos):
                target = upload.folder / f"a{k}-{n}"
                try:
                    member = open_member(m)
                    if member is None:
                        raise UnsafeArchive(f"archive {name!r}: member {m.name!r} is not a regular file")
                    with member:
                        _copy(member, target, m.size, f"archive {name!r}: member {m.name!r}")
                except _CORRUPT as exc:
                    raise MalformedRequest(f"archive {name!r}: member {m.name!r} is corrupt: {exc}") from None
                upload.photos.append(Photo(target, label, m.name))
        path.unlink()  # what it held is spooled; do not keep two copies


# --- photos ----------------------------------------------------------------------------------
def sniff(path: Path, formats: Iterable[str]) -> str | None:
    """Why ``path`` is not a photo we take (0 bytes, not a recognised or allowed image), or None. Only the
    header is read; the decode (and the pixel limit) is :func:`app.core.imaging.load_image`'s, in the job."""
    from PIL import UnidentifiedImageError

    from app.core.imaging import open_image

    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    allowed = set(formats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with open_image(path, allowed) as img:  # only the allowed formats' plugins read it
                fmt = img.format
        except UnidentifiedImageError:
            return f"not a recognised image of an allowed format (allowed formats: {', '.join(sorted(allowed))})"
        except Exception as exc:  # noqa: BLE001 - a header Pillow cannot parse is bad input
            return f"cannot read image header: {type(exc).__name__}"
    if fmt not in allowed:
        return f"image format {fmt} is not allowed (allowed formats: {', '.join(sorted(allowed))})"
    return None


def check_photos(photos: list[Photo], formats: Iterable[str]) -> None:
    """Every photo is a non-empty, recognised, allowed image (by its header); the request names those that are not."""
    import app.core.imaging  # noqa: F401 - registers the HEIF opener with Pillow, as the loader does

    formats = frozenset(formats)
    bad = [(p, why) for p in photos if (why := sniff(p.path, formats)) is not None]
    if not bad:
        return
    listed = "; ".join(f"{p.label}/{p.name}: {why}" for p, why in bad[:10]) + (
        f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
    )
    error = EmptyInput if all(why.startswith("empty") for _, why in bad) else UnsupportedFormat
    raise error(f"{len(bad)} of the {len(photos)} uploaded files are not photos it can take: {listed}")
