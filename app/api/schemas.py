"""Response (and documented request) models for /v1, so /docs shows real schemas."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `queue_full`, `unsupported_format`")
    message: str = Field(description="What went wrong, naming the limit or input at fault")
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ItemError(BaseModel):
    code: str
    message: str
    status: int = Field(description="The HTTP status this error would have on its own")


class TopK(BaseModel):
    label: str
    probability: float


class ImageResult(BaseModel):
    index: int = Field(description="Position of the image in the request")
    file: str | None = Field(None, description="File name (multipart) or the JSON item's `name`")
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = Field(None, description="Every class's probability (when top_k is not set)")
    top_k: list[TopK] | None = None
    familiarity: float | None = Field(
        None,
        description="How much the photo looks like the head's training photos (higher: more); heads with familiarity data only",
    )
    in_distribution: bool | None = Field(
        None,
        description="Whether `familiarity` is at or above the head's calibrated threshold; absent for heads without "
        "familiarity data. With `ood_policy=refuse`, `false` comes with no `label`, `confidence` or probabilities",
    )
    error: ItemError | None = Field(None, description="Set when this image failed; the others are still classified")


class ClassifyResponse(BaseModel):
    head: str
    version: int = Field(description="The head version that answered")
    model: str = Field(description="Extractor sha256 prefix")
    request_id: str
    results: list[ImageResult]


class Embedding(BaseModel):
    index: int
    file: str | None = None
    embedding: list[float] | None = None
    error: ItemError | None = None


class EmbedResponse(BaseModel):
    model: str
    dim: int
    normalized: bool
    request_id: str
    results: list[Embedding]


class FamiliaritySummary(BaseModel):
    available: bool = Field(description="Whether answers carry `familiarity` and `in_distribution`")
    note: str | None = Field(None, description="Why not, and what to do")
    method: str | None = None
    threshold: float | None = None
    acceptance: float | None = Field(
        None, description="Share of training-like photos the threshold accepts (calibrated out of fold)"
    )
    calibrated_accepted: float | None = Field(None, description="Out-of-fold accepted share of the training photos")
    held_out_accepted: float | None = Field(None, description="Accepted share of the held-out photos (a check)")


class ModelSummary(BaseModel):
    name: str
    classes: list[str]
    loaded: bool
    version: int | None = Field(None, description="The version served (or, when none is, the current one on disk)")
    error: str | None = Field(None, description="Why the head is not served, or why its last reload was refused")
    error_code: str | None = Field(None, description="The stable code of that error (e.g. `incompatible_head`)")
    accuracy: float | None = None
    extractor_sha256: str | None = None
    pickle_sha256: str | None = None
    created_at: str | None = None
    familiarity: FamiliaritySummary | None = None


class ModelList(BaseModel):
    default: str
    models: list[ModelSummary]


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
                        "ood_policy": {"type": "string", "enum": ["report", "refuse"]},
                    },
                }
            },
        },
    }
}
