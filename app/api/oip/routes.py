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
  (:mod:`app.familiarity`). Request parameter ``ood_policy``: ``report`` (default: the setting) or
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

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from app import __version__, tracing
from app.api.deps import ServiceDep, probe_auth, require_key
from app.api.inputs import read_body
from app.api.oip.codec import HEADER_LENGTH, INPUT, images, inflater, ood_policy, outputs, parse, requested, split
from app.api.oip.schemas import (
    INFER_BODY,
    InferenceResponse,
    Live,
    ModelMetadata,
    ModelReady,
    OipError,
    Ready,
    ServerMetadata,
    TensorMetadata,
)
from app.api.parsing import error_responses
from app.errors import TlserveError
from app.inference import InferRequest, Item
from app.service import Service

EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "onnxruntime_sklearn"
router = APIRouter(
    prefix="/v2",
    tags=["Open Inference Protocol (v2)"],
    responses=error_responses(OipError, (400, 401, 404, 409, 413, 415, 422, 500, 503)),
)
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


def _classes(service: Service, name: str, version: int | None) -> tuple[str, ...]:
    if version is not None:  # VersionNotFound → 404 listing the versions that exist
        return tuple(str(c) for c in service.registry.store.get(name, version).card.get("classes", []))
    current, head, _ = service.head_record(name)  # HeadNotFound → 404
    return head.classes if head is not None else tuple(str(c) for c in current.card.get("classes", []))


@router.get("/models/{name}", name="oip_model_metadata", response_model=ModelMetadata, dependencies=KeyDep,
            summary="Model metadata: the input and outputs with datatypes and shapes")  # fmt: skip
async def oip_model_metadata(name: str, service: ServiceDep) -> ModelMetadata:
    return model_metadata(service, name, None)


@router.get("/models/{name}/versions/{version}", name="oip_model_version_metadata", response_model=ModelMetadata,
            dependencies=KeyDep, summary="Metadata of one version of a model")  # fmt: skip
async def oip_model_version_metadata(name: str, version: int, service: ServiceDep) -> ModelMetadata:
    return model_metadata(service, name, version)


def model_metadata(service: Service, name: str, version: int | None) -> ModelMetadata:
    n_classes = len(_classes(service, name, version))
    familiar = "familiarity" in (service.registry.store.get(name, version).card)
    dim = service.info.feature_dim if service.info else -1
    return ModelMetadata(
        name=name,
        versions=[str(v) for v in service.registry.store.versions(name)],
        platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[
            TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
            TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, n_classes]),
            TensorMetadata(name="features", datatype="FP32", shape=[-1, dim]),
            *(
                [
                    TensorMetadata(name="familiarity", datatype="FP32", shape=[-1]),
                    TensorMetadata(name="in_distribution", datatype="BOOL", shape=[-1]),
                ]
                if familiar
                else []
            ),
        ],
    )


@router.get("/models/{name}/ready", name="oip_model_ready", response_model=ModelReady, dependencies=KeyDep,
            responses={400: {"model": ModelReady}}, summary="Model readiness: 200 when it can serve, 400 otherwise")  # fmt: skip
async def oip_model_ready(name: str, service: ServiceDep) -> JSONResponse:
    return _ready(service, name, None)


@router.get("/models/{name}/versions/{version}/ready", name="oip_model_version_ready", response_model=ModelReady,
            dependencies=KeyDep, responses={400: {"model": ModelReady}}, summary="Readiness of one version of a model")  # fmt: skip
async def oip_model_version_ready(name: str, version: int, service: ServiceDep) -> JSONResponse:
    return _ready(service, name, version)


def _ready(service: Service, name: str, version: int | None) -> JSONResponse:
    _, head, error = service.head_record(name)  # 404 for an unknown model
    ok, reason = service.ready
    if ok and version is not None:
        try:
            service.head(name, version)
        except TlserveError as exc:
            if exc.status_code == 404:
                raise
            ok, reason = False, exc.message
    elif ok and head is None:
        ok, reason = False, error.message if error else "not loaded"
    body = ModelReady(name=name, ready=ok, reason=None if ok else reason).model_dump(exclude_none=True)
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
    head = service.head(name, version)  # 404 before reading the body
    s = service.settings
    with tracing.span("receive"):
        body = await read_body(request, s.max_body_bytes, inflater(content_encoding, s.max_decompressed_bytes))
        header, blob = split(body, header_length)
        req = await parse(header, s.max_request_elements, s.max_json_depth)
        wanted = requested(req, familiar="familiarity" in head.card)
        policy = ood_policy(req)
        data = images(req, blob, service.settings.max_images_per_request)
    request.state.images = len(data)
    items = [Item(d, f"{INPUT}[{i}]") for i, d in enumerate(data)]
    result = await service.infer(InferRequest(items, "infer", head=name, version=version, all_or_nothing=True, ood_policy=policy))
    assert result.head is not None and result.proba is not None
    request.state.head = result.head.name
    if result.failed:
        i, err = result.failed[0]
        raise type(err)(f"input {INPUT!r} element {i}: {err.message}")

    with tracing.span("encode"):
        tensors = outputs(result, wanted)
        doc: dict[str, Any] = {"model_name": result.head.name, "model_version": str(result.head.version),
                               "outputs": [t for t, _ in tensors]}  # fmt: skip
        if req.id is not None:
            doc["id"] = req.id
        text = json.dumps(doc, separators=(",", ":")).encode()
        if not any(binary for _, binary, _ in wanted):
            return Response(text, media_type="application/json")
        answer = b"".join([text, *(blob for _, blob in tensors)])  # JSON outputs add b""
        return Response(answer, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(text))})
