"""``tlserve settings``: the effective settings, or the README's settings table."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    """``tlserve settings``."""
    g = sub.add_parser("settings", help="print the effective settings (or the README table)")
    g.add_argument("--markdown", action="store_true", help="print the README's settings table instead")
    g.set_defaults(func=_settings)


def _settings(args: argparse.Namespace) -> int:
    from app.core.settings import get_settings, settings_markdown

    if args.markdown:
        print(settings_markdown())
        return 0
    print(json.dumps(get_settings().redacted(), indent=2))
    return 0
