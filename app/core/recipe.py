"""The training recipe's fixed numbers, each stated once: training (:mod:`app.learning.training`), the example
store (:mod:`app.storage.examples`), training jobs (:mod:`app.learning.jobs`) and the HTTP front read them here."""

from __future__ import annotations

SEED = 42
"""Every random choice of a training: folds, the held-out split, the example store's validation pick, the estimator."""
VAL_FRACTION = 0.2
"""Held out of each class for validation when no validation set is given (at least one photo a class)."""
MIN_IMAGES_PER_CLASS = 2
"""Fewest training photos a class may have: cross-validation needs two a class."""
