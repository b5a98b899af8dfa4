"""``python -m benchmarks.weather_cv``: the weather floor of issue 13 with many paired shuffles.

    python -m benchmarks.weather_cv [--shuffles 40] [--sizes 224,256,288] [--stores /tmp/isz] [--cache DIR]

The input-size benchmark (:mod:`benchmarks.input_size`) reports weather 5-fold CV accuracy as the mean of a
few fold assignments. Sizes differ there by one or two photos of 766, about the spread between shuffles, so
this runs the same nested CV (:func:`benchmarks.input_size.nested_cv`: C chosen inside each outer training
part) for ``--shuffles`` fold assignments, the *same* ones at every size (seeds SEED, SEED+1, ...), and
compares each size with the first one shuffle by shuffle: mean difference in photos, its standard error, and
in how many shuffles it was better or worse. Features come from the input-size run's stores
(``<stores>/<size>``) through the feature cache, extracted where missing. One BLAS thread a process; run
sizes in separate processes to use more cores. Writes ``<out>/weather_cv.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.input_size import DATA, ensure_export, nested_cv, product_features


def run(args: argparse.Namespace) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    from app.learning.features import Dataset
    from app.serving.extractor import Extractor

    threadpool_limits(1, user_api="blas")
    weather = Dataset.from_folder(args.data / "weather" / "train")
    per_size: dict[int, list[int]] = {}
    for size in args.sizes:
        t0 = time.perf_counter()
        info = ensure_export(args.stores / str(size), size)
        ext, _ = product_features(weather.paths, Extractor(info), info, args.cache)
        r = nested_cv(ext.features, weather.labels[ext.kept], args.shuffles)
        per_size[size] = r["correct_by_shuffle"]
        print(f"[weather_cv] {size}: mean {statistics.mean(r['correct_by_shuffle']):.2f} of {r['n']} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    base = args.sizes[0]
    n = len(weather.paths)
    rows = []
    for size, correct in per_size.items():
        diff = [b - a for a, b in zip(per_size[base], correct, strict=True)]
        se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
        rows.append({"size": size, "mean_accuracy": statistics.mean(correct) / n, "mean_photos_vs_base": statistics.mean(diff),
                     "se_photos": se, "better": sum(d > 0 for d in diff), "worse": sum(d < 0 for d in diff),
                     "same": sum(d == 0 for d in diff), "correct_by_shuffle": correct})  # fmt: skip
    return {"photos": n, "shuffles": args.shuffles, "base": base, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"| size | weather 5-fold CV, mean of {result['shuffles']} shuffles | photos vs {result['base']} (mean ± SE) | "
             "shuffles better / worse / same |", "|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['size']} | {r['mean_accuracy']:.2%} | {r['mean_photos_vs_base']:+.2f} ± {r['se_photos']:.2f} | "
                     f"{r['better']} / {r['worse']} / {r['same']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.weather_cv", description=__doc__.split("\n\n")[0])
    p.add_argument("--shuffles", type=int, default=40)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[224, 256, 288])
    p.add_argument("--data", type=Path, default=DATA, help="holds weather/train")
    p.add_argument("--stores", type=Path, default=Path("/tmp/isz"), help="the input-size run's stores: <stores>/<size>")
    p.add_argument("--cache", type=Path, default=Path("model_store/.cache/features"), help="feature cache root")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    if not (args.data / "weather" / "train").is_dir():
        p.error(f"{args.data / 'weather' / 'train'} is not there (the shared photos)")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weather_cv.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
