"""Features of photos under augmentation views for :mod:`benchmarks.learning_curve`, cached once per
(photo bytes, view, extractor).

Each view is a decode through the one image loader (:func:`app.core.imaging.load_image`) plus a crop or a flip
(:data:`app.core.recipe.VIEWS`: the same functions the trainer uses), run through the extractor the service trains
with (the store's fp32 export, :meth:`app.storage.store.ModelStore.extractor`). The cache lives outside the repository
(``--cache``, default ``/work/cache/fewshot``): ``<cache>/<extractor sha16>/<view>/<photo sha256>.npy``;
``cost.json`` beside them keeps the measured seconds per image of each view (the extraction cost column).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app.core.hashing import sha256_bytes
from app.core.recipe import view_image

BATCH = 16


class ViewCache:
    def __init__(self, root: Path, extractor_sha: str) -> None:
        self.dir = root / extractor_sha[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cost_file = self.dir / "cost.json"

    def path(self, view: str, sha: str) -> Path:
        return self.dir / view / f"{sha}.npy"

    def costs(self) -> dict[str, dict[str, float]]:
        try:
            return dict(json.loads(self.cost_file.read_text()))
        except (OSError, ValueError):
            return {}

    def add_cost(self, view: str, images: int, seconds: float) -> None:
        costs = self.costs()
        entry = costs.setdefault(view, {"images": 0, "seconds": 0.0})
        entry["images"] += images
        entry["seconds"] += seconds
        tmp = self.cost_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(costs, indent=1))
        tmp.replace(self.cost_file)


def photo_hashes(paths: list[Path]) -> list[str]:
    return [sha256_bytes(p.read_bytes()) for p in paths]


def view_features(paths: list[Path], hashes: list[str], view: str, extractor, cache: ViewCache,  # type: ignore[no-untyped-def]
                  label: str = "") -> np.ndarray:  # fmt: skip
    """``[len(paths), D]`` features of ``view`` of each photo, extracted where the cache misses."""
    out: list[np.ndarray | None] = [None] * len(paths)
    todo = []
    for i, h in enumerate(hashes):
        p = cache.path(view, h)
        if p.is_file():
            out[i] = np.load(p, allow_pickle=False)
        else:
            todo.append(i)
    if todo:
        (cache.dir / view).mkdir(parents=True, exist_ok=True)
        t0, done = time.perf_counter(), 0
        with ThreadPoolExecutor(max_workers=2) as pool:
            for start in range(0, len(todo), BATCH):
                idx = todo[start : start + BATCH]
                imgs = list(pool.map(lambda i: view_image(paths[i].read_bytes(), view, extractor.size), idx))
                feats = extractor.run(np.stack(imgs))
                for i, vec in zip(idx, feats, strict=True):
                    vec = np.ascontiguousarray(vec, dtype=np.float32)
                    tmp = cache.path(view, hashes[i]).with_suffix(".tmp")
                    with open(tmp, "wb") as f:
                        np.save(f, vec, allow_pickle=False)
                    tmp.replace(cache.path(view, hashes[i]))
                    out[i] = vec
                done += len(idx)
                if start // BATCH % 10 == 0 or done == len(todo):
                    el = time.perf_counter() - t0
                    print(f"[views] {label} {view}: {done}/{len(todo)} extracted, {el / done:.3f} s/img", file=sys.stderr,
                          flush=True)  # fmt: skip
        cache.add_cost(view, len(todo), time.perf_counter() - t0)
    return np.stack([v for v in out if v is not None])
