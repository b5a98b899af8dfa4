"""Training over HTTP: ``POST /v1/heads/{name}/train`` and ``/examples``, ``GET /v1/jobs/{id}``.

Thin: the upload is :mod:`app.learning.uploads`' (streamed to a spool folder, bounded, archives checked before
extraction), the photos go into the head's example store (:mod:`app.storage.examples`), and the job is
:mod:`app.learning.jobs`'. Every check — name, labels, sizes, counts, options, the planned training and
validation sets — happens before the 202, and a refused upload stores nothing.

This replica's :class:`~app.learning.jobs.JobRunner` is the app factory's (:func:`app.main.create_app`, at
``app.state.jobs``): it starts after the service and stops (cancelling running jobs) before the service
drains its batch queue.
"""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from app.api.deps import ServiceDep, require_admin, require_key, require_writer
from app.api.parsing import error_responses, parse_bool
from app.api.schemas import ErrorResponse
from app.api.uploads import receive
from app.core.errors import EmptyInput, MalformedRequest, NotReady
from app.core.names import valid_head_name
from app.core.recipe import VAL_FRACTION
from app.learning.jobs import JobRunner, JobSpec, Plan, plan
from app.learning.uploads import Upload, spool
from app.serving.service import Service
from app.storage.examples import ExampleStore, Incoming, Snapshot

router = APIRouter(prefix="/v1", tags=["training"], dependencies=[Depends(require_key)],
                   responses=error_responses(ErrorResponse, (401, 403, 404, 413, 415, 422, 429, 503)))  # fmt: skip
Admin = [Depends(require_admin), Depends(require_writer)]  # every route here that needs an admin key writes


async def get_jobs(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.jobs
    return runner


JobsDep = Annotated[JobRunner, Depends(get_jobs)]


class JobList(BaseModel):
    jobs: list[dict[str, Any]] = Field(description="Job records, newest first")


class ExamplesAdded(BaseModel):
    head: str
    added: int = Field(description="Photos stored now")
    duplicates: int = Field(description="Photos already in the store (the same bytes), or sent twice")
    relabelled: int = Field(0, description="Duplicates whose label changed (a correction: the newest label wins)")
    examples: dict[str, int] = Field(description="Photos per label in the store now")


class ExamplesSummary(BaseModel):
    head: str
    examples: dict[str, int] = Field(description="Photos per label in the store")
    validation: dict[str, int] = Field(
        description="Photos per label of the fixed validation set (empty before the first training)"
    )


TRAIN_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "Every file part's field name is its class label; a file part named `archive` is a zip or "
                    "tar(.gz) of class folders.",
                    "properties": {
                        "archive": {"type": "string", "format": "binary"},
                        "c": {"type": "string", "description": "`auto` (cross-validated, default) or a positive number"},
                        "val_fraction": {"type": "number", "description": "0 < f < 0.5; only at the head's first training"},
                        "promote": {"type": "boolean", "default": True},
                        "use_examples": {"type": "boolean", "default": True},
                    },
                    "additionalProperties": {"type": "string", "format": "binary"},
                }
            }
        },
    }
}


def _c(value: str | None) -> float | None:
    if value is None or value.lower() in ("", "auto"):
        return None
    try:
        c = float(value)
    except ValueError:
        c = math.nan
    if not (c > 0 and math.isfinite(c)):
        raise MalformedRequest(f"c must be 'auto' or a positive number, not {value[:40]!r}")
    return c


def _fraction(value: str | None) -> float:
    if value is None or value == "":
        return VAL_FRACTION
    try:
        f = float(value)
    except ValueError:
        f = math.nan
    if not 0 < f < 0.5:
        raise MalformedRequest(f"val_fraction must be a number between 0 and 0.5 (exclusive), not {value[:40]!r}")
    return f


def _incoming(upload: Upload) -> list[Incoming]:
    return [Incoming(p.path, p.label, p.name) for p in upload.photos]


def _ready(service: Service) -> None:
    if service.extractor is None or service.batcher is None:
        raise NotReady(f"not ready: {service.not_ready_reason}")


def _too_many_classes(upload: Upload, limit: int) -> None:
    labels = sorted({p.label for p in upload.photos})
    if len(labels) > limit:
        raise MalformedRequest(f"{len(labels)} class labels in this upload, over the limit of {limit} (max_training_classes)")


@router.post("/heads/{name}/train", status_code=202, dependencies=Admin, openapi_extra=TRAIN_BODY,
             summary="Train a new version of a head from labelled photos (admin); 202 with the job")  # fmt: skip
async def train(name: str, request: Request, response: Response, service: ServiceDep, jobs: JobsDep) -> dict[str, Any]:
    valid_head_name(name)
    _ready(service)
    settings = service.settings
    with jobs.slot():  # 429 before the upload is read when this replica is busy
        async with spool(settings) as folder:
            upload = await receive(request, settings, folder)
            c = _c(upload.options.get("c"))
            fraction = _fraction(upload.options.get("val_fraction"))
            promote = parse_bool(upload.options.get("promote", "true"), "promote")
            use_examples = parse_bool(upload.options.get("use_examples", "true"), "use_examples")
            _too_many_classes(upload, settings.max_training_classes)
            if not upload.photos and not use_examples:
                raise EmptyInput("no photos: send file parts named by their class label, or an archive of class folders")
            store = ExampleStore(service.registry.store, name)
            planned: list[Plan] = []

            def check(snap: Snapshot) -> None:
                planned.append(plan(snap, use_examples=use_examples, max_classes=settings.max_training_classes))

            snap = await asyncio.to_thread(store.add, _incoming(upload), choose_validation=fraction, check=check)
        chosen = planned[-1]
        data = {
            "uploaded": len(upload.photos), "added": snap.added, "duplicates": snap.duplicates, "relabelled": snap.relabelled,
            "ignored_archive_members": upload.ignored, "use_examples": use_examples,
            "train_per_class": snap.counts([e.sha256 for e in chosen.train]),
            "validation_per_class": snap.counts([e.sha256 for e in chosen.val]),
            "validation_excluded": chosen.excluded_val,
            "validation_set": {**(snap.validation_info or {}), "images": len(snap.validation or []),
                               "chosen_now": snap.validation_chosen},
        }  # fmt: skip
        options = {"c": "auto" if c is None else c, "val_fraction": fraction, "promote": promote, "use_examples": use_examples}
        record = jobs.submit(JobSpec(name, chosen, c, promote, data, options))
    response.headers["Location"] = f"/v1/jobs/{record['id']}"
    return record


@router.post("/heads/{name}/examples", response_model=ExamplesAdded, dependencies=Admin, openapi_extra=TRAIN_BODY,
             summary="Add labelled photos to a head's example store without training (admin)")  # fmt: skip
async def add_examples(name: str, request: Request, service: ServiceDep) -> ExamplesAdded:
    valid_head_name(name)
    settings = service.settings
    async with spool(settings) as folder:
        upload = await receive(request, settings, folder)
        if upload.options:
            raise MalformedRequest(f"examples take no options (got {', '.join(sorted(upload.options))}); they are for /train")
        if not upload.photos:
            raise EmptyInput("no photos: send file parts named by their class label, or an archive of class folders")
        _too_many_classes(upload, settings.max_training_classes)
        store = ExampleStore(service.registry.store, name)
        snap = await asyncio.to_thread(store.add, _incoming(upload))
    return ExamplesAdded(head=name, added=snap.added, duplicates=snap.duplicates, relabelled=snap.relabelled,
                         examples=snap.counts())  # fmt: skip


@router.get("/heads/{name}/examples", response_model=ExamplesSummary, summary="A head's example store: photos per label")
async def list_examples(name: str, service: ServiceDep) -> ExamplesSummary:
    store = ExampleStore(service.registry.store, valid_head_name(name))
    snap = await asyncio.to_thread(store.snapshot)
    if not snap.examples and not service.registry.store.versions(name):
        service.registry.store.get(name)  # 404 naming the known heads
    return ExamplesSummary(head=name, examples=snap.counts(), validation=snap.counts(snap.validation or []))


@router.get("/jobs/{job_id}", summary="A training job: state, progress, report or error (the same on every replica)")
async def get_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    return await asyncio.to_thread(jobs.store.get, job_id)


@router.get("/jobs", response_model=JobList, summary="Training jobs, newest first")
async def list_jobs(
    jobs: JobsDep,
    head: str | None = Query(None, max_length=64, description="Only this head's jobs"),
    limit: int = Query(50, ge=1, le=1000, description="At most this many"),
) -> JobList:
    if head is not None:
        valid_head_name(head)
    return JobList(jobs=(await asyncio.to_thread(jobs.store.list, head))[:limit])
