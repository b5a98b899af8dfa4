"""tlserve-client: a small Python client for tlserve's ``/v1`` API, on httpx and pydantic only.

    from tlserve_client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as tl:
        result = tl.classify(["cat.jpg", "dog.png"], top_k=1)
        for r in result.results:
            print(r.file, r.label if r.error is None else r.error.message)

:class:`Client` is synchronous, :class:`AsyncClient` has the same methods, awaitable. Images are
paths, ``bytes``, or ``(name, bytes)`` pairs; they go up as one multipart request. Results are the
server's own response models (:class:`ClassifyResponse`, :class:`EmbedResponse`, :class:`ModelList`).
One image that fails comes back with ``error`` set while the others are classified; a refused
request (4xx/5xx) raises :class:`ClientError` with the server's ``status``, ``code`` and ``message``.

``503`` (queue full, not ready, shutting down) and ``429`` are retried up to ``retries`` times,
waiting what ``Retry-After`` says (at most ``max_wait`` seconds), or ``backoff * 2**attempt``
when the server says nothing. Every retry is logged on the ``tlserve.client`` logger.

The version is the server release's: ``tlserve_client.__version__`` equals ``tlserve``'s.
"""

from tlserve_client._client import AsyncClient, Client
from tlserve_client._exceptions import ClientError
from tlserve_client._models import (
    ClassifyResponse,
    Embedding,
    EmbedResponse,
    FamiliaritySummary,
    ImageResult,
    ItemError,
    ModelList,
    ModelSummary,
    TopK,
)
from tlserve_client._version import __version__

__all__ = [
    "AsyncClient",
    "ClassifyResponse",
    "Client",
    "ClientError",
    "EmbedResponse",
    "Embedding",
    "FamiliaritySummary",
    "ImageResult",
    "ItemError",
    "ModelList",
    "ModelSummary",
    "TopK",
    "__version__",
]
