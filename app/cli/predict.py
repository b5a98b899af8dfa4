"""``tlserve predict`` (local images, in this process) and ``tlserve classify`` (the same on a running server)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli.common import make_trainer, positive, progress_options

if TYPE_CHECKING:
    from tlserve_client import Client

    from app.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    """``tlserve predict`` and ``tlserve classify``."""
    r = sub.add_parser("predict", help="classify local images without a server")
    r.add_argument("images", nargs="+", type=Path, help="image files")
    r.add_argument("--head", help="head to use (default: TLSERVE_DEFAULT_HEAD)")
    r.add_argument("--top-k", type=positive, default=None, help="also list the K most likely classes (1 to the head's classes)")
    r.add_argument("--json", action="store_true", help="print the results as JSON")
    progress_options(r, default="none")
    r.set_defaults(func=_predict)

    c = sub.add_parser("classify", help="classify local images on a running server (remote `predict`)")
    c.add_argument("images", nargs="+", type=Path, help="image files")
    c.add_argument("--url", default=os.environ.get("TLSERVE_URL", "http://127.0.0.1:8000"), help="server URL (env TLSERVE_URL)")
    c.add_argument("--head", help="head to use (default: the server's default head)")
    c.add_argument("--top-k", type=positive, default=None, help="also list the K most likely classes")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.add_argument("--api-key", default=os.environ.get("TLSERVE_API_KEY"), help="API key (env TLSERVE_API_KEY)")
    c.add_argument("--batch", type=positive, default=16, help="images per request (default 16)")
    c.add_argument("--retries", type=int, default=3, help="retries on 503/429, honouring Retry-After (default 3)")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    c.set_defaults(func=_classify)


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from app.core.errors import InputError
    from app.core.imaging import DecodeLimits
    from app.serving.familiarity import for_head
    from app.serving.predict import answer_images
    from app.storage.registry import load_head

    trainer = make_trainer(args)
    s, info = trainer.settings, trainer.info
    head = load_head(trainer.heads, args.head or s.default_head, info.feature_space)
    if args.top_k is not None and args.top_k > len(head.classes):
        print(f"error: --top-k {args.top_k} is more than head {head.name!r}'s {len(head.classes)} classes", file=sys.stderr)
        return 2
    known = for_head(trainer.heads, head, info.feature_dim)
    limits = DecodeLimits.from_settings(s)
    results, failed = [], 0
    for path in args.images:
        try:
            img = limits.load(Path(path), info.size, info.resample)
        except (InputError, OSError) as exc:
            failed += 1
            results.append({"file": str(path), "error": getattr(exc, "message", None) or str(exc)})
            continue
        answers = answer_images(trainer.extractor, head, img[np.newaxis], known)  # one image a run: the core, as served
        results.append({"file": str(path), **answers.row(0, args.top_k)})
    _print_results(results, head.name, args.json)
    return 1 if failed else 0


def _print_results(results: list[dict[str, Any]], head: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"head": head, "results": results}, indent=2))
        return
    for r in results:
        if "error" in r:
            print(f"{r.get('file', '?')}: ERROR {r['error']}")
        else:
            top = ", ".join(f"{t['label']} {t['probability']:.4f}" for t in r.get("top_k", []))
            verdict = ""
            if "in_distribution" in r:
                verdict = f"  [{'in distribution' if r['in_distribution'] else 'NOT IN DISTRIBUTION'}, familiarity {r['familiarity']:.3f}]"
            print(
                f"{r.get('file', '?')}: {r['label']} ({r['confidence']:.4f})"
                + (f"  top-{len(r['top_k'])}: {top}" if top else "")
                + verdict
            )


def _remote(
    client: Client, chunk: list[tuple[int, Path, bytes]], args: argparse.Namespace, out: list[dict[str, Any] | None]
) -> str | None:
    """Classify one chunk on the server into ``out``; a chunk refused for its images is retried image by image."""
    from tlserve_client import ClientError

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

    import httpx
    from tlserve_client import Client, ClientError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here; retries still log
    out: list[dict[str, Any] | None] = [None] * len(args.images)
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
