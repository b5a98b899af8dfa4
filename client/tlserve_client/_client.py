""":class:`Client` (sync) and :class:`AsyncClient`: the same ``/v1`` methods on one retrying base."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

import httpx
from pydantic import BaseModel

from tlserve_client._exceptions import ClientError
from tlserve_client._models import ClassifyResponse, EmbedResponse, ModelList

log = logging.getLogger("tlserve.client")
RETRY_STATUSES = frozenset({429, 503})
Image = str | Path | bytes | tuple[str, bytes]
Images = Image | Iterable[Image]
M = TypeVar("M", bound=BaseModel)


def _is_pair(images: object) -> TypeGuard[tuple[str, bytes]]:
    return isinstance(images, tuple) and len(images) == 2 and isinstance(images[0], str) and isinstance(images[1], bytes)


def _files(images: Images) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart file parts; paths are read here (``OSError`` if one cannot be)."""
    items: list[Image] = [images] if isinstance(images, str | Path | bytes) or _is_pair(images) else list(images)
    parts = []
    for i, image in enumerate(items):
        if isinstance(image, bytes):
            name, data = f"image{i}", image
        elif isinstance(image, tuple):
            name, data = image
        else:
            name, data = Path(image).name, Path(image).read_bytes()
        parts.append(("files", (name, data, "application/octet-stream")))
    if not parts:
        raise ValueError("no images given")
    return parts


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Base:
    def __init__(self, url: str, *, api_key: str | None, retries: int, backoff: float, max_wait: float) -> None:
        if retries < 0 or backoff < 0 or max_wait < 0:
            raise ValueError("retries, backoff and max_wait must be >= 0")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait

    def _wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when the response is final."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
            return None
        said = _retry_after(response.headers.get("retry-after"))
        wait = min(self.max_wait, said if said is not None else self.backoff * 2**attempt)
        code = ClientError.from_response(response).code
        log.info("%s %s: %d %s, retry %d/%d in %.2fs", response.request.method, response.request.url.path,
                 response.status_code, code, attempt + 1, self.retries, wait)  # fmt: skip
        return wait

    @staticmethod
    def _parse(response: httpx.Response, model: type[M]) -> M:
        if response.status_code >= 400:
            raise ClientError.from_response(response)
        return model.model_validate(response.json())

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise ClientError.from_response(response)
        body: dict[str, Any] = response.json()
        return body

    @staticmethod
    def _params(**options: Any) -> dict[str, Any]:
        return {k: v for k, v in options.items() if v is not None}


class Client(_Base):
    """Synchronous client; use as a context manager (or call :meth:`close`)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, max_wait: float = 30.0) -> None:  # fmt: skip
        super().__init__(url, api_key=api_key, retries=retries, backoff=backoff, max_wait=max_wait)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            response = self._http.request(method, path, **kwargs)
            wait = self._wait(response, attempt)
            if wait is None:
                return response
            attempt += 1
            time.sleep(wait)

    def classify(self, images: Images, head: str | None = None, top_k: int | None = None) -> ClassifyResponse:
        params = self._params(head=head, top_k=top_k)
        return self._parse(self._request("POST", "/v1/classify", files=_files(images), params=params), ClassifyResponse)

    def embed(self, images: Images, normalize: bool = False) -> EmbedResponse:
        params = {"normalize": "true" if normalize else "false"}
        return self._parse(self._request("POST", "/v1/embed", files=_files(images), params=params), EmbedResponse)

    def models(self) -> ModelList:
        return self._parse(self._request("GET", "/v1/models"), ModelList)

    def info(self) -> dict[str, Any]:
        return self._json(self._request("GET", "/v1/info"))

    def ready(self) -> bool:
        """``/readyz`` is 200 (no retries: a 503 here is the answer)."""
        return self._http.get("/readyz").status_code == 200


class AsyncClient(_Base):
    """The same API, awaitable; use as an async context manager (or await :meth:`aclose`)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, max_wait: float = 30.0, limits: httpx.Limits | None = None) -> None:  # fmt: skip
        super().__init__(url, api_key=api_key, retries=retries, backoff=backoff, max_wait=max_wait)
        kwargs: dict[str, Any] = {"limits": limits} if limits is not None else {}  # else httpx's own default
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout, **kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            response = await self._http.request(method, path, **kwargs)
            wait = self._wait(response, attempt)
            if wait is None:
                return response
            attempt += 1
            await asyncio.sleep(wait)

    async def classify(self, images: Images, head: str | None = None, top_k: int | None = None) -> ClassifyResponse:
        params = self._params(head=head, top_k=top_k)
        return self._parse(await self._request("POST", "/v1/classify", files=_files(images), params=params), ClassifyResponse)

    async def embed(self, images: Images, normalize: bool = False) -> EmbedResponse:
        params = {"normalize": "true" if normalize else "false"}
        return self._parse(await self._request("POST", "/v1/embed", files=_files(images), params=params), EmbedResponse)

    async def models(self) -> ModelList:
        return self._parse(await self._request("GET", "/v1/models"), ModelList)

    async def info(self) -> dict[str, Any]:
        return self._json(await self._request("GET", "/v1/info"))

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200
