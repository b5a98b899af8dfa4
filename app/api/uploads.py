"""The HTTP side of training uploads: a ``multipart/form-data`` body streamed into a spool folder.

:func:`receive` checks the content type and the announced length, parses the body as it streams
(python-multipart, :class:`app.api.multipart.PartHeaders`) and writes each file part to the path
:class:`app.learning.uploads.Upload` gives it (the label and photo limit checked when the part's headers
arrive, before any of its bytes are written), bounded by ``max_training_bytes``; then
:func:`app.learning.uploads.admit` checks the archives and photos (see :mod:`app.learning.uploads`, which knows no HTTP).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from starlette.requests import Request

from app.api.multipart import PartHeaders, boundary_of
from app.core.errors import BodyTooLarge, MalformedRequest, UnsupportedMediaType
from app.core.settings import Settings
from app.learning.uploads import ARCHIVE_FIELD, MAX_OPTION_BYTES, OPTION_FIELDS, Upload, admit


class _Spooler(PartHeaders):
    """Writes each file part into the spool folder as it arrives."""

    def __init__(self, upload: Upload, settings: Settings) -> None:
        super().__init__()
        self.upload, self.settings = upload, settings
        self.kind: str | None = None  # "photo", "archive", "option"
        self.name = ""
        self.filename = ""
        self.file: BinaryIO | None = None
        self.path: Path | None = None
        self.value = bytearray()
        self.parts = 0

    def begin_part(self) -> None:
        self.kind, self.value = None, bytearray()

    def start_part(self, options: dict[bytes, bytes]) -> None:
        self.name = options[b"name"].decode("utf-8", "replace")
        self.parts += 1
        if b"filename" not in options:
            if self.name not in OPTION_FIELDS:
                raise MalformedRequest(
                    f"text field {self.name[:64]!r} is not an option ({', '.join(OPTION_FIELDS)}): send photos as file "
                    f"parts named by their class label, archives as a file part named {ARCHIVE_FIELD!r}"
                )
            self.kind = "option"
            return
        self.filename = options[b"filename"].decode("utf-8", "replace")
        if self.name == ARCHIVE_FIELD:
            self.kind, self.path = "archive", self.upload.archive(self.filename)
        else:  # the label and the photo limit are checked before any of the part's bytes are written
            self.kind, self.path = "photo", self.upload.photo(self.name, self.filename, self.settings)
        self.file = self.path.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.kind == "option":
            self.value += data[start:end]
            if len(self.value) > MAX_OPTION_BYTES:
                raise MalformedRequest(f"option {self.name!r} is over {MAX_OPTION_BYTES} bytes")
        elif self.file is not None:
            self.file.write(data[start:end])

    def on_part_end(self) -> None:
        if self.kind == "option":
            self.upload.options[self.name] = self.value.decode("utf-8", "replace").strip()
        if self.file is not None:
            empty = self.file.tell() == 0
            self.file.close()
            self.file = None
            if empty and not self.filename and self.path is not None:  # a browser's empty file input: no file chosen
                self.path.unlink()
                if self.kind == "photo":
                    self.upload.photos.pop()
                else:
                    self.upload.archives.pop()
        self.kind = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


async def receive(request: Request, settings: Settings, folder: Path) -> Upload:
    """The upload of one request, spooled under ``folder`` and checked (see the module docstring)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "multipart/form-data":
        raise UnsupportedMediaType(
            f"content type {ctype.split(';')[0] or '(none)'!r} is not accepted here: send multipart/form-data "
            "(a file part per photo named by its class label, and/or an archive part)"
        )
    boundary, _charset = boundary_of(ctype)
    limit = settings.max_training_bytes
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise BodyTooLarge(f"upload of {announced} bytes is over the limit of {limit} bytes (max_training_bytes)")
    upload = Upload(folder)
    spooler = _Spooler(upload, settings)
    parser = spooler.parser(boundary)
    try:
        async for chunk in request.stream():
            upload.bytes += len(chunk)
            if upload.bytes > limit:
                raise BodyTooLarge(f"upload is over the limit of {limit} bytes (max_training_bytes)")
            if chunk:
                await asyncio.to_thread(parser.write, chunk)
        parser.finalize()
    except FormParserError:
        raise MalformedRequest("malformed multipart body: Invalid multipart data.") from None
    finally:
        spooler.close()
    if spooler.kind is not None or spooler.file is not None:
        raise MalformedRequest("malformed multipart body: it ended inside a part")
    return await asyncio.to_thread(admit, upload, settings)
