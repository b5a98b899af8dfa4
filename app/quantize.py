"""INT8: a statically quantized copy of the exported extractor, and the measurement that decides its heads.

``tlserve export --int8 --calibration-dir DIR`` calls :func:`quantize_int8` after the fp32 export:

1. calibration images are read with :func:`app.imaging.load_image` (the one loader) at the
   manifest's size and resize filter, classes interleaved, ``limit`` of them;
2. ONNX Runtime static quantization, QDQ format, per-channel int8 weights, uint8 activations,
   MinMax calibration. ``reduce_range`` (7-bit weights) is the default everywhere: on AVX2
   without VNNI the u8s8 kernels saturate their int16 pair sums with 8-bit weights and damage the
   features; with VNNI/AMX they do not, but the file may be served on any CPU, and 7-bit weights
   cost nothing measurable here (see benchmarks/RESULTS.md);
3. the quantized model is checked on held-out images (``check_dir``, or images of the
   calibration folder not used for calibration): feature cosine with fp32, and for every head
   trained on the fp32 extractor, prediction agreement (and accuracy when the folder is labelled
   with the head's classes). Only when *every* such head agrees on at least ``min_agreement`` of
   the images does the entry say ``feature_space: <fp32 sha256>``: then the service serves those
   heads on the int8 extractor. Otherwise it is omitted and the service refuses fp32-trained
   heads with it (train new heads on the int8 features).

The manifest's ``extractor`` becomes the int8 entry; ``variants`` keeps both entries, so
``python -m app.quantize use fp32`` switches back (and ``use int8`` forward) without re-exporting.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app import __version__
from app.errors import ArtifactError, InputError
from app.hashing import sha256_file
from app.imaging import is_image_file, load_image
from app.store import ExtractorInfo, ModelStore, read_json, write_json

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.995
CALIBRATION_BATCH = 8


# --- images ------------------------------------------------------------------------------------
def image_files(root: Path) -> list[tuple[Path, str | None]]:
    """Image files under ``root`` with their class (first sub-folder) when labelled; classes interleaved."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [[(f, d.name) for f in sorted(d.rglob("*")) if is_image_file(f)] for d in subdirs]
    groups = [g for g in groups if g]
    flat = [(f, None) for f in sorted(root.iterdir()) if is_image_file(f)]
    if flat or not groups:
        return flat + [item for g in groups for item in g]
    out: list[tuple[Path, str | None]] = []
    for i in range(max(len(g) for g in groups)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def load_many(files: list[tuple[Path, str | None]], info: ExtractorInfo) -> tuple[np.ndarray, list[str | None]]:
    """Decoded images (unreadable ones skipped), with their labels."""
    images, labels = [], []
    for path, label in files:
        try:
            images.append(load_image(path, info.size, resample=info.resample))
        except (InputError, OSError) as exc:
            log.warning("skipped %s: %s", path, getattr(exc, "message", exc))
            continue
        labels.append(label)
    if not images:
        raise ValueError("no readable images")
    return np.stack(images), labels


class _Reader:
    """onnxruntime.quantization ``CalibrationDataReader``: batches of decoded uint8 images."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._batches: Iterator[np.ndarray] = (
            images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)
        )
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch}

    def __len__(self) -> int:  # some calibrators ask
        return 0


# --- manifest ------------------------------------------------------------------------------------
def fp32_entry(store: ModelStore) -> dict[str, Any]:
    manifest = read_json(store.manifest_path)
    current = manifest.get("extractor") or {}
    entry = current if current.get("precision", "fp32") == "fp32" else (manifest.get("variants") or {}).get("fp32")
    if not isinstance(entry, dict):
        raise ArtifactError(f"{store.manifest_path} records no fp32 extractor: run `tlserve export` first")
    path = store.root / entry["file"]
    if not path.exists() or sha256_file(path) != entry["sha256"]:
        raise ArtifactError(f"{path} is missing or differs from the manifest: run `tlserve export` again")
    return entry


def _info(store: ModelStore, entry: dict[str, Any]) -> ExtractorInfo:
    return ExtractorInfo.from_entry(store.root, entry)


def use_variant(store: ModelStore, precision: str) -> dict[str, Any]:
    """Make the recorded ``precision`` variant the served extractor; returns its entry."""
    manifest = read_json(store.manifest_path)
    variants = manifest.get("variants") or {}
    if precision not in variants:
        raise ArtifactError(f"{store.manifest_path} records no {precision} variant (has: {', '.join(variants) or 'none'})")
    manifest["extractor"] = variants[precision]
    write_json(store.manifest_path, manifest)
    store.extractor(verify=True)
    return manifest["extractor"]


# --- quantization --------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def quantize_file(src: Path, dst: Path, calibration: np.ndarray, *, reduce_range: bool = True) -> dict[str, Any]:
    """Static QDQ quantization of ``src`` into ``dst``; returns what was done."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="tlserve-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(pre),
            str(out),
            _Reader(calibration, "images"),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
        )
        from app.store import atomic_write

        atomic_write(dst, out.read_bytes())
    return {
        "tool": f"onnxruntime.quantization {onnxruntime.__version__} quantize_static",
        "format": "QDQ",
        "weights": "int8 symmetric, per-channel" + (", reduce_range (7-bit)" if reduce_range else ""),
        "activations": "uint8 asymmetric",
        "calibrate_method": "MinMax",
        "reduce_range": reduce_range,
        "quantized_on_cpu": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}),
    }


def _session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    from app.cpus import available_cpus

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cpus()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def features_of(path: Path, images: np.ndarray, batch: int = 16) -> np.ndarray:
    sess = _session(path)
    return np.concatenate([sess.run(["features"], {"images": images[i : i + batch]})[0] for i in range(0, len(images), batch)])


def speed_compare(
    fp32: Path, int8: Path, images: np.ndarray, *, batch: int = 8, seconds: float = 6.0, rounds: int = 3
) -> dict[str, Any]:
    """fp32 vs int8 images/s of bare sessions at ``batch``, interleaved in ``rounds`` (the machine's speed drifts)."""
    sessions = {"fp32": _session(fp32), "int8": _session(int8)}
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
        "fp32_images_s": round(rate["fp32"], 2),
        "int8_images_s": round(rate["int8"], 2),
        "speedup": round(rate["int8"] / rate["fp32"], 3),
        "fp32_cpu_ms_per_image": round(cpu_ms["fp32"], 2),
        "int8_cpu_ms_per_image": round(cpu_ms["int8"], 2),
        "speedup_cpu": round(cpu_ms["fp32"] / cpu_ms["int8"], 3),
    }


def compare(
    store: ModelStore,
    fp32: dict[str, Any],
    int8_path: Path,
    images: np.ndarray,
    labels: list[str | None],
    *,
    min_agreement: float = MIN_AGREEMENT,
) -> dict[str, Any]:
    """Cosine of int8 vs fp32 features and, per fp32-trained head, agreement and accuracy on ``images``."""
    from app.registry import load_head

    f32 = features_of(store.root / fp32["file"], images)
    f8 = features_of(int8_path, images)
    cos = np.sum(f32 * f8, axis=1) / np.maximum(np.linalg.norm(f32, axis=1) * np.linalg.norm(f8, axis=1), 1e-12)
    heads: dict[str, Any] = {}
    for name in store.heads.names():
        try:
            head = load_head(store.heads, name, fp32["sha256"])
        except Exception as exc:  # noqa: BLE001 - a head of another extractor (or broken) is reported, not checked
            heads[name] = {"checked": False, "reason": getattr(exc, "message", str(exc))[:200]}
            continue
        p32 = head.predict_proba(f32).argmax(axis=1)
        p8 = head.predict_proba(f8).argmax(axis=1)
        row: dict[str, Any] = {"checked": True, "images": len(images), "agreement": round(float((p32 == p8).mean()), 4)}
        known = [i for i, lab in enumerate(labels) if lab in head.classes]
        if len(known) == len(labels):
            y = np.array([head.classes.index(lab) for lab in labels])  # type: ignore[arg-type]
            row["accuracy_fp32"] = round(float((p32 == y).mean()), 4)
            row["accuracy_int8"] = round(float((p8 == y).mean()), 4)
        heads[name] = row
    checked = [h for h in heads.values() if h["checked"]]
    return {
        "images": len(images),
        "cosine_mean": round(float(cos.mean()), 5),
        "cosine_min": round(float(cos.min()), 5),
        "heads": heads,
        "min_agreement": min_agreement,
        "heads_agree": bool(checked) and all(h["agreement"] >= min_agreement for h in checked),
    }


def quantize_int8(
    store: ModelStore,
    calibration_dir: Path,
    limit: int = 200,
    *,
    check_dir: Path | None = None,
    check_limit: int = 400,
    reduce_range: bool = True,
    min_agreement: float = MIN_AGREEMENT,
    speed_seconds: float = 0.0,
) -> dict[str, Any]:
    """Write ``<fp32 stem>.int8.onnx``, check it, and make it the served extractor; returns its manifest entry."""
    fp32 = fp32_entry(store)
    info = _info(store, fp32)
    files = image_files(calibration_dir)
    calib_files = files[:limit]
    check_files = image_files(check_dir)[:check_limit] if check_dir else files[limit : limit + check_limit]
    if not calib_files:
        raise ValueError(f"{calibration_dir} holds no image files to calibrate with")
    t0 = time.perf_counter()
    calib, _ = load_many(calib_files, info)
    dst = store.root / (Path(fp32["file"]).stem + ".int8.onnx")
    how = quantize_file(info.path, dst, calib, reduce_range=reduce_range)
    log.info("quantized %s with %d images in %.1fs", dst.name, len(calib), time.perf_counter() - t0)
    listing = hashlib.sha256("\n".join(str(p.relative_to(calibration_dir)) for p, _ in calib_files).encode()).hexdigest()
    entry: dict[str, Any] = {
        k: fp32[k]
        for k in (
            "format",
            "input",
            "output",
            "input_size",
            "resample",
            "pooling",
            "feature_dim",
            "preprocessing",
            "weights",
            "opset",
        )
        if k in fp32
    }
    entry.update({
        "file": dst.name,
        "sha256": sha256_file(dst),
        "bytes": dst.stat().st_size,
        "precision": "int8",
        "parent_sha256": fp32["sha256"],
        "quantization": how,
        "calibration": {
            "dir": str(calibration_dir),
            "images": len(calib),
            "files_sha256": listing,
            "loader": f"app.imaging.load_image(size={info.size}, resample={info.resample})",
        },
        "exported_by": f"tlserve {__version__}",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })  # fmt: skip
    if check_files:
        images, labels = load_many(check_files, info)
        check = compare(store, fp32, dst, images, labels, min_agreement=min_agreement)
        check["dir"] = str(check_dir or calibration_dir) + ("" if check_dir else " (held out from calibration)")
        if speed_seconds > 0:
            check["speed"] = speed_compare(info.path, dst, images, seconds=speed_seconds)
    else:
        check = {"images": 0, "heads_agree": False, "reason": "no held-out images to check with"}
    entry["check"] = check
    if check["heads_agree"]:
        entry["feature_space"] = fp32["sha256"]  # fp32-trained heads are served with this extractor
    manifest = read_json(store.manifest_path)
    manifest["extractor"] = entry
    manifest["variants"] = {"fp32": fp32, "int8": entry}
    write_json(store.manifest_path, manifest)
    log.info(
        "int8 extractor %s: cosine %.4f, heads %s",
        dst.name, check.get("cosine_mean", float("nan")), "accepted" if check["heads_agree"] else "refused",
    )  # fmt: skip
    return entry


# --- python -m app.quantize ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-store", type=Path, default=Path(os.environ.get("TLSERVE_MODEL_STORE", "model_store")))
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="write the int8 model from the recorded fp32 one and serve it")
    q.add_argument("--calibration-dir", type=Path, required=True)
    q.add_argument("--calibration-images", type=int, default=200)
    q.add_argument(
        "--check-dir", type=Path, help="labelled folder for the agreement check (default: held-out calibration images)"
    )
    q.add_argument("--check-images", type=int, default=400)
    q.add_argument("--no-reduce-range", action="store_true", help="8-bit weights (only safe on VNNI/AMX CPUs)")
    q.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT)
    q.add_argument("--speed-seconds", type=float, default=5.0, help="also measure fp32 vs int8 images/s (0 = skip)")
    u = sub.add_parser("use", help="serve the recorded fp32 or int8 variant")
    u.add_argument("precision", choices=["fp32", "int8"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import json

    store = ModelStore(args.model_store)
    try:
        if args.command == "use":
            entry = use_variant(store, args.precision)
        else:
            entry = quantize_int8(
                store, args.calibration_dir, args.calibration_images, check_dir=args.check_dir, check_limit=args.check_images,
                reduce_range=not args.no_reduce_range, min_agreement=args.min_agreement, speed_seconds=args.speed_seconds,
            )  # fmt: skip
    except (ArtifactError, FileNotFoundError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
