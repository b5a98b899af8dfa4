"""The Open Inference Protocol's REST wire format: request bodies (inflated, split, parsed) → the input's
image bytes; output tensors → response bodies (JSON, or the binary tensor data extension). What the
tensors mean and how they are checked is :mod:`app.serving.oip.tensors`'s, shared with gRPC."""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

from pydantic import ValidationError

from app.api.oip.schemas import InferenceRequest
from app.api.parsing import THREAD_BYTES, decode_base64, load_json_bounded
from app.core.errors import BadRequest, BodyTooLarge, UnsupportedMediaType
from app.serving.oip.plane import Answer
from app.serving.oip.tensors import INPUT, Wanted, count, unframe

HEADER_LENGTH = "Inference-Header-Content-Length"


STEP = 1024 * 1024
"""Most bytes one call to zlib may inflate: memory grows with the output actually kept, step by step."""


class Inflater:
    """A gzip or deflate request body undone while it arrives, refused once it inflates past ``limit``
    (``max_decompressed_bytes``): output is kept in steps of :data:`STEP`, never allocated ahead."""

    def __init__(self, encoding: str, limit: int) -> None:
        enc = encoding.strip().lower()
        if enc not in ("gzip", "deflate"):
            raise UnsupportedMediaType(f"Content-Encoding {enc!r} is not supported: send identity, gzip or deflate")
        self.encoding, self.limit, self.size = enc, limit, 0
        self._z = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)

    def feed(self, chunk: bytes, out: bytearray) -> None:
        data = chunk
        while data:
            if self._z.eof:
                raise BadRequest(f"bytes follow the end of the {self.encoding} data")
            try:
                piece = self._z.decompress(data, min(STEP, self.limit - self.size + 1))
            except zlib.error:
                raise BadRequest(f"body is not valid {self.encoding} data") from None
            self.size += len(piece)
            if self.size > self.limit:
                raise BodyTooLarge(f"decompressed body is over the limit of {self.limit} bytes (max_decompressed_bytes)")
            out += piece
            if self._z.unused_data:
                raise BadRequest(f"bytes follow the end of the {self.encoding} data")
            data = self._z.unconsumed_tail

    def finish(self) -> None:
        if not self._z.eof:
            raise BadRequest(f"{self.encoding} body is truncated")


def inflater(encoding: str | None, limit: int) -> Inflater | None:
    """The :class:`Inflater` for a Content-Encoding, or None for identity (or none)."""
    if (encoding or "identity").strip().lower() == "identity":
        return None
    return Inflater(encoding or "", limit)


def split(body: bytes | bytearray, header_length: str | None) -> tuple[bytes | bytearray, bytes | bytearray]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} is not a number") from None
    if not 0 <= n <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {n}, but the body holds {len(body)} bytes")
    return body[:n], body[n:]


async def parse(header: bytes | bytearray, max_elements: int, max_depth: int) -> InferenceRequest:
    """The JSON header, bounded (``max_request_elements``, ``max_json_depth``) before it is parsed; a
    large one is parsed and validated off the event loop."""
    what = "the inference request"
    doc = await load_json_bounded(header, what, BadRequest, max_elements=max_elements, max_depth=max_depth)
    if len(header) <= THREAD_BYTES:
        return _validate(doc)
    return await asyncio.to_thread(_validate, doc)


def _validate(doc: Any) -> InferenceRequest:
    try:
        return InferenceRequest.model_validate(doc)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]]
        raise BadRequest("invalid inference request: " + "; ".join(parts)) from None


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major flattening of (possibly nested) JSON tensor data, without recursion."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _b64(value: Any, index: int) -> bytes:
    return decode_base64(value, f"input {INPUT!r} element {index}", BadRequest)


def elements(req: InferenceRequest, blob: bytes | bytearray, n: int) -> list[bytes | memoryview]:
    """The ``n`` images of the request's (checked) input: after the JSON header in the binary form
    (``binary_data_size``), or base64 strings in ``data``."""
    t = req.inputs[0]
    size = (t.parameters or {}).get("binary_data_size")
    if size is not None:
        if t.data is not None:
            raise BadRequest(f"input {INPUT!r} has both data and binary_data_size")
        if count(size, "binary_data_size") != len(blob):
            raise BadRequest(f"binary_data_size is {size}, but {len(blob)} bytes follow the JSON header")
        return unframe(blob, n)
    if blob:
        raise BadRequest(f"{len(blob)} bytes follow the JSON header, but no input has binary_data_size")
    if t.data is None:
        raise BadRequest(f"input {INPUT!r} has neither data nor binary_data_size")
    flat = _flatten(t.data)
    if len(flat) != n:
        raise BadRequest(f"input {INPUT!r} has shape {t.shape} but {len(flat)} data elements")
    return [_b64(v, i) for i, v in enumerate(flat)]


def encode(answer: Answer, request_id: str | None, wanted: list[Wanted]) -> tuple[bytes, int | None]:
    """The response body: the JSON header with the ``outputs``, each JSON or (``binary``) after the JSON
    header; and the header's length when any output is binary (else ``None``)."""
    blobs, outs = [], []
    for t, w in zip(answer.outputs, wanted, strict=True):
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if w.binary:
            blob = t.raw()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = t.data()
        outs.append(out)
    doc: dict[str, Any] = {"model_name": answer.model_name, "model_version": answer.model_version, "outputs": outs}
    if request_id is not None:
        doc["id"] = request_id
    text = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)
