"""``/v1/heads/{name}/review``: a head's review queue from production (:mod:`app.serving.review`) — list it (most
useful first), fetch a queued photo, label one (it joins the head's example store), dismiss one.

Every route needs an admin key: the queue holds users' photos. Which heads sample is the operator's
setting (``review_heads``), not a route: nothing over HTTP can start storing users' photos.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from app.api.deps import ServiceDep, require_admin
from app.api.parsing import error_responses
from app.api.schemas import ErrorResponse
from app.core.names import valid_head_name
from app.serving.review import Item, ReviewQueue, valid_sha
from app.serving.service import Service
from app.storage.examples import ExampleStore

router = APIRouter(prefix="/v1/heads", tags=["review"], dependencies=[Depends(require_admin)],
                   responses=error_responses(ErrorResponse, (400, 401, 403, 404, 422, 500, 503)))  # fmt: skip

PHOTO_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"GIF8": "image/gif", b"BM": "image/bmp"}


class ReviewItem(BaseModel):
    sha256: str = Field(description="The photo's sha256: the item's name in the routes below")
    label: str = Field(description="The head's answer")
    confidence: float = Field(description="Probability of that answer")
    margin: float = Field(description="Top-class minus second-class probability (small: the head hesitated)")
    probabilities: dict[str, float]
    familiarity: float | None = Field(None, description="Familiarity score, for heads with familiarity data")
    in_distribution: bool | None = Field(None, description="False: unlike the head's training photos")
    reason: str = Field(description="`unfamiliar` or `low_confidence`: why it was sampled")
    version: int = Field(description="The head version that answered")
    queued_at: str
    last_seen_at: str = Field(description="When these bytes were last sampled (the answer is that time's)")
    seen: int = Field(description="Times these bytes were sampled")
    bytes: int
    photo: str = Field(description="Where the photo is (admin key)")


class ReviewList(BaseModel):
    head: str
    enabled: bool = Field(description="Whether this head samples answers (the `review_heads` setting)")
    count: int = Field(description="Photos in the queue")
    bytes: int = Field(description="Photo bytes in the queue")
    limits: dict[str, Any] = Field(description="The queue's bounds and sampling (the `review_*` settings)")
    items: list[ReviewItem] = Field(description="Most useful first: unfamiliar answers, then by margin")


class Label(BaseModel):
    label: str = Field(min_length=1, max_length=64, description="The right class (the head's guess confirms it)")


class Labelled(BaseModel):
    head: str
    sha256: str
    label: str
    guess: str = Field(description="What the head had answered")
    confirmed: bool = Field(description="The label is the head's guess")
    relabelled: bool = Field(description="The photo was already an example under another label (the newest label wins)")
    examples: dict[str, int] = Field(description="Photos per label in the head's example store now")


def _queue(service: Service, name: str) -> ReviewQueue:
    return service.review.queue(valid_head_name(name))


def _item(name: str, item: Item) -> ReviewItem:
    return ReviewItem(**item.record(), sha256=item.sha256, photo=f"/v1/heads/{name}/review/{item.sha256}/photo")


@router.get("/{name}/review", response_model=ReviewList, summary="A head's review queue, most useful first (admin)")
async def list_review(
    name: str, service: ServiceDep, limit: int = Query(100, ge=1, le=10_000, description="At most this many items")
) -> ReviewList:
    queue = _queue(service, name)
    items, gone = await asyncio.to_thread(queue.items)
    if not items and not service.registry.store.versions(name):
        service.registry.store.get(name)  # 404 naming the known heads
    size = (len(items), sum(i.bytes for i in items))
    service.review.observe(name, gone, size)
    s = service.settings
    limits = {"max_items": s.review_max_items, "max_bytes": s.review_max_bytes, "max_age_days": s.review_max_age_days,
              "max_photo_bytes": s.review_max_photo_bytes, "confidence": s.review_confidence,
              "sample_rate": s.review_sample_rate}  # fmt: skip
    return ReviewList(head=name, enabled=name in service.review.enabled, count=size[0], bytes=size[1], limits=limits,
                      items=[_item(name, i) for i in items[:limit]])  # fmt: skip


@router.get("/{name}/review/{sha}/photo", summary="A queued photo's bytes (admin)",
            responses={200: {"content": {"image/*": {}}}})  # fmt: skip
async def review_photo(name: str, sha: str, service: ServiceDep) -> Response:
    data = await asyncio.to_thread(_queue(service, name).photo, valid_sha(sha))
    media = next((t for magic, t in PHOTO_TYPES.items() if data.startswith(magic)), "application/octet-stream")
    headers = {"Cache-Control": "no-store", "Content-Security-Policy": "default-src 'none'", "X-Content-Type-Options": "nosniff",
               "Content-Disposition": f'inline; filename="{sha[:12]}"'}  # fmt: skip
    return Response(data, media_type=media, headers=headers)


@router.post("/{name}/review/{sha}/label", response_model=Labelled,
             summary="Label a queued photo: it joins the head's example store (admin)")  # fmt: skip
async def label_review(name: str, sha: str, body: Label, service: ServiceDep) -> Labelled:
    queue = _queue(service, name)
    examples = ExampleStore(service.registry.store, name)
    item, snap = await asyncio.to_thread(queue.label, valid_sha(sha), body.label, examples)
    confirmed = body.label == item.label
    service.review.observe(name, {"confirmed" if confirmed else "corrected": 1}, await asyncio.to_thread(queue.size))
    return Labelled(head=name, sha256=sha, label=body.label, guess=item.label, confirmed=confirmed,
                    relabelled=bool(snap.relabelled), examples=snap.counts())  # fmt: skip


@router.delete("/{name}/review/{sha}", summary="Dismiss a queued photo: its bytes are deleted (admin)")
async def dismiss_review(name: str, sha: str, service: ServiceDep) -> dict[str, Any]:
    queue = _queue(service, name)
    await asyncio.to_thread(queue.remove, valid_sha(sha))
    service.review.observe(name, {"dismissed": 1}, await asyncio.to_thread(queue.size))
    return {"head": name, "dismissed": sha}
