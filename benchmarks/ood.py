"""Out-of-distribution scores on ../shared photos: which familiarity score to ship (issue 15).

Every score's threshold is calibrated the way :mod:`app.serving.familiarity` does it: out of fold on the
training photos (5 stratified folds, the trainer's seed), at 95% acceptance. Then:

- **far**: the cats_vs_dogs head (2,000 train photos) on the 1,000 val photos (accepted) against
  ``weather/train`` (766 photos of skies; flagged), AUROC val vs weather;
- **near**: a head trained on three weather classes (80% of their photos, stratified, seed 42)
  against the fourth class, each class in turn: the other 20% accepted, the fourth class flagged;
- **cost**: scoring time per image against 10,000 stored photos next to the extractor's time per
  image, and bytes stored per 1,000 training photos.

Scores tried: max softmax probability, Mahalanobis (shared covariance, class means), kNN mean cosine
k=10 on raw L2-normalised features (Sun et al. 2022, the baseline), and every method of
:data:`app.serving.familiarity.METHODS`. Features come from the trainer's feature cache (extract once; a
cold run on 2 busy cores takes long): ``nice -n 10 python -m benchmarks.ood [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from app.core.recipe import SEED
from app.core.settings import Settings
from app.learning.crossval import cross_validate, fit, sklearn_threads, stratified_holdout
from app.learning.features import Dataset, hash_files
from app.learning.training import Trainer
from app.serving import familiarity
from app.serving.familiarity import Familiarity, auroc, calibrate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ACCEPTANCE = 0.95
BASELINES = ("msp", "mahalanobis")
SCORES = (*BASELINES, *familiarity.METHODS)

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _mahalanobis(x: np.ndarray, y: np.ndarray) -> Scorer:
    means = np.stack([x[y == c].mean(axis=0) for c in np.unique(y)])
    centred = x - means[y]
    cov = centred.T @ centred / len(x) + 1e-6 * np.eye(x.shape[1])
    prec = np.linalg.pinv(cov)

    def score(q: np.ndarray, _proba: np.ndarray) -> np.ndarray:
        d = np.stack([np.einsum("ij,jk,ik->i", q - m, prec, q - m) for m in means], axis=1)
        return -d.min(axis=1)

    return score


def _scorer(kind: str, x: np.ndarray, y: np.ndarray) -> Scorer:
    if kind == "msp":
        return lambda _q, proba: proba.max(axis=1)
    if kind == "mahalanobis":
        return _mahalanobis(x, y)
    raise ValueError(kind)


def threshold_and_scorer(kind: str, x: np.ndarray, y: np.ndarray, folds: np.ndarray, oof: np.ndarray) -> tuple[float, Scorer]:
    """The score fitted on all of ``x`` and its threshold from the out-of-fold scores."""
    if kind in familiarity.METHODS:
        model, _ = calibrate(x, y, folds, oof, method=kind, acceptance=ACCEPTANCE)
        return model.threshold, model.score
    scores = np.zeros(len(y))
    for f in np.unique(folds):
        held = folds == f
        scores[held] = _scorer(kind, x[~held], y[~held])(x[held], oof[held])
    return float(np.quantile(scores, 1 - ACCEPTANCE, method="lower")), _scorer(kind, x, y)


def evaluate(x: np.ndarray, y: np.ndarray, c: float, inside: np.ndarray, outside: np.ndarray) -> dict[str, dict[str, float]]:
    """Every score: accepted share of ``inside``, flagged share of ``outside``, AUROC."""
    n_classes = int(y.max()) + 1
    cv = cross_validate(x, y, (c,), n_classes)
    head = fit(x, y, c)
    with sklearn_threads(1):
        p_in, p_out = head.predict_proba(inside), head.predict_proba(outside)
    out = {}
    for kind in SCORES:
        t, score = threshold_and_scorer(kind, x, y, cv.folds, cv.oof[c])
        s_in, s_out = score(inside, p_in), score(outside, p_out)
        out[kind] = {"accepted": float((s_in >= t).mean()), "flagged": float((s_out < t).mean()), "auroc": auroc(s_in, s_out)}
    return out


def features(trainer: Trainer, folder: Path, cached_only: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = Dataset.from_folder(folder)
    if cached_only:  # only the photos whose features are in the cache already (no extraction)
        hashes, _ = hash_files(ds.paths, trainer.settings.decoders)
        c, info = trainer.cache, trainer.info
        ds = ds.subset(np.array([i for i, h in enumerate(hashes) if h and c.has(c.key(h, info.size, info.resample))], int))
    ext = trainer.features(ds.paths, phase=folder.name)
    return ext.features, ds.labels[ext.kept], ds.classes


def cost(trainer: Trainer, photos: np.ndarray, n: int = 10_000) -> dict[str, float]:
    """Scoring time per image against ``n`` stored photos (real features, drawn with replacement plus
    a little noise, two classes), against the extractor's time per image."""
    rng = np.random.default_rng(SEED)
    x = photos[rng.integers(0, len(photos), n)] + rng.normal(0, 0.01, (n, photos.shape[1])).astype(np.float32)
    labels = rng.integers(0, 2, n)
    model = Familiarity.build(x, labels, familiarity.DEFAULT_METHOD, standardize=(0.5, 0.1, 3.0, 1.0))
    q, proba = x[:16], np.eye(2)[labels[:16]] * 0.9 + 0.05
    size = trainer.info.size
    imgs = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    trainer.extractor.run(imgs)  # warm
    t0 = time.perf_counter()
    runs = 3
    for _ in range(runs):
        trainer.extractor.run(imgs)
    extract = (time.perf_counter() - t0) / (runs * len(imgs))
    timings = {}
    with sklearn_threads(1):  # as served: app/serving/service.py limits BLAS to one thread at start
        for batch in (1, 16):
            reps = 200 if batch == 1 else 50
            model.score(q[:batch], proba[:batch])
            t0 = time.perf_counter()
            for _ in range(reps):
                model.score(q[:batch], proba[:batch])
            timings[batch] = (time.perf_counter() - t0) / (reps * batch)
    per_1000 = sum(len(b) for b in Familiarity.build(x[:1000], labels[:1000], "knn_class").files().values())
    return {"stored": n, "extractor_s_per_image": extract, "score_s_per_image_batch1": timings[1],
            "score_s_per_image_batch16": timings[16], "ratio_batch1": timings[1] / extract,
            "ratio_batch16": timings[16] / extract, "bytes_per_1000_photos": per_1000}  # fmt: skip


def table(title: str, rows: dict[str, dict[str, float]], inside: str, outside: str) -> str:
    lines = [f"### {title}", "", f"| score | {inside} accepted | {outside} flagged | AUROC |", "|---|---|---|---|"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {r['accepted']:.1%} | {r['flagged']:.1%} | {r['auroc']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--C", type=float, default=0.01, help="C of the cats_vs_dogs head (the default head's)")
    ap.add_argument("--far-train", default="train", help="cats_vs_dogs split the far-case head is trained on")
    ap.add_argument("--far-test", default="val", help="cats_vs_dogs split it is tested on (in distribution)")
    ap.add_argument("--cached-only", action="store_true", help="use only photos whose features are cached (no extraction)")
    args = ap.parse_args()
    trainer = Trainer(Settings(), progress=True)
    tx, ty, _ = features(trainer, DATA / "cats_vs_dogs" / args.far_train, args.cached_only)
    vx, _, _ = features(trainer, DATA / "cats_vs_dogs" / args.far_test, args.cached_only)
    print(f"far case: head on {len(tx)} photos of {args.far_train}, {len(vx)} photos of {args.far_test} in distribution")
    wx, wy, wclasses = features(trainer, DATA / "weather" / "train")
    results: dict[str, object] = {}
    far = evaluate(tx, ty, args.C, vx, wx)
    results["far"] = far
    print(table(f"far: cats_vs_dogs head ({args.far_train}), {args.far_test} photos vs weather/train", far, args.far_test, "weather"),
          "\n", flush=True)  # fmt: skip

    near_all: dict[str, list[dict[str, float]]] = {k: [] for k in SCORES}
    for h, name in enumerate(wclasses):
        keep = wy != h
        x_in, y_in = wx[keep], wy[keep]
        y_in = np.searchsorted(np.unique(y_in), y_in)
        train, test = stratified_holdout(y_in, 3)
        rows = evaluate(x_in[train], y_in[train], 0.1, x_in[test], wx[wy == h])
        results[f"near_{name}"] = rows
        print(
            table(f"near: weather head without {name!r}, its held-out 20% vs {name!r}", rows, "held-out", name), "\n", flush=True
        )
        for k, r in rows.items():
            near_all[k].append(r)
    mean = {k: {m: float(np.mean([r[m] for r in v])) for m in ("accepted", "flagged", "auroc")} for k, v in near_all.items()}
    results["near_mean"] = mean
    print(table("near: mean over the four held-out weather classes", mean, "held-out", "4th class"), "\n", flush=True)

    results["cost"] = c = cost(trainer, np.concatenate([tx, vx, wx]))
    print(f"cost at {c['stored']} stored photos ({familiarity.DEFAULT_METHOD}): score {c['score_s_per_image_batch1'] * 1e3:.3f} ms/image "
          f"(batch 1), {c['score_s_per_image_batch16'] * 1e3:.3f} ms/image (batch 16); extractor "
          f"{c['extractor_s_per_image'] * 1e3:.1f} ms/image: {c['ratio_batch1']:.2%} / {c['ratio_batch16']:.2%}; "
          f"{c['bytes_per_1000_photos']} bytes stored per 1,000 training photos")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
