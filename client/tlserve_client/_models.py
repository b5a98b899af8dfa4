"""The ``/v1`` response models: what the server sends and the client parses, defined once.

The server's routes answer with these very classes (``app.api.schemas`` imports them), so the
client cannot drift from the server it ships with, and ``/docs`` shows the same schemas.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


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
