"""INT8: a statically quantized copy of the exported extractor, and the measurement that decides its heads.

``tlserve export`` calls :func:`quantize_int8` after the fp32 export whenever it has calibration photos:
``--calibration-dir DIR``, or by default the default head's training photos while its card's folder still
exists (:func:`default_calibration`; its validation folder is then the check set); otherwise it exports fp32
only and says so. ``--int8`` makes the copy required, ``--no-int8`` skips it.

1. calibration images are read with :func:`app.imaging.load_image` (the one loader) at the
   manifest's size and resize filter, classes interleaved, ``limit`` of them;
2. ONNX Runtime static quantization, QDQ format, per-channel int8 weights, uint8 activations,
   MinMax calibration. ``reduce_range`` (7-bit weights) is the default everywhere: on AVX2
   without VNNI the u8s8 kernels saturate their int16 pair sums with 8-bit weights and damage the
   features; with VNNI/AMX they do not, but the file may be served on any CPU, and 7-bit weights
   cost nothing measurable here (see benchmarks/RESULTS.md);
3. the accuracy gate: the quantized model is checked on held-out images (``check_dir``, or images
   of the calibration folder not used for calibration): feature cosine with fp32, and for every
   head trained on the fp32 extractor, prediction agreement (and accuracy when the folder is
   labelled with the head's classes). Only when *every* such head agrees on at least
   ``min_agreement`` of the images and the mean feature cosine is at least ``min_cosine`` does the entry
   say ``feature_space: <fp32 sha256>``: then the
   service serves those heads on the int8 extractor. Otherwise it is omitted and the service
   refuses fp32-trained heads with it.

The entry is recorded as ``variants.int8`` of the manifest; ``extractor`` stays the fp32 export.
Which one is served is the ``precision`` setting (``TLSERVE_PRECISION=auto|fp32|int8``, see
:meth:`app.store.ModelStore.choose`); with ``auto`` the service also times both on its own CPU at start-up
(:func:`measure_speedup`, the rule is :func:`app.store.int8_speed_verdict`). Benchmarks live in ``benchmarks/``.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app import __version__
from app.errors import InputError
from app.export import CALIBRATION_IMAGES, CHECK_IMAGES, MIN_AGREEMENT, MIN_COSINE
from app.extractor import create_session
from app.hashing import sha256_file
from app.imaging import is_image_file, load_image
from app.store import ExtractorInfo, ModelStore, atomic_write

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8
SELF_CHECK_ROUNDS = 3  # fp32/int8 pairs the start-up self-check times (after one warm-up pair)


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


def _existing(folder: str | None, store: ModelStore) -> Path | None:
    """``folder`` as a card records it (absolute, or relative to where training ran: tried from the current
    folder, then from the model store's parent, i.e. the repository for ``model_store/``)."""
    if not folder:
        return None
    path = Path(folder)
    for candidate in [path] if path.is_absolute() else [path, store.root.resolve().parent / path]:
        if candidate.is_dir():
            return candidate
    return None


def default_calibration(store: ModelStore, head: str) -> tuple[Path | None, Path | None, str]:
    """Where ``tlserve export`` calibrates when no ``--calibration-dir`` is given: the default ``head``'s
    training photos (its card's ``training.data_dir``) and, as the gate's check set, its validation folder
    (``training.split.val_dir``) when there is one. ``(None, None, why not)`` when the card or folder is gone."""
    try:
        card = store.heads.get(head).card
    except Exception as exc:  # noqa: BLE001 - no store, no head, a broken card: no default calibration, said why
        return None, None, f"the default head {head!r} is not in {store.heads_dir} ({getattr(exc, 'message', exc)})"
    training = card.get("training") or {}
    calib = _existing(training.get("data_dir"), store)
    if calib is None or not image_files(calib):
        return None, None, f"the default head {head}'s training photos ({training.get('data_dir')}) are not here"
    check = _existing((training.get("split") or {}).get("val_dir"), store)
    return calib, check, f"the default head {head}'s training photos"


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


def measure_speedup(
    fp32: Path, int8: Path, size: int, *, threads: int, spinning: bool, rounds: int = SELF_CHECK_ROUNDS
) -> dict[str, float]:
    """The start-up self-check: the int8 over the fp32 extractor's speed on this CPU, one image per run,
    fp32 and int8 alternating for ``rounds`` after one warm-up run each; each side's fastest run counts
    (the least disturbed by other processes on a shared machine)."""
    sessions = [create_session(p, threads=threads, spinning=spinning) for p in (fp32, int8)]
    x = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    best = [float("inf"), float("inf")]
    for r in range(rounds + 1):
        for i, sess in enumerate(sessions):
            t0 = time.perf_counter()
            sess.run(["features"], {"images": x})
            if r:  # round 0 warms up
                best[i] = min(best[i], time.perf_counter() - t0)
    return {"fp32_ms": round(best[0] * 1000, 2), "int8_ms": round(best[1] * 1000, 2), "speedup": round(best[0] / best[1], 3)}


def features_of(path: Path, images: np.ndarray, batch: int = 16) -> np.ndarray:
    sess = create_session(path, threads=0, spinning=False)
    return np.concatenate([sess.run(["features"], {"images": images[i : i + batch]})[0] for i in range(0, len(images), batch)])


def compare(
    store: ModelStore,
    fp32: dict[str, Any],
    int8_path: Path,
    images: np.ndarray,
    labels: list[str | None],
    *,
    min_agreement: float = MIN_AGREEMENT,
    min_cosine: float = MIN_COSINE,
) -> dict[str, Any]:
    """Cosine of int8 vs fp32 features and, per fp32-trained head, agreement and accuracy on ``images``;
    ``heads_agree`` when the mean cosine reaches ``min_cosine`` and every checked head ``min_agreement``."""
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
            y = np.array([head.classes.index(lab) for lab in labels if lab is not None])
            row["accuracy_fp32"] = round(float((p32 == y).mean()), 4)
            row["accuracy_int8"] = round(float((p8 == y).mean()), 4)
        heads[name] = row
    checked = [h for h in heads.values() if h["checked"]]
    out: dict[str, Any] = {
        "images": len(images),
        "cosine_mean": round(float(cos.mean()), 5),
        "cosine_min": round(float(cos.min()), 5),
        "heads": heads,
        "min_agreement": min_agreement,
        "min_cosine": min_cosine,
        "heads_agree": bool(checked)
        and all(h["agreement"] >= min_agreement for h in checked)
        and float(cos.mean()) >= min_cosine,
    }
    if float(cos.mean()) < min_cosine:
        out["reason"] = f"feature cosine mean {float(cos.mean()):.5f} of {len(images)} images, below {min_cosine}"
    return out


def quantize_int8(
    store: ModelStore,
    calibration_dir: Path,
    limit: int = CALIBRATION_IMAGES,
    *,
    check_dir: Path | None = None,
    check_limit: int = CHECK_IMAGES,
    reduce_range: bool = True,
    min_agreement: float = MIN_AGREEMENT,
    min_cosine: float = MIN_COSINE,
) -> dict[str, Any]:
    """Write ``<fp32 stem>.int8.onnx``, check it, and record it as the manifest's int8 variant; returns its entry."""
    info = store.extractor(verify=True, precision="fp32")
    fp32 = info.raw
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
        check = compare(store, fp32, dst, images, labels, min_agreement=min_agreement, min_cosine=min_cosine)
        check["dir"] = str(check_dir or calibration_dir) + ("" if check_dir else " (held out from calibration)")
    else:
        check = {"images": 0, "heads_agree": False, "reason": "no held-out images to check with"}
    entry["check"] = check
    if check["heads_agree"]:
        entry["feature_space"] = fp32["sha256"]  # fp32-trained heads are served with this extractor
    store.record_variant("int8", entry)
    log.info(
        "int8 variant %s: cosine %.4f, fp32-trained heads %s; served with TLSERVE_PRECISION=int8%s",
        dst.name, check.get("cosine_mean", float("nan")), "accepted" if check["heads_agree"] else "refused",
        " or auto (the default)" if check["heads_agree"] else " (auto keeps fp32: the accuracy gate failed)",
    )  # fmt: skip
    return entry
