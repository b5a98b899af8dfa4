"""Confidence that means what it says: expected calibration error, reliability diagram, temperature scaling.

All of it is computed on a training's **out-of-fold** probabilities (every photo scored by a head that did not
see it, :mod:`app.learning.training` step 6), never on the photos a head was fitted on.

- :func:`ece`: the expected calibration error of the top answer, :data:`BINS` equal-width confidence bins:
  ``sum_b (n_b / n) * |accuracy_b - confidence_b|``.
- :func:`fit_temperature`: the temperature ``T`` that minimises the out-of-fold negative log-likelihood of
  ``p ** (1 / T)`` renormalised (for a softmax head, ``softmax(logits / T)``: the answers' order never
  changes, only how sure they sound). It is **kept only where it lowers the out-of-fold ECE**; otherwise
  ``T = 1``. The card's ``calibration`` section records both ECEs and the temperature; the loaded head's
  ``predict_proba`` applies it (:meth:`app.storage.heads.Head.predict_proba`), so every path that answers
  probabilities (REST, OIP, gRPC, batch, ``tlserve predict``) answers the calibrated ones.
- :func:`reliability_png`: accuracy against confidence per bin, before and after, for the training report.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

BINS = 10
T_BOUNDS = (0.5, 20.0)
"""The temperatures searched. Below 1 a head is made surer than its fit; out-of-fold data that is all right (a
few separable photos) always asks for the smallest temperature there is, so sharpening stops at 2x the log-odds
(a 90% answer becomes 99%), never at certainty. Above 1 the search reaches what a hopeless head needs."""


def temper(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``proba ** (1 / T)``, each row renormalised (``T == 1``: ``proba`` itself, the very array)."""
    if temperature == 1.0:
        return proba
    logp = np.log(np.clip(np.asarray(proba, np.float64), 1e-30, 1.0)) / temperature
    e = np.exp(logp - logp.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


def ece(proba: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return float(total)


def _nll(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The NLL-minimising temperature (golden-section search on log T within :data:`T_BOUNDS`)."""
    lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    g = (math.sqrt(5) - 1) / 2

    def f(t: float) -> float:
        return _nll(temper(proba, math.exp(t)), y)

    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return round(math.exp((a + b) / 2), 4)


def calibrate(oof: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The card's ``calibration`` section from out-of-fold probabilities and labels."""
    before = ece(oof, y)
    t = fit_temperature(oof, y) if len(y) else 1.0
    after = ece(temper(oof, t), y)
    applied = after < before
    conf, acc, count = _curve(temper(oof, t) if applied else oof, y, BINS)
    return {
        "method": "temperature scaling (NLL), fitted out of fold; applied only where it lowers the out-of-fold ECE",
        "temperature": t if applied else 1.0,
        "fitted_temperature": t,
        "applied": applied,
        "ece_before": round(before, 4),
        "ece_after": round(after if applied else before, 4),
        "ece_with_fitted": round(after, 4),
        "nll_before": round(_nll(oof, y), 4) if len(y) else None,
        "bins": BINS,
        "n": len(y),
        "reliability": {"confidence": [round(v, 4) for v in conf], "accuracy": [round(v, 4) for v in acc], "count": count},
        "data": "out-of-fold probabilities of all labelled photos of DATA_DIR (oof_proba.npy holds them calibrated)",
    }


def temperature_of(card: dict[str, Any], where: str) -> float:
    """A loaded head's temperature: its card's ``calibration.temperature``, 1 where it has none (older heads)."""
    from app.core.errors import ArtifactError

    section = card.get("calibration")
    if section is None:
        return 1.0
    t = section.get("temperature") if isinstance(section, dict) else None
    if type(t) not in (int, float) or not (T_BOUNDS[0] <= float(t) <= T_BOUNDS[1]):  # type: ignore[arg-type]
        raise ArtifactError(f"{where}: card's calibration.temperature {str(t)[:40]} is not a number in {list(T_BOUNDS)}")
    return float(t)  # type: ignore[arg-type]


def _curve(proba: np.ndarray, y: np.ndarray, bins: int) -> tuple[list[float], list[float], list[int]]:
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        sel = which == b
        if sel.any():
            xs.append(float(conf[sel].mean()))
            ys.append(float(correct[sel].mean()))
            ns.append(int(sel.sum()))
    return xs, ys, ns


def report_section(section: Any) -> dict[str, Any] | None:
    """What a version's HTTP report (and the console's reliability diagram) shows of its card's ``calibration``."""
    if not isinstance(section, dict) or not isinstance(section.get("reliability"), dict):
        return None
    keys = ("temperature", "applied", "ece_before", "ece_after", "n", "reliability")
    return {k: section.get(k) for k in keys}


def reliability_png(oof: np.ndarray, y: np.ndarray, section: dict[str, Any], title: str) -> bytes:
    """Accuracy against confidence of the top answer, out of fold: before and (where applied) after scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6, 3.6), dpi=100)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    xs, ys, _ = _curve(oof, y, BINS)
    ax.plot(xs, ys, marker="o", ms=3, label=f"out of fold, ECE {section['ece_before']:.3f}")
    if section["applied"]:
        xs, ys, _ = _curve(temper(oof, section["temperature"]), y, BINS)
        ax.plot(xs, ys, marker="s", ms=3, label=f"T={section['temperature']:.2f}, ECE {section['ece_after']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nreliability (n={len(y)})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
