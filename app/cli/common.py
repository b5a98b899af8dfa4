"""What the command modules share: argument types, the progress options, the trainer."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TypeAlias

    from app.learning.training import Trainer

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
    """What ``add_subparsers`` returns: each command module's ``register`` adds its commands to it."""


def make_trainer(args: argparse.Namespace) -> Trainer:
    from app.core.progress import console
    from app.core.settings import get_settings
    from app.learning.training import Trainer

    return Trainer(get_settings(), progress=console(args.progress))


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {n}")
    return n


def positive_float(value: str) -> float:
    x = float(value)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return x


def progress_options(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.set_defaults(progress=default)
    parser.add_argument("--progress", action="store_const", const="bar", dest="progress",
                        help="a progress bar on stderr even when it is not a terminal (default: a bar on a "
                        "terminal, otherwise a line every few seconds with images done, images/s and ETA)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_const", const="none", dest="progress", help="no progress output")
