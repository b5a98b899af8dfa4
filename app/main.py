"""The app factory: ``create_app(settings)`` → a FastAPI app holding one :class:`Service` and the
:class:`~app.learning.jobs.JobRunner` that trains on it (started after the service, stopped before it drains)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute

from app import __version__
from app.api import console, errors, heads, oip, probes, review, training, v1
from app.api.middleware import RequestContext, TrustedHosts
from app.core.settings import Settings, get_settings
from app.learning.jobs import JobRunner
from app.serving.service import Service


def _operation_id(route: APIRoute) -> str:
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        jobs = JobRunner(service)
        app.state.jobs = jobs
        jobs.start()
        try:
            yield
        finally:
            await jobs.stop(settings.drain_timeout_s)
            await service.stop()

    app = FastAPI(
        title="tlserve",
        version=__version__,
        description="Transfer-learning image classification: VGG16 conv base (ONNX Runtime) + scikit-learn heads.",
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        # FastAPI >= 0.16x would add its own server spans once a tracer provider exists; tlserve's
        # middleware makes the one HTTP server span (app/core/tracing.py). Older FastAPI ignores this.
        telemetry={"tracing": False},
        # Swagger UI and ReDoc pages load their scripts from a CDN: off unless the operator asks (``docs``).
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
    )
    app.state.service = service
    errors.install(app)
    app.include_router(probes.router)
    app.include_router(v1.router)
    app.include_router(heads.router)
    app.include_router(training.router)
    app.include_router(review.router)
    app.include_router(oip.router)
    app.include_router(console.router)
    if settings.origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(TrustedHosts, hosts=settings.hosts)
    app.add_middleware(RequestContext, metrics=service.metrics)
    return app
