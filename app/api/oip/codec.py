"""The Open Inference Protocol's wire format: request bodies → image bytes and wanted outputs,
results → output tensors (JSON, or the binary tensor data extension)."""

from __future__ import annotations

import asyncio
import struct
import zlib
from typing import Any, cast

import numpy as np
from pydantic import ValidationError

from app.api.oip.schemas import InferenceRequest
from app.api.parsing import THREAD_BYTES, decode_base64, load_json_bounded, parse_bool
from app.errors import BadRequest, BodyTooLarge, TooManyImages, UnsupportedMediaType
from app.inference import OOD_POLICIES, InferResult, OodPolicy

INPUT = "image"
OUTPUTS = ("label", "probabilities", "features", "familiarity", "in_distribution")
DEFAULT_OUTPUTS = ("label", "probabilities")
FAMILIARITY_OUTPUTS = ("familiarity", "in_distribution")
"""Extra outputs of heads with familiarity data, sent by default with them (absent for other heads)."""
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


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{what} must be a non-negative integer")
    return value


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


def _unframe(blob: bytes | bytearray, n: int) -> list[bytes | memoryview]:
    """BYTES tensor elements from the binary form: each a 4-byte little-endian length, then the bytes
    (views into the body, not copies)."""
    view = memoryview(blob)
    out: list[bytes | memoryview] = []
    offset = 0
    while offset < len(blob) and len(out) <= n:
        if offset + 4 > len(blob):
            raise BadRequest(f"binary data of input {INPUT!r} is truncated in the length of element {len(out)}")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise BadRequest(f"binary data of input {INPUT!r} is truncated in element {len(out)}")
        out.append(view[offset : offset + size])
        offset += size
    if len(out) != n or offset != len(blob):
        raise BadRequest(f"input {INPUT!r} has shape [{n}] but its binary data holds a different number of elements")
    return out


def _b64(value: Any, index: int) -> bytes:
    return decode_base64(value, f"input {INPUT!r} element {index}", BadRequest)


def images(req: InferenceRequest, blob: bytes | bytearray, limit: int) -> list[bytes | memoryview]:
    if len(req.inputs) != 1:
        raise BadRequest(f"expected one input tensor named {INPUT!r}, got {len(req.inputs)}")
    t = req.inputs[0]
    if t.name != INPUT:
        raise BadRequest(f"unknown input {t.name[:64]!r}: the model takes one BYTES input named {INPUT!r}")
    if t.datatype != "BYTES":
        raise BadRequest(f"input {INPUT!r} must have datatype BYTES (encoded image files), not {t.datatype[:16]!r}")
    if len(t.shape) not in (1, 2) or any(d < 0 for d in t.shape) or (len(t.shape) == 2 and t.shape[1] != 1):
        raise BadRequest(f"input {INPUT!r} must have shape [N] or [N, 1], not {t.shape[:4]}")
    n = t.shape[0]
    if n == 0:
        raise BadRequest(f"input {INPUT!r} holds no images")
    if n > limit:
        raise TooManyImages(f"{n} images in one request, over the limit of {limit} (max_images_per_request)")
    size = (t.parameters or {}).get("binary_data_size")
    if size is not None:
        if t.data is not None:
            raise BadRequest(f"input {INPUT!r} has both data and binary_data_size")
        if _count(size, "binary_data_size") != len(blob):
            raise BadRequest(f"binary_data_size is {size}, but {len(blob)} bytes follow the JSON header")
        return _unframe(blob, n)
    if blob:
        raise BadRequest(f"{len(blob)} bytes follow the JSON header, but no input has binary_data_size")
    if t.data is None:
        raise BadRequest(f"input {INPUT!r} has neither data nor binary_data_size")
    flat = _flatten(t.data)
    if len(flat) != n:
        raise BadRequest(f"input {INPUT!r} has shape {t.shape} but {len(flat)} data elements")
    return [_b64(v, i) for i, v in enumerate(flat)]


def _bool_param(params: dict[str, Any] | None, key: str, default: bool) -> bool:
    return parse_bool((params or {}).get(key, default), f"parameter {key!r}", strings=False, error=BadRequest)


def ood_policy(req: InferenceRequest) -> OodPolicy | None:
    """The request's ``ood_policy`` parameter (``report`` or ``refuse``), or ``None`` for the setting."""
    value = (req.parameters or {}).get("ood_policy")
    if value is not None and value not in OOD_POLICIES:
        raise BadRequest(f"parameter 'ood_policy' must be one of {', '.join(OOD_POLICIES)}, not {str(value)[:40]!r}")
    return cast("OodPolicy | None", value)


def requested(req: InferenceRequest, familiar: bool = False) -> list[tuple[str, bool, int | None]]:
    """(output name, binary?, classification k or None) for each output to send, in order; without
    ``outputs`` the defaults, plus the familiarity outputs when the head has them (``familiar``)."""
    default = _bool_param(req.parameters, "binary_data_output", False)
    if not req.outputs:
        names = DEFAULT_OUTPUTS + (FAMILIARITY_OUTPUTS if familiar else ())
        return [(name, default, None) for name in names]
    out, seen = [], set()
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise BadRequest(f"unknown output {o.name[:64]!r}: the outputs are {', '.join(OUTPUTS)}")
        if o.name in seen:
            raise BadRequest(f"output {o.name!r} is requested twice")
        seen.add(o.name)
        k = (o.parameters or {}).get("classification")
        if k is not None:
            if o.name != "probabilities":
                raise BadRequest("the classification parameter applies to the probabilities output only")
            if _count(k, "classification") == 0:
                raise BadRequest("classification must be at least 1")
        out.append((o.name, _bool_param(o.parameters, "binary_data", default), k))
    return out


def _tensor(
    name: str, datatype: str, values: np.ndarray | list[str], shape: list[int], binary: bool
) -> tuple[dict[str, Any], bytes]:
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if datatype == "BOOL":
        flags = np.ascontiguousarray(values, dtype=np.bool_)
        if binary:
            blob = flags.tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            return out, blob
        out["data"] = [bool(v) for v in flags.ravel()]
        return out, b""
    if datatype == "BYTES":
        strings = [str(s).encode() for s in values]
        if binary:
            blob = b"".join(struct.pack("<I", len(s)) + s for s in strings)
            out["parameters"] = {"binary_data_size": len(blob)}
            return out, blob
        out["data"] = list(values)
        return out, b""
    array = np.ascontiguousarray(values, dtype="<f4")
    if binary:
        blob = array.tobytes()
        out["parameters"] = {"binary_data_size": len(blob)}
        return out, blob
    out["data"] = array.ravel().tolist()
    return out, b""


def outputs(res: InferResult, wanted: list[tuple[str, bool, int | None]]) -> list[tuple[dict[str, Any], bytes]]:
    """The output tensors of ``res``; a refused answer (``ood_policy=refuse``) has the label ``""``."""
    assert res.head is not None and res.proba is not None
    head, proba, feats = res.head, res.proba, res.features
    n = len(proba)
    result = []
    for name, binary, k in wanted:
        if name in FAMILIARITY_OUTPUTS and (res.familiarity is None or res.in_distribution is None):
            raise BadRequest(f"output {name!r}: head {head.name!r} has no familiarity data (retrain it to add it)")
        if name == "label":
            labels = [head.classes[int(i)] if res.named(r) else "" for r, i in enumerate(np.argmax(proba, axis=1))]
            result.append(_tensor(name, "BYTES", labels, [n], binary))
        elif name == "familiarity":
            result.append(_tensor(name, "FP32", res.familiarity, [n], binary))  # type: ignore[arg-type]
        elif name == "in_distribution":
            result.append(_tensor(name, "BOOL", res.in_distribution, [n], binary))  # type: ignore[arg-type]
        elif name == "probabilities" and k is not None:
            k = min(k, len(head.classes))
            order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
            top = [f"{proba[r, c]:.6f}:{c}:{head.classes[c]}" for r in range(n) for c in order[r]]
            result.append(_tensor(name, "BYTES", top, [n, k], binary))
        elif name == "probabilities":
            result.append(_tensor(name, "FP32", proba, [n, proba.shape[1]], binary))
        else:
            result.append(_tensor(name, "FP32", feats, [n, feats.shape[1]], binary))
    return result
