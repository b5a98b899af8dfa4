"""``multipart/form-data`` parsed from a body already in memory, without copying the files out of it.

Starlette's form parser copies every file part into a ``SpooledTemporaryFile`` (RAM up to 1 MB,
then a file in ``/tmp``, which is RAM again where ``/tmp`` is a tmpfs), and reading the part back
makes a third copy. Here the body is parsed in one pass by python-multipart (the parser Starlette
uses) and each file part is a ``memoryview`` into the body: an upload is held once, and nothing is
written to disk. The limits and messages are Starlette's: ``max_files``, ``max_fields``, a text
field of at most ``max_field_bytes``, the part's ``name`` required, the ``charset`` parameter honoured.

:class:`PartHeaders` (each part's ``Content-Disposition``) and :func:`boundary_of` are shared with the
training uploads (:mod:`app.api.uploads`), which stream their parts to disk instead.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import MalformedRequest, TooManyImages

MAX_FIELD_BYTES = 1024 * 1024


@dataclass
class Part:
    """One part: a file (``filename`` is not None, ``data`` a view into the body) or a text field (``value``)."""

    name: str
    filename: str | None
    data: memoryview | bytes = b""
    value: str = ""
    _chunks: list[memoryview | bytes] = field(default_factory=list, repr=False)

    @property
    def is_file(self) -> bool:
        return self.filename is not None


def _decode(raw: bytes | bytearray | memoryview, charset: str) -> str:
    try:
        return bytes(raw).decode(charset)
    except (UnicodeDecodeError, LookupError):
        return bytes(raw).decode("latin-1")


def boundary_of(content_type: str) -> tuple[bytes, str]:
    """The ``boundary`` and ``charset`` (default utf-8, an unknown one read as latin-1) of a multipart content type."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequest("malformed multipart body: Missing boundary in multipart.")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        return boundary, codecs.lookup(charset).name
    except LookupError:
        return boundary, "latin-1"


class PartHeaders:
    """python-multipart's header callbacks: each part's ``Content-Disposition`` is collected, its ``name``
    required, and :meth:`start_part` gets its parsed options. Subclasses add ``on_part_data``/``on_part_end``."""

    def __init__(self) -> None:
        self.header_name = self.header_value = self.disposition = b""

    def begin_part(self) -> None:
        """A new part starts (before its headers)."""

    def start_part(self, options: dict[bytes, bytes]) -> None:
        raise NotImplementedError

    def on_part_begin(self) -> None:
        self.disposition = b""
        self.begin_part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += bytes(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += bytes(data[start:end])

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise MalformedRequest('malformed multipart body: the Content-Disposition header field "name" must be provided.')
        self.start_part(options)

    def parser(self, boundary: bytes) -> MultipartParser:
        callbacks: dict[str, Callable[..., None]] = {n: getattr(self, n) for n in dir(self) if n.startswith("on_")}
        return MultipartParser(boundary, callbacks)  # type: ignore[arg-type]


class _Collector(PartHeaders):
    """Records where each part lies in the body."""

    def __init__(self, body: bytearray | bytes, charset: str, max_files: int, max_fields: int, max_field_bytes: int) -> None:
        super().__init__()
        self.body, self.view, self.charset = body, memoryview(body), charset
        self.max_files, self.max_fields, self.max_field_bytes = max_files, max_fields, max_field_bytes
        self.parts: list[Part] = []
        self.files = self.fields = 0
        self.current: Part | None = None

    def _slice(self, data: bytes | bytearray, start: int, end: int) -> memoryview | bytes:
        # With the whole body in one write() the data always is the body; a look-behind buffer is copied.
        return self.view[start:end] if data is self.body else bytes(data[start:end])

    def begin_part(self) -> None:
        self.current = None

    def start_part(self, options: dict[bytes, bytes]) -> None:
        name = _decode(options[b"name"], self.charset)
        if b"filename" in options:
            self.files += 1
            if self.files > self.max_files:
                raise TooManyImages(f"Too many files. Maximum number of files is {self.max_files}.")
            self.current = Part(name, _decode(options[b"filename"], self.charset))
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise TooManyImages(f"Too many fields. Maximum number of fields is {self.max_fields}.")
            self.current = Part(name, None)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        if part is None:
            return
        part._chunks.append(self._slice(data, start, end))
        if not part.is_file and sum(len(c) for c in part._chunks) > self.max_field_bytes:
            raise MalformedRequest(f"malformed multipart body: field {part.name!r} is over {self.max_field_bytes} bytes")

    def on_part_end(self) -> None:
        part = self.current
        if part is None:
            return
        chunks, part._chunks = part._chunks, []
        part.data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not part.is_file:
            part.value, part.data = _decode(part.data, self.charset), b""
        self.parts.append(part)
        self.current = None


def parse_multipart(
    body: bytearray | bytes,
    content_type: str,
    *,
    max_files: int,
    max_fields: int,
    max_field_bytes: int = MAX_FIELD_BYTES,
) -> list[Part]:
    """Every complete part of ``body``, in order. Raises ``TooManyImages`` or ``MalformedRequest``."""
    boundary, charset = boundary_of(content_type)
    collector = _Collector(body, charset, max_files, max_fields, max_field_bytes)
    try:
        parser = collector.parser(boundary)
        parser.write(body)  # type: ignore[arg-type]  # bytes-like: find/rfind/startswith/indexing
        parser.finalize()
    except FormParserError:
        raise MalformedRequest("malformed multipart body: Invalid multipart data.") from None
    return collector.parts
