"""``/ui``: the web console, plain static files from ``app/console/`` (no build step, nothing from the internet).

The page holds no secret and calls the same JSON API users call (the keys a person types are kept in
the tab's sessionStorage and sent as ``X-API-Key``), so serving it needs no key. Only the files listed
in :data:`ASSETS` are served (no path from the request reaches the file system), each with a
Content-Security-Policy that allows scripts and styles from this origin only — no inline script, no
inline event handlers, no framing — and ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from app.core.errors import NotFound

router = APIRouter(prefix="/ui", include_in_schema=False)

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "classify.js": "text/javascript; charset=utf-8",
    "heads.js": "text/javascript; charset=utf-8",
    "train.js": "text/javascript; charset=utf-8",
    "main.js": "text/javascript; charset=utf-8",
    "report.js": "text/javascript; charset=utf-8",
    "reliability.js": "text/javascript; charset=utf-8",
    "review.js": "text/javascript; charset=utf-8",
}

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",  # thumbnails of the photos a person picks are blob: URLs
        "connect-src 'self'",
        "form-action 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("app.console").joinpath(name).read_bytes()


@router.get("")
async def console_root() -> Response:
    return RedirectResponse("ui/", status_code=307, headers=HEADERS)  # relative: works behind a path prefix


@router.get("/")
async def console_index() -> Response:
    return await console_asset("index.html")


@router.get("/{name}")
async def console_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no console file {name[:64]!r} (files: {', '.join(sorted(ASSETS))})")
    return Response(_read(name), media_type=media_type, headers=HEADERS)
