"""Train and evaluate heads on folders of class sub-folders (any classes, any names).

What :meth:`Trainer.train` does, and which number comes from which data:

1. **Checks, before any image is decoded** (:mod:`app.learning.features`): the folder layout, the
   validation folder's class names, at least two readable images a class; duplicates and nested
   sub-folders are reported by name.
2. **Features**, from the cache where the same bytes were seen before; or, with
   :meth:`Trainer.train_features`, read back from a ``tlserve batch --features`` output (no decoding,
   no extractor run; another extractor's features are refused). Steps 3-8 are the same either way.
3. **Held-out part**: ``--val-dir``, or else a stratified 20% of DATA_DIR (seed 42).
4. **C by cross-validation**: 5-fold stratified CV over :data:`app.learning.crossval.C_GRID` on the training part
   (the other 80%, or all of DATA_DIR with ``--val-dir``). ``--C`` skips it.
5. **Held-out report** (``metrics`` in the card): a head fitted at that C on the training part,
   scored on the held-out part, which took no part in choosing C or fitting.
6. **Out-of-fold predictions** at that C over *all* labelled photos of DATA_DIR (5 folds): the
   card's ``cv`` accuracy, and the artifacts ``oof_proba.npy`` + ``folds.json`` (which photo,
   by content hash and relative path, was held out in which fold).
7. **Familiarity** (:mod:`app.serving.familiarity`): the photos' features as the head's familiarity bank, its
   threshold calibrated on the out-of-fold scores of step 6 at ``ood_acceptance`` (the card's
   ``familiarity``), and the held-out part's acceptance rate as a check.
8. **The shipped head**: fitted at that C on all labelled photos of DATA_DIR (with ``--val-dir``
   it is the head of step 5). It is written as a new version of the head (:func:`app.storage.registry.save_head`);
   earlier versions stay.

Model selection (folds, the C search, the estimator) is :mod:`app.learning.crossval`'s; the report and
its picture are :mod:`app.learning.report`'s; this module is the trainer that puts them together.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from app.core import calibration
from app.core.errors import DatasetError, TlserveError
from app.core.imaging import DecodeLimits, configure
from app.core.names import valid_head_name
from app.core.progress import Meter, ProgressCallback, console, no_progress
from app.core.recipe import LEGACY, MIN_IMAGES_PER_CLASS, SEED, Recipe
from app.core.recipe import choose as choose_recipe
from app.core.settings import Settings
from app.learning import fewshot
from app.learning.crossval import (
    DEFAULT_C,
    CrossValidation,
    n_folds,
    sklearn_threads,
    stratified_holdout,
)
from app.learning.features import (
    Dataset,
    Duplicate,
    Extracted,
    FeatureCache,
    check_readable,
    extract_paths,
    find_duplicates,
    hash_files,
    hidden,
)
from app.learning.report import Report, confusion_png, make_report
from app.learning.trainingcard import FOLDS_FILE, OOF_FILE, training_card
from app.serving import familiarity
from app.serving.extractor import Extractor
from app.serving.predict import answer
from app.storage.heads import Head, to_npy
from app.storage.registry import Version, save_head
from app.storage.store import ExtractorInfo, ModelStore

log = logging.getLogger(__name__)


# --- results ---------------------------------------------------------------------------------
@dataclass
class Trained:
    """What one training run produced (the card is the version's, as written)."""

    report: Report
    version: Version
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    nested: dict[str, int] = field(default_factory=dict)
    loose: int = 0  # files directly in DATA_DIR, outside any class folder: ignored

    @property
    def card(self) -> dict[str, Any]:
        """The version's card as written (typed: ``version.info``)."""
        return self.version.card


@dataclass
class Mistake:
    file: str
    true: str
    predicted: str
    probability: float  # of the predicted class
    true_probability: float

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "true": self.true, "predicted": self.predicted,
                "probability": round(self.probability, 6), "true_probability": round(self.true_probability, 6)}  # fmt: skip


@dataclass
class Evaluation:
    report: Report
    skipped: list[tuple[Path, str]]
    mistakes: list[Mistake]  # worst (most confident) first
    familiarity: np.ndarray | None = None  # scores of the evaluated photos, when the head has familiarity data
    in_distribution: np.ndarray | None = None
    ood: OodReport | None = None


@dataclass
class OodReport:
    """``evaluate --ood DIR``: how the verdict does on photos that are none of the head's classes."""

    folder: str
    n: int
    flagged: float  # share of DIR's photos judged not in distribution
    accepted: float  # share of the evaluated (labelled) photos judged in distribution
    auroc: float  # labelled photos (positives) against DIR's photos
    skipped: int

    def as_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "n": self.n, "flagged": round(self.flagged, 4), "accepted": round(self.accepted, 4),
                "auroc": round(self.auroc, 4), "skipped": self.skipped}  # fmt: skip

    def render(self) -> str:
        return (f"out of distribution ({self.folder}, {self.n} photos): {self.flagged:.1%} flagged; "
                f"labelled photos accepted {self.accepted:.1%}; AUROC {self.auroc:.4f}")  # fmt: skip


def out_of_fold(version: Version) -> tuple[np.ndarray, dict[str, Any]]:
    """A version's out-of-fold probabilities ``[n, classes]`` and its ``folds.json`` (files,
    labels and folds in the same order), both checked against the card's artifacts map."""
    proba = np.load(io.BytesIO(version.read(OOF_FILE)), allow_pickle=False)
    folds = json.loads(version.read(FOLDS_FILE))
    if proba.shape != (len(folds["files"]), len(version.info.classes)):
        raise DatasetError(f"head {version.name!r} version {version.version}: {OOF_FILE} and {FOLDS_FILE} disagree")
    return proba, folds


# --- the trainer -----------------------------------------------------------------------------
class Trainer:
    """Everything ``train``/``evaluate``/``predict`` share: store, extractor, cache, progress."""

    def __init__(
        self, settings: Settings, *, progress: ProgressCallback | bool = True, extractor: Extractor | None = None,
        feature_batch: int = 32,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.feature_batch = feature_batch  # images an extractor run gets (and progress counts); a job's are small
        self.store = ModelStore.open(settings)
        self.heads = self.store.heads
        self.progress: ProgressCallback = progress if callable(progress) else (console() if progress else no_progress)
        if extractor is None:  # a command of its own (not a job inside a running service, which configured it)
            configure(settings.max_image_pixels)  # libjpeg's memory cap, before any decode thread exists
        if extractor is not None:  # a running service's extractor (app/learning/jobs.py): no second ONNX Runtime session
            self.__dict__["extractor"] = extractor
            if extractor.info is not None:  # the served one (it may be the int8 variant): its features, its cache
                self.__dict__["info"] = extractor.info

    # loaded on first use, so that a mistake in the folders is reported before the model is read
    @cached_property
    def info(self) -> ExtractorInfo:
        return self.store.extractor()

    @cached_property
    def extractor(self) -> Extractor:
        s = self.settings
        return Extractor(self.info, provider=s.provider, threads=s.intra_op_threads, spinning=s.ort_spinning)

    @cached_property
    def cache(self) -> FeatureCache:
        return FeatureCache(self.settings.cache_dir, self.info.sha256)

    def features(self, paths: list[Path], *, phase: str = "features",
                 hashes: tuple[list[str | None], dict[int, str]] | None = None) -> Extracted:  # fmt: skip
        return extract_paths(
            paths,
            self.extractor,
            resample=self.info.resample,
            cache=self.cache,
            decode_threads=self.settings.decoders,
            limits=DecodeLimits.from_settings(self.settings),
            progress=self.progress,
            phase=phase,
            hashes=hashes,
            batch_size=self.feature_batch,
        )

    def _prepare(self, data: Dataset, minimum: int, what: str) -> tuple[list[str | None], dict[int, str]]:
        hashes = hash_files(data.paths, self.settings.decoders)
        check_readable(data, *hashes, self.cache, self.info.size, self.info.resample, minimum=minimum,
                       limits=DecodeLimits.from_settings(self.settings), what=what)  # fmt: skip
        return hashes

    def train(self, data_dir: Path, name: str, *, val_dir: Path | None = None, c: float | None = None, limit: int = 0,
              allow_subset: bool = False, promote: bool = True) -> Trained:  # fmt: skip
        valid_head_name(name)  # every check before any work
        _check_c(c)
        data = Dataset.from_folder(data_dir, min_per_class=MIN_IMAGES_PER_CLASS)
        val = Dataset.from_folder(val_dir, data.classes, allow_subset=allow_subset, what="--val-dir") if val_dir else None
        if limit:
            data = data.subset(_per_class_subset(data.labels, limit))
            val = val.subset(_per_class_subset(val.labels, limit)) if val else None
        return self.fit_datasets(data, name, val=val, c=c, promote=promote)

    def fit_datasets(self, data: Dataset, name: str, *, val: Dataset | None = None, c: float | None = None,
                     promote: bool = True, card: dict[str, Any] | None = None) -> Trained:  # fmt: skip
        """The one fit path (steps 2-8 above) on labelled photos already checked for layout: :meth:`train`'s
        folders, or a training job's photos of a head's example store with its fixed validation set as ``val``
        (:mod:`app.learning.jobs`). ``card``: entries merged into the version's card (a dict one level deep)."""
        hashes = self._prepare(data, MIN_IMAGES_PER_CLASS, "DATA_DIR")
        vhashes = self._prepare(val, 1, "--val-dir") if val else None
        sets = [("train", data, hashes[0])] + ([("val", val, vhashes[0])] if val and vhashes else [])
        duplicates = find_duplicates(sets)

        ext = self.features(data.paths, hashes=hashes)
        skipped = list(ext.skipped)
        held_out = None
        if val is not None and vhashes is not None:
            vext = self.features(val.paths, phase="validation features", hashes=vhashes)
            skipped += vext.skipped
            held_out = (val, vext)
        return self._fit_and_save(name, data, ext, c, skipped, duplicates, held_out, promote=promote, card=card)

    def train_features(self, features_dir: str, name: str, *, c: float | None = None, promote: bool = True) -> Trained:
        """Train from a ``tlserve batch --features`` output (``tlserve train --features DIR``), no
        re-extraction: its rows become the same :class:`Dataset` and :class:`Extracted` as extracting
        the folder they came from, and take the same path as :meth:`train` from there on (held-out
        20%, C by CV, out-of-fold artifacts, familiarity data, card, signing). Features of another
        extractor than the model store's are refused before any row is read."""
        from app.batch.parquet import read_features  # pyarrow: only this path needs it

        valid_head_name(name)
        _check_c(c)
        fs = read_features(features_dir, self.info.feature_space)
        data, ext = fs.data, fs.extracted
        duplicates = find_duplicates([("train", data, ext.hashes)])
        provenance = {"dir": features_dir, "source": fs.metadata["source"], "extractor_sha256": fs.metadata["extractor"]["sha256"],
                      "rows": fs.rows}  # fmt: skip
        return self._fit_and_save(name, data, ext, c, list(ext.skipped), duplicates, None, provenance, promote=promote)

    def _fit_and_save(self, name: str, data: Dataset, ext: Extracted, c: float | None, skipped: list[tuple[Path, str]],
                      duplicates: list[Duplicate], held_out: tuple[Dataset, Extracted] | None,
                      features: dict[str, Any] | None = None, *, promote: bool = True,
                      card: dict[str, Any] | None = None) -> Trained:  # fmt: skip
        """Everything after the features, whichever way they came: split, fits, report, card, artifacts, save."""
        x, y = ext.features, data.labels[ext.kept]
        _enough_after_extraction(data, y)
        val = held_out[0] if held_out else None
        if held_out is not None:
            vdata, vext = held_out
            held = _Held(vext.features, vdata.labels[vext.kept], None, [vdata.paths[int(i)] for i in vext.kept])
        else:
            train_idx, test_idx = stratified_holdout(y, len(data.classes))
            held = _Held(x[test_idx], y[test_idx], train_idx, [data.paths[int(ext.kept[i])] for i in test_idx])

        recipes, rule = choose_recipe(int(np.bincount(y).min()))
        if features is not None:  # rows of features, no photos to make views of
            recipes, rule = [replace(r, views=("orig",)) for r in recipes], f"{rule}; trained from features: served view only"
        views = tuple(dict.fromkeys(v for r in recipes for v in r.views))
        fitted = self._fit(self._views(data, ext, views), y, held, len(data.classes), c, recipes, views)
        recipe = fitted.recipe
        fitted.calibration = calibration.calibrate(fitted.oof.oof[fitted.c], y)
        fitted.head.temperature = fitted.calibration["temperature"]  # the loaded head's predict_proba applies it
        if fitted.report_head is not None:
            fitted.report_head.temperature = fitted.head.temperature
        oof_raw = fitted.oof.oof[fitted.c]
        fitted.oof.oof[fitted.c] = calibration.temper(fitted.oof.oof[fitted.c], fitted.head.temperature)
        report = make_report(held.y, fitted.held_pred, data.classes)
        full = training_card(self.info, data, val, y, held, skipped, duplicates, fitted, report)
        full["recipe"] = {**recipe.as_card(), "rule": rule, "cv_accuracy_by_recipe": fitted.recipe_scores, "C": fitted.c,
                          **({"scale": fitted.scale} if fitted.scale else {}),
                          "chosen_by": "the learning curve, benchmarks/RESULTS.md"}  # fmt: skip
        full["calibration"] = fitted.calibration
        full["estimator"]["kind"] = fewshot.describe(recipe)
        if features is not None:
            full["training"]["features"] = features
        for key, value in (card or {}).items():  # a training job's entries (app/learning/jobs.py)
            full[key] = {**full[key], **value} if isinstance(value, dict) and isinstance(full.get(key), dict) else value
        known, full["familiarity"] = self._familiarity(x, y, held, fitted, data.classes)  # on calibrated probabilities
        full["int8"] = self._int8_check(fitted, held)
        files = {
            **known.files(),
            "confusion_matrix.png": confusion_png(report, f"{name} ({'val_dir' if val else 'stratified'} split)"),
            "reliability.png": calibration.reliability_png(oof_raw, y, fitted.calibration, name),
            OOF_FILE: to_npy(fitted.oof.oof[fitted.c]),
            FOLDS_FILE: json.dumps(_folds_json(data, ext, y, fitted), indent=1).encode(),
        }
        version = save_head(self.heads, name, fitted.head.estimator, full, files, promote=promote)
        return Trained(report, version, skipped, duplicates, dict(data.nested), data.loose)

    def _int8_check(self, fitted: _Fitted, held: _Held) -> dict[str, Any]:
        """The card's ``int8`` entry: does this head answer the same on the store's INT8 copy as on the fp32 features
        it was fitted on? Agreement of the report head's answers on the held-out photos, fp32 vs INT8 features, against
        the extractor gate's bar (``MIN_AGREEMENT``): a head whose agreement is below it even at its 95% upper bound
        (:func:`app.learning.quantize.agreement_upper`) is refused where INT8 is served (named error)."""
        from app.learning.export import MIN_AGREEMENT
        from app.learning.quantize import agreement_upper

        if self.info.precision != "fp32":
            return {"checked": False, "trained_on": self.info.precision,
                    "reason": f"fitted on the served {self.info.precision} features, which serve it"}  # fmt: skip
        try:
            int8 = self.store.extractor(verify=True, precision="int8")
        except TlserveError:  # (its message names server paths, which a card never holds)
            return {
                "checked": False,
                "trained_on": "fp32",
                "reason": "no INT8 copy to check against (`tlserve export` makes one)",
            }
        if int8.feature_space != self.info.sha256:
            return {
                "checked": False,
                "trained_on": "fp32",
                "reason": "the INT8 copy failed its accuracy gate: not served for fp32 heads",
            }
        if not held.paths:
            return {"checked": False, "trained_on": "fp32", "reason": "no held-out photos"}
        s = self.settings
        other = Extractor(int8, provider=s.provider, threads=s.intra_op_threads, spinning=s.ort_spinning)
        got = extract_paths(held.paths, other, resample=int8.resample, cache=FeatureCache(s.cache_dir, int8.sha256),
                            decode_threads=s.decoders, limits=DecodeLimits.from_settings(s), progress=self.progress,
                            phase="INT8 check", batch_size=self.feature_batch)  # fmt: skip
        if not len(got.kept):
            return {"checked": False, "trained_on": "fp32",
                    "reason": f"none of the {len(held.paths)} held-out photos is readable here"}  # fmt: skip
        head = fitted.report_head or fitted.head
        with sklearn_threads(1):
            p32 = head.predict(held.x[got.kept])
            p8 = head.predict(got.features)
        agree, n, truth = int((p32 == p8).sum()), len(p8), held.y[got.kept]
        upper = agreement_upper(agree, n)
        return {
            "checked": True,
            "trained_on": "fp32",
            "int8_sha256": int8.sha256,
            "images": n,
            "agreement": round(agree / n, 4),
            "agreement_upper_95": round(upper, 4),
            "accuracy_fp32": round(float((p32 == truth).mean()), 4),
            "accuracy_int8": round(float((p8 == truth).mean()), 4),
            "min_agreement": MIN_AGREEMENT,
            "passed": upper >= MIN_AGREEMENT,
            "how": "the held-out photos' answers on INT8 features vs the fp32 features the head was fitted on; "
            "refused only when the agreement's 95% upper bound (Wilson) is below min_agreement",
        }

    def _views(self, data: Dataset, ext: Extracted, views: tuple[str, ...]) -> np.ndarray:
        """``[n, V, D]``: the kept photos' features under ``views`` (the first: as served, ``ext``)."""
        x = ext.features
        if views == ("orig",):
            return x[:, None, :]
        paths = [data.paths[int(i)] for i in ext.kept]
        hashes = [ext.hashes[int(i)] for i in ext.kept]
        cols = [x]
        for view in views[1:]:
            meter = Meter(self.progress, f"{view} view features", len(paths))
            cols.append(fewshot.view_features(paths, hashes, view, self.extractor, self.cache, resample=self.info.resample,
                                              max_pixels=self.settings.max_image_pixels, fallback=x,
                                              batch_size=self.feature_batch, meter=meter))  # fmt: skip
            meter.finish()
        return np.stack(cols, axis=1)

    def _fit(self, xv: np.ndarray, y: np.ndarray, held: _Held, n_classes: int, c: float | None, recipes: list[Recipe],
             views: tuple[str, ...]) -> _Fitted:  # fmt: skip
        """Steps 4-6 and 8: the recipe by cross-validation on the training part (:func:`app.learning.fewshot.select`), then
        its fits (:func:`app.learning.fewshot.fit_parts`)."""
        train = slice(None) if held.train_idx is None else held.train_idx
        folds = n_folds(y[train])
        meter = Meter(self.progress, "model selection", folds * sum(len(fewshot.grid_of(r, c)) for r in recipes), unit="fit")
        recipe, search, scores = fewshot.select(xv[train], y[train], views, recipes, n_classes, c, on_fold=meter.advance)
        meter.finish()
        stratified = held.train_idx is not None
        reuse = search is not None and c is None and not stratified  # the search ran on all of DATA_DIR already
        meter = Meter(self.progress, "final fits", stratified + (0 if reuse else n_folds(y)) + 1, unit="fit")
        f = fewshot.fit_parts(fewshot.views_of(xv, recipe, views), y, held.train_idx, held.x, recipe, n_classes, c,
                              DEFAULT_C, meter, search=search if c is None else None)  # fmt: skip
        meter.finish()
        return _Fitted(f.head, f.c, f.source, f.search, f.oof, f.held_pred, f.report_head, scale=f.scale, recipe=recipe,
                       recipe_scores=scores)  # fmt: skip

    def _familiarity(self, x: np.ndarray, y: np.ndarray, held: _Held, fitted: _Fitted,
                     classes: list[str]) -> tuple[familiarity.Familiarity, dict[str, Any]]:  # fmt: skip
        """The familiarity model of all photos, threshold out of fold; the held-out part scored as a check
        (against the training part's photos when the held-out part is a split of DATA_DIR)."""
        s = self.settings
        acceptance = s.ood_acceptance
        model, oof = familiarity.calibrate(x, y, fitted.oof.folds, fitted.oof.oof[fitted.c], method=s.ood_method,
                                           acceptance=acceptance)  # fmt: skip
        with sklearn_threads(1):
            proba = (fitted.report_head or fitted.head).predict_proba(held.x)
        if held.train_idx is None:
            checker, note = model, "scored against all training photos (they took no part in it)"
        else:
            part = familiarity.Familiarity.build(x[held.train_idx], y[held.train_idx], model.method, model.k,
                                                 standardize=model.standardize, threshold=model.threshold)  # fmt: skip
            checker = part
            note = "scored against the other photos of DATA_DIR (the threshold was calibrated on all of DATA_DIR)"
        accepted = checker.verdict(checker.score(held.x, proba))
        held_out = {"n": len(held.y), "accepted": round(float(accepted.mean()), 4) if len(accepted) else None, "how": note}
        section = familiarity.card_section(model, oof, y, classes, fitted.oof.n_splits, acceptance, held_out)
        return model, section

    def evaluate(self, head: Head, data_dir: Path, *, limit: int = 0, allow_subset: bool = False,
                 ood_dir: Path | None = None) -> Evaluation:  # fmt: skip
        """Accuracy on a labelled folder; with ``ood_dir`` (photos that are none of the classes, any
        layout), the flagged rate there and the AUROC of the familiarity score, labelled photos against them."""
        known = familiarity.for_head(self.heads, head, None)
        if ood_dir is not None:
            if known is None:
                raise DatasetError(
                    f"--ood: head {head.name!r} version {head.version} has no familiarity data; retrain it to add it"
                )
            if not ood_dir.is_dir():
                raise DatasetError(f"--ood {ood_dir}: not a folder")
        data = Dataset.from_folder(data_dir, list(head.classes), allow_subset=allow_subset, what="evaluation folder")
        if limit:
            data = data.subset(_per_class_subset(data.labels, limit))
        hashes = self._prepare(data, 1, "evaluation folder")
        ext = self.features(data.paths, hashes=hashes)
        if not len(ext.kept):
            raise DatasetError(f"evaluation folder {data.root}: none of its {len(data.paths)} files is a readable image")
        with sklearn_threads(1):
            answers = answer(head, ext.features, known)  # the one core (app/serving/predict.py), as predict and the service
        proba = answers.proba
        y, pred = data.labels[ext.kept], proba.argmax(axis=1)
        classes = list(head.classes)
        mistakes = [
            Mistake(data.relative(int(i)), classes[t], classes[p], float(pr[p]), float(pr[t]))
            for i, t, p, pr in zip(ext.kept, y, pred, proba, strict=True)
            if t != p
        ]
        mistakes.sort(key=lambda m: (-m.probability, m.file))
        ev = Evaluation(make_report(y, pred, classes), ext.skipped, mistakes)
        ev.familiarity, ev.in_distribution = answers.familiarity, answers.in_distribution
        if ood_dir is not None and known is not None and ev.familiarity is not None:
            ev.ood = self._ood(head, known, ood_dir, ev.familiarity)
        return ev

    def _ood(self, head: Head, known: familiarity.Familiarity, ood_dir: Path, scores: np.ndarray) -> OodReport:
        paths = sorted(p for p in ood_dir.rglob("*") if p.is_file() and not hidden(p, ood_dir))
        ext = self.features(paths, phase="--ood features")
        if not len(ext.kept):
            raise DatasetError(f"--ood {ood_dir}: none of its {len(paths)} files is a readable image")
        with sklearn_threads(1):
            got = answer(head, ext.features, known)
        assert got.familiarity is not None and got.in_distribution is not None
        return OodReport(str(ood_dir), len(ext.kept), float((~got.in_distribution).mean()), float(known.verdict(scores).mean()),
                         familiarity.auroc(scores, got.familiarity), len(ext.skipped))  # fmt: skip


@dataclass
class _Held:
    x: np.ndarray
    y: np.ndarray
    train_idx: np.ndarray | None  # indices of the training part of DATA_DIR (stratified split); None with --val-dir
    paths: list[Path] = field(default_factory=list)  # the held-out photos (for the INT8 check)


@dataclass
class _Fitted:
    head: Any
    c: float
    source: str
    search: CrossValidation | fewshot.Search | None
    oof: CrossValidation | fewshot.Search
    held_pred: np.ndarray
    report_head: Any = None  # the head fitted on the training part (stratified split), else None
    scale: float = 0.0  # the blend's class-mean scale (app.learning.fewshot)
    recipe: Recipe = LEGACY
    recipe_scores: dict[str, float] = field(default_factory=dict)  # cross-validated accuracy of each recipe tried
    calibration: dict[str, Any] = field(default_factory=dict)  # the card's calibration section


def _check_c(c: float | None) -> None:
    if c is not None and not (c > 0 and math.isfinite(c)):
        raise DatasetError(f"--C must be a positive number, not {c}")


def _enough_after_extraction(data: Dataset, y: np.ndarray) -> None:
    """The readable-image check again, on what extraction really kept (a file can change in between)."""
    counts = np.bincount(y, minlength=len(data.classes))
    for label, count in enumerate(counts):
        if count < MIN_IMAGES_PER_CLASS:
            raise DatasetError(
                f"class {data.classes[label]!r} has {count} readable image(s) (folder {data.folder(label)}); at least "
                f"{MIN_IMAGES_PER_CLASS} needed"
            )


def _folds_json(data: Dataset, ext: Extracted, y: np.ndarray, fitted: _Fitted) -> dict[str, Any]:
    return {
        "n_splits": fitted.oof.n_splits,
        "seed": SEED,
        "C": fitted.c,
        "classes": data.classes,
        "proba_file": OOF_FILE,
        "files": [
            {"path": data.relative(int(i)), "sha256": ext.hashes[int(i)], "label": int(label), "fold": int(fold)}
            for i, label, fold in zip(ext.kept, y, fitted.oof.folds, strict=True)
        ],
    }


def _per_class_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """The first ``limit`` items of every class (deterministic)."""
    return np.concatenate([np.flatnonzero(labels == k)[:limit] for k in np.unique(labels)])
