"""``tlserve``: export, train, evaluate, predict, batch, serve, classify, heads, keys, sign, settings (benchmarks: ``python -m benchmarks.bench``).

One module per command group, each with a ``register(sub)`` that adds its commands and options:
:mod:`~app.cli.export`, :mod:`~app.cli.train` (train, evaluate), :mod:`~app.cli.predict` (predict,
classify), :mod:`~app.cli.batch`, :mod:`~app.cli.serve`, :mod:`~app.cli.settings`, :mod:`~app.cli.heads`,
:mod:`~app.cli.keys` (keys, sign); what they share is :mod:`~app.cli.common`. This module builds the
parser from them and runs a command (:func:`main`, the ``tlserve`` entry point).
"""

from __future__ import annotations

import argparse
import sys

from app.cli import batch, export, heads, keys, predict, serve, train
from app.cli import settings as settings_command
from app.core.errors import TlserveError

__all__ = ["build_parser", "main"]


DESCRIPTION = """\
Transfer-learning image recognition: the VGG16 conv base (ONNX Runtime) extracts features,
a logistic-regression head per task turns them into your classes.

  tlserve export                                   export the model once
  tlserve train DATA_DIR --name NAME               train a head on DATA_DIR/<class>/*.jpg
  tlserve evaluate DIR --head NAME --errors        accuracy, confusion matrix, misclassified files
  tlserve predict IMAGE... --head NAME --top-k 3   classify local files
  tlserve batch SRC --head NAME --output DIR       classify a whole folder (or URI) into Parquet, optionally on Ray
  tlserve serve                                    the HTTP service

Run `tlserve COMMAND --help` for a command's options."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tlserve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default=None, help="override TLSERVE_LOG_LEVEL")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (export, train, predict, batch, serve, settings_command, heads, keys):  # the order of `tlserve --help`
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from app.core.logs import setup_logging
    from app.core.settings import get_settings

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "heads" and args.action not in ("list", "migrate") and not args.name:
        parser.error(f"heads {args.action} needs a head name")
    if args.command == "heads" and args.action == "promote" and args.version is None:
        parser.error("heads promote needs a version: tlserve heads promote NAME VERSION")
    if getattr(args, "check", None):
        args.check(args)  # usage errors exit 2 here, before any work
    try:
        settings = get_settings()
    except ValueError as exc:  # pydantic's ValidationError names each bad TLSERVE_* variable
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or settings.log_level, "text" if args.command != "serve" else settings.log_format)
    try:
        return int(args.func(args))
    except TlserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # missing folders, full disk, bad values: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
