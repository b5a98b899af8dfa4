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
- output ``features``: ``FP32 [N, D]``, the extractor's feature vectors, only when asked for;
- outputs ``familiarity`` (``FP32 [N]``, higher: more like the training photos) and ``in_distribution``
  (``BOOL [N]``, at or above the head's calibrated threshold), for heads with familiarity data
  (:mod:`app.serving.familiarity`). Request parameter ``ood_policy``: ``report`` (default: the setting) or
  ``refuse``, which sends the label ``""`` for an image that is not in distribution.

Without ``outputs`` in the request, ``label`` and ``probabilities`` come back, and the two familiarity
outputs with heads that have them. Outputs are JSON
unless ``parameters.binary_data_output`` (request) or ``parameters.binary_data`` (per output) asks
for binary; then the response body is the JSON header (its length in ``Inference-Header-Content-Length``)
followed by each binary output's bytes in output order.

The OIP has no per-item errors: one bad image fails the whole request with a 4xx that names the
element. Errors are ``{"error": "..."}`` (rendered by :mod:`app.api.errors`). Same batcher, limits
(``max_body_bytes``, ``max_images_per_request``, ``max_request_elements``, ``max_json_depth``) and metrics
as ``/v1``; a gzip or deflate body is inflated as it arrives, up to ``max_decompressed_bytes``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from app.api.deps import ServiceDep, probe_auth, require_key
from app.api.inputs import read_body
from app.api.oip.codec import HEADER_LENGTH, elements, encode, inflater, parse, split
from app.api.oip.schemas import INFER_BODY, InferenceResponse, Live, ModelMetadata, ModelReady, OipError, Ready, ServerMetadata
from app.api.parsing import error_responses
from app.core import tracing
from app.serving.oip import plane
from app.serving.service import Service

router = APIRouter(
    prefix="/v2",
    tags=["Open Inference Protocol (v2)"],
    responses=error_responses(OipError, (400, 401, 404, 409, 413, 415, 422, 500, 503)),
)
KeyDep = [Depends(require_key)]


# --- health and metadata -------------------------------------------------------------------------
@router.get("", name="oip_server_metadata", response_model=ServerMetadata, dependencies=KeyDep, summary="Server metadata")
async def oip_server_metadata() -> ServerMetadata:
    return plane.server_metadata()


@router.get("/health/live", name="oip_server_live", response_model=Live, dependencies=[Depends(probe_auth)],
            summary="Liveness: 200 while the process answers")  # fmt: skip
async def oip_server_live() -> Live:
    return Live(live=True)


@router.get("/health/ready", name="oip_server_ready", response_model=Ready, dependencies=[Depends(probe_auth)],
            responses={400: {"model": Ready}}, summary="Readiness: 200 when ready, 400 (the spec's 4xx = false) otherwise")  # fmt: skip
async def oip_server_ready(service: ServiceDep) -> JSONResponse:
    ok, reason = plane.server_ready(service)
    return JSONResponse(Ready(ready=ok, reason=reason).model_dump(exclude_none=True), status_code=200 if ok else 400)


@router.get("/models/{name}", name="oip_model_metadata", response_model=ModelMetadata, dependencies=KeyDep,
            summary="Model metadata: the input and outputs with datatypes and shapes")  # fmt: skip
async def oip_model_metadata(name: str, service: ServiceDep) -> ModelMetadata:
    return plane.model_metadata(service, name, None)


@router.get("/models/{name}/versions/{version}", name="oip_model_version_metadata", response_model=ModelMetadata,
            dependencies=KeyDep, summary="Metadata of one version of a model")  # fmt: skip
async def oip_model_version_metadata(name: str, version: int, service: ServiceDep) -> ModelMetadata:
    return plane.model_metadata(service, name, version)


@router.get("/models/{name}/ready", name="oip_model_ready", response_model=ModelReady, dependencies=KeyDep,
            responses={400: {"model": ModelReady}}, summary="Model readiness: 200 when it can serve, 400 otherwise")  # fmt: skip
async def oip_model_ready(name: str, service: ServiceDep) -> JSONResponse:
    return await _ready(service, name, None)


@router.get("/models/{name}/versions/{version}/ready", name="oip_model_version_ready", response_model=ModelReady,
            dependencies=KeyDep, responses={400: {"model": ModelReady}}, summary="Readiness of one version of a model")  # fmt: skip
async def oip_model_version_ready(name: str, version: int, service: ServiceDep) -> JSONResponse:
    return await _ready(service, name, version)


async def _ready(service: Service, name: str, version: int | None) -> JSONResponse:
    ok, reason = await plane.model_ready(service, name, version)
    body = ModelReady(name=name, ready=ok, reason=reason).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=200 if ok else 400)


BINARY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON; or, when binary outputs were asked for, the JSON header (length in "
        "Inference-Header-Content-Length) followed by the binary outputs",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


HeaderLength = Annotated[str | None, Header(alias=HEADER_LENGTH, description="Binary tensor data: length of the JSON header")]
ContentEncoding = Annotated[str | None, Header(alias="Content-Encoding", description="identity, gzip or deflate")]


@router.post("/models/{name}/infer", name="oip_model_infer", response_model=InferenceResponse, response_model_exclude_none=True,
             responses=BINARY_RESPONSE, dependencies=KeyDep, openapi_extra=INFER_BODY,
             summary="Classify encoded images (BYTES input `image`)")  # fmt: skip
async def oip_model_infer(name: str, request: Request, service: ServiceDep, header_length: HeaderLength = None,
                          content_encoding: ContentEncoding = None) -> Response:  # fmt: skip
    return await _infer(service, request, name, None, header_length, content_encoding)


@router.post("/models/{name}/versions/{version}/infer", name="oip_model_version_infer", response_model=InferenceResponse,
             response_model_exclude_none=True, responses=BINARY_RESPONSE, dependencies=KeyDep, openapi_extra=INFER_BODY,
             summary="Classify encoded images with one version of a model")  # fmt: skip
async def oip_model_version_infer(name: str, version: int, request: Request, service: ServiceDep,
                                  header_length: HeaderLength = None, content_encoding: ContentEncoding = None) -> Response:  # fmt: skip
    return await _infer(service, request, name, version, header_length, content_encoding)


async def _infer(service: Service, request: Request, name: str, version: int | None, header_length: str | None,
                 content_encoding: str | None) -> Response:  # fmt: skip
    head = await plane.head(service, name, version)  # 404 before reading the body
    request.state.head = head.name
    s = service.settings
    with tracing.span("receive"):
        body = await read_body(request, s.max_body_bytes, inflater(content_encoding, s.max_decompressed_bytes))
        header, blob = split(body, header_length)
        req = await parse(header, s.max_request_elements, s.max_json_depth)
        inputs = [plane.Input(t.name, t.datatype, t.shape) for t in req.inputs]
        outputs = [(o.name, o.parameters) for o in req.outputs] if req.outputs else None
        call = plane.translate(service, head, version, inputs, lambda n: elements(req, blob, n), outputs, req.parameters)
    request.state.images = len(call.request.items)
    result = await plane.run(service, call)
    with tracing.span("encode"):
        answer, header_size = encode(plane.answer(call, result), req.id, call.wanted)
        if header_size is None:
            return Response(answer, media_type="application/json")
        return Response(answer, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_size)})
