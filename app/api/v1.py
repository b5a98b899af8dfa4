"""``/v1``: classify, embed, models, info."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request

from app.api.deps import ServiceDep, require_key
from app.api.errors import redact
from app.api.inputs import parse_images
from app.api.schemas import (
    IMAGE_BODY,
    ClassifyResponse,
    EmbedResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelSummary,
)
from app.errors import InputError, MalformedRequest, TlserveError
from app.heads import read_card
from app.service import Service

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 404, 409, 413, 415, 422, 500, 503)}
router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses=ERRORS)


def _int_option(value: Any, name: str, low: int, high: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise MalformedRequest(f"{name} must be an integer") from None
    if isinstance(value, float | bool) or not low <= n <= high:
        raise MalformedRequest(f"{name} must be an integer from {low} to {high} (max_top_k)")
    return n


def _bool_option(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.lower() in ("true", "1", "yes")
    raise MalformedRequest(f"{name} must be true or false")


def _all_failed(results: list[dict[str, Any]]) -> None:
    """A request whose every image failed gets the first failure's status, not 200."""
    if results and all("error" in r for r in results):
        first = results[0]["error"]
        exc = InputError(first["message"])
        exc.status_code, exc.code = first["status"], first["code"]
        raise exc


@router.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True, openapi_extra=IMAGE_BODY,
             summary="Classify uploaded images with a head")  # fmt: skip
async def classify(
    request: Request,
    service: ServiceDep,
    head: str | None = Query(None, max_length=64, description="Head name (default: the configured default head)"),
    top_k: int | None = Query(None, ge=1, description="Return the k most likely classes instead of every probability"),
) -> dict[str, Any]:
    parsed = await parse_images(request, service.settings)
    head_name = parsed.options.get("head", head)
    if head_name is not None and not isinstance(head_name, str):
        raise MalformedRequest("head must be a string")
    k = _int_option(parsed.options.get("top_k", top_k), "top_k", 1, service.settings.max_top_k)
    request.state.images = len(parsed.items)
    h, results = await service.classify(parsed.items, head_name, k)
    request.state.head = h.name
    _all_failed(results)
    return {"head": h.name, "model": service.info.fingerprint if service.info else "", "request_id": request.state.request_id,
            "results": results}  # fmt: skip


@router.post("/embed", response_model=EmbedResponse, response_model_exclude_none=True, openapi_extra=IMAGE_BODY,
             summary="Feature vectors of uploaded images")  # fmt: skip
async def embed(
    request: Request,
    service: ServiceDep,
    normalize: bool = Query(False, description="L2-normalise each vector"),
) -> dict[str, Any]:
    parsed = await parse_images(request, service.settings)
    norm = _bool_option(parsed.options.get("normalize", normalize), "normalize")
    request.state.images = len(parsed.items)
    decoded, feats = await service.features(parsed.items)
    if norm and len(feats):
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    results, row = [], 0
    for i, d in enumerate(decoded):
        entry: dict[str, Any] = {"index": i, "file": d.item.name}
        if d.error is not None:
            entry["error"] = {"code": d.error.code, "message": d.error.message, "status": d.error.status_code}
        else:
            entry["embedding"] = feats[row].tolist()
            row += 1
        results.append(entry)
    _all_failed(results)
    dim = service.info.feature_dim if service.info else 0
    return {"model": service.info.fingerprint if service.info else "", "dim": dim, "normalized": norm,
            "request_id": request.state.request_id, "results": results}  # fmt: skip


def _head_error(service: Service, name: str) -> str | None:
    error = service.head_errors.get(name)
    return None if error is None else redact(error, service.settings.model_store)


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


def _summary(service: Service, name: str) -> ModelSummary:
    try:
        card = read_card(service.store, name)
    except TlserveError as exc:
        return ModelSummary(name=name, classes=[], loaded=False, error=redact(exc.message, service.settings.model_store))
    return ModelSummary(
        name=name,
        classes=[str(c) for c in card.get("classes", [])],
        loaded=name in service.heads,
        error=_head_error(service, name),
        accuracy=(card.get("metrics") or {}).get("accuracy"),
        extractor_sha256=(card.get("extractor") or {}).get("sha256"),
        pickle_sha256=card.get("pickle_sha256"),
        created_at=card.get("created_at"),
    )


@router.get("/models", response_model=ModelList, summary="Heads in the model store")
async def list_models(service: ServiceDep) -> ModelList:
    names = sorted(set(service.store.head_names()) | set(service.heads))
    return ModelList(default=service.settings.default_head, models=[_summary(service, n) for n in names])


@router.get("/models/{name}", response_model=ModelCard, summary="One head's card")
async def get_model(name: str, service: ServiceDep) -> ModelCard:
    card = read_card(service.store, name)
    return ModelCard(name=name, loaded=name in service.heads, error=_head_error(service, name), card=_public_card(card))


@router.post("/models/{name}/reload", response_model=ModelSummary, summary="Verify and load a head again (atomic swap)")
async def reload_model(name: str, service: ServiceDep) -> ModelSummary:
    await service.reload_head(name)
    return _summary(service, name)


@router.get("/info", summary="Version, execution providers, threads, input size, batching and limits")
async def info(service: ServiceDep) -> dict[str, Any]:
    return service.describe_info()
