"""``/v2``: the Open Inference Protocol (KServe v2 REST), so KServe, Triton and MLServer clients work as they are.

Every loaded head is a model. A model takes one input and gives up to three outputs:

- input ``image``: datatype ``BYTES``, shape ``[N]`` or ``[N, 1]``, one element per image, each the
  bytes of an encoded image file (JPEG, PNG, …; the format is sniffed). In the JSON form an element
  is a **base64 string** (JSON strings cannot carry raw bytes; a ``data:image/…;base64,`` prefix is
  allowed). With the binary tensor data extension (``Inference-Header-Content-Length`` header and
  ``"parameters": {"binary_data_size": n}`` on the input) the elements are raw bytes, each framed as
  a 4-byte little-endian length followed by the bytes.
- output ``label``: ``BYTES [N]``, the most likely class of each image;
- output ``probabilities``: ``FP32 [N, classes]``, columns in the order of the model metadata's
  classes (the head card); with the classification extension (``"classification": k`` on this
  output, tritonclient's ``class_count``) it becomes ``BYTES [N, k]`` of ``"probability:index:label"``;
- output ``features``: ``FP32 [N, D]``, the extractor's feature vectors, only when asked for.

Without ``outputs`` in the request, ``label`` and ``probabilities`` come back. Outputs are JSON
unless ``parameters.binary_data_output`` (request) or ``parameters.binary_data`` (per output) asks
for binary; then the response body is the JSON header (its length in ``Inference-Header-Content-Length``)
followed by each binary output's bytes in output order.

The OIP has no per-item errors: one bad image fails the whole request with a 4xx that names the
element. Errors are ``{"error": "..."}`` (rendered by :mod:`app.api.errors`). Same batcher, limits
(``max_body_bytes``, ``max_images_per_request``) and metrics as ``/v1``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from app import __version__
from app.api.deps import ServiceDep, probe_auth, require_key
from app.api.inputs import read_body
from app.errors import BodyTooLarge, MalformedRequest, TooManyImages, UnsupportedMediaType
from app.heads import Head, read_card
from app.service import Item, Service

INPUT = "image"
OUTPUTS = ("label", "probabilities", "features")
DEFAULT_OUTPUTS = ("label", "probabilities")
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "onnxruntime_sklearn"
HEADER_LENGTH = "Inference-Header-Content-Length"
_DATA_URL = re.compile(r"^data:[\w.+/-]*;base64,", re.IGNORECASE)


class BadRequest(MalformedRequest):
    """A malformed inference request: the OIP answers 400 (``/v1`` uses 422)."""

    status_code = 400


# --- schemas (the spec's JSON objects) -----------------------------------------------------------
class OipError(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    reason: str | None = None


class ModelReady(BaseModel):
    name: str
    ready: bool
    reason: str | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension")


class ModelMetadata(BaseModel):
    name: str
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str = Field(description="Always `image`")
    shape: list[int] = Field(description="[N] or [N, 1]")
    datatype: str = Field(description="Always `BYTES`")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` when the data follows the JSON header")
    data: list[Any] | None = Field(None, description="Base64 strings of encoded image files (flat or nested)")


class RequestOutput(BaseModel):
    name: str = Field(description="`label`, `probabilities` or `features`")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data` (bool); `classification` (int) on probabilities")


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_output` (bool); others are ignored")
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = Field(None, description="Default: label and probabilities")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[ResponseOutput]


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` resolved in place, for ``openapi_extra``."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.split("/")[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline(InferenceRequest.model_json_schema())},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "Binary tensor data extension: the JSON header (length in Inference-Header-Content-Length), "
                "then the input's elements, each a 4-byte little-endian length and the image bytes",
            },
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": OipError} for code in (400, 401, 404, 413, 415, 422, 500, 503)}
router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"], responses=ERRORS)
KeyDep = [Depends(require_key)]


# --- health and metadata -------------------------------------------------------------------------
@router.get("", name="oip_server_metadata", response_model=ServerMetadata, dependencies=KeyDep, summary="Server metadata")
async def oip_server_metadata() -> ServerMetadata:
    return ServerMetadata(name="tlserve", version=__version__, extensions=EXTENSIONS)


@router.get("/health/live", name="oip_server_live", response_model=Live, dependencies=[Depends(probe_auth)],
            summary="Liveness: 200 while the process answers")  # fmt: skip
async def oip_server_live() -> Live:
    return Live(live=True)


@router.get("/health/ready", name="oip_server_ready", response_model=Ready, dependencies=[Depends(probe_auth)],
            responses={400: {"model": Ready}}, summary="Readiness: 200 when ready, 400 (the spec's 4xx = false) otherwise")  # fmt: skip
async def oip_server_ready(service: ServiceDep) -> JSONResponse:
    ok, reason = service.ready
    return JSONResponse(
        Ready(ready=ok, reason=None if ok else reason).model_dump(exclude_none=True), status_code=200 if ok else 400
    )


def _classes(service: Service, name: str) -> tuple[str, ...]:
    head = service.heads.get(name)
    if head is not None:
        return head.classes
    return tuple(str(c) for c in read_card(service.store, name).get("classes", []))  # HeadNotFound → 404


@router.get("/models/{name}", name="oip_model_metadata", response_model=ModelMetadata, dependencies=KeyDep,
            summary="Model metadata: the input and outputs with datatypes and shapes")  # fmt: skip
async def oip_model_metadata(name: str, service: ServiceDep) -> ModelMetadata:
    n_classes = len(_classes(service, name))
    dim = service.info.feature_dim if service.info else -1
    return ModelMetadata(
        name=name,
        platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[
            TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, n_classes]),
            TensorMetadata(name="features", datatype="FP32", shape=[-1, dim]),
        ],
    )


@router.get("/models/{name}/ready", name="oip_model_ready", response_model=ModelReady, dependencies=KeyDep,
            responses={400: {"model": ModelReady}}, summary="Model readiness: 200 when it can serve, 400 otherwise")  # fmt: skip
async def oip_model_ready(name: str, service: ServiceDep) -> JSONResponse:
    _classes(service, name)  # 404 for an unknown model
    ok, reason = service.ready
    if ok and name not in service.heads:
        ok, reason = False, service.head_errors.get(name, "not loaded")
    body = ModelReady(name=name, ready=ok, reason=None if ok else reason).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=200 if ok else 400)


# --- inference: request parsing ------------------------------------------------------------------
def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {enc!r} is not supported: send identity, gzip or deflate")
    inflater = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise BadRequest(f"body is not valid {enc} data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge(f"decompressed body is over the limit of {limit} bytes (max_body_bytes)")
    if not inflater.eof:
        raise BadRequest(f"{enc} body is truncated")
    return out


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} is not a number") from None
    if not 0 <= n <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {n}, but the body holds {len(body)} bytes")
    return body[:n], body[n:]


def _parse(header: bytes) -> InferenceRequest:
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError):
        raise BadRequest("the inference request is not valid JSON") from None
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


def _unframe(blob: bytes, n: int) -> list[bytes]:
    """BYTES tensor elements from the binary form: each a 4-byte little-endian length, then the bytes."""
    out, offset = [], 0
    while offset < len(blob) and len(out) <= n:
        if offset + 4 > len(blob):
            raise BadRequest(f"binary data of input {INPUT!r} is truncated in the length of element {len(out)}")
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise BadRequest(f"binary data of input {INPUT!r} is truncated in element {len(out)}")
        out.append(blob[offset : offset + size])
        offset += size
    if len(out) != n or offset != len(blob):
        raise BadRequest(f"input {INPUT!r} has shape [{n}] but its binary data holds a different number of elements")
    return out


def _b64(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"input {INPUT!r} element {index}: in the JSON form each element must be a base64 string")
    try:
        return base64.b64decode(_DATA_URL.sub("", value.strip(), count=1), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"input {INPUT!r} element {index} is not valid base64") from None


def _images(req: InferenceRequest, blob: bytes, limit: int) -> list[bytes]:
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
    value = (params or {}).get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {key!r} must be true or false")
    return value


def _requested(req: InferenceRequest) -> list[tuple[str, bool, int | None]]:
    """(output name, binary?, classification k or None) for each output to send, in order."""
    default = _bool_param(req.parameters, "binary_data_output", False)
    if not req.outputs:
        return [(name, default, None) for name in DEFAULT_OUTPUTS]
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


# --- inference: outputs --------------------------------------------------------------------------
def _tensor(
    name: str, datatype: str, values: np.ndarray | list[str], shape: list[int], binary: bool
) -> tuple[dict[str, Any], bytes]:
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if datatype == "BYTES":
        strings = [s.encode() for s in values]  # type: ignore[union-attr]
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


def _outputs(
    head: Head, proba: np.ndarray, feats: np.ndarray, wanted: list[tuple[str, bool, int | None]]
) -> list[tuple[dict[str, Any], bytes]]:
    n = len(proba)
    result = []
    for name, binary, k in wanted:
        if name == "label":
            result.append(_tensor(name, "BYTES", [head.classes[int(i)] for i in np.argmax(proba, axis=1)], [n], binary))
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


BINARY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON; or, when binary outputs were asked for, the JSON header (length in "
        "Inference-Header-Content-Length) followed by the binary outputs",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post("/models/{name}/infer", name="oip_model_infer", response_model=InferenceResponse, response_model_exclude_none=True,
             responses=BINARY_RESPONSE, dependencies=KeyDep, openapi_extra=INFER_BODY,
             summary="Classify encoded images (BYTES input `image`)")  # fmt: skip
async def oip_model_infer(
    name: str,
    request: Request,
    service: ServiceDep,
    header_length: Annotated[
        str | None, Header(alias=HEADER_LENGTH, description="Binary tensor data: length of the JSON header")
    ] = None,
    content_encoding: Annotated[str | None, Header(alias="Content-Encoding", description="identity, gzip or deflate")] = None,
) -> Response:
    head = service.head(name)  # 404 before reading the body
    limit = service.settings.max_body_bytes
    body = _decompress(await read_body(request, limit), content_encoding, limit)
    header, blob = _split(body, header_length)
    req = _parse(header)
    wanted = _requested(req)
    images = _images(req, blob, service.settings.max_images_per_request)
    request.state.images, request.state.head = len(images), head.name

    decoded = await service.decode([Item(data, f"{INPUT}[{i}]") for i, data in enumerate(images)])
    failed = [(i, d.error) for i, d in enumerate(decoded) if d.error is not None]
    counter = service.metrics.images
    if failed:
        counter.labels("infer", head.name, "error").inc(len(failed))
        i, err = failed[0]
        raise type(err)(f"input {INPUT!r} element {i}: {err.message}")
    _, _, batcher = service.require_ready()
    feats = await batcher.submit(np.stack([d.image for d in decoded]))
    proba = head.predict_proba(feats)
    counter.labels("infer", head.name, "ok").inc(len(images))

    tensors = _outputs(head, proba, feats, wanted)
    doc: dict[str, Any] = {"model_name": head.name, "outputs": [t for t, _ in tensors]}
    if req.id is not None:
        doc["id"] = req.id
    text = json.dumps(doc, separators=(",", ":")).encode()
    if not any(binary for _, binary, _ in wanted):
        return Response(text, media_type="application/json")
    body = b"".join([text, *(blob for _, blob in tensors)])  # JSON outputs add b""
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(text))})
