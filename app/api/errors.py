"""One error model everywhere: ``{"error": {"code", "message", "request_id"}}``; never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.core.errors import (
    HTTP_CODES,
    HTTP_ERROR,
    INTERNAL_ERROR,
    CapacityError,
    ClientDisconnected,
    MalformedRequest,
    TlserveError,
    redact,
)

log = logging.getLogger(__name__)


def is_oip(request: Request) -> bool:
    """Open Inference Protocol paths answer errors in its own shape ``{"error": "..."}``."""
    path = request.url.path
    return path == "/v2" or path.startswith("/v2/")


def public_message(request: Request, message: str) -> str:
    service = getattr(request.app.state, "service", None)
    return message if service is None else redact(message, service.settings.model_store)


def error_response(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    rid = getattr(request.state, "request_id", None)
    body = {"error": {"code": code, "message": public_message(request, message), "request_id": rid}}
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(TlserveError)
    async def _tlserve(request: Request, exc: TlserveError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, CapacityError) else None
        if is_oip(request):  # the Open Inference Protocol's own error shape
            return JSONResponse({"error": public_message(request, exc.message)}, status_code=exc.status_code, headers=headers)
        return error_response(request, exc.status_code, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        message = "invalid request: " + "; ".join(parts)
        if is_oip(request):
            return JSONResponse({"error": message}, status_code=422)
        return error_response(request, 422, MalformedRequest.code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, HTTP_ERROR)
        message = exc.detail if isinstance(exc.detail, str) else code
        if is_oip(request):
            return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return error_response(request, exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client closed the connection mid-upload: nobody will read this answer and it is not a
        # server fault (no traceback, no 5xx); 499 is nginx's "client closed request".
        log.info("client disconnected before its request body was read", extra={"path": request.url.path})
        gone = ClientDisconnected("the client closed the connection mid-request")
        return error_response(request, gone.status_code, gone.code, gone.message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s: %s", request.url.path, type(exc).__name__, exc_info=exc)
        if is_oip(request):
            return JSONResponse({"error": "internal error"}, status_code=500)
        return error_response(request, 500, INTERNAL_ERROR, "internal error; see the server log with this request id")
