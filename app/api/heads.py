"""``/v1/heads``: a head's versions — list them with their reports, promote one (compare-and-swap), roll
back, delete, compare two on the head's fixed validation set. (Training and examples: ``app/api/training.py``.)

Listing needs an inference key; changing what is served needs an admin key (``TLSERVE_ADMIN_KEYS``)
once keys are configured. A change is served by this replica at once and by every replica sharing
the store within ``TLSERVE_HEAD_POLL_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from app.api.deps import ServiceDep, require_admin, require_key, require_writer
from app.api.parsing import error_responses
from app.api.schemas import ErrorResponse
from app.core.errors import DatasetError, HeadNotFound, TlserveError
from app.core.names import valid_head_name
from app.learning.jobs import JobRunner
from app.learning.jobstore import card_report
from app.serving.service import Service
from app.storage.examples import ExampleStore
from app.storage.registry import Version

router = APIRouter(prefix="/v1/heads", tags=["heads"], dependencies=[Depends(require_key)],
                   responses=error_responses(ErrorResponse, (400, 401, 403, 404, 409, 422, 500, 503)))  # fmt: skip
Admin = [Depends(require_admin), Depends(require_writer)]  # every route here that needs an admin key writes


class VersionSummary(BaseModel):
    version: int
    current: bool
    created_at: str | None = None
    classes: list[str]
    accuracy: float | None = Field(None, description="The version's validation accuracy, from its card")
    signed: bool
    copied_from: int | None = None
    report: dict[str, Any] | None = Field(None, description="The version's validation report, from its card (as a job's)")
    job_id: str | None = Field(None, description="The training job that made it (None: trained by `tlserve train`)")


class VersionList(BaseModel):
    name: str
    current: int = Field(description="The version the store points to")
    served: int | None = Field(None, description="The version this replica serves (differs until it reloads)")
    error: str | None = Field(None, description="Why the current version is not served, if it is not")
    versions: list[VersionSummary]


class Promote(BaseModel):
    version: int = Field(ge=1, description="The version to serve")
    expected: int | None = Field(None, ge=1, description="Only if the current version is still this one (compare-and-swap)")


def _summary(v: Version, current: int) -> VersionSummary:
    info = v.info
    return VersionSummary(
        version=v.version, current=v.version == current, created_at=info.created_at, classes=list(info.classes),
        accuracy=info.accuracy, signed=info.signed, copied_from=info.copied_from, report=card_report(info),
        job_id=info.job_id,
    )  # fmt: skip


def _list(service: Service, name: str) -> VersionList:
    listing = service.control.listing(name)
    served, error = service.served(name)
    return VersionList(name=name, current=listing.current, served=served.version if served else None,
                       error=error.message if error else None,
                       versions=[_summary(v, listing.current) for v in listing.versions])  # fmt: skip


async def _changed(service: Service, name: str) -> VersionList:
    """Serve what the store now says (a refused version leaves the previous one serving and says why)."""
    try:
        await service.reload_head(name)
    except HeadNotFound:
        raise
    except TlserveError:
        pass  # recorded by the registry; reported in the listing below
    return _list(service, name)


@router.get("/{name}/versions", response_model=VersionList, summary="A head's versions with their metrics")
async def list_versions(name: str, service: ServiceDep) -> VersionList:
    return _list(service, name)


@router.post("/{name}/promote", response_model=VersionList, dependencies=Admin, summary="Serve a version (admin)")
async def promote(name: str, body: Promote, service: ServiceDep) -> VersionList:
    service.control.promote(name, body.version, expected=body.expected)
    return await _changed(service, name)


@router.post("/{name}/rollback", response_model=VersionList, dependencies=Admin,
             summary="Serve the version before the current one (admin)")  # fmt: skip
async def rollback(name: str, service: ServiceDep) -> VersionList:
    service.control.rollback(name)
    return await _changed(service, name)


@router.delete("/{name}/versions/{version}", response_model=VersionList, dependencies=Admin,
               summary="Delete a version that is not current (admin)")  # fmt: skip
async def delete_version(name: str, version: int, service: ServiceDep) -> VersionList:
    service.control.delete_version(name, version)
    return _list(service, name)


@router.delete("/{name}", dependencies=Admin, summary="Delete a head and all its versions (admin)")
async def delete_head(name: str, service: ServiceDep) -> dict[str, Any]:
    service.control.delete(name)
    await service.forget_deleted()
    return {"deleted": name}


class Scored(BaseModel):
    version: int
    report: dict[str, Any] | None = Field(description="Scored on the validation photos of this version's classes")
    excluded: int = Field(description="Validation photos of classes this version does not have")
    skipped: int = Field(description="Validation photos that could not be decoded")


class Comparison(BaseModel):
    head: str
    validation_images: int = Field(description="Photos in the head's fixed validation set")
    a: Scored
    b: Scored


@router.get("/{name}/compare", response_model=Comparison, summary="Two versions scored on the head's fixed validation set")
async def compare(
    name: str,
    request: Request,
    service: ServiceDep,
    a: int = Query(ge=1, description="A version"),
    b: int = Query(ge=1, description="Another version"),
) -> Comparison:
    store = ExampleStore(service.store.heads, valid_head_name(name))
    snap = await asyncio.to_thread(store.snapshot)
    versions = {v: await asyncio.to_thread(service.head, name, v) for v in dict.fromkeys((a, b))}  # 404s first
    if not snap.validation:
        raise DatasetError(
            f"head {name!r} has no fixed validation set yet: it is chosen at the head's first training over HTTP "
            f"(POST /v1/heads/{name}/train)"
        )
    val = [snap.examples[s] for s in snap.validation if s in snap.examples]
    jobs: JobRunner = request.app.state.jobs
    with jobs.comparing():  # 429 beyond compare_concurrency; the validation features are extracted once
        scored = {v: await asyncio.to_thread(jobs.score, head, store, val) for v, head in versions.items()}
    return Comparison(head=name, validation_images=len(val), a=Scored(version=a, **scored[a]), b=Scored(version=b, **scored[b]))
