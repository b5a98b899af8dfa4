"""``tlserve train`` and ``tlserve evaluate``: fit a head on a labelled folder, measure one on another."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli.common import make_trainer, non_negative, positive_float, progress_options

if TYPE_CHECKING:
    from app.cli.common import Subparsers


TRAIN_HELP = """\
Train a head on DATA_DIR, one sub-folder per class (DATA_DIR/<class>/*.jpg; images in deeper
sub-folders count for their class and are reported). The folder is checked before any image is
decoded: at least two classes, at least two readable images a class, no split folders
(train/test/val) in place of classes, --val-dir with the same class names.

C is chosen by 5-fold cross-validation; the report is on --val-dir, or on a stratified 20% held
out of DATA_DIR; the shipped head is then fitted on all labelled photos of DATA_DIR. Each run
writes a new version of the head; earlier versions are kept.

--features DIR trains from a `tlserve batch SRC --features --output DIR` output instead of a photo
folder (no re-extraction; features of another extractor are refused), the same way from there on."""


def register(sub: Subparsers) -> None:
    """``tlserve train`` and ``tlserve evaluate``."""
    t = sub.add_parser("train", help="train a logistic-regression head on a folder of class sub-folders",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    t.add_argument("data_dir", type=Path, nargs="?", help="folder with one sub-folder of images per class "
                   "(DATA_DIR/<class>/...); or use --features")  # fmt: skip
    t.add_argument("--features", metavar="DIR", help="train from a `tlserve batch --features` Parquet output (no re-extraction)")
    t.add_argument("--head", "--name", dest="name", required=True,
                   help="head name (--name is an alias); an existing head gets a new version, earlier ones are kept")  # fmt: skip
    t.add_argument("--no-promote", action="store_true",
                   help="write the new version without serving it (default: it becomes current, as over HTTP with promote=true)")  # fmt: skip
    t.add_argument("--val-dir", type=Path, help="report on this folder (same class sub-folders) instead of a held-out 20%%")
    t.add_argument("--C", type=positive_float, default=None, help="inverse regularisation; default: chosen by 5-fold CV")
    t.add_argument("--limit", type=non_negative, default=0, help="use at most this many images per class (0 = all)")
    t.add_argument("--allow-subset", action="store_true", help="let --val-dir lack some of the classes")
    progress_options(t)
    t.set_defaults(func=_train, check=lambda args: _check_train(t, args))

    v = sub.add_parser("evaluate", help="accuracy, confusion matrix and report of a head on a labelled folder")
    v.add_argument("data_dir", type=Path, help="folder with one sub-folder per class, named exactly as the head's classes")
    v.add_argument("--head", help="head to evaluate (default: TLSERVE_DEFAULT_HEAD)")
    v.add_argument("--json", action="store_true", help="print the report as JSON (with `mistakes`, worst first)")
    v.add_argument("--limit", type=non_negative, default=0, help="use at most this many images per class (0 = all)")
    v.add_argument("--allow-subset", action="store_true", help="accept a folder that lacks some of the head's classes")
    v.add_argument("--errors", action="store_true", help="list the misclassified files, worst (most confident) first")
    v.add_argument("--plot", type=Path, metavar="PATH", help="write the confusion matrix as a PNG to PATH")
    v.add_argument("--ood", type=Path, metavar="DIR", help="a folder of photos that are none of the classes (any layout): "
                   "report the share flagged not in distribution and the AUROC against DATA_DIR's photos")  # fmt: skip
    progress_options(v)
    v.set_defaults(func=_evaluate)


def _check_train(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of ``tlserve train`` (exit 2): a photo folder or ``--features``, and the options each takes."""
    if (args.data_dir is None) == (args.features is None):
        p.error("train takes a photo folder DATA_DIR or --features DIR (one of them)")
    given = [flag for flag, on in (("--val-dir", args.val_dir is not None), ("--limit", args.limit),
                                   ("--allow-subset", args.allow_subset)) if on]  # fmt: skip
    if args.features is not None and given:
        p.error(f"{' and '.join(given)}: only with a photo folder, not with --features")


def _train(args: argparse.Namespace) -> int:
    trainer = make_trainer(args)
    promote = not args.no_promote
    if args.features is not None:
        done = trainer.train_features(args.features, args.name, c=args.C, promote=promote)
    else:
        done = trainer.train(args.data_dir, args.name, val_dir=args.val_dir, c=args.C, limit=args.limit,
                             allow_subset=args.allow_subset, promote=promote)  # fmt: skip
    card = done.version.info
    ev, training, estimator = card.evaluation or {}, card.training, card.estimator
    print(f"head {args.name!r}: {len(card.classes)} classes, fitted on all {training.n_train} labelled photos "
          f"{training.train_per_class}, C={estimator.C} ({estimator.C_source})")  # fmt: skip
    _print_notes(done.skipped, done.nested, [d.describe() for d in done.duplicates])
    if done.loose:
        print(f"note: {done.loose} file(s) directly in {training.data_dir} (outside the class folders) were ignored")
    if estimator.cv_accuracy_by_C:
        print(f"model selection ({ev['model_selection']}): accuracy by C {estimator.cv_accuracy_by_C}")
    cv = ev["cv"]
    print(f"cross-validation ({cv['folds']} folds, {cv['data']}, C={cv['C']}): accuracy {cv['accuracy']:.4f}")
    print(f"held-out report ({ev['metrics']}):")
    print(done.report.render())
    served = ("now current" if promote else
              f"not promoted (--no-promote): serve it with `tlserve heads promote {args.name} {done.version.version}`")  # fmt: skip
    print(f"version {done.version.version} written to {done.version.folder} ({served}; earlier versions are kept)")
    return 0


def _print_notes(skipped: list[tuple[Path, str]], nested: dict[str, int], duplicates: list[str]) -> None:
    """Each unreadable file, nested folder count and duplicate once, on stdout (never logged as well)."""
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):")
        for path, why in skipped:
            print(f"  {path}: {why}")
    for name, count in nested.items():
        print(f"note: class {name!r} has {count} file(s) in sub-folders of its folder (they count as {name!r})")
    for line in duplicates:
        print(f"warning: {line}")


def _evaluate(args: argparse.Namespace) -> int:
    from app.learning.report import confusion_png
    from app.storage.registry import load_head

    trainer = make_trainer(args)
    head = load_head(trainer.heads, args.head or trainer.settings.default_head, trainer.info.feature_space)
    if args.plot is not None and not args.plot.parent.is_dir():
        print(f"error: --plot {args.plot}: folder {args.plot.parent} does not exist", file=sys.stderr)
        return 2
    ev = trainer.evaluate(head, args.data_dir, limit=args.limit, allow_subset=args.allow_subset, ood_dir=args.ood)
    if args.plot is not None:
        args.plot.write_bytes(confusion_png(ev.report, f"{head.name} v{head.version} on {args.data_dir.name}"))
    if args.json:
        print(json.dumps({**ev.report.as_dict(), "head": head.name, "version": head.version, "skipped": len(ev.skipped),
                          "skipped_files": [f"{p}: {why}" for p, why in ev.skipped],
                          "mistakes": [m.as_dict() for m in ev.mistakes],
                          "in_distribution": _accepted(ev), "ood": ev.ood.as_dict() if ev.ood else None}, indent=2))  # fmt: skip
        return 0
    print(f"head {head.name!r} version {head.version} on {args.data_dir}")
    _print_notes(ev.skipped, {}, [])
    print(ev.report.render())
    accepted = _accepted(ev)
    print(f"in distribution: {accepted:.1%} of the photos (familiarity threshold {(head.familiarity or {}).get('threshold', float('nan')):.4f})"
          if accepted is not None else "in distribution: not checked (the head has no familiarity data; retrain it to add it)")  # fmt: skip
    if ev.ood is not None:
        print(ev.ood.render())
    if args.errors:
        print(f"misclassified: {len(ev.mistakes)} of {ev.report.n} (worst first)")
        for m in ev.mistakes:
            print(f"  {m.file}: true {m.true}, predicted {m.predicted} ({m.probability:.4f}; {m.true} {m.true_probability:.4f})")
    if args.plot is not None:
        print(f"confusion matrix written to {args.plot}")
    return 0


def _accepted(ev: Any) -> float | None:
    return round(float(ev.in_distribution.mean()), 4) if ev.in_distribution is not None and len(ev.in_distribution) else None
