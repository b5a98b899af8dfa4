"""Request bodies → image items, with every limit enforced before the work.

Three forms (``POST /v1/classify``, ``/v1/embed``):

- ``multipart/form-data``: every part with a file name is an image; text parts ``head``,
  ``top_k``, ``normalize``, ``ood_policy`` are options; any other text part becomes a per-item error;
- a raw body whose content type is ``image/*`` (or ``application/octet-stream``): one image;
- ``application/json``: ``{"images": [{"b64": "...", "name": "..."}], "head": ..., "top_k": ...}``,
  its values counted and its nesting measured before it is parsed (``max_request_elements``,
  ``max_json_depth``: 413 ``request_too_complex``), parsed off the event loop when it is large.

The body is read with a hard cap (``max_body_bytes``) whether or not Content-Length is sent
(chunked uploads are counted as they arrive) and is held once: a raw image is the body itself,
a multipart file part a view into it (``app/api/multipart.py``); nothing is spooled to disk.
Formats are sniffed later from the bytes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from app.api.multipart import parse_multipart
from app.api.parsing import THREAD_BYTES, decode_base64, load_json_bounded
from app.core.errors import BodyTooLarge, EmptyInput, MalformedRequest, TooManyImages, UnsupportedMediaType
from app.core.settings import Settings
from app.serving.inference import Item

if TYPE_CHECKING:
    from app.api.oip.codec import Inflater

OPTION_FIELDS = ("head", "version", "top_k", "normalize", "ood_policy")


@dataclass
class Parsed:
    items: list[Item]
    options: dict[str, Any] = field(default_factory=dict)


async def read_body(request: Request, limit: int, inflate: Inflater | None = None) -> bytearray:
    """The whole body in one buffer, refusing more than ``limit`` bytes (announced or not).

    Chunks are appended as they arrive (memory follows what was really sent, not what was
    announced), never joined into a second copy. With ``inflate`` (a gzip/deflate Content-Encoding)
    each chunk is inflated as it arrives and only the inflated bytes are kept, bounded by the
    inflater's own limit (``max_decompressed_bytes``).
    """
    announced = request.headers.get("content-length")
    if announced is not None:
        try:
            size = int(announced)
        except ValueError:
            raise MalformedRequest("Content-Length is not a number") from None
        if size > limit:
            raise BodyTooLarge(f"body of {size} bytes is over the limit of {limit} bytes (max_body_bytes)")
    body, received = bytearray(), 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(f"body is over the limit of {limit} bytes (max_body_bytes)")
        if inflate is None:
            body += chunk
        else:
            inflate.feed(chunk, body)
    if inflate is not None:
        inflate.finish()
    return body


def _b64(value: Any, index: int) -> Item:
    try:
        return Item(decode_base64(value, f"images[{index}].b64"))
    except MalformedRequest as exc:
        return Item(b"", None, exc)


async def parse_images(request: Request, settings: Settings) -> Parsed:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, settings.max_body_bytes)
    limit = settings.max_images_per_request
    if ctype == "multipart/form-data":
        parsed = _multipart(body, request.headers.get("content-type", ""), limit)
    elif ctype == "application/json" or ctype.endswith("+json"):
        doc = await load_json_bounded(
            body, "body", MalformedRequest, max_elements=settings.max_request_elements, max_depth=settings.max_json_depth
        )
        # base64 images decoded off the event loop too, when the body is large
        parsed = _json(doc, limit) if len(body) <= THREAD_BYTES else await asyncio.to_thread(_json, doc, limit)
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        parsed = Parsed([Item(body, request.headers.get("x-filename"))])
    else:
        raise UnsupportedMediaType(
            f"content type {ctype or '(none)'!r} is not accepted: send multipart/form-data, image/*, or application/json"
        )
    if not parsed.items:
        raise EmptyInput("the request holds no images")
    if len(parsed.items) > limit:
        raise TooManyImages(f"{len(parsed.items)} images in one request, over the limit of {limit} (max_images_per_request)")
    return parsed


def _json(doc: Any, limit: int) -> Parsed:
    if not isinstance(doc, dict):
        raise MalformedRequest('JSON body must be an object like {"images": [{"b64": "..."}]}')
    images = doc.get("images")
    if not isinstance(images, list):
        raise MalformedRequest('JSON body needs "images": a list of {"b64": "..."} objects')
    if len(images) > limit:
        raise TooManyImages(f"{len(images)} images in one request, over the limit of {limit} (max_images_per_request)")
    items = []
    for i, entry in enumerate(images):
        if not isinstance(entry, dict):
            items.append(Item(b"", None, MalformedRequest(f"images[{i}] must be an object with a b64 field")))
            continue
        item = _b64(entry.get("b64"), i)
        name = entry.get("name")
        item.name = name if isinstance(name, str) else None
        items.append(item)
    options = {k: doc[k] for k in OPTION_FIELDS if k in doc and doc[k] is not None}
    return Parsed(items, options)


def _multipart(body: bytearray, content_type: str, limit: int) -> Parsed:
    try:
        parts = parse_multipart(body, content_type, max_files=limit, max_fields=limit + 16)
    except TooManyImages as exc:
        raise TooManyImages(f"{exc.message} (max_images_per_request={limit})") from None
    items, options = [], {}
    for part in parts:
        if part.is_file:
            items.append(Item(part.data, part.filename or part.name))
        elif part.name in OPTION_FIELDS:
            options[part.name] = part.value
        else:
            items.append(
                Item(b"", part.name, MalformedRequest(f"part {part.name!r} has no file name: send images as file parts"))
            )
    return Parsed(items, options)
