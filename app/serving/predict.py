"""The one inference core after decoding: features and a loaded head in, the answers out.

:func:`answer` runs the head's ``predict_proba`` and, when the head has familiarity data, its
familiarity score and the ``in_distribution`` verdict at the calibrated threshold
(:class:`app.serving.familiarity.Familiarity`); :meth:`Answers.row` renders one image's answer as every
front shows it: ``label``, ``confidence``, every ``probabilities`` or the ``top_k`` list
(:func:`app.storage.heads.describe`), then ``familiarity`` (6 places) and ``in_distribution``.
:func:`answer_images` is the same from decoded pixel arrays, through an extractor.

Every path that answers runs it, so a photo gets the same answer whichever way it came
(``tests/test_predict.py`` compares ``tlserve predict``, ``tlserve batch`` and ``/v1/classify``):

- the service, after the batcher (:meth:`app.serving.service.Service.infer`; it scores large familiarity
  banks in a worker thread, so it calls the two steps, :func:`probabilities` and :func:`judge`);
- ``tlserve predict`` and ``tlserve evaluate`` (:meth:`app.learning.training.Trainer.evaluate`);
- batch jobs, in-process and on Ray (:class:`app.batch.compute.Model`).

Decoding is not here: it is :class:`app.core.imaging.DecodeLimits` over :func:`app.core.imaging.load_image`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from app.storage.heads import Head, describe

if TYPE_CHECKING:
    from app.serving.extractor import Extractor
    from app.serving.familiarity import Familiarity


@dataclass(frozen=True)
class Answers:
    """The answers for ``n`` images of one head: one row each."""

    head: Head
    proba: np.ndarray
    """``[n, classes]`` float32, columns in ``head.classes`` order."""
    familiarity: np.ndarray | None = None
    """``[n]`` float64 scores, when the head has familiarity data."""
    in_distribution: np.ndarray | None = None
    """``[n]`` bool verdicts at the head's threshold, with ``familiarity``."""

    def __len__(self) -> int:
        return len(self.proba)

    def row(self, i: int, top_k: int | None = None, *, named: bool = True) -> dict[str, Any]:
        """Image ``i``'s answer; ``named=False`` (refused: below the familiarity threshold under
        ``ood_policy=refuse``) leaves out the label, confidence and probabilities."""
        out = describe(self.head, self.proba[i], top_k) if named else {}
        if self.familiarity is not None and self.in_distribution is not None:
            out["familiarity"] = round(float(self.familiarity[i]), 6)
            out["in_distribution"] = bool(self.in_distribution[i])
        return out


def probabilities(head: Head, features: np.ndarray) -> Answers:
    """The head's probabilities for ``[n, D]`` features (no familiarity yet: :func:`judge`)."""
    proba = head.predict_proba(features) if len(features) else np.zeros((0, len(head.classes)), np.float32)
    return Answers(head, proba)


def judge(answers: Answers, known: Familiarity | None, features: np.ndarray) -> Answers:
    """``answers`` with the familiarity score and verdict of ``known`` (the head's familiarity model,
    :func:`app.serving.familiarity.for_head`); unchanged when the head has none."""
    if known is None:
        return answers
    score = known.score(features, answers.proba) if len(features) else np.zeros(0, np.float64)
    return replace(answers, familiarity=score, in_distribution=known.verdict(score))


def answer(head: Head, features: np.ndarray, known: Familiarity | None = None) -> Answers:
    """Probabilities, then familiarity: the whole core for ``[n, D]`` features."""
    return judge(probabilities(head, features), known, features)


def answer_images(extractor: Extractor, head: Head, images: np.ndarray, known: Familiarity | None = None) -> Answers:
    """:func:`answer` for decoded images ``uint8 [n, S, S, 3]`` (what :func:`app.core.imaging.load_image` gives)."""
    return answer(head, extractor.run(images), known)
