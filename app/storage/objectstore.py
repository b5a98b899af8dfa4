"""An object store (``s3://bucket/prefix``) as the few operations the head store needs: list, get, put,
create-only put (``If-None-Match: *``), compare-and-swap put (``If-Match: <etag>``) and delete.

The client is `obstore <https://developmentseed.org/obstore/>`_ (Rust's ``object_store``): it is one small
wheel with type hints, it speaks both conditional writes (``PutMode`` ``create`` and ``{"e_tag": …}``) and
reports them as distinct exceptions (``AlreadyExistsError``, ``PreconditionError``), and it reads the
standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_SESSION_TOKEN``…), so AWS S3, MinIO and other S3-compatible servers work by
configuration. (boto3 also sends both headers but is ~100 MB of dependencies and untyped; s3fs is async-first
and exposes no compare-and-swap.) It is the optional extra ``tlserve[s3]``: nothing imports it unless a
store URL is configured.

Every failure that is not "absent", "exists already" or "changed under us" is :class:`StoreUnavailable`
(a 503 with ``Retry-After``): the caller serves what it has and writes nothing half-way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from app.core.errors import ArtifactError, MissingDependency, StoreUnavailable

if TYPE_CHECKING:
    from obstore.store import S3Store

SCHEMES = ("s3://",)
_ERRORS: tuple[type[BaseException], ...] = (OSError,)  # + obstore's BaseError once it is imported
RETRY_AFTER_S = 5


def is_url(location: str) -> bool:
    """``location`` names an object store (``s3://…``), not a local folder."""
    return location.startswith(SCHEMES)


@dataclass(frozen=True)
class Stored:
    """An object's bytes and the ETag they were read with (what a compare-and-swap put names)."""

    data: bytes
    etag: str


class ObjectStore:
    """One ``s3://bucket/prefix``; keys are relative to the prefix (``heads/toy/3/card.json``)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0, max_retries: int = 2) -> None:
        global _ERRORS
        try:
            from obstore.exceptions import BaseError
            from obstore.store import S3Store
        except ImportError:
            raise MissingDependency(f"{url} needs the s3 extra: pip install 'tlserve[s3]' (obstore)") from None
        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ArtifactError(f"object store {url[:200]!r}: expected s3://bucket/prefix")
        _ERRORS = (OSError, BaseError)
        bucket, _, prefix = url[5:].partition("/")
        self.url = url.rstrip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        client: dict[str, Any] = {
            "timeout": timedelta(seconds=timeout_s),
            "connect_timeout": timedelta(seconds=min(timeout_s, 3)),
        }
        if endpoint.startswith("http://"):
            client["allow_http"] = True  # a MinIO or test server on plain HTTP, named by the standard variable
        retry: dict[str, Any] = {"max_retries": max_retries, "retry_timeout": timedelta(seconds=timeout_s)}
        self._store: S3Store = S3Store(
            bucket,
            prefix=prefix.strip("/") or None,
            client_options=client,  # type: ignore[arg-type]
            retry_config=retry,  # type: ignore[arg-type]
        )

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        error = StoreUnavailable(f"object store {self.url} unreachable ({what}): {reason}; retry later")
        error.retry_after_s = RETRY_AFTER_S
        return error

    def get(self, key: str, max_bytes: int) -> Stored | None:
        """The object and its ETag, None when absent; an :class:`ArtifactError` past ``max_bytes``."""
        import obstore

        try:
            result = obstore.get(self._store, key)
            size, etag = result.meta["size"], result.meta["e_tag"] or ""
            if size > max_bytes:
                raise ArtifactError(f"{self.url}/{key} is {size} bytes, over the limit of {max_bytes}")
            data = bytes(result.bytes())
        except FileNotFoundError:
            return None
        except ArtifactError:
            raise
        except _ERRORS as exc:  # obstore's errors are not typed by cause: each one is "unreachable" here
            raise self._unavailable(f"get {key}", exc) from None
        if len(data) > max_bytes:
            raise ArtifactError(f"{self.url}/{key} grew past the limit of {max_bytes} bytes while it was read")
        return Stored(data, etag)

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (recursively), sorted."""
        import obstore

        try:
            return sorted(str(meta["path"]) for chunk in obstore.list(self._store, prefix) for meta in chunk)
        except _ERRORS as exc:
            raise self._unavailable(f"list {prefix}", exc) from None

    def children(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (``heads/`` → ``["toy", "triage"]``), objects and folders."""
        import obstore

        try:
            found = obstore.list_with_delimiter(self._store, prefix.rstrip("/") or None)
        except _ERRORS as exc:
            raise self._unavailable(f"list {prefix}", exc) from None
        names = [str(p) for p in found["common_prefixes"]] + [str(m["path"]) for m in found["objects"]]
        return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names})

    def put(self, key: str, data: bytes) -> str:
        """Write ``key`` unconditionally; returns its ETag."""
        return self._put(key, data, "overwrite") or ""

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist (``If-None-Match: *``): False when it does."""
        return self._put(key, data, "create") is not None

    def swap(self, key: str, data: bytes, etag: str | None) -> bool:
        """Write ``key`` only if it still has ``etag`` (``If-Match``; None: only if absent): False when another
        writer got there first, so the caller reads again and decides again."""
        return self._put(key, data, "create" if etag is None else {"e_tag": etag}) is not None

    def _put(self, key: str, data: bytes, mode: Any) -> str | None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            result = obstore.put(self._store, key, data, mode=mode)
        except (AlreadyExistsError, PreconditionError):
            return None
        except _ERRORS as exc:
            raise self._unavailable(f"put {key}", exc) from None
        return str(result["e_tag"] or "")

    def delete(self, key: str) -> None:
        import obstore

        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            return
        except _ERRORS as exc:
            raise self._unavailable(f"delete {key}", exc) from None
