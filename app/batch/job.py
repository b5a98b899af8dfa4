"""One batch job: what it was asked (:class:`BatchJob`), what it will do (:class:`Plan`: checked
before any image is read), and what it did (:class:`Summary`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app import __version__
from app.batch.compute import DecodeSpec, ModelSpec
from app.batch.parquet import FORMAT, JOB_KEYS, Output, new_run
from app.batch.source import Source, open_source
from app.core.errors import OutputConflict
from app.core.imaging import DecodeLimits
from app.core.settings import Settings
from app.serving.familiarity import Familiarity, for_head
from app.storage.registry import load_head
from app.storage.store import ExtractorInfo, ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchJob:
    source: str
    """A local folder or a URI pyarrow opens (``s3://bucket/prefix``)."""
    output: str
    """The Parquet dataset folder (local or URI)."""
    head: str | None = None
    """The head to classify with (default: the settings' default head); unused with ``features``."""
    features: bool = False
    """Write feature vectors instead of labels."""
    top_k: int | None = None  # classes in the top_k column; None: every class (as the other paths answer)
    batch_size: int = 16
    """Images per extractor run."""
    part_rows: int = 1024
    """Rows per part file (the unit that is committed, and that a killed job loses at most one of per writer)."""
    resume: bool = False
    ray: str | None = None
    """``None``: in-process. ``local`` (a Ray instance inside the command), ``auto`` (this machine's
    cluster), ``ray://host:port`` or ``host:port``."""
    actors: int | None = None
    """Ray actor pool size (default: one per GPU in the cluster, else half its CPUs)."""
    actor_cpus: float = 1.0
    """CPUs Ray reserves per actor (also its ONNX Runtime threads, at least 1)."""


@dataclass
class Plan:
    job: BatchJob
    settings: Settings
    source: Source
    output: Output
    info: ExtractorInfo
    meta: dict[str, Any]
    run: str
    todo: list[str]
    """Relative paths still to do (all of them unless resuming)."""
    already: int
    """Rows already committed by earlier runs."""
    decode: DecodeSpec
    model: ModelSpec
    previous: dict[str, Any] | None
    """The output's ``_tlserve.json`` before this run."""


@dataclass
class Summary:
    images: int
    """Images this run wrote."""
    errors: int
    """Rows of this run with an ``error`` (files that did not decode)."""
    seconds: float
    total_rows: int
    """Rows in the output after this run (earlier runs included)."""
    output: str
    engine: str
    actors: dict[str, int] = field(default_factory=dict)
    """Ray only: images per actor of the pool."""
    stages: dict[str, float] = field(default_factory=dict)
    """In-process only: seconds spent reading, decoding, in the extractor, the head and writing."""
    stats: str = ""
    """Ray only: Ray Data's execution stats."""

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        pool = f", {len(self.actors)} actor(s)" if self.actors else ""
        return (f"{self.images} images in {self.seconds:.1f}s ({self.rate:.1f} images/s, {self.engine}{pool}), "
                f"{self.errors} error(s); {self.total_rows} rows in {self.output}")  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "errors": self.errors, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.rate, 3), "total_rows": self.total_rows, "output": self.output,
                "engine": self.engine, "actors": self.actors, "stages": {k: round(v, 3) for k, v in self.stages.items()}}  # fmt: skip


def metadata(job: BatchJob, source: Source, info: ExtractorInfo, head: Any, known: Familiarity | None = None) -> dict[str, Any]:
    """What every part and ``_tlserve.json`` record: kind, source, extractor (feature space), head version
    (and its familiarity method and threshold, when it has familiarity data)."""
    extractor = {k: info.raw.get(k) for k in ("file", "input_size", "resample", "pooling", "feature_dim", "precision")}
    head_meta = {"name": head.name, "version": head.version, "pickle_sha256": head.sha256} if head is not None else {}
    head_meta["familiarity"] = None if known is None else {"method": known.method, "threshold": known.threshold}
    return {
        "format": FORMAT,
        "kind": "features" if head is None else "classify",
        "source": source.uri if "://" in source.uri else source.root,
        "classes": list(head.classes) if head is not None else source.classes,
        "extractor": {**extractor, "sha256": info.sha256, "feature_space": info.feature_space},
        "head": None if head is None else head_meta,
        "top_k": None if head is None else min(job.top_k or len(head.classes), len(head.classes)),
        "tlserve_version": __version__,
    }


def plan(job: BatchJob, settings: Settings) -> Plan:
    """Every check a user's mistake can fail, before any image is read: source, extractor, head, output."""
    store = ModelStore.open(settings)
    info = store.extractor(verify=True)
    head = known = None
    if not job.features:
        heads = store.heads
        head = load_head(heads, job.head or settings.default_head, info.feature_space)
        known = for_head(heads, head, info.feature_dim)  # as `tlserve predict` and the service load it
    source = open_source(job.source)
    output = Output.open(job.output)
    meta = metadata(job, source, info, head, known)
    previous = output.read_job()
    parts = output.parts()
    if previous is None and not output.is_empty():
        raise OutputConflict(f"output {job.output} is not empty and holds no tlserve batch job: choose another --output")
    if previous is not None and parts and not job.resume:
        raise OutputConflict(f"output {job.output} already holds a batch job ({len(parts)} committed part(s)): "
                         "pass --resume to continue it, or choose another --output")  # fmt: skip
    if previous is not None and parts:
        different = [k for k in JOB_KEYS if previous.get(k) != meta.get(k)]
        if different:
            k = different[0]
            raise OutputConflict(f"cannot resume {job.output}: its {k} is {_short(previous.get(k))}, this job's is "
                             f"{_short(meta.get(k))} (a resumed job must be the same job; choose another --output)")  # fmt: skip
    done, rows = output.done_paths() if parts else (set(), 0)
    todo = [rel for rel in source.files if rel not in done]
    if done:
        log.info("resuming %s: %d of %d images already written, %d to do", job.output, len(source.files) - len(todo),
                 len(source.files), len(todo))  # fmt: skip
    s = settings
    decode = DecodeSpec(source.root, info.size, info.resample, DecodeLimits.from_settings(s), source.classes is not None)
    model = ModelSpec(info, head, known, meta, meta["top_k"] or 0, s.provider, s.threads)
    return Plan(job, settings, source, output, info, meta, new_run(), todo, rows, decode, model, previous)


def claim(plan: Plan) -> None:
    """Make this run the owner of the output (a straggler of an earlier run then drops its parts) and
    delete the unfinished parts a killed run left."""
    previous = plan.previous or {}
    runs = [*previous.get("runs", []), plan.run] if previous.get("kind") == plan.meta["kind"] else [plan.run]
    started = previous.get("created_at") if plan.already else None
    plan.output.write_job({**plan.meta, "run": plan.run, "runs": runs,
                           "created_at": started or datetime.now(UTC).isoformat(timespec="seconds")})  # fmt: skip
    for path in plan.output.stale() if plan.output.local else []:
        plan.output.fs.delete_file(path)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."
