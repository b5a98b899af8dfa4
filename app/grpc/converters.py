"""Protobuf ↔ the protocol's transport-neutral types (:mod:`app.serving.oip`) for the gRPC front. What the
tensors mean and how they are checked is :mod:`app.serving.oip.tensors`'s, shared with REST ``/v2``; here only
bytes move:

- the input's elements come in ``raw_input_contents`` (4-byte little-endian length + bytes each, what
  tritonclient sends) or as ``contents.bytes_contents`` (one entry per image);
- request and output ``parameters`` (``InferParameter``) become plain values;
- outputs go out as ``raw_output_contents`` (as Triton answers; what tritonclient reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.core.errors import BadRequest
from app.grpc.stubs import pb
from app.serving.oip.plane import Answer, Input, ModelMetadata
from app.serving.oip.tensors import INPUT, frame, unframe


def parameter(value: Any) -> Any:
    """An ``InferParameter`` as a plain value (None when unset)."""
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: parameter(v) for k, v in params.items()}


def version(text: str) -> int | None:
    """``model_version``: empty for the head's current version, else a version number."""
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 9:
        raise BadRequest(f"model_version {text[:20]!r} is not a head version number (1, 2, …)")
    return int(text)


def inputs(request: pb.ModelInferRequest) -> list[Input]:
    return [Input(t.name, t.datatype, list(t.shape)) for t in request.inputs]


def outputs(request: pb.ModelInferRequest) -> list[tuple[str, Mapping[str, Any] | None]] | None:
    return [(o.name, parameters(o.parameters)) for o in request.outputs] or None


def elements(request: pb.ModelInferRequest, n: int) -> list[bytes | memoryview]:
    """The ``n`` images of the (checked) input, from ``raw_input_contents`` or ``contents.bytes_contents``."""
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise BadRequest(f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs")
        if tensor.HasField("contents"):
            raise BadRequest(f"input {INPUT!r} has both contents and raw_input_contents")
        return unframe(request.raw_input_contents[0], n)
    contents = tensor.contents.bytes_contents
    if not contents:
        raise BadRequest(f"input {INPUT!r} has neither raw_input_contents nor contents.bytes_contents")
    return unframe(frame(contents), n)  # the count is checked as for the binary form


def infer_response(request: pb.ModelInferRequest, answer: Answer) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version, id=request.id)
    for t in answer.outputs:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        response.raw_output_contents.append(t.raw())
    return response


def metadata_response(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    def tensors(ts: Any) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in ts]

    return pb.ModelMetadataResponse(
        name=meta.name, versions=meta.versions, platform=meta.platform, inputs=tensors(meta.inputs), outputs=tensors(meta.outputs)
    )
