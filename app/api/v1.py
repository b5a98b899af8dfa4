"""``/v1``: classify, embed, models, info."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request

from app.api.deps import ServiceDep, require_admin, require_key
from app.api.inputs import parse_images
from app.api.parsing import error_responses, item_error, parse_bool
from app.api.schemas import (
    IMAGE_BODY,
    ClassifyResponse,
    EmbedResponse,
    ErrorResponse,
    FamiliaritySummary,
    ModelCard,
    ModelList,
    ModelSummary,
)
from app.core import tracing
from app.core.errors import InputError, MalformedRequest, TlserveError, redact
from app.serving.inference import InferRequest, InferResult, OodPolicy, parse_ood_policy
from app.serving.service import Service
from app.storage.card import Card

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)],
                   responses=error_responses(ErrorResponse, (401, 404, 409, 413, 415, 422, 500, 503)))  # fmt: skip


def _int_option(value: Any, name: str, low: int, high: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise MalformedRequest(f"{name} must be an integer") from None
    if isinstance(value, float | bool) or not low <= n <= high:
        raise MalformedRequest(f"{name} must be an integer from {low} to {high}" + (" (max_top_k)" if name == "top_k" else ""))
    return n


def ood_policy(value: Any) -> OodPolicy | None:
    """A request's ``ood_policy`` option: ``report``, ``refuse`` or absent or empty (the setting decides)."""
    return parse_ood_policy(None if value == "" else value)


def _all_failed(result: InferResult) -> None:
    """A request whose every image failed gets the first failure's status, not 200."""
    if result.decoded and len(result.failed) == len(result.decoded):
        first = result.failed[0][1]
        exc = InputError(first.message)
        exc.status_code, exc.code = first.status_code, first.code
        raise exc


@router.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True, openapi_extra=IMAGE_BODY,
             summary="Classify uploaded images with a head")  # fmt: skip
async def classify(
    request: Request,
    service: ServiceDep,
    head: str | None = Query(None, max_length=64, description="Head name (default: the configured default head)"),
    version: int | None = Query(None, ge=1, description="Pin a version of the head (default: its current version)"),
    top_k: int | None = Query(None, ge=1, description="Return the k most likely classes instead of every probability"),
    ood_policy_q: str | None = Query(
        None,
        alias="ood_policy",
        description="Below the head's familiarity threshold: `report` (name the class, `in_distribution: false`) or "
        "`refuse` (name none); default: the `ood_policy` setting",
    ),
) -> dict[str, Any]:
    with tracing.span("receive"):
        parsed = await parse_images(request, service.settings)
    head_name = parsed.options.get("head", head)
    if head_name is not None and not isinstance(head_name, str):
        raise MalformedRequest("head must be a string")
    k = _int_option(parsed.options.get("top_k", top_k), "top_k", 1, service.settings.max_top_k)
    pinned = _int_option(parsed.options.get("version", version), "version", 1, 10**9)
    policy = ood_policy(parsed.options.get("ood_policy", ood_policy_q))
    request.state.images = len(parsed.items)
    result = await service.infer(InferRequest(parsed.items, "classify", head=head_name, version=pinned, ood_policy=policy))
    assert result.head is not None and result.proba is not None
    h = result.head
    request.state.head = h.name
    _all_failed(result)
    k = min(k, len(h.classes)) if k is not None else None
    answers, results = result.answers, []
    for i, d, row in result.rows():
        entry: dict[str, Any] = {"index": i}
        if d.item.name is not None:
            entry["file"] = d.item.name
        if row is None:
            assert d.error is not None
            entry["error"] = item_error(d.error)
        else:  # refused (below the familiarity threshold): no label, confidence or probabilities
            entry.update(answers.row(row, k, named=result.named(row)))
        results.append(entry)
    return {"head": h.name, "version": h.version, "model": service.info.fingerprint if service.info else "",
            "request_id": request.state.request_id, "results": results}  # fmt: skip


@router.post("/embed", response_model=EmbedResponse, response_model_exclude_none=True, openapi_extra=IMAGE_BODY,
             summary="Feature vectors of uploaded images")  # fmt: skip
async def embed(
    request: Request,
    service: ServiceDep,
    normalize: bool = Query(False, description="L2-normalise each vector"),
) -> dict[str, Any]:
    with tracing.span("receive"):
        parsed = await parse_images(request, service.settings)
    norm = parse_bool(parsed.options.get("normalize", normalize), "normalize")
    request.state.images = len(parsed.items)
    result = await service.infer(InferRequest(parsed.items, "embed", classify=False))
    _all_failed(result)
    feats = result.features
    if norm and len(feats):
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    results = []
    for i, d, row in result.rows():
        entry: dict[str, Any] = {"index": i, "file": d.item.name}
        if row is None:
            assert d.error is not None
            entry["error"] = item_error(d.error)
        else:
            entry["embedding"] = feats[row].tolist()
        results.append(entry)
    dim = service.info.feature_dim if service.info else 0
    return {"model": service.info.fingerprint if service.info else "", "dim": dim, "normalized": norm,
            "request_id": request.state.request_id, "results": results}  # fmt: skip


def _redacted(service: Service, error: TlserveError | None) -> str | None:
    return None if error is None else redact(error.message, service.settings.model_store)


def _file_name(line: str) -> str:
    path, sep, why = line.partition(": ")  # "<path>: <why it was skipped>"
    return PurePath(path).name + sep + why


def _public_card(card: dict[str, Any]) -> dict[str, Any]:
    """The card as shown over HTTP: training folders and skipped files by name, not by server path."""
    training = card.get("training")
    if not isinstance(training, dict):
        return card
    training = dict(training)
    if isinstance(training.get("data_dir"), str):
        training["data_dir"] = PurePath(training["data_dir"]).name
    if isinstance(training.get("split"), dict) and isinstance(training["split"].get("val_dir"), str):
        training["split"] = {**training["split"], "val_dir": PurePath(training["split"]["val_dir"]).name}
    if isinstance(training.get("skipped_files"), list):
        training["skipped_files"] = [_file_name(str(line)) for line in training["skipped_files"]]
    return {**card, "training": training}


NO_FAMILIARITY = ("no familiarity data (trained before tlserve stored it): answers carry no in_distribution "
                  "verdict and are never refused; retrain the head to add it")  # fmt: skip


def familiarity_summary(card: Card) -> FamiliaritySummary:
    section = card.familiarity
    if section is None:
        return FamiliaritySummary(available=False, note=NO_FAMILIARITY)
    calibration = section.get("calibration") or {}
    held = section.get("held_out") or {}
    return FamiliaritySummary(available=True, method=section.get("method"), threshold=section.get("threshold"),
                              acceptance=section.get("acceptance"), calibrated_accepted=calibration.get("accepted"),
                              held_out_accepted=held.get("accepted"))  # fmt: skip


def _summary(service: Service, name: str) -> ModelSummary:
    try:
        version, head, error = service.head_record(name)
        card = version.info
    except TlserveError as exc:
        return ModelSummary(name=name, version=None, classes=[], loaded=False, error=_redacted(service, exc), error_code=exc.code)
    return ModelSummary(
        name=name,
        version=head.version if head else version.version,
        classes=list(card.classes),
        loaded=head is not None,
        error=_redacted(service, error),
        error_code=error.code if error else None,
        accuracy=card.accuracy,
        extractor_sha256=card.extractor.sha256,
        pickle_sha256=card.pickle_sha256,
        created_at=card.created_at,
        familiarity=familiarity_summary(card),
    )


@router.get("/models", response_model=ModelList, summary="Heads in the model store")
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(default=service.settings.default_head, models=[_summary(service, n) for n in service.head_names()])


@router.get("/models/{name}", response_model=ModelCard, summary="One head's card")
async def get_model(name: str, service: ServiceDep) -> ModelCard:
    version, head, error = service.head_record(name)
    return ModelCard(name=name, loaded=head is not None, error=_redacted(service, error), card=_public_card(version.card))


@router.post("/models/{name}/reload", response_model=ModelSummary, dependencies=[Depends(require_admin)],
             summary="Verify and load a head again (atomic swap; admin)")  # fmt: skip
async def reload_model(name: str, service: ServiceDep) -> ModelSummary:
    await service.reload_head(name)
    return _summary(service, name)


@router.get("/info", summary="Version, execution providers, threads, input size, batching and limits")
async def info(service: ServiceDep) -> dict[str, Any]:
    return service.describe_info()
