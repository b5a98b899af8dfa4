"""``tlserve heads``: list a head's versions; promote, roll back or delete."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.cli.common import Subparsers
    from app.storage.control import HeadControl


def register(sub: Subparsers) -> None:
    """``tlserve heads``."""
    h = sub.add_parser("heads", help="list a head's versions; promote, roll back or delete (the model store is changed in place)")
    h.add_argument(
        "action",
        choices=["list", "promote", "rollback", "delete", "migrate"],
        help="what to do (list: * marks the current version; migrate: move heads from before versions into 1/)",
    )
    h.add_argument("name", nargs="?", help="head name (list: all heads when omitted)")
    h.add_argument("version", nargs="?", type=int, help="version to promote, or to delete (delete without it: the whole head)")
    h.add_argument("--expect", type=int, default=None, help="promote only if this is still the current version")
    h.add_argument("--yes", action="store_true", help="delete without asking (needed when there is no terminal to ask on)")
    h.set_defaults(func=_heads)


def control() -> HeadControl:
    """The control plane (:class:`app.storage.control.HeadControl`) over the configured store, with its keys."""
    from app.core.settings import get_settings
    from app.storage.control import HeadControl
    from app.storage.store import ModelStore

    s = get_settings()
    return HeadControl(ModelStore.open(s).heads, s.default_head)


def _heads(args: argparse.Namespace) -> int:
    heads = control()
    if args.action == "promote":
        heads.promote(args.name, args.version, expected=args.expect)
    elif args.action == "rollback":
        heads.rollback(args.name)
    elif args.action == "migrate":
        moved = heads.migrate()
        print(f"moved to 1/: {', '.join(moved)}" if moved else "no flat heads: every head is in the versioned layout")
    elif args.action == "delete":
        what = (
            f"version {args.version} of head {args.name!r}"
            if args.version is not None
            else f"head {args.name!r} and all its versions"
        )
        heads.heads.get(args.name, args.version)  # a head or version that is not there is named before anyone is asked
        if not _confirmed(f"delete {what}", args.yes):
            return 2
        if args.version is not None:
            heads.delete_version(args.name, args.version)
        else:
            heads.delete(args.name)
            print(f"head {args.name!r} deleted")
            return 0
    for name in [args.name] if args.name else heads.names():
        listing = heads.listing(name)
        for version in listing.versions:
            card = version.info
            mark = "*" if version.version == listing.current else " "
            signed = "signed" if card.signed else "unsigned"
            print(f"{mark} {name} v{version.version}  {card.created_at or '?'}  accuracy {card.accuracy}  {signed}")
    return 0


def _confirmed(action: str, yes: bool) -> bool:
    """``--yes``, or a "y" typed on a terminal; anything else (and no terminal) refuses, saying how to go on."""
    if yes:
        return True
    if not sys.stdin.isatty():
        print(f"error: refusing to {action} without confirmation: pass --yes (no terminal to ask on)", file=sys.stderr)
        return False
    answer = input(f"{action}? This cannot be undone. [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        print("not deleted", file=sys.stderr)
        return False
    return True
