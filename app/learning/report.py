"""A head's validation report: accuracy, per-class precision / recall / F1 and the confusion matrix (the
recipe's classification report), the confusion-matrix picture, and what ``tlserve evaluate`` finds."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np


# --- reports ---------------------------------------------------------------------------------
@dataclass
class Report:
    accuracy: float
    n: int
    classes: list[str]
    confusion: list[list[int]]
    per_class: dict[str, dict[str, float]]
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "classes": self.classes,
                "confusion_matrix": self.confusion, "per_class": self.per_class}  # fmt: skip

    def render(self) -> str:
        width = max(len(c) for c in self.classes)
        lines = [f"accuracy: {self.accuracy:.4f}  (n={self.n})", "", "confusion matrix (rows: true, columns: predicted):"]
        lines.append(" " * (width + 2) + " ".join(f"{c[:8]:>8}" for c in self.classes))
        for name, row in zip(self.classes, self.confusion, strict=True):
            lines.append(f"{name:>{width}}  " + " ".join(f"{v:>8}" for v in row))
        return "\n".join([*lines, "", self.text])


def make_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> Report:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    labels = list(range(len(classes)))
    d = classification_report(y_true, y_pred, labels=labels, target_names=classes, output_dict=True, zero_division=0)
    per_class = {c: {k: round(float(d[c][k]), 4) for k in ("precision", "recall", "f1-score", "support")} for c in classes}
    text = classification_report(y_true, y_pred, labels=labels, target_names=classes, digits=4, zero_division=0)
    return Report(
        accuracy=round(float(accuracy_score(y_true, y_pred)), 4),
        n=len(y_true),
        classes=classes,
        confusion=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        per_class=per_class,
        text=text,
    )


def confusion_png(report: Report, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.classes)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * n, 1.6 + 0.6 * n), dpi=100)
    cm = np.asarray(report.confusion)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), report.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), report.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {report.accuracy:.4f} (n={report.n})", fontsize=9)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
