"""Parsing helpers every front shares: base64 images, booleans, JSON bodies, per-image errors.

A JSON body is bounded before it is parsed (:func:`check_json`): its values are counted and its
nesting measured by a walk over its text that skips strings with the ``json`` module's own C scanner
and stops at the first token over a limit, so a 64 MiB body of ``[{},{},…]`` (which ``json.loads``
turns into ~1.7 GB of Python objects) is refused after reading ``max_request_elements`` tokens. Bodies
over :data:`THREAD_BYTES` are scanned and parsed in a worker thread (:func:`load_json_bounded`), so
the event loop (``/livez``, other requests) goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

from pydantic import BaseModel

from app.core.errors import InputError, MalformedRequest, RequestTooComplex

_DATA_URL = re.compile(r"^data:[\w.+/-]*;base64,", re.IGNORECASE)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


def decode_base64(value: Any, where: str, error: type[MalformedRequest] = MalformedRequest) -> bytes:
    """Standard base64 (whitespace around it and a ``data:image/…;base64,`` prefix allowed)."""
    if not isinstance(value, str):
        raise error(f"{where} must be a base64 string")
    try:
        return base64.b64decode(_DATA_URL.sub("", value.strip(), count=1), validate=True)
    except (binascii.Error, ValueError):
        raise error(f"{where} is not valid base64") from None


def parse_bool(value: Any, name: str, *, strings: bool = True, error: type[MalformedRequest] = MalformedRequest) -> bool:
    """A JSON boolean, or (query and form values, with ``strings``) true/false/1/0/yes/no."""
    if isinstance(value, bool):
        return value
    if strings and isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise error(f"{name} must be true or false")


def load_json(body: str | bytes | bytearray, what: str, error: type[MalformedRequest] = MalformedRequest) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise error(f"{what} is not valid JSON") from None
    except RecursionError:  # "[[[[…" nested deeper than the parser's stack
        raise error(f"{what} is not valid JSON: nested too deeply") from None


THREAD_BYTES = 64 * 1024
"""JSON bodies larger than this are checked and parsed off the event loop."""
_TOKENS = re.compile(r'[\[\]{},"]')
"""The characters the bounds look at; everything between them (numbers, literals, white space) is skipped in C."""


def _text(body: bytes | bytearray) -> str | None:
    """The body as ``json.loads`` would decode it (UTF-8, -16 or -32, sniffed), or None where it cannot."""
    try:
        return body.decode(json.detect_encoding(body), "surrogatepass")
    except (UnicodeDecodeError, LookupError):
        return None


def check_json(text: str, what: str, max_elements: int, max_depth: int) -> None:
    """Refuse a JSON document with more than ``max_elements`` values (each ``[``, ``{``, ``,`` and string
    counts one) or nested deeper than ``max_depth``, before any object is built. Strings are skipped by
    the ``json`` module's own C scanner; anything that is not valid JSON stops the walk (``json.loads``
    then names the error), so the walk never takes more steps than ``max_elements``."""
    elements = depth = pos = 0
    search = _TOKENS.search
    while (m := search(text, pos)) is not None:
        c, pos = m.group(), m.end()
        if c == '"':
            try:
                pos = scanstring(text, pos, True)[1]
            except ValueError:
                return
        elif c in "[{":
            depth += 1
            if depth > max_depth:
                raise RequestTooComplex(f"{what} nests arrays and objects deeper than {max_depth} levels (max_json_depth)")
        elif c in "]}":
            depth -= 1
            continue
        elements += 1
        if elements > max_elements:
            raise RequestTooComplex(f"{what} holds over {max_elements} JSON values (max_request_elements)")


def _bounded(body: bytes | bytearray, what: str, error: type[MalformedRequest], max_elements: int, max_depth: int) -> Any:
    text = _text(body)
    if text is None:
        raise error(f"{what} is not valid JSON")
    check_json(text, what, max_elements, max_depth)
    return load_json(text, what, error)


async def load_json_bounded(
    body: bytes | bytearray, what: str, error: type[MalformedRequest], *, max_elements: int, max_depth: int
) -> Any:
    """:func:`check_json`, then :func:`load_json`; in a worker thread for a body over :data:`THREAD_BYTES`."""
    if len(body) <= THREAD_BYTES:
        return _bounded(body, what, error, max_elements, max_depth)
    return await asyncio.to_thread(_bounded, body, what, error, max_elements, max_depth)


def item_error(exc: InputError) -> dict[str, Any]:
    """The shape of one failed image inside a 200 answer."""
    return {"code": exc.code, "message": exc.message, "status": exc.status_code}


def error_responses(model: type[BaseModel], statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a router: each error status documented with the front's error model."""
    return {status: {"model": model} for status in statuses}
