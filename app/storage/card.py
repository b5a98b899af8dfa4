"""A head version's card (``card.json``), typed: what every reader of a card reads, in one model.

The card on disk is the commit point of a version (:mod:`app.storage.registry`) and what a signature covers
(:mod:`app.core.signing`), so the raw JSON object is kept byte-for-byte where it is verified and shown;
everything else reads a :class:`Card`. Unknown keys are kept (``extra="allow"``): a card written by a
newer tlserve, or a section no reader here types, loads and round-trips unchanged. A card that does
not parse (a field of the wrong type, a required field missing) is an :class:`~app.core.errors.ArtifactError`
naming the field, never a ``KeyError`` deep in a request.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from app.core.errors import ArtifactError

_OPEN = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class CardExtractor(BaseModel):
    """The extractor a head was trained on: its features are the only ones the head understands."""

    model_config = _OPEN
    sha256: str
    file: str | None = None
    input_size: int | None = None
    pooling: str | None = None
    feature_dim: int | None = None

    def described(self) -> str:
        """`` (vgg16_256_avg.onnx, 256x256, avg pooling)``, or nothing when the card does not say."""
        parts = [self.file[:80]] if self.file else []
        if self.input_size:
            parts.append(f"{self.input_size}x{self.input_size}")
        if self.pooling:
            parts.append(f"{self.pooling[:20]} pooling")
        return f" ({', '.join(parts)})" if parts else ""


class CardMetrics(BaseModel):
    """The validation report of the version (``metrics.accuracy`` and the confusion matrix)."""

    model_config = _OPEN
    accuracy: float | None = None


class CardTraining(BaseModel):
    """How the version was trained (folders, per-class counts, the split)."""

    model_config = _OPEN
    data_dir: str | None = None
    train_per_class: dict[str, int] | None = None
    val_per_class: dict[str, int] | None = None
    split: dict[str, Any] | None = None

    @property
    def val_dir(self) -> str | None:
        value = (self.split or {}).get("val_dir")
        return value if isinstance(value, str) else None

    @property
    def n_train(self) -> int | None:
        return sum(self.train_per_class.values()) if self.train_per_class is not None else None


class CardEstimator(BaseModel):
    model_config = _OPEN
    C: float | None = None
    C_source: str | None = None
    cv_accuracy_by_C: dict[str, float] | None = None


class CardJob(BaseModel):
    """The training job that made the version (HTTP training only)."""

    model_config = _OPEN
    id: str


class CardInt8(BaseModel):
    """The version's own INT8 check: its answers on INT8 features against fp32 on held-out photos."""

    model_config = _OPEN
    checked: bool = False
    passed: bool | None = None
    agreement: float = 0.0
    images: int | None = None
    min_agreement: float = 0.0


class Card(BaseModel):
    """One version's card. ``schema``, ``name``, ``version`` and ``artifacts`` are written by the store
    (:meth:`app.storage.registry.HeadStore.save`); a flat card from before versions has none of them."""

    model_config = _OPEN
    schema_: StrictInt | None = Field(None, alias="schema")
    name: str | None = None
    version: Any = None  # checked against the folder by app.storage.registry.check_place (an int when it is right)
    classes: tuple[str, ...]
    extractor: CardExtractor
    pickle: str
    pickle_sha256: str
    arrays: dict[str, str] | None = None
    artifacts: dict[str, str] | None = None
    created_at: str | None = None
    copied_from: int | None = None
    signature: dict[str, Any] | None = None
    estimator: CardEstimator = CardEstimator()
    metrics: CardMetrics | None = None
    training: CardTraining = CardTraining()
    evaluation: dict[str, Any] | None = None
    familiarity: dict[str, Any] | None = None
    int8: CardInt8 | None = None
    job: CardJob | None = None
    recipe: dict[str, Any] | None = None  # the training recipe (app.core.recipe): its transform is applied when served
    calibration: dict[str, Any] | None = None  # out-of-fold ECE and temperature (app.core.calibration)

    @classmethod
    def parse(cls, raw: dict[str, Any], where: str) -> Card:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "card"
            if first["type"] == "missing":
                raise ArtifactError(f"{where}: card lacks {field!r}") from None
            raise ArtifactError(f"{where}: card field {field!r}: {first['msg']}") from None

    @property
    def legacy(self) -> bool:
        """A flat card from before versions (no ``schema``): version 1, only its pickle listed."""
        return self.schema_ is None

    @property
    def signed(self) -> bool:
        return self.signature is not None

    @property
    def accuracy(self) -> float | None:
        return self.metrics.accuracy if self.metrics is not None else None

    @property
    def job_id(self) -> str | None:
        return self.job.id if self.job is not None else None
