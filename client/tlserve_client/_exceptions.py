"""The client's one exception, and what else a call can raise.

ClientError          the server answered 4xx/5xx (after retries for 503/429): status, code, message
httpx.HTTPError      no answer: connection refused, timeout, protocol error (httpx's own tree)
OSError              an image path could not be read (before anything is sent)
ValueError           a call without images, or a negative retries/backoff/max_wait
"""

from __future__ import annotations

import httpx


class ClientError(Exception):
    """The server refused a request: ``status`` (HTTP), ``code`` (stable, e.g. ``head_not_found``), ``message``."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id

    @classmethod
    def from_response(cls, response: httpx.Response) -> ClientError:
        try:
            err = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return cls(response.status_code, f"http_{response.status_code}", response.text[:300] or response.reason_phrase)
        if isinstance(err, dict):  # /v1: {"error": {"code", "message", "request_id"}}
            return cls(response.status_code, str(err.get("code")), str(err.get("message")), err.get("request_id"))
        return cls(response.status_code, f"http_{response.status_code}", str(err))  # /v2: {"error": "..."}
