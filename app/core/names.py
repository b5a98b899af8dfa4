"""How heads and class labels may be named: one rule, because a name becomes a folder, a card entry, a metrics
label and a URL segment (the store, the settings that list heads and every front check names with it)."""

from __future__ import annotations

import re

from app.core.errors import HeadNotFound

HEAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # every use is fullmatch: '$' would accept "name\n"


def valid_head_name(name: str) -> str:
    if not HEAD_NAME.fullmatch(name) or ".." in name:
        raise HeadNotFound(f"invalid head name {name[:80]!r}: use letters, digits, '_', '-', '.' (at most 64)")
    return name
