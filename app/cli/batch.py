"""``tlserve batch``: every image under a folder or URI into a Parquet dataset, in-process or on Ray."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from app.cli.common import positive, positive_float, progress_options

if TYPE_CHECKING:
    from app.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    """``tlserve batch``."""
    a = sub.add_parser("batch", help="classify (or extract features of) every image under SRC into a Parquet dataset")
    a.add_argument(
        "source", metavar="SRC", help="a folder or a URI pyarrow reads (s3://bucket/prefix, credentials from the environment)"
    )
    a.add_argument("--output", required=True, metavar="DIR", help="the Parquet dataset folder (part files) to write")
    a.add_argument("--head", help="head to classify with (default: TLSERVE_DEFAULT_HEAD)")
    a.add_argument("--features", action="store_true", help="write feature vectors (and the class folder) instead of labels")
    a.add_argument("--top-k", type=positive, default=None,
                   help="classes in the top_k column, most likely first (default: every class, as predict, classify and HTTP answer)")  # fmt: skip
    a.add_argument("--resume", action="store_true", help="continue a job in DIR: skip images already in committed parts")
    a.add_argument(
        "--ray", metavar="ADDRESS", help="run on Ray Data: local | auto | ray://host:port | host:port (default: in-process)"
    )
    a.add_argument("--actors", type=positive, help="Ray actor pool size (default: one per GPU, else half the cluster's CPUs)")
    a.add_argument("--actor-cpus", type=positive_float, default=1.0,
                   help="CPUs per Ray actor, its ONNX Runtime threads (default 1)")  # fmt: skip
    a.add_argument("--batch-size", type=positive, default=16, help="images per extractor run (default 16)")
    a.add_argument("--part-rows", type=positive, default=1024, help="rows per committed part file (default 1024)")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    progress_options(a)
    a.set_defaults(func=_batch)


def _batch(args: argparse.Namespace) -> int:
    from app.batch import BatchJob, run
    from app.core.settings import get_settings

    job = BatchJob(
        source=args.source, output=args.output, head=args.head, features=args.features, top_k=args.top_k,
        batch_size=args.batch_size, part_rows=args.part_rows, resume=args.resume, ray=args.ray,
        actors=args.actors, actor_cpus=args.actor_cpus,
    )  # fmt: skip
    summary = run(job, get_settings(), progress=args.progress)
    print(json.dumps(summary.as_dict(), indent=2) if args.json else summary.line())
    return 0
