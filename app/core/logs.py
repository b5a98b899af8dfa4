"""Logging: one JSON object per line (default) or plain text; request fields travel in ``extra``.

With tracing on, a JSON line written while a request is being handled carries that request's
``trace_id``, so a log line leads to its trace.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from app.core import tracing

_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(given: str) -> str:
    """The client's (or nginx's) request id when it is a sane token, else a new one; every front uses it."""
    return given if _RID.match(given) else uuid.uuid4().hex


_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STD})
        if tracing.enabled and "trace_id" not in out and (trace_id := tracing.trace_id()):
            out["trace_id"] = trace_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True  # we log each request ourselves
