"""fp32 vs int8 speed of bare ONNX Runtime sessions on the manifest's two extractors.

    python -m benchmarks.int8_speed [--model-store DIR] [--data DIR] [--batch 8] [--seconds 12]

Needs an int8 variant (``tlserve export --int8 --calibration-dir DIR``). Both sessions come from
:func:`app.serving.extractor.create_session` with ONNX Runtime's defaults (as the bench's bare engine) and
run the same batch of real decoded images, alternating in ``rounds`` because the speed of a shared
machine drifts. Prints one JSON object: images/s and CPU ms per image of each, and the speed-ups.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.core.errors import TlserveError
from app.serving.extractor import create_session
from app.storage.store import ModelStore
from benchmarks.bench import DEFAULT_DATA, decode_all, load_payloads


def speed_compare(
    fp32: Path, int8: Path, images: np.ndarray, *, batch: int = 8, seconds: float = 6.0, rounds: int = 3
) -> dict[str, Any]:
    """fp32 vs int8 images/s of bare sessions at ``batch``, interleaved in ``rounds`` (the machine's speed drifts)."""
    sessions = {name: create_session(path, threads=0, spinning=True) for name, path in (("fp32", fp32), ("int8", int8))}
    x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    runs: dict[str, list[float]] = {"fp32": [], "int8": []}
    cpu: dict[str, float] = {"fp32": 0.0, "int8": 0.0}
    for sess in sessions.values():
        sess.run(["features"], {"images": x})
    for _ in range(rounds):
        for name, sess in sessions.items():
            c0, end, n = time.process_time(), time.perf_counter() + seconds / (2 * rounds), 0
            while n < 2 or time.perf_counter() < end:
                t0 = time.perf_counter()
                sess.run(["features"], {"images": x})
                runs[name].append(time.perf_counter() - t0)
                n += 1
            cpu[name] += time.process_time() - c0
    rate = {k: batch / float(np.median(v)) for k, v in runs.items()}
    cpu_ms = {k: cpu[k] / (batch * len(runs[k])) * 1000 for k in runs}
    return {
        "batch": batch,
        "runs": {k: len(v) for k, v in runs.items()},
        "fp32_images_s": round(rate["fp32"], 2),
        "int8_images_s": round(rate["int8"], 2),
        "speedup": round(rate["int8"] / rate["fp32"], 3),
        "fp32_cpu_ms_per_image": round(cpu_ms["fp32"], 2),
        "int8_cpu_ms_per_image": round(cpu_ms["int8"], 2),
        "speedup_cpu": round(cpu_ms["fp32"] / cpu_ms["int8"], 3),
    }


def run(store: ModelStore, data: Path, *, images: int = 16, batch: int = 8, seconds: float = 12.0) -> dict[str, Any]:
    fp32 = store.extractor(precision="fp32")
    int8 = store.extractor(precision="int8")
    payloads, source = load_payloads(data, images)
    decoded = decode_all(payloads, fp32.size, fp32.resample)
    result = speed_compare(fp32.path, int8.path, decoded, batch=batch, seconds=seconds)
    return {"fp32": fp32.path.name, "int8": int8.path.name, "inputs": source, **result}


def main(argv: list[str] | None = None) -> int:
    from app.core.settings import Settings

    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-store", type=Path, default=None, help="default: TLSERVE_MODEL_STORE")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of JPEGs; synthetic if absent")
    p.add_argument("--images", type=int, default=16, help="distinct images the batch is filled from")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=12.0, help="total measuring time, both models together")
    args = p.parse_args(argv)
    store = ModelStore(args.model_store or Settings().model_store)
    try:
        result = run(store, args.data, images=args.images, batch=args.batch, seconds=args.seconds)
    except TlserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
