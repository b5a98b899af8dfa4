"""How fast is training, and is its accuracy the reference's? Real photos, the real extractor.

    nice -n 10 python -m benchmarks.train_speed [--data ../shared/data/cats_vs_dogs/train --limit 500]
        [--weather ../shared/data/weather/train] [--model-store model_store] [--out benchmarks/out/train_speed]
        [--baseline DIR [--baseline-limit N]]   # DIR: another version's app/ (`git archive main app | tar -x -C DIR`)
        [--accuracy-cache DIR]                  # a feature cache that may already hold --weather's features

In one run, in a scratch model store (the extractor linked, never the repository's heads/):

1. **bare**: the extractor alone on one decoded batch of 32, images/s (and CPU s/image), measured right
   before and right after the first train (the machine is shared: both are printed);
2. **first train** on ``--limit`` photos a class of ``--data`` with an empty feature cache: images/s of the whole
   ``Trainer.train`` call and of its feature phase, as ratios to the bare figure (target >= 0.87);
3. **re-train** from the cached features (target < 10 s for 1,000 images x 512-d on 2 cores);
4. **one fit** at C=0.01 on those features with BLAS threads limited to 1 and unlimited (twice each, alternating);
5. **accuracy**: the trainer's 5-fold CV accuracy on ``--weather`` against an independent
   ``LogisticRegressionCV`` (same C grid, same folds) on the same cached features (target: within 1 point).

With ``--baseline DIR`` steps 1-3 are repeated in a subprocess on ``DIR/app`` (the "before" numbers): its first
train on ``--baseline-limit`` photos a class with an empty cache, its re-train on the same photos as ours with
its cache filled from ours (same extractor and loader: the same vectors; see :func:`seed_main_cache`). Prints
JSON as each step ends and keeps ``--out``/train_speed.json current.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

MEASURE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from app.core.settings import Settings
from app.learning.training import Trainer
from app.learning.features import Dataset
from app.core.imaging import load_image

store, data, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
first_limit, first_cache, retrain_limit, retrain_cache = int(sys.argv[4]), Path(sys.argv[5]), int(sys.argv[6]), Path(sys.argv[7])

def trainer(cache):
    return Trainer(Settings(model_store=store, feature_cache_dir=cache), progress=False)

t = trainer(first_cache)
info = t.info
paths = Dataset.from_folder(data).paths
batch = np.stack([load_image(p.read_bytes(), info.size, resample=info.resample) for p in paths[:32]])

def bare():
    t.extractor.run(batch)  # warm
    n, w0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds or n < 3 * 32:
        t.extractor.run(batch)
        n += 32
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"images_per_s": n / wall, "cpu_s_per_image": cpu / n}

def train(tr, name, limit):
    w0, c0 = time.perf_counter(), time.process_time()
    out = tr.train(data, name, limit=limit)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    card = out.card if hasattr(out, "card") else out[1]
    fitted_on_all = "fitted_on" in card.get("estimator", {})  # main's card: train + val parts; ours: all in train_per_class
    n = sum(card["training"]["train_per_class"].values()) + (0 if fitted_on_all else sum(card["training"]["val_per_class"].values()))
    return {"images": n, "wall_s": wall, "cpu_s": cpu, "images_per_s": n / wall, "cpu_s_per_image": cpu / n, "C": card["estimator"]["C"]}

before = bare()
first = train(t, "speed", first_limit)
after = bare()
retrain = train(t if retrain_cache == first_cache else trainer(retrain_cache), "speed", retrain_limit)
print("RESULT " + json.dumps({"bare_before": before, "first_train": first, "bare_after": after, "retrain": retrain}))
"""


def scratch_store(model_store: Path, root: Path) -> Path:
    """A model store with the same manifest and extractor (linked) and no heads."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((model_store / "manifest.json").read_text())
    shutil.copy(model_store / "manifest.json", root / "manifest.json")
    for entry in [manifest["extractor"], *manifest.get("variants", [])]:
        (root / entry["file"]).symlink_to((model_store / entry["file"]).resolve())
    return root


def measure(src: Path | None, store: Path, data: Path, seconds: float, first: tuple[int, Path],
            retrain: tuple[int, Path]) -> dict:  # fmt: skip
    """Steps 1-3 in a fresh process (``src``: another version's package, else this one): bare, first train
    (``first``: photos a class, empty cache), bare, re-train (``retrain``: photos a class, filled cache)."""
    env = {**os.environ, "PYTHONPATH": str(src or Path.cwd()), "TLSERVE_LOG_LEVEL": "warning"}
    args = [str(store), str(data), str(seconds), str(first[0]), str(first[1]), str(retrain[0]), str(retrain[1])]
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], env=env, capture_output=True, text=True, check=False,
                         cwd=src or Path.cwd())  # fmt: skip
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"measurement failed ({out.returncode}): {out.stderr[-3000:]}")
    result = json.loads(line[len("RESULT ") :])
    bare = (result["bare_before"]["images_per_s"] + result["bare_after"]["images_per_s"]) / 2
    bare_cpu = (result["bare_before"]["cpu_s_per_image"] + result["bare_after"]["cpu_s_per_image"]) / 2
    result["first_train_ratio"] = result["first_train"]["images_per_s"] / bare
    result["first_train_cpu_ratio"] = bare_cpu / result["first_train"]["cpu_s_per_image"]
    return result


def seed_main_cache(store: Path, data: Path, limit: int, ours: Path, theirs: Path) -> int:
    """Copy our cached vectors of ``data`` into main's cache layout (``<sha16>/<file sha[:2]>/<file sha>.npy``):
    the same extractor and loader give the same vectors, so main's re-train runs on the same features without
    a second extraction of every photo. Returns how many were copied."""
    from app.learning.features import Dataset, FeatureCache, hash_files
    from app.learning.training import _per_class_subset

    info = json.loads((store / "manifest.json").read_text())["extractor"]
    ds = Dataset.from_folder(data)
    ds = ds.subset(_per_class_subset(ds.labels, limit)) if limit else ds
    cache = FeatureCache(ours, info["sha256"])
    hashes, _ = hash_files(ds.paths)
    copied = 0
    for h in hashes:
        src = cache.dir / (key := cache.key(h or "", int(info["input_size"]), info["resample"]))[:2] / f"{key}.npy"
        if h and src.is_file():
            dst = theirs / info["sha256"][:16] / h[:2] / f"{h}.npy"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            copied += 1
    return copied


def accuracy_vs_reference(store: Path, weather: Path, cache: Path) -> dict:
    """The trainer's 5-fold CV accuracy against scikit-learn's LogisticRegressionCV on the same cached features."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    from app.core.recipe import SEED
    from app.core.settings import Settings
    from app.learning.crossval import C_GRID, cross_validate, sklearn_threads
    from app.learning.features import Dataset
    from app.learning.training import Trainer

    t = Trainer(Settings(model_store=store, feature_cache_dir=cache), progress=False)
    done = t.train(weather, "weather")
    data = Dataset.from_folder(weather)
    ext = t.features(data.paths)  # all from the cache
    x, y = ext.features, data.labels[ext.kept]
    w0 = time.perf_counter()
    ours = cross_validate(x, y, C_GRID, len(data.classes))
    ours_s = time.perf_counter() - w0
    w0 = time.perf_counter()
    with sklearn_threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 announces new defaults; these are explicit
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)
        ref = LogisticRegressionCV(Cs=list(C_GRID), cv=folds, max_iter=5000, random_state=SEED, scoring="accuracy").fit(x, y)
    ref_s = time.perf_counter() - w0
    scores = np.mean(next(iter(ref.scores_.values())), axis=0)  # [C], the same for every class (multinomial)
    return {
        "photos": len(y),
        "classes": data.classes,
        "cache_hits": ext.cache_hits,
        "train_card_cv": done.card["evaluation"]["cv"],
        "train_C": done.card["estimator"]["C"],
        "train_heldout_accuracy": done.card["metrics"]["accuracy"],
        "cv_all_photos": {
            "by_C": {str(c): round(a, 4) for c, a in ours.accuracy.items()},
            "best_C": ours.best,
            "accuracy": round(ours.accuracy[ours.best], 4),
            "seconds": round(ours_s, 2),
        },
        "LogisticRegressionCV": {
            "by_C": {str(c): round(float(a), 4) for c, a in zip(C_GRID, scores, strict=True)},
            "best_C": float(ref.C_[0]),
            "accuracy": round(float(scores.max()), 4),
            "seconds": round(ref_s, 2),
        },
        "difference_points": round(100 * (ours.accuracy[ours.best] - float(scores.max())), 2),
    }


def fit_threads(store: Path, data: Path, limit: int, cache: Path) -> dict:
    """One fit at C=0.01 on the cached features: BLAS threads limited to 1 vs scikit-learn's default."""
    from app.core.settings import Settings
    from app.learning.crossval import make_estimator, sklearn_threads
    from app.learning.features import Dataset
    from app.learning.training import Trainer, _per_class_subset

    t = Trainer(Settings(model_store=store, feature_cache_dir=cache), progress=False)
    ds = Dataset.from_folder(data)
    ds = ds.subset(_per_class_subset(ds.labels, limit)) if limit else ds
    ext = t.features(ds.paths)
    x, y = ext.features, ds.labels[ext.kept]
    out: dict = {"shape": list(x.shape)}
    with sklearn_threads(1):
        warm = _per_class_subset(y, 25)
        make_estimator(0.01).fit(x[warm], y[warm])  # imports and first-call costs, not timed
    for label, limited in (("blas_1_thread", True), ("blas_default", False), ("blas_1_thread", True), ("blas_default", False)):
        w0 = time.perf_counter()
        if limited:
            with sklearn_threads(1):
                make_estimator(0.01).fit(x, y)
        else:
            make_estimator(0.01).fit(x, y)
        out.setdefault(label + "_s", []).append(round(time.perf_counter() - w0, 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cats_vs_dogs/train"), help="photos for the speed runs")
    ap.add_argument("--limit", type=int, default=500, help="photos a class for the speed runs (default 500: 1,000 photos)")
    ap.add_argument("--weather", type=Path, default=Path("../shared/data/weather/train"), help="photos for the accuracy check")
    ap.add_argument("--model-store", type=Path, default=Path("model_store"), help="where the exported extractor is")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/train_speed"), help="where train_speed.json goes")
    ap.add_argument("--baseline", type=Path, default=None, help="a folder holding another version's app/ package")
    ap.add_argument("--accuracy-cache", type=Path, default=None, help="feature cache for the accuracy check (default: scratch)")
    ap.add_argument("--baseline-limit", type=int, default=None, help="photos a class for the baseline runs (default --limit)")
    ap.add_argument("--bare-seconds", type=float, default=10.0, help="seconds per bare-extractor measurement")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="train_speed_"))
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"data": str(args.data), "limit": args.limit, "cpus": os.cpu_count()}

    def step(key: str, value: dict) -> None:
        result[key] = value
        print(json.dumps({key: value}, indent=1), flush=True)
        (args.out / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")  # kept if a later step fails

    try:
        store = scratch_store(args.model_store, scratch / "store")
        cache = scratch / "cache"
        step("after", measure(None, store, args.data, args.bare_seconds, (args.limit, cache), (args.limit, cache)))
        step("fit_threads", fit_threads(store, args.data, args.limit, cache))
        if args.weather.is_dir():
            step("accuracy", accuracy_vs_reference(store, args.weather, args.accuracy_cache or cache))
        if args.baseline is not None:
            old = scratch_store(args.model_store, scratch / "store_before")
            seeded = seed_main_cache(store, args.data, args.limit, cache, scratch / "cache_before_retrain")
            first = (args.baseline_limit or args.limit, scratch / "cache_before_first")
            before = measure(args.baseline.resolve(), old, args.data.resolve(), args.bare_seconds, first,
                             (args.limit, scratch / "cache_before_retrain"))  # fmt: skip
            step("before", {**before, "retrain_cache_seeded_from_ours": seeded})
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
