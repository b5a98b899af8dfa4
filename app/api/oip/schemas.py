"""The Open Inference Protocol's JSON objects (KServe v2 REST), as pydantic models; the metadata ones are
:mod:`app.serving.oip.plane`'s, shared with gRPC."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.serving.oip.plane import ModelMetadata, ServerMetadata, TensorMetadata


class OipError(BaseModel):
    error: str


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    reason: str | None = None


class ModelReady(BaseModel):
    name: str
    ready: bool
    reason: str | None = None


class RequestInput(BaseModel):
    name: str = Field(description="Always `image`")
    shape: list[int] = Field(description="[N] or [N, 1]")
    datatype: str = Field(description="Always `BYTES`")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` when the data follows the JSON header")
    data: list[Any] | None = Field(None, description="Base64 strings of encoded image files (flat or nested)")


class RequestOutput(BaseModel):
    name: str = Field(description="`label`, `probabilities`, `features`, `familiarity` or `in_distribution`")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data` (bool); `classification` (int) on probabilities")


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_output` (bool); `ood_policy` (`report` or `refuse`); others are ignored"
    )
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
    model_version: str | None = None
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

    resolved: dict[str, Any] = walk(schema)
    return resolved


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

__all__ = [
    "INFER_BODY", "InferenceRequest", "InferenceResponse", "Live", "ModelMetadata", "ModelReady", "OipError", "Ready",
    "RequestInput", "RequestOutput", "ResponseOutput", "ServerMetadata", "TensorMetadata",
]  # fmt: skip
