"""Training jobs: run at most ``training_jobs`` at a time per replica (records: :mod:`app.learning.jobstore`).

**Running**: a job is one thread at nice :data:`JOB_NICE` (threads it starts, the decode pool
included, inherit it), so requests' decoding and the event loop win the CPU. Its features come from
the service's one extractor through the serving batcher at background priority
(:class:`BackgroundExtractor`: a serving batch's worth of photos queued at once in pieces of
``training_batch_images``, run after every waiting request or in the room a request's batch leaves,
within ``training_share`` of the engine's time while requests are served), and from the feature cache
where the same bytes were seen before.
The fit is :meth:`app.learning.training.Trainer.fit_datasets`, the same path as ``tlserve train``; the version
is written by :func:`app.storage.registry.save_head` (files first, ``card.json`` last: the commit point), so a
process killed mid-job leaves no half-written version, only an invisible uncommitted folder.

**Stopping**: on shutdown every running job is cancelled at its next progress step or batch (the
record says ``failed``/``shutting_down``: resubmit it; its photos are already in the example store).
Beyond ``training_jobs`` running jobs a replica answers 429 + Retry-After (no queue: a queued job
would hold its upload on a replica that may go away; the client, or the console, retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core.errors import DatasetError, NotReady, ShuttingDown, TlserveError, TooManyJobs
from app.core.progress import Progress
from app.core.recipe import MIN_IMAGES_PER_CLASS, SEED
from app.core.settings import Settings
from app.learning.features import Dataset, Extracted
from app.learning.jobstore import JobStore, calibrated, iso, now, report_dict
from app.serving.extractor import Extractor
from app.storage.card import Card
from app.storage.examples import Example, ExampleStore, Snapshot

if TYPE_CHECKING:
    from app.learning.report import Report
    from app.serving.service import Service
    from app.storage.heads import Head

log = logging.getLogger(__name__)

JOB_NICE = 10
_VALIDATION_SETS_KEPT = 8
"""Heads whose validation features a replica keeps for ``compare`` (each n_val x D float32: 2 KiB a photo at D=512)."""


# --- what a job trains on --------------------------------------------------------------------
@dataclass
class Plan:
    train: list[Example]
    val: list[Example]
    classes: list[str]
    excluded_val: int  # validation photos of classes this training does not have


def plan(snap: Snapshot, *, use_examples: bool, max_classes: int) -> Plan:
    """The training and validation photos of a job, checked before it is accepted (each mistake named)."""
    held = set(snap.validation or [])
    if use_examples:
        train = [e for sha, e in sorted(snap.examples.items()) if sha not in held]
    else:
        train = [snap.examples[s] for s in dict.fromkeys(snap.upload) if s not in held]
    counts = dict(sorted(Counter(e.label for e in train).items()))
    held_counts = snap.counts(sorted(held))
    classes = list(counts)
    if len(classes) < 2:
        source = "the example store and this upload" if use_examples else "this upload (use_examples=false)"
        raise DatasetError(
            f"training needs photos of at least two classes; {source} hold {classes or 'none'} outside the validation set"
        )
    if len(classes) > max_classes:
        raise DatasetError(f"{len(classes)} classes, over the limit of {max_classes} (max_training_classes)")
    few = [c for c, n in counts.items() if n < MIN_IMAGES_PER_CLASS]
    if few:
        listed = ", ".join(f"{c!r} has {counts[c]} to train on" + (f" and {held_counts[c]} in the validation set" if held_counts.get(c) else "")
                           for c in few)  # fmt: skip
        first = (f"; a head's first training needs {MIN_IMAGES_PER_CLASS + 1} photos a class (one goes to its fixed validation set)"
                 if snap.validation_chosen else "")  # fmt: skip
        raise DatasetError(
            f"every class needs at least {MIN_IMAGES_PER_CLASS} training photos besides the validation set: {listed}{first}"
        )
    if snap.validation_chosen:  # the first training: every class gets photos in the fixed validation set
        missing = [c for c in classes if not held_counts.get(c)]
        if missing:
            raise DatasetError(
                f"a head's first training needs at least {MIN_IMAGES_PER_CLASS + 1} photos a class (one for its fixed "
                f"validation set, {MIN_IMAGES_PER_CLASS} to train on): "
                + ", ".join(f"{c!r} has {counts[c]} photos" for c in missing)
            )
    val = [snap.examples[s] for s in snap.validation or [] if s in snap.examples]
    kept = [e for e in val if e.label in counts]
    if not kept:
        raise DatasetError(f"the head's fixed validation set holds no photo of the classes trained on ({classes})")
    return Plan(train, kept, classes, len(val) - len(kept))


def dataset(store: ExampleStore, examples: list[Example], classes: list[str]) -> Dataset:
    """Photos of the example store as a :class:`~app.learning.features.Dataset` (``relative`` paths: ``ab/<sha256>``)."""
    return Dataset(store.folder / "objects", classes, [store.path(e.sha256) for e in examples],
                   np.asarray([classes.index(e.label) for e in examples], dtype=np.int64))  # fmt: skip


# --- features through the serving batcher ----------------------------------------------------
class JobCancelled(Exception):
    """The replica is stopping: the job ends at its next progress step."""


class BackgroundExtractor(Extractor):
    """The service's extractor as :func:`app.learning.features.extract_paths` sees it, each batch sent through the
    serving batcher at background priority in pieces of ``piece`` images (no second ONNX Runtime session)."""

    def __init__(self, inner: Extractor, submit: Callable[[np.ndarray, int], np.ndarray], piece: int,
                 cancelled: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        # not Extractor.__init__: the session, size and providers are the serving extractor's
        self.info, self.session, self.input_name = inner.info, inner.session, inner.input_name
        self.size, self.feature_dim, self.threads, self.providers = inner.size, inner.feature_dim, inner.threads, inner.providers
        self._submit, self._piece, self._cancelled = submit, piece, cancelled

    def run(self, images: np.ndarray) -> np.ndarray:
        if self._cancelled():
            raise JobCancelled
        return self._submit(images, self._piece)  # every piece queued at once: the batcher takes what its share allows


# --- running jobs ----------------------------------------------------------------------------
@dataclass
class JobSpec:
    """What one accepted job trains (frozen when it was accepted)."""

    head: str
    plan: Plan
    c: float | None
    promote: bool
    data: dict[str, Any]  # the data summary, for the record and the version's card
    options: dict[str, Any]


@dataclass
class _Job:
    record: dict[str, Any]
    spec: JobSpec
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class JobRunner:
    """The jobs of one replica: accepts at most ``training_jobs``, runs each in a niced thread, keeps its
    record current in the shared store, cancels what runs on shutdown."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings: Settings = service.settings
        self.store = JobStore(service.registry.store)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.active: dict[str, _Job] = {}
        self._reserved = 0
        self._beat: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._compare_lock = threading.Lock()
        self._comparing = 0
        self._val_features: dict[str, tuple[tuple[object, ...], Extracted]] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._beat = self._loop.create_task(self._heartbeat(), name="job-heartbeat")

    async def stop(self, timeout: float) -> None:
        """Cancel every running job and wait (bounded) for its thread to record it."""
        for job in self.active.values():
            job.cancel.set()
        deadline = time.monotonic() + timeout
        for job in list(self.active.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), max(0.1, deadline - time.monotonic()))
        for job in list(self.active.values()):  # a thread stuck in one long fit: recorded as stopped anyway
            self._finish(job, "failed", error=_stopped())
        if self._beat is not None:
            self._beat.cancel()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.job_heartbeat_s)
            for job in list(self.active.values()):
                with contextlib.suppress(OSError, TlserveError):
                    await asyncio.to_thread(self._flush, job)

    # --- accepting ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """A place for one more job on this replica, held while its upload is checked (429 when none)."""
        limit = self.settings.training_jobs
        if len(self.active) + self._reserved >= limit:
            raise TooManyJobs(
                f"this replica already runs {len(self.active) + self._reserved} training job(s), its limit (training_jobs="
                f"{limit}); retry after the Retry-After seconds, or on another replica"
                if limit
                else "this replica runs no training jobs (training_jobs=0)"
            )
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    def submit(self, spec: JobSpec) -> dict[str, Any]:
        """Record the job (``queued``) and start it; returns its record."""
        if self.service.extractor is None or self.service.batcher is None:
            raise NotReady(f"not ready: {self.service.not_ready_reason}")
        at = iso(now())
        record: dict[str, Any] = {
            "id": uuid.uuid4().hex, "head": spec.head, "state": "queued", "created_at": at, "updated_at": at,
            "progress": {"phase": "queued", "done": 0, "total": len(spec.plan.train) + len(spec.plan.val), "images_per_s": None},
            "version": None, "promoted": False, "report": None, "error": None,
            "replica": self.replica, "heartbeat_at": at, "heartbeat_s": self.settings.job_heartbeat_s,
            "options": spec.options, "data": spec.data, "phases": {}, "skipped": [],
        }  # fmt: skip
        job = _Job(record, spec)
        self.store.write(record)
        self.active[record["id"]] = job
        job.thread = threading.Thread(target=self._run, args=(job,), name=f"job-{record['id'][:8]}", daemon=True)
        job.thread.start()
        return dict(record)

    # --- the job's thread --------------------------------------------------------------------
    def _flush(self, job: _Job) -> None:
        with job.lock:
            if job.record["state"] in ("queued", "running"):
                job.record["heartbeat_at"] = job.record["updated_at"] = iso(now())
            self.store.write(job.record)

    def _progress(self, job: _Job, p: Progress) -> None:
        if job.cancel.is_set():
            raise JobCancelled
        with job.lock:
            job.record["progress"] = {"phase": p.phase, "done": p.done, "total": p.total,
                                      "images_per_s": round(p.rate, 3) if p.unit == "img" and p.done else None}  # fmt: skip
            job.record["phases"][p.phase] = {"done": p.done, "total": p.total, "unit": p.unit,
                                             "elapsed_s": round(p.elapsed_s, 3), "rate": round(p.rate, 3)}  # fmt: skip

    def _submit_features(self, images: np.ndarray, piece: int) -> np.ndarray:
        assert self._loop is not None and self.service.batcher is not None
        fut: Future[np.ndarray] = asyncio.run_coroutine_threadsafe(
            self.service.batcher.submit(images, background=True, piece=piece), self._loop
        )
        return fut.result()

    @property
    def _feature_batch(self) -> int:
        """Images a job decodes and queues at once: a serving batch's worth, so the batcher can fill the room
        requests leave (each a piece of ``training_batch_images``), within ``training_share``."""
        return max(self.settings.training_batch_images, self.settings.max_batch_size)

    def extractor(self, cancelled: Callable[[], bool] = lambda: False) -> BackgroundExtractor:
        if self.service.extractor is None:
            raise NotReady(f"not ready: {self.service.not_ready_reason}")
        return BackgroundExtractor(self.service.extractor, self._submit_features, self.settings.training_batch_images, cancelled)

    def _run(self, job: _Job) -> None:
        from app.learning.training import Trainer

        with contextlib.suppress(OSError, AttributeError):  # lower CPU priority for this thread and those it starts
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), JOB_NICE)
        spec, record = job.spec, job.record
        with job.lock:
            record["state"] = "running"
        with contextlib.suppress(OSError, TlserveError):
            self._flush(job)
        try:
            trainer = Trainer(self.settings, progress=lambda p: self._progress(job, p), extractor=self.extractor(job.cancel.is_set),
                              feature_batch=self._feature_batch)  # fmt: skip
            examples = ExampleStore(self.store.heads, spec.head)
            train = dataset(examples, spec.plan.train, spec.plan.classes)
            val = dataset(examples, spec.plan.val, spec.plan.classes)
            trained = trainer.fit_datasets(train, spec.head, val=val, c=spec.c, promote=spec.promote,
                                           card=self._card(record, spec))  # fmt: skip
        except JobCancelled:
            self._finish(job, "failed", error=_stopped())
        except ShuttingDown:
            self._finish(job, "failed", error=_stopped())
        except TlserveError as exc:
            self._finish(job, "failed", error={"code": exc.code, "message": exc.message})
        except Exception as exc:  # the record says it failed; the log has the traceback
            log.exception("training job %s failed", record["id"])
            self._finish(job, "failed", error={"code": "internal_error", "message": f"training failed: {type(exc).__name__}"})
        else:
            if spec.promote:
                self._reload(spec.head)
            names = {examples.path(e.sha256): (e.label, e.name) for e in spec.plan.train + spec.plan.val}
            skipped = [{"label": names.get(p, ("", p.name))[0], "file": names.get(p, ("", p.name))[1], "reason": why}
                       for p, why in trained.skipped]  # fmt: skip
            self._finish(job, "succeeded", version=trained.version.version, report=_report(trained.report, trained.version.info),
                         promoted=spec.promote, skipped=skipped)  # fmt: skip

    def _reload(self, head: str) -> None:
        """This replica serves the promoted version before the record says so (the others poll)."""
        assert self._loop is not None
        try:
            asyncio.run_coroutine_threadsafe(self.service.reload_head(head), self._loop).result(timeout=120)
        except (TlserveError, TimeoutError) as exc:
            log.warning("head %s trained but not reloaded here: %s", head, exc)

    def _card(self, record: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
        n_val = len(spec.plan.val)
        return {
            "job": {"id": record["id"], "created_at": record["created_at"], "replica": self.replica},
            "training": {
                "data_dir": f"example store of head {spec.head}",
                "split": {
                    "kind": "fixed_validation",
                    "validation_images": n_val,
                    "seed": SEED,
                    **{k: v for k, v in spec.data.get("validation_set", {}).items() if k in ("val_fraction", "chosen_at")},
                },
                "data": spec.data,
            },
            "evaluation": {
                "metrics": f"held out: the head's fixed validation set ({n_val} photos, chosen at its first training); "
                "scored with the shipped head, fitted on the training photos (none of them in that set) at estimator.C",
            },
        }

    def _finish(self, job: _Job, state: str, **fields: Any) -> None:
        with job.lock:
            if job.record["state"] in ("succeeded", "failed"):
                return
            job.record.update(state=state, **fields)
            job.record["updated_at"] = iso(now())
            if state == "succeeded":
                job.record["progress"] = {**job.record["progress"], "phase": "done"}
        try:
            self._flush(job)
        except (OSError, TlserveError) as exc:
            log.error("job %s: its record could not be written: %s", job.record["id"], exc)
        self.active.pop(job.record["id"], None)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self._loop.call_soon_threadsafe(job.done.set)
        log.info("training job %s %s", job.record["id"], state, extra={"head": job.spec.head})

    # --- scoring on the fixed validation set -------------------------------------------------
    @contextlib.contextmanager
    def comparing(self) -> Iterator[None]:
        """A place for one more comparison on this replica (429 beyond ``compare_concurrency``)."""
        limit = self.settings.compare_concurrency
        with self._compare_lock:
            if self._comparing >= limit:
                raise TooManyJobs(
                    f"this replica already scores {self._comparing} comparison(s), its limit (compare_concurrency="
                    f"{limit}); retry after the Retry-After seconds, or on another replica"
                )
            self._comparing += 1
        try:
            yield
        finally:
            with self._compare_lock:
                self._comparing -= 1

    def validation_features(self, examples: ExampleStore, val: list[Example]) -> tuple[Extracted, str]:
        """The features of a head's validation photos, extracted once: kept (per head, the last set) while
        the set, the extractor and every photo file (inode, mtime, size: one ``stat`` each) are unchanged,
        so scoring versions again reads and hashes no photo."""
        from app.learning.training import Trainer

        paths = [examples.path(e.sha256) for e in val]
        stats: list[tuple[int, int, int] | None] = []
        for path in paths:
            try:
                st = os.stat(path, follow_symlinks=False)
                stats.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                stats.append(None)
        info = self.service.info
        key = (info.sha256 if info is not None else "", tuple(e.sha256 for e in val), tuple(stats))
        with self._compare_lock:
            hit = self._val_features.get(examples.head)
        if hit is not None and hit[0] == key:
            return hit[1], "cached"
        trainer = Trainer(self.settings, progress=False, extractor=self.extractor(), feature_batch=self._feature_batch)
        ext = trainer.features(paths, phase="compare features")
        with self._compare_lock:
            self._val_features[examples.head] = (key, ext)
            while len(self._val_features) > _VALIDATION_SETS_KEPT:
                self._val_features.pop(next(iter(self._val_features)))
        return ext, "extracted"

    def score(self, head: Head, examples: ExampleStore, val: list[Example]) -> dict[str, Any]:
        """``head`` on the validation photos of its classes (others excluded and counted): a report."""
        from app.learning.crossval import sklearn_threads
        from app.learning.report import make_report

        classes = list(head.classes)
        ext, _ = self.validation_features(examples, val)
        rows = [r for r, i in enumerate(ext.kept) if val[int(i)].label in classes]
        kept = [e for e in val if e.label in classes]
        skipped = sum(1 for p, _ in ext.skipped if p in {examples.path(e.sha256) for e in kept})
        y = np.asarray([classes.index(val[int(ext.kept[r])].label) for r in rows], dtype=np.int64)
        with sklearn_threads(1):
            pred = head.predict_proba(ext.features[rows]).argmax(axis=1) if len(y) else np.zeros(0, np.int64)
        out = report_dict(make_report(y, pred, classes).as_dict(), None) if len(y) else None
        return {"report": out, "excluded": len(val) - len(kept), "skipped": skipped}


def _report(report: Report, card: Card) -> dict[str, Any]:
    return calibrated(report_dict(report.as_dict(), card.training.n_train or 0), card)


def _stopped() -> dict[str, str]:
    return {"code": "shutting_down", "message": "the replica stopped before this job finished; no version was written. "
            "Submit the training again (its photos are already in the head's example store)"}  # fmt: skip
