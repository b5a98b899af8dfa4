"""``python -m benchmarks.learning_curve``: accuracy against photos a class, for each candidate training recipe.

    nice -n 10 python -m benchmarks.learning_curve [--data ../shared/data] [--cache /work/cache/fewshot]
        [--draws 10] [--ks 3,5,10,20,50,all] [--extract-only] [--out benchmarks]

* **weather** (``weather/train``, 766 photos, 4 classes): nested cross-validation. Draw ``d`` splits the
  photos into 5 stratified folds (seed ``SEED + d``); for each fold, ``k`` photos a class are drawn from the
  other four folds (the same draw for every recipe), the recipe is fitted on them (its own choice of C by
  cross-validation inside those ``k`` a class, grouped by photo so a photo's views never straddle folds) and
  scores the held-out fold. A draw's accuracy is over all 766 photos.
* **cats_vs_dogs**: ``k`` photos a class drawn from ``train`` (from a fixed pool of :data:`CATS_POOL` a class for
  k <= 50, the photos whose views are extracted; all 1,000 a class at ``all``), scored on ``val`` (1,000).

Every recipe is :func:`app.core.recipe.fit_recipe`, the code ``tlserve train`` and HTTP training run. Features:
the store's fp32 export (what training uses), each (photo, view) extracted once and cached under ``--cache``
(:mod:`benchmarks.fewshot_views`). Writes ``<out>/learning_curve.json``, ``learning_curve.png`` and prints the
markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.core.recipe import CANDIDATES, SEED, VIEWS, Recipe
from benchmarks.fewshot_views import ViewCache, photo_hashes, view_features

CATS_POOL = 200
"""Photos a class of cats_vs_dogs/train whose augmentation views are extracted (the draws for k <= 50)."""


@dataclass
class Photos:
    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    hashes: list[str]


def photos(folder: Path) -> Photos:
    from app.learning.features import Dataset

    data = Dataset.from_folder(folder)
    return Photos(list(data.paths), data.labels, list(data.classes), photo_hashes(list(data.paths)))


def cats_pool(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), CATS_POOL, replace=False)
                                   for c in np.unique(labels)]))  # fmt: skip


def extractor():  # type: ignore[no-untyped-def]
    from app.serving.extractor import Extractor
    from app.storage.store import ModelStore

    info = ModelStore(Path(os.environ.get("TLSERVE_MODEL_STORE", "model_store"))).extractor(precision="fp32")
    return Extractor(info, provider="cpu", threads=int(os.environ.get("LC_THREADS", "2"))), info


def load_features(args: argparse.Namespace) -> dict[str, Any]:
    """Every (photo, view) the benchmark needs, in order of importance (so a cut-short run still has the
    weather curve): weather orig+flip, cats val + pool, weather crops, cats pool crops, the rest of cats train."""
    ext, info = extractor()
    cache = ViewCache(args.cache, info.sha256)
    w = photos(args.data / "weather" / "train")
    tr = photos(args.data / "cats_vs_dogs" / "train")
    va = photos(args.data / "cats_vs_dogs" / "val")
    pool = cats_pool(tr.labels)
    sub = lambda p, idx: ([p.paths[i] for i in idx], [p.hashes[i] for i in idx])  # noqa: E731
    wf: dict[str, np.ndarray] = {}
    cf: dict[str, np.ndarray] = {}
    for v in VIEWS:
        wf[v] = view_features(w.paths, w.hashes, v, ext, cache, "weather")
    val = view_features(va.paths, va.hashes, "orig", ext, cache, "cats val")
    cats_all = view_features(tr.paths, tr.hashes, "orig", ext, cache, "cats train")
    cf["orig"] = cats_all[pool]
    for v in VIEWS[1 : 2 if args.no_cats_crops else None]:
        cf[v] = view_features(*sub(tr, pool), v, ext, cache, "cats pool")
    return {"weather": (w, wf), "cats": (tr, pool, cf, cats_all, va, val), "info": info, "costs": cache.costs()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown"


def _draw(labels: np.ndarray, pool: np.ndarray, k: int | str, rng: np.random.Generator) -> np.ndarray:
    """``k`` photos a class from ``pool`` (indices into ``labels``); ``all``: the whole pool."""
    if k == "all":
        return pool
    return np.sort(np.concatenate([rng.choice(pool[labels[pool] == c], int(k), replace=False)
                                   for c in np.unique(labels[pool])]))  # fmt: skip


def _fit_score(xv: np.ndarray, y: np.ndarray, test_x: np.ndarray, recipe: Recipe, n_classes: int) -> tuple[np.ndarray, float]:
    from app.core.recipe import choose, transform
    from app.learning.fewshot import cross_validate, fit_prepared, prepare, select, views_of

    t0 = time.perf_counter()
    if recipe.name == AUTO.name:  # what the trainer does: the default for this size, or lr by cross-validation
        views = recipe.views
        recipe, search, _ = select(xv, y, views, choose(int(np.bincount(y).min()))[0], n_classes)
        zv = prepare(views_of(xv, recipe, views), recipe)
        assert search is not None
    elif recipe.head == "lda":  # no C to choose
        zv = prepare(xv, recipe)
        est = fit_prepared(zv, y, recipe, n_classes, 1.0)
        return est.predict(transform(test_x, recipe.transform)), time.perf_counter() - t0
    else:
        zv = prepare(xv, recipe)
        search = cross_validate(zv, y, recipe, n_classes, prepared=True)
    c = search.best
    est = fit_prepared(zv, y, recipe, n_classes, c, search.scale.get(c, 0.0))
    pred = est.predict(transform(test_x, recipe.transform))
    return pred, time.perf_counter() - t0


AUTO = Recipe("auto")
"""The trainer's default: :func:`app.core.recipe.choose` for the smallest class, checked against lr by cross-validation."""


def _auto(smallest: int) -> Recipe:
    from app.core.recipe import choose

    return Recipe(AUTO.name, views=tuple(dict.fromkeys(v for r in choose(smallest)[0] for v in r.views)))


def run_cell(feats: dict[str, Any], dataset: str, recipe: Recipe, k: int | str, draws: int) -> dict[str, Any]:
    from app.learning.crossval import fold_ids

    if recipe.name == AUTO.name:
        recipe = _auto(int(k) if k != "all" else (113 if dataset == "weather" else 1000))  # weather: 143 x 4/5 folds

    cell: dict[str, Any] = {"recipe": recipe.name, "dataset": dataset, "k": k, "views": list(recipe.views)}
    accs: list[float] = []
    seconds: list[float] = []
    if dataset == "weather":
        w, wf = feats["weather"]
        if any(v not in wf for v in recipe.views):
            return {**cell, "skipped": "views not extracted"}
        xv = np.stack([wf[v] for v in recipe.views], axis=1)
        y = w.labels
        for d in range(draws):
            outer = fold_ids(y, 5, SEED + d)
            correct = 0
            for f in range(5):
                rng = np.random.default_rng([SEED, d, f])
                idx = _draw(y, np.flatnonzero(outer != f), k, rng)
                test = np.flatnonzero(outer == f)
                pred, sec = _fit_score(xv[idx], y[idx], wf["orig"][test], recipe, len(w.classes))
                correct += int((pred == y[test]).sum())
                seconds.append(sec)
            accs.append(correct / len(y))
    else:
        tr, pool, cf, cats_all, va, val = feats["cats"]
        if k == "all":
            if recipe.views != ("orig",):
                return {**cell, "skipped": "views of all 2,000 photos not extracted"}
            xv, y, base = cats_all[:, None, :], tr.labels, np.arange(len(tr.labels))
        else:
            if any(v not in cf for v in recipe.views):
                return {**cell, "skipped": "views not extracted"}
            xv, y, base = np.stack([cf[v] for v in recipe.views], axis=1), tr.labels[pool], np.arange(len(pool))
        for d in range(draws):
            idx = _draw(y, base, k, np.random.default_rng([SEED, d]))
            pred, sec = _fit_score(xv[idx], y[idx], val, recipe, 2)
            accs.append(float((pred == va.labels).mean()))
            seconds.append(sec)
    return {**cell, "mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accuracies": accs, "draws": len(accs), "fit_seconds": statistics.mean(seconds)}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for ax, dataset in zip(axes, ("weather", "cats_vs_dogs"), strict=True):
        cells = [c for c in result["cells"] if c["dataset"] == dataset and "mean" in c]
        ks = sorted({c["k"] for c in cells if c["k"] != "all"})
        pos = {k: i for i, k in enumerate([*ks, "all"])}
        cells.sort(key=lambda c: pos[c["k"]])
        for name in dict.fromkeys(c["recipe"] for c in cells):
            row = [c for c in cells if c["recipe"] == name]
            xs = [pos[c["k"]] for c in row]
            ax.errorbar(xs, [100 * c["mean"] for c in row], yerr=[100 * c["sd"] for c in row], marker="o", ms=3,
                        capsize=2, label=name)  # fmt: skip
        ax.set_xticks(range(len(pos)), [str(k) for k in pos])
        ax.set_xlabel("photos a class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(dataset + (" (nested 5-fold CV)" if dataset == "weather" else " (val, 1,000 photos)"), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"learning curve, mean ± sd of {result['draws']} draws ({result['date']}, {result['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    ks: list[Any] = sorted({c["k"] for c in result["cells"] if c["k"] != "all"}) + (
        ["all"] if any(c["k"] == "all" for c in result["cells"]) else [])  # fmt: skip
    vs = result["view_seconds"]
    lines = []
    for dataset in ("weather", "cats_vs_dogs"):
        lines += [f"**{dataset}**", "", "| recipe | views | extraction s/photo | " + " | ".join(f"k={k}" for k in ks)
                  + " | fit s (k=10 / all) |", "|---|---|---|" + "---|" * len(ks) + "---|"]  # fmt: skip
        for name in dict.fromkeys(c["recipe"] for c in result["cells"]):
            row = {c["k"]: c for c in result["cells"] if c["recipe"] == name and c["dataset"] == dataset}
            if not row:
                continue
            views = next(iter(row.values()))["views"]
            ext = sum(vs.get(v, float("nan")) for v in views)
            cells = [f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['sd']:.1f}"
                     + ("" if row[k]["draws"] == result["draws"] else f" ({row[k]['draws']} draws)")
                     if k in row and "mean" in row[k] else "n/a" for k in ks]  # fmt: skip
            fits = " / ".join(f"{row[k]['fit_seconds']:.2f}" if k in row and "mean" in row[k] else "n/a" for k in (10, "all"))
            lines.append(f"| {name} | {'+'.join(views)} | {ext:.2f} | " + " | ".join(cells) + f" | {fits} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/fewshot"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks"))
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--ks", default="5,10,3,20,50,all", help="in the order run (the floors' sizes first)")
    ap.add_argument("--recipes", default="", help="comma-separated candidate names (default: all)")
    ap.add_argument(
        "--draws-all",
        type=int,
        default=10,
        help="draws at k=all for recipes with training-time views (4x the rows: the slowest cells)",
    )
    ap.add_argument("--no-cats-crops", action="store_true", help="do not extract crops of the cats pool")
    ap.add_argument("--extract-only", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    feats = load_features(args)
    print(f"[learning_curve] features ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.extract_only:
        return
    names = [n for n in args.recipes.split(",") if n] or [*CANDIDATES, AUTO.name]
    ks = [k if k == "all" else int(k) for k in args.ks.split(",")]
    result = {"cpu": cpu_model(), "date": datetime.now(UTC).strftime("%Y-%m-%d"), "draws": args.draws,
              "draws_all": args.draws_all, "extractor": feats["info"].path.name, "extractor_sha256": feats["info"].sha256,
              "view_seconds": {v: c["seconds"] / max(1, c["images"]) for v, c in feats["costs"].items()},
              "cells": []}  # fmt: skip
    for k in ks:  # every recipe at a k before the next k: a run cut short still compares them
        for name in names:
            recipe = AUTO if name == AUTO.name else CANDIDATES[name]
            for dataset in ("weather", "cats_vs_dogs"):
                few = k == "all" and len(recipe.views) > 1
                cell = run_cell(feats, dataset, recipe, k, args.draws_all if few else args.draws)
                result["cells"].append(cell)
                print(f"[learning_curve] {name} {dataset} k={k}: {cell.get('mean', float('nan')):.4f} "
                      f"± {cell.get('sd', float('nan')):.4f} ({cell.get('fit_seconds', 0):.2f} s a fit)", file=sys.stderr,
                      flush=True)  # fmt: skip
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "learning_curve.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "learning_curve.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
