"""Progress of long work: one event type, one callback, two console renderers.

Training reports every phase (``features``, ``validation features``, ``model selection``,
``refit``) as :class:`Progress` events to one :data:`ProgressCallback`. The CLI renders them with
:func:`console` (a tqdm bar on a terminal, a plain line every few seconds otherwise: logs, CI,
containers); a training job run over HTTP keeps the last event as its status (:meth:`Progress.as_dict`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

LINE_INTERVAL_S = 5.0
"""Seconds between two progress lines when the output is not a terminal."""


@dataclass(frozen=True)
class Progress:
    """Where one phase stands: ``done`` of ``total`` ``unit``s after ``elapsed_s`` seconds."""

    phase: str
    done: int
    total: int
    elapsed_s: float
    unit: str = "img"

    @property
    def rate(self) -> float:
        """Units per second so far (images/s while extracting, fits/s during model selection)."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; ``None`` before anything is done."""
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def as_dict(self) -> dict[str, Any]:
        eta = self.eta_s
        return {"phase": self.phase, "done": self.done, "total": self.total, "unit": self.unit,
                "rate": round(self.rate, 3), "elapsed_s": round(self.elapsed_s, 3),
                "eta_s": None if eta is None else round(eta, 1)}  # fmt: skip

    def line(self) -> str:
        eta = self.eta_s
        left = "done" if self.finished else f"ETA {_duration(eta)}" if eta is not None else "ETA ?"
        return f"{self.phase}: {self.done}/{self.total} {self.unit}, {self.rate:.1f} {self.unit}/s, {left}"


ProgressCallback = Callable[[Progress], None]
"""What training calls with every event; it must return quickly (it runs on the training thread)."""


def no_progress(_: Progress) -> None:
    """A callback that shows nothing."""


@dataclass
class Meter:
    """Counts one phase and reports it: ``Meter(callback, "features", 766).advance(32)``; a
    ``start`` event at 0 and a final one at ``total`` are always sent."""

    callback: ProgressCallback
    phase: str
    total: int
    unit: str = "img"
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self._emit()

    def advance(self, n: int = 1) -> None:
        if n:
            self.done = min(self.total, self.done + n)
            self._emit()

    def finish(self) -> None:
        if self.done < self.total:
            self.done = self.total
            self._emit()

    def _emit(self) -> None:
        self.callback(Progress(self.phase, self.done, self.total, time.perf_counter() - self.started, self.unit))


class LineProgress:
    """A plain line per phase every ``interval_s`` seconds (and when it finishes) on ``stream``."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = LINE_INTERVAL_S) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        first = p.phase not in self._last
        if p.total == 0 or (first and p.done == 0 and not p.finished):
            self._last.setdefault(p.phase, now)  # the clock starts; nothing to say yet
            return
        if p.finished or first or now - self._last[p.phase] >= self.interval_s:
            self._last[p.phase] = now
            print(p.line(), file=self.stream or sys.stderr, flush=True)


class BarProgress:
    """One tqdm bar per phase (the terminal renderer)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._bars: dict[str, Any] = {}

    def __call__(self, p: Progress) -> None:
        from tqdm import tqdm

        bar = self._bars.get(p.phase)
        if bar is None:
            if p.finished and p.total == 0:
                return
            bar = self._bars[p.phase] = tqdm(total=p.total, unit=p.unit, desc=p.phase, file=self.stream or sys.stderr,
                                             smoothing=0.1, dynamic_ncols=True)  # fmt: skip
        bar.update(p.done - bar.n)
        if p.finished:
            bar.close()


Mode = Literal["auto", "bar", "lines", "none"]


def console(mode: Mode = "auto", stream: TextIO | None = None, interval_s: float = LINE_INTERVAL_S) -> ProgressCallback:
    """The CLI's renderer: ``auto`` is a bar on a terminal and lines otherwise."""
    out = stream or sys.stderr
    if mode == "auto":
        mode = "bar" if out.isatty() else "lines"
    if mode == "bar":
        return BarProgress(out)
    if mode == "lines":
        return LineProgress(out, interval_s)
    return no_progress


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
