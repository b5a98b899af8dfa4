"""Protobuf ↔ tlserve types for the gRPC front. The rules are the HTTP ``/v2`` front's, reused, not restated:

- the input is checked and its elements split by :func:`app.api.oip.codec.images` (one BYTES input
  named ``image``, shape ``[N]`` or ``[N, 1]``, ``max_images_per_request``), whether the elements came
  in ``raw_input_contents`` (4-byte little-endian length + bytes each, what tritonclient sends) or as
  ``contents.bytes_contents`` (one entry per image);
- the outputs asked for are checked by :func:`app.api.oip.codec.requested` (``label``,
  ``probabilities`` with the classification extension, ``features``) and rendered by
  :func:`app.api.oip.codec.outputs`, always as ``raw_output_contents`` (as Triton answers; what
  tritonclient reads).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from app.api.oip.codec import INPUT, images, outputs, requested
from app.api.oip.schemas import InferenceRequest, RequestInput, RequestOutput
from app.errors import BadRequest
from app.grpc.stubs import pb
from app.inference import InferResult


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


def _blob(request: pb.ModelInferRequest) -> bytes:
    """The one input's elements, framed as in ``raw_input_contents``."""
    tensor = request.inputs[0]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise BadRequest(f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs")
        if tensor.HasField("contents"):
            raise BadRequest(f"input {INPUT!r} has both contents and raw_input_contents")
        return bytes(request.raw_input_contents[0])
    contents = tensor.contents.bytes_contents
    if not contents:
        raise BadRequest(f"input {INPUT!r} has neither raw_input_contents nor contents.bytes_contents")
    return b"".join(struct.pack("<I", len(b)) + b for b in contents)


def infer_request(
    request: pb.ModelInferRequest, max_images: int
) -> tuple[list[bytes | memoryview], list[tuple[str, bool, int | None]]]:
    """The images of a ``ModelInferRequest`` and the outputs it wants, checked as ``/v2`` over HTTP checks them."""
    if len(request.inputs) != 1:
        raise BadRequest(f"expected one input tensor named {INPUT!r}, got {len(request.inputs)}")
    wanted = requested(
        InferenceRequest(
            inputs=[],
            outputs=[RequestOutput(name=o.name, parameters=parameters(o.parameters)) for o in request.outputs] or None,
        )
    )
    t = request.inputs[0]
    blob = _blob(request) if (t.name, t.datatype) == (INPUT, "BYTES") else b""  # else images() names the mistake
    header = RequestInput(name=t.name, shape=list(t.shape), datatype=t.datatype, parameters={"binary_data_size": len(blob)})
    return images(InferenceRequest(inputs=[header]), blob, max_images), wanted


def infer_response(
    request: pb.ModelInferRequest, result: InferResult, wanted: list[tuple[str, bool, int | None]]
) -> pb.ModelInferResponse:
    assert result.head is not None and result.proba is not None
    response = pb.ModelInferResponse(model_name=result.head.name, model_version=str(result.head.version), id=request.id)
    for tensor, blob in outputs(result, [(name, True, k) for name, _, k in wanted]):
        response.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        response.raw_output_contents.append(blob)
    return response


def tensor(name: str, datatype: str, shape: list[int]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)
