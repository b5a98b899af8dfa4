"""INT8: a statically quantized copy of the exported extractor, and the measurement that decides its heads.

The copy is made from two inputs only: the fp32 export and a **calibration table**, the activation ranges
of every quantized tensor (``model_store/int8_calibration.json``, :class:`CalibrationTable`; a small text
file, no pixel data). The committed table was derived once from the default head's training photos, and it
pins the sha256 of the INT8 file it yields, so ``tlserve export`` makes that very file, byte for byte, on any
machine and with no photos (:func:`quantize_from_table`); a different result is an error naming both hashes
and the ONNX Runtime / onnx versions of either side.

``tlserve export --calibration-dir DIR`` re-derives the table from DIR's photos (:func:`quantize_int8`),
writes it (pinning its own result) and gates the copy on ``--check-dir`` or DIR's photos it did not use.

1. calibration images are read with :func:`app.core.imaging.load_image` (the one loader) at the
   manifest's size and resize filter, classes interleaved, ``limit`` of them; ONNX Runtime's MinMax
   calibrator turns them into the table;
2. ONNX Runtime static quantization from the table, QDQ format, per-channel int8 weights, uint8
   activations. ``reduce_range`` (7-bit weights) is the default everywhere: on AVX2
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
   refuses fp32-trained heads with it. With no check photos, a copy made from a table is byte-identical
   to the one the table's recorded gate measured, and that measurement is the gate (said so in the entry).

The entry is recorded as ``variants.int8`` of the manifest; ``extractor`` stays the fp32 export.
Which one is served is the ``precision`` setting (``TLSERVE_PRECISION=auto|fp32|int8``, see
:meth:`app.storage.store.ModelStore.choose`); with ``auto`` the service also times both on its own CPU at start-up
(:func:`app.serving.extractor.measure_speedup`, the rule is :func:`app.storage.store.int8_speed_verdict`). Benchmarks live in ``benchmarks/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app import __version__
from app.core.errors import ArtifactError, DatasetError, InputError
from app.core.hashing import sha256_file
from app.core.imaging import is_image_file, load_image
from app.learning.export import CALIBRATION_IMAGES, CHECK_IMAGES, MIN_AGREEMENT, MIN_COSINE
from app.serving.extractor import create_session
from app.storage.files import atomic_write, read_json, write_json
from app.storage.store import ExtractorInfo, ModelStore

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8


# --- images ------------------------------------------------------------------------------------
def image_files(root: Path) -> list[tuple[Path, str | None]]:
    """Image files under ``root`` with their class (first sub-folder) when labelled; classes interleaved."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
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
        raise DatasetError("no readable images")
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


def default_check_dir(store: ModelStore, head: str) -> Path | None:
    """The accuracy gate's check photos when ``tlserve export`` is given none: the default ``head``'s validation
    folder (its card's ``training.split.val_dir``) while it exists here, else None."""
    try:
        card = store.heads.get(head).info
    except Exception:  # noqa: BLE001 - no store, no head, a broken card: no default check folder
        return None
    check = _existing(card.training.val_dir, store)
    return check if check is not None and image_files(check) else None


# --- quantization --------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


TABLE_FORMAT = "tlserve-int8-calibration/1"
_REMAKE = "re-make it from photos with `tlserve export --calibration-dir DIR`"


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


def _ranges_sha256(ranges: dict[str, tuple[float, float]]) -> str:
    text = "\n".join(f"{name} {lo!r} {hi!r}" for name, (lo, hi) in sorted(ranges.items()))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CalibrationTable:
    """The activation ranges INT8 quantization uses (MinMax over the calibration photos), as a text file.

    ``ranges`` maps each calibrated tensor to its float32 ``(lowest, highest)``, written as the shortest
    decimal that reads back to the same float32. ``int8_sha256`` pins the file quantizing ``fp32_sha256``
    with these ranges gave when the table was made (with ``made_with``'s ONNX Runtime and onnx), ``check`` its
    accuracy gate then. ``ranges_sha256`` guards the ranges against edits: a table whose ranges do not match it
    is refused by name."""

    fp32_sha256: str
    ranges: dict[str, tuple[float, float]]
    reduce_range: bool
    calibration: dict[str, Any]
    made_with: dict[str, str]
    int8_sha256: str | None = None
    check: dict[str, Any] | None = None

    def pinned(self, entry: dict[str, Any]) -> CalibrationTable:
        """This table pinning the INT8 file and gate of the manifest ``entry`` it produced."""
        return replace(self, int8_sha256=entry["sha256"], check=entry.get("check"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "fp32_sha256": self.fp32_sha256,
            "int8_sha256": self.int8_sha256,
            "made_with": self.made_with,
            "quantization": {"method": "MinMax", "format": "QDQ", "per_channel": True, "reduce_range": self.reduce_range},
            "calibration": self.calibration,
            "check": self.check,
            "ranges_sha256": _ranges_sha256(self.ranges),
            "ranges": {name: [lo, hi] for name, (lo, hi) in sorted(self.ranges.items())},
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str, *, check_sum: bool = True) -> CalibrationTable:
        """A table read back; ArtifactError naming ``where`` and what is wrong when it is not one, or its
        ranges were edited (they no longer match its ``ranges_sha256``; ``check_sum=False`` skips that)."""
        if obj.get("format") != TABLE_FORMAT:
            raise ArtifactError(f"{where}: format {obj.get('format')!r} is not {TABLE_FORMAT!r}; {_REMAKE}")
        try:
            raw, quant = obj["ranges"], obj["quantization"]
            if not isinstance(raw, dict) or not raw:
                raise ValueError("no ranges")
            ranges: dict[str, tuple[float, float]] = {}
            for name, pair in raw.items():
                if not (isinstance(pair, list) and len(pair) == 2 and all(type(v) in (int, float) for v in pair)):
                    raise ValueError(f"range of {name!r} is not two numbers")
                lo, hi = (float(np.float32(v)) for v in pair)
                if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
                    raise ValueError(f"range of {name!r} is not finite and ordered: {pair}")
                ranges[str(name)] = (lo, hi)
            table = cls(
                fp32_sha256=str(obj["fp32_sha256"]),
                ranges=ranges,
                reduce_range=bool(quant["reduce_range"]),
                calibration=dict(obj.get("calibration") or {}),
                made_with={str(k): str(v) for k, v in (obj.get("made_with") or {}).items()},
                int8_sha256=str(obj["int8_sha256"]) if obj.get("int8_sha256") else None,
                check=obj.get("check") if isinstance(obj.get("check"), dict) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where} is not a calibration table ({exc}); {_REMAKE}") from None
        if check_sum and obj.get("ranges_sha256") != _ranges_sha256(table.ranges):
            raise ArtifactError(
                f"{where}: its ranges do not match its ranges_sha256 (the file was edited or damaged); "
                f"restore it (git checkout {where}) or {_REMAKE}"
            )
        return table


def read_table(store: ModelStore) -> CalibrationTable | None:
    """The store's calibration table, None when it has none (a damaged or edited one is an ArtifactError)."""
    path = store.calibration_path
    if not path.exists():
        return None
    return CalibrationTable.from_dict(read_json(path), str(path))


def _quantize(pre: Path, out: Path, table: CalibrationTable, reader: _Reader | None = None) -> Path:
    """ONNX Runtime's ``quantize_static`` from ``table`` (handed to it as its calibration cache); with a
    ``reader`` instead, calibrate and leave the ranges in the cache (``<out>.ranges.json``). Returns the cache."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    cache = out.with_suffix(".ranges.json")
    if reader is None:
        data = {
            name: TensorData(lowest=np.array([lo], dtype=np.float32), highest=np.array([hi], dtype=np.float32))
            for name, (lo, hi) in table.ranges.items()
        }
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
    quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=table.reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        calibration_providers=["CPUExecutionProvider"],
        calibration_cache_path=str(cache),
    )
    return cache


def _preprocessed(src: Path, tmp: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    return pre


def calibrate(src: Path, fp32_sha256: str, images: np.ndarray, *, reduce_range: bool = True,
              calibration: dict[str, Any] | None = None) -> CalibrationTable:  # fmt: skip
    """MinMax activation ranges of ``src`` over ``images``: a new, unpinned :class:`CalibrationTable`."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    unpinned = CalibrationTable(fp32_sha256, {}, reduce_range, dict(calibration or {}), _versions())
    with tempfile.TemporaryDirectory(prefix="tlserve-calib-") as tmp:
        cache = _quantize(_preprocessed(src, Path(tmp)), Path(tmp) / "int8.onnx", unpinned, _Reader(images, "images"))
        data = load_tensors_data(cache)
    ranges = {name: (_scalar(td.range_value[0]), _scalar(td.range_value[1])) for name, td in data.items()}
    return replace(unpinned, ranges=ranges)


def _scalar(value: Any) -> float:
    """A per-tensor range bound as ONNX Runtime's MinMax calibrator gives it (a float32 array of one value)."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.size != 1:
        raise ArtifactError(f"a per-tensor calibration range has {arr.size} values, expected 1")
    return float(arr.reshape(-1)[0])


def quantize_file(src: Path, dst: Path, table: CalibrationTable) -> dict[str, Any]:
    """Static QDQ quantization of ``src`` into ``dst`` with ``table``'s ranges; returns what was done."""
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="tlserve-quant-") as tmp:
        out = Path(tmp) / "int8.onnx"
        _quantize(_preprocessed(src, Path(tmp)), out, table)
        atomic_write(dst, out.read_bytes())
    return {
        "tool": f"onnxruntime.quantization {onnxruntime.__version__} quantize_static",
        "format": "QDQ",
        "weights": "int8 symmetric, per-channel" + (", reduce_range (7-bit)" if table.reduce_range else ""),
        "activations": "uint8 asymmetric",
        "calibrate_method": "MinMax",
        "reduce_range": table.reduce_range,
        "quantized_on_cpu": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}),
    }


def agreement_upper(agree: int, n: int, z: float = 1.96) -> float:
    """The Wilson score upper bound (95% by default) of an agreement rate seen as ``agree`` of ``n``: a head's own
    INT8 check refuses it only when even this bound is below the gate's bar, since on a small held-out set one
    flipped photo is noise (1 of 154 is 99.35%, under a 99.5% bar, while the true rate may well be above it)."""
    if n <= 0:
        return 1.0
    p, z2 = agree / n, z * z
    centre = p + z2 / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(min(1.0, (centre + margin) / (1 + z2 / n)))


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
    from app.storage.registry import load_head

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
    """Calibrate on ``calibration_dir``'s photos: a new table, the INT8 copy made from it (as
    :func:`quantize_from_table`) and gated on ``check_dir`` (else the photos of ``calibration_dir`` past
    ``limit``), and the table written to the store pinning that copy. Returns the manifest entry."""
    info = store.extractor(verify=True, precision="fp32")
    files = image_files(calibration_dir)
    calib_files = files[:limit]
    if not calib_files:
        raise DatasetError(f"{calibration_dir} holds no image files to calibrate with")
    t0 = time.perf_counter()
    calib, _ = load_many(calib_files, info)
    listing = hashlib.sha256("\n".join(str(p.relative_to(calibration_dir)) for p, _ in calib_files).encode()).hexdigest()
    described = {
        "dir": str(calibration_dir),
        "images": len(calib),
        "files_sha256": listing,
        "loader": f"app.core.imaging.load_image(size={info.size}, resample={info.resample})",
    }
    table = calibrate(info.path, info.sha256, calib, reduce_range=reduce_range, calibration=described)
    log.info("calibrated on %d images of %s in %.1fs", len(calib), calibration_dir, time.perf_counter() - t0)
    check_files = image_files(check_dir)[:check_limit] if check_dir else files[limit : limit + check_limit]
    check_from = str(check_dir) if check_dir else f"{calibration_dir} (held out from calibration)"
    entry = _make_variant(store, info, table, check_files, check_from, min_agreement, min_cosine)
    write_json(store.calibration_path, table.pinned(entry).as_dict())
    log.info("wrote %s (pins the INT8 file's sha256 %s…)", store.calibration_path, entry["sha256"][:12])
    return entry


def quantize_from_table(
    store: ModelStore,
    table: CalibrationTable,
    *,
    check_dir: Path | None = None,
    check_limit: int = CHECK_IMAGES,
    min_agreement: float = MIN_AGREEMENT,
    min_cosine: float = MIN_COSINE,
) -> dict[str, Any]:
    """The INT8 copy from the fp32 export and ``table`` alone, no photos: it must be the very file the table
    pins (ArtifactError naming both sha256s and both sides' versions otherwise). Gated on ``check_dir``'s photos
    when given, else by the gate the table recorded for that file. Returns the manifest entry."""
    info = store.extractor(verify=True, precision="fp32")
    where = store.calibration_path
    if table.fp32_sha256 != info.sha256:
        raise ArtifactError(
            f"{where} was made for the fp32 export {table.fp32_sha256[:12]}…, this one is {info.sha256[:12]}… "
            f"({info.path.name}): {_REMAKE}"
        )
    check_files = image_files(check_dir)[:check_limit] if check_dir else []
    return _make_variant(store, info, table, check_files, str(check_dir), min_agreement, min_cosine)


def _make_variant(
    store: ModelStore, info: ExtractorInfo, table: CalibrationTable, check_files: list[tuple[Path, str | None]],
    check_from: str, min_agreement: float, min_cosine: float,
) -> dict[str, Any]:  # fmt: skip
    """Quantize with ``table``, check the file against its pin, gate it, record it as the int8 variant."""
    fp32 = info.raw
    dst = store.root / (Path(fp32["file"]).stem + ".int8.onnx")
    new = dst.with_name(f".{dst.name}.new")  # checked against the pin before it replaces the copy being served
    how = quantize_file(info.path, new, table)
    actual = sha256_file(new)
    if table.int8_sha256 is not None and actual != table.int8_sha256:
        new.unlink(missing_ok=True)
        made = ", ".join(f"{k} {v}" for k, v in sorted(table.made_with.items())) or "unrecorded versions"
        here = ", ".join(f"{k} {v}" for k, v in sorted(_versions().items()))
        raise ArtifactError(
            f"the INT8 copy made from {store.calibration_path} has sha256 {actual}, the table pins "
            f"{table.int8_sha256} (pinned with {made}; made here with {here}): install the pinned versions "
            f"(deploy/requirements/) or {_REMAKE}"
        )
    os.replace(new, dst)
    entry: dict[str, Any] = {k: fp32[k] for k in _INHERITED if k in fp32}
    entry.update({
        "file": dst.name,
        "sha256": actual,
        "bytes": dst.stat().st_size,
        "precision": "int8",
        "parent_sha256": fp32["sha256"],
        "quantization": how,
        "calibration": {**table.calibration, "table": store.calibration_path.name,
                        "ranges_sha256": _ranges_sha256(table.ranges), "pinned": table.int8_sha256 is not None},
        "exported_by": f"tlserve {__version__}",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })  # fmt: skip
    if check_files:
        images, labels = load_many(check_files, info)
        check = compare(store, fp32, dst, images, labels, min_agreement=min_agreement, min_cosine=min_cosine)
        check["dir"] = check_from
    elif table.check is not None and table.int8_sha256 == actual:
        check = {**table.check, "recorded": f"measured when {store.calibration_path.name} was made, on this very "
                 f"file (sha256 {actual[:12]}…); no check photos here to measure it again"}  # fmt: skip
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


_INHERITED = (
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
