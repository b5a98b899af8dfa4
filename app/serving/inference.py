"""The types of one inference request, shared by every front (``/v1``, ``/v2``) and the service.

A front turns its wire format into an :class:`InferRequest` (a list of :class:`Item`: bytes and a
name), calls :meth:`app.serving.service.Service.infer` — the one data path: decode → batch → extractor →
head, metrics counted there once per image — and renders the :class:`InferResult` in its format.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

import numpy as np

from app.core.errors import InputError, MalformedRequest
from app.core.settings import OodPolicy as OodPolicy  # re-exported: a request type
from app.serving.predict import Answers
from app.storage.heads import Head

Endpoint = Literal["classify", "embed", "infer"]
OOD_POLICIES: tuple[str, ...] = get_args(OodPolicy)


def parse_ood_policy(value: Any, where: str = "ood_policy", error: type[InputError] = MalformedRequest) -> OodPolicy | None:
    """A request's ``ood_policy`` (``report`` or ``refuse``), or ``None`` when absent (the setting decides)."""
    if value is None:
        return None
    if value not in OOD_POLICIES:
        raise error(f"{where} must be one of {', '.join(OOD_POLICIES)}, not {str(value)[:40]!r}")
    return cast("OodPolicy", value)


@dataclass
class Item:
    """One image of a request: its bytes and, when it had one, a file name."""

    data: bytes | bytearray | memoryview  # a request body or a view into it: never copied
    name: str | None = None
    error: InputError | None = None  # set when the item was bad before decoding (bad base64, …)


@dataclass
class Decoded:
    item: Item
    image: np.ndarray | None
    error: InputError | None


@dataclass(frozen=True)
class InferRequest:
    items: list[Item]
    endpoint: Endpoint
    head: str | None = None
    """The head to classify with (``None``: the default head); ignored without ``classify``."""
    version: int | None = None
    """Pin a version of the head (``None``: the current one)."""
    classify: bool = True
    """Run the head; ``False`` gives features only (``/v1/embed``)."""
    all_or_nothing: bool = False
    """When any image fails to decode, run nothing (the Open Inference Protocol has no per-item errors)."""
    ood_policy: OodPolicy | None = None
    """Below the head's familiarity threshold: ``report`` or ``refuse`` (``None``: the ``ood_policy`` setting)."""


@dataclass
class InferResult:
    decoded: list[Decoded]
    features: np.ndarray
    """``[n_ok, D]``: one row per image that decoded, in request order."""
    head: Head | None = None
    proba: np.ndarray | None = None
    """``[n_ok, classes]`` when a head ran."""
    failed: list[tuple[int, InputError]] = field(default_factory=list)
    familiarity: np.ndarray | None = None
    """``[n_ok]`` familiarity scores, when the head has familiarity data (see :mod:`app.serving.familiarity`)."""
    in_distribution: np.ndarray | None = None
    """``[n_ok]`` bool verdicts at the head's calibrated threshold, with ``familiarity``."""
    refuse: bool = False
    """The policy was ``refuse``: a front names no class for a row whose verdict is ``False``."""

    @property
    def answers(self) -> Answers:
        """The head's answers as :mod:`app.serving.predict` renders them (the same rows as ``tlserve predict``)."""
        assert self.head is not None and self.proba is not None, "the head ran"
        return Answers(self.head, self.proba, self.familiarity, self.in_distribution)

    def named(self, row: int) -> bool:
        """Whether the answer for ``row`` names a class (``False`` only when refused)."""
        return not (self.refuse and self.in_distribution is not None and not bool(self.in_distribution[row]))

    def rows(self) -> Iterator[tuple[int, Decoded, int | None]]:
        """``(index, decoded, row)`` for every image; ``row`` indexes features/proba, ``None`` on error."""
        row = 0
        for i, d in enumerate(self.decoded):
            if d.error is None:
                yield i, d, row
                row += 1
            else:
                yield i, d, None
