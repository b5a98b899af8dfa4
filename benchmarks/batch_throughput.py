"""Batch jobs: images/s in-process vs Ray Data with 1 and 2 actors, and where the time goes.

    nice -n 10 python -m benchmarks.batch_throughput [--images 200] [--data ../shared/data/cats_vs_dogs]

On the same real photos (symlinked into a scratch folder, never copied into the repository):

1. the stages alone, one after the other: read the bytes, decode them (the one image loader, one
   thread: images/s per core), the extractor on batches of 16 (all cores), the head, the Parquet write;
2. ``tlserve batch`` in-process (the default engine), with its own stage times;
3. ``tlserve batch --ray local`` (a private Ray on loopback, 2 CPUs) with a pool of 1 and of 2
   actors (1 ONNX Runtime thread each), the Ray start-up timed apart; Ray Data's per-operator times.

Prints a table and writes ``benchmarks/out/batch/batch.json``. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from app.batch import BatchJob, run
from app.core.cpus import available_cpus
from app.core.imaging import load_image
from app.core.settings import Settings
from app.serving.extractor import Extractor
from app.storage.registry import load_head
from app.storage.store import ModelStore


def scratch_source(data: Path, n: int, root: Path) -> Path:
    src = root / "src"
    shutil.rmtree(src, ignore_errors=True)
    for label in ("cat", "dog"):
        (src / label).mkdir(parents=True)
        for p in sorted((data / "train" / label).iterdir())[: n // 2]:
            (src / label / p.name).symlink_to(p.resolve())
    return src


def stages_alone(src: Path, settings: Settings) -> dict[str, float]:
    """images/s of each stage run alone over every file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(p for p in src.rglob("*") if p.is_file())
    store = ModelStore.open(settings)
    info = store.extractor()
    t0 = time.perf_counter()
    blobs = [p.read_bytes() for p in files]
    t1 = time.perf_counter()
    images = [load_image(b, info.size, resample=info.resample) for b in blobs]
    t2 = time.perf_counter()
    ex = Extractor(info, provider="cpu", threads=settings.threads)
    ex.warm_up((16,))
    head = load_head(store.heads, settings.default_head, info.feature_space)
    head.predict_proba(np.zeros((1, info.feature_dim), np.float32))
    t3 = time.perf_counter()
    feats = np.concatenate([ex.run(np.stack(images[i : i + 16])) for i in range(0, len(images), 16)])
    t4 = time.perf_counter()
    head.predict_proba(feats)
    t5 = time.perf_counter()
    table = pa.table({"path": [str(p) for p in files], "features": list(feats)})
    pq.write_table(table, src.parent / "stage_write.parquet", compression="zstd")
    t6 = time.perf_counter()
    n = len(files)
    return {"read": n / (t1 - t0), "decode_1_thread": n / (t2 - t1), f"extractor_{settings.threads}_threads": n / (t4 - t3),
            "head": n / (t5 - t4), "write_parquet": n / (t6 - t5)}  # fmt: skip


def ray_operator_seconds(stats: str) -> dict[str, float]:
    """Total remote wall time per Ray Data operator, from ``Dataset.stats()``."""
    out: dict[str, float] = {}
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    for block in re.split(r"\n(?=Operator \d+ )", stats):
        name = re.match(r"Operator \d+ ([^:]+):", block)
        total = re.search(r"Remote wall time: .*?([\d.]+)(us|ms|s) total", block)
        if name and total:
            out[name.group(1)] = round(float(total.group(1)) * unit[total.group(2)], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cats_vs_dogs"))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/batch"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    src = scratch_source(args.data, args.images, args.out)
    result: dict[str, object] = {"images": args.images, "cpus": available_cpus(), "load_average_at_start": os.getloadavg()}
    result["stages_alone_images_per_s"] = stages_alone(src, settings)
    print("stages alone (images/s):", json.dumps(result["stages_alone_images_per_s"]))

    out = args.out / "inprocess"
    shutil.rmtree(out, ignore_errors=True)
    s = run(BatchJob(str(src), str(out)), settings, progress=False)
    result["inprocess"] = s.as_dict()
    print("in-process:", s.line(), json.dumps({k: round(v, 1) for k, v in s.stages.items()}))

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only
    from app.batch.raydata import connect

    t0 = time.perf_counter()
    connect("local", num_cpus=available_cpus())
    result["ray_start_s"] = round(time.perf_counter() - t0, 2)
    for actors, cpus in ((1, 1.0), (2, 0.5)):
        out = args.out / f"ray{actors}"
        shutil.rmtree(out, ignore_errors=True)
        s = run(BatchJob(str(src), str(out), ray="local", actors=actors, actor_cpus=cpus), settings, progress=False)
        result[f"ray_{actors}_actors"] = {**s.as_dict(), "operator_seconds": ray_operator_seconds(s.stats)}
        print(f"ray, {actors} actor(s):", s.line(), json.dumps(ray_operator_seconds(s.stats)))
    result["load_average_at_end"] = os.getloadavg()
    (args.out / "batch.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print("| engine | images/s |")
    print("|---|---|")
    for key in ("inprocess", "ray_1_actors", "ray_2_actors"):
        print(f"| {key} | {result[key]['images_per_s']:.1f} |")  # type: ignore[index]


if __name__ == "__main__":
    main()
