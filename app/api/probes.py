"""``/livez`` (process alive), ``/readyz`` (can really serve), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import ServiceDep, probe_auth
from app.api.schemas import Probe
from app.core.errors import redact

router = APIRouter(dependencies=[Depends(probe_auth)])


@router.get("/livez", response_model=Probe, summary="Liveness: the process answers (never touches the model)")
async def livez() -> Probe:
    return Probe(status="alive")


@router.get(
    "/readyz",
    response_model=Probe,
    responses={503: {"model": Probe}},
    summary="Readiness: extractor warm, heads verified, not draining",
)
async def readyz(service: ServiceDep) -> JSONResponse:
    ok, reason = service.ready
    reason = redact(reason, service.settings.model_store)
    return JSONResponse({"status": "ready" if ok else "not_ready", "reason": reason}, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(service: ServiceDep) -> Response:
    if service.batcher:
        service.metrics.queue_depth.set(service.batcher.depth)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
