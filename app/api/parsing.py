"""Parsing helpers every front shares: base64 images, booleans, JSON bodies, per-image errors."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from pydantic import BaseModel

from app.errors import InputError, MalformedRequest

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


def load_json(body: bytes | bytearray, what: str, error: type[MalformedRequest] = MalformedRequest) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise error(f"{what} is not valid JSON") from None
    except RecursionError:  # "[[[[…" nested deeper than the parser's stack
        raise error(f"{what} is not valid JSON: nested too deeply") from None


def item_error(exc: InputError) -> dict[str, Any]:
    """The shape of one failed image inside a 200 answer."""
    return {"code": exc.code, "message": exc.message, "status": exc.status_code}


def error_responses(model: type[BaseModel], statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a router: each error status documented with the front's error model."""
    return {status: {"model": model} for status in statuses}
