"""``tlserve serve``: the HTTP (and gRPC) service under uvicorn."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    """``tlserve serve``."""
    s = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    s.add_argument("--host", default=None, help="address to bind (default: TLSERVE_HOST)")
    s.add_argument("--port", type=int, default=None, help="port to listen on (default: TLSERVE_PORT)")
    s.add_argument("--generate-admin-key", action="store_true",
                   help="with no TLSERVE_ADMIN_KEYS set, make an admin key for this run and print it (`make run` does)")  # fmt: skip
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from app.server import serve

    return serve(host=args.host, port=args.port, generate_admin_key=args.generate_admin_key)
