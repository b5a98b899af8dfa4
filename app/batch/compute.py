"""The work of a batch job, the same in-process and on Ray: decode a batch of files, then run the
extractor and the head on it and give back Arrow rows.

Decoding is :func:`app.core.imaging.load_image` (the one loader) within the settings' limits
(:class:`app.core.imaging.DecodeLimits`); features come from :class:`app.serving.extractor.Extractor` over the
exported model whose sha256 the manifest names; the labels, probabilities, familiarity score and
verdict are :func:`app.serving.predict.answer`'s, the one core that ``tlserve predict`` and the service run. A
file that does not decode becomes a row with an ``error``; it never fails the batch.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.batch.parquet import error_column, features_column, schema
from app.core.errors import ArtifactError, InputError
from app.core.hashing import sha256_bytes, sha256_file
from app.core.imaging import DecodeLimits
from app.serving.extractor import Extractor
from app.serving.familiarity import Familiarity
from app.serving.predict import answer
from app.storage.heads import Head
from app.storage.store import ExtractorInfo

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class DecodeSpec:
    """What decoding needs (picklable: Ray's decode tasks receive it)."""

    root: str
    size: int
    resample: str
    limits: DecodeLimits
    labelled: bool


def decode_one(data: bytes, spec: DecodeSpec) -> tuple[np.ndarray | None, str, str]:
    """``(image, "", "")``, or ``(None, code, message)`` for bytes that are not a usable image."""
    try:
        return spec.limits.load(data, spec.size, spec.resample), "", ""
    except InputError as exc:
        return None, exc.code, exc.message


Decoded = tuple[str, np.ndarray | None, str, str, str]
"""``(full path, image or None, error code or "", error message or "", sha256 of the bytes or "")``."""


def decode_file(path: str, data: bytes | OSError, spec: DecodeSpec) -> Decoded:
    """One file's bytes (or the error reading it gave) decoded."""
    if isinstance(data, OSError):
        return path, None, "unreadable", f"cannot read: {data}", ""
    return (path, *decode_one(data, spec), sha256_bytes(data))


def stack(rows: list[Decoded], spec: DecodeSpec) -> dict[str, np.ndarray]:
    """Decoded files → one batch: ``path`` (relative to the source), ``class`` ("" unless labelled and in
    a class folder), ``image`` (``uint8 [n, S, S, 3]``, zeros where decoding failed), ``error_code``,
    ``error_message``, ``sha256``."""
    images = np.zeros((len(rows), spec.size, spec.size, 3), np.uint8)
    prefix = spec.root + "/"
    rels = [p[len(prefix) :] if p.startswith(prefix) else p for p, *_ in rows]
    for i, (_, image, *_) in enumerate(rows):
        if image is not None:
            images[i] = image

    def strings(values: list[str]) -> np.ndarray:
        return np.array(values, dtype=object) if values else np.zeros(0, dtype=object)

    return {
        "path": strings(rels),
        "class": strings([rel.split("/", 1)[0] if spec.labelled and "/" in rel else "" for rel in rels]),
        "image": images,
        "error_code": strings([r[2] for r in rows]),
        "error_message": strings([r[3] for r in rows]),
        "sha256": strings([r[4] for r in rows]),
    }


def decode_batch(batch: dict[str, Any], spec: DecodeSpec) -> dict[str, np.ndarray]:
    """Ray's ``read_binary_files`` batch (``bytes``, full ``path``) decoded (see :func:`stack`)."""
    return stack([decode_file(str(p), bytes(b), spec) for p, b in zip(batch["path"], batch["bytes"], strict=True)], spec)


@dataclass(frozen=True)
class ModelSpec:
    """What the model step needs (picklable: it is shipped to every Ray actor)."""

    info: ExtractorInfo
    head: Head | None
    """``None`` in features mode."""
    familiarity: Familiarity | None
    """The head's familiarity model (:func:`app.serving.familiarity.for_head`); ``None`` in features mode or when it has none."""
    meta: dict[str, Any]
    """The job metadata (:func:`app.batch.job.metadata`), stamped on every part."""
    top_k: int
    provider: str
    threads: int


def materialise(info: ExtractorInfo, model: bytes) -> ExtractorInfo:
    """The extractor's bytes (shipped to a node that may not share the model store) checked against
    the manifest's sha256 and written once to a local file named by it."""
    if sha256_bytes(model) != info.sha256:
        raise ArtifactError(f"the extractor bytes received do not match sha256 {info.sha256[:12]} of the manifest")
    path = Path(tempfile.gettempdir()) / f"tlserve-{info.sha256[:16]}-{info.path.name}"
    if not path.is_file() or sha256_file(path) != info.sha256:  # another actor's copy is reused only when it checks out
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        os.replace(tmp, path)
    return dataclasses.replace(info, path=path)


class Model:
    """Extractor + head over decoded batches → Arrow rows: one instance in-process, one per Ray actor."""

    def __init__(self, spec: ModelSpec, model: bytes | None = None) -> None:
        info = materialise(spec.info, model) if model is not None else spec.info
        self.spec = spec
        self.extractor = Extractor(info, provider=spec.provider, threads=spec.threads)
        self.schema = schema(spec.meta)
        self.seconds = {"extractor": 0.0, "head": 0.0}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import pyarrow as pa

        codes = [str(c) or None for c in batch["error_code"]]
        messages = [str(m) if c else None for c, m in zip(codes, batch["error_message"], strict=True)]
        ok = np.array([c is None for c in codes], bool)
        t0 = time.perf_counter()
        images = np.ascontiguousarray(batch["image"][ok])
        features = self.extractor.run(images) if ok.any() else np.zeros((0, self.extractor.feature_dim), np.float32)
        t1 = time.perf_counter()
        self.seconds["extractor"] += t1 - t0
        columns: dict[str, Any] = {"path": pa.array([str(p) for p in batch["path"]], pa.string())}
        head = self.spec.head
        if head is None:
            columns["class"] = pa.array([str(c) or None for c in batch["class"]], pa.string())
            columns["features"] = features_column(features, ok, self.extractor.feature_dim)
            columns["sha256"] = pa.array([str(h) or None for h in batch["sha256"]], pa.string())
        else:
            answers = answer(head, features, self.spec.familiarity)
            rows: list[dict[str, Any] | None] = [None] * len(ok)
            for i, row in enumerate(np.flatnonzero(ok)):
                rows[row] = answers.row(i, self.spec.top_k)
            columns["label"] = pa.array([a and a["label"] for a in rows], pa.string())
            columns["probability"] = pa.array([a and a["confidence"] for a in rows], pa.float32())
            columns["top_k"] = pa.array([a and a["top_k"] for a in rows], self.schema.field("top_k").type)
            if answers.familiarity is not None and answers.in_distribution is not None:
                score = np.full(len(ok), np.nan)
                score[ok] = answers.familiarity  # the column keeps every digit (the row rounds to 6 places)
                verdict = np.zeros(len(ok), bool)
                verdict[ok] = answers.in_distribution
                columns["familiarity"] = pa.array(score, pa.float64(), mask=~ok)
                columns["in_distribution"] = pa.array(verdict, pa.bool_(), mask=~ok)
            self.seconds["head"] += time.perf_counter() - t1
        columns["error"] = error_column(codes, messages)
        return pa.table(columns, schema=self.schema)
