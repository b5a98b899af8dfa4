"""Response (and documented request) models for /v1, so /docs shows real schemas."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# The responses a client parses are defined once, in the client package the server ships with.
from tlserve_client import ClassifyResponse as ClassifyResponse
from tlserve_client import EmbedResponse as EmbedResponse
from tlserve_client import FamiliaritySummary as FamiliaritySummary
from tlserve_client import ModelList as ModelList
from tlserve_client import ModelSummary as ModelSummary

from app.serving.inference import OOD_POLICIES


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `queue_full`, `unsupported_format`")
    message: str = Field(description="What went wrong, naming the limit or input at fault")
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    name: str
    loaded: bool
    error: str | None = None
    card: dict[str, Any]


class Probe(BaseModel):
    status: str
    reason: str | None = None


IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["b64"],
                                "properties": {
                                    "b64": {"type": "string", "description": "base64 of the image file"},
                                    "name": {"type": "string"},
                                },
                            },
                        },
                        "head": {"type": "string"},
                        "top_k": {"type": "integer", "minimum": 1},
                        "normalize": {"type": "boolean"},
                        "ood_policy": {"type": "string", "enum": list(OOD_POLICIES)},
                    },
                }
            },
        },
    }
}
