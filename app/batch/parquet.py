"""The Parquet dataset a batch job writes: its columns, its metadata, atomic part files, resume, reading.

An output folder holds::

    _tlserve.json                 the job: kind, source, extractor, head; ``run`` = the run that owns it now
    part-<run>-<id>.parquet       committed parts (any number, any order); each carries the job metadata
    .part-….tmp                   a part being written (invisible: readers skip names starting with . or _)

Local parts are written to a temporary name, fsynced and renamed (:func:`app.storage.store.atomic_write`);
on object stores (``s3://``…) an object appears only when its upload completes. So a killed job leaves
only whole parts, and ``--resume`` skips every path already in one. A straggler writer of a run that
was replaced by a resumed one (its ``run`` no longer in ``_tlserve.json``) drops its part instead of
committing it, so no image is written twice.

Columns, classify mode: ``path`` (relative to the source), ``label``, ``probability`` (of the label),
``top_k`` (list of ``{label, probability}``), and when the head has familiarity data
(:mod:`app.serving.familiarity`) ``familiarity`` (the score, float64) and ``in_distribution`` (the verdict at
the head's calibrated threshold), the same numbers as ``tlserve predict`` and the service; then
``error`` (null, or ``{code, message}`` for a file that did not decode: its other columns are null).
Features mode: ``path``, ``class`` (the class folder of a labelled source, else null), ``features``
(``float32[D]``), ``sha256`` (of the file's bytes: the photo's identity in a head's ``folds.json`` and
for duplicates, as training from a folder records it), ``error``.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core.errors import DatasetError, IncompatibleFeatures, MissingDependency, OutputConflict
from app.storage.files import atomic_write

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from app.learning.features import Dataset, Extracted

JOB_FILE = "_tlserve.json"
FORMAT = "tlserve-batch/1"
METADATA_KEY = b"tlserve"
JOB_KEYS = ("format", "kind", "source", "classes", "extractor", "head", "top_k")
"""The metadata that makes two runs one job: a resumed run must match them, and so must every part."""


def _error_type() -> pa.DataType:
    import pyarrow as pa

    return pa.struct([("code", pa.string()), ("message", pa.string())])


def schema(meta: dict[str, Any]) -> pa.Schema:
    """The columns of ``meta['kind']`` (``classify`` or ``features``), with the job metadata attached."""
    import pyarrow as pa

    if meta["kind"] == "features":
        dim = int(meta["extractor"]["feature_dim"])
        fields = [("path", pa.string()), ("class", pa.string()), ("features", pa.list_(pa.float32(), dim)),
                  ("sha256", pa.string())]  # fmt: skip
    else:
        top = pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float32())]))
        fields = [("path", pa.string()), ("label", pa.string()), ("probability", pa.float32()), ("top_k", top)]
        if meta["head"].get("familiarity") is not None:
            fields += [("familiarity", pa.float64()), ("in_distribution", pa.bool_())]
    return pa.schema([*fields, ("error", _error_type())], metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def need_pyarrow(command: str) -> None:
    """Refuse ``command`` before any work when pyarrow (Parquet) is not installed."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MissingDependency(f"`{command}` reads and writes Parquet and needs pyarrow: pip install 'tlserve[ray]' "
                         "(or pyarrow alone for the in-process engine)") from None  # fmt: skip


def metadata_of(sch: pa.Schema) -> dict[str, Any] | None:
    raw = (sch.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def error_column(codes: list[str | None], messages: list[str | None]) -> pa.Array:
    import pyarrow as pa

    rows = [None if c is None else {"code": c, "message": m} for c, m in zip(codes, messages, strict=True)]
    return pa.array(rows, type=_error_type())


def features_column(features: np.ndarray, ok: np.ndarray, dim: int) -> pa.Array:
    """``float32 [n_ok, D]`` rows placed at the ``ok`` positions of ``len(ok)`` rows, null elsewhere."""
    import pyarrow as pa

    full = np.zeros((len(ok), dim), np.float32)
    full[ok] = features
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim, mask=pa.array(~ok))


@dataclass
class Output:
    """The output folder of one job (local path or URI). Picklable: Ray's write tasks hold one."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, uri: str) -> Output:
        from app.batch.source import resolve

        fs, root = resolve(uri)
        return cls(uri, fs, root)

    @property
    def local(self) -> bool:
        import pyarrow.fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    def _entries(self) -> list[Any]:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type != pafs.FileType.Directory:
            raise OutputConflict(f"output {self.uri} exists and is not a folder")
        return list(self.fs.get_file_info(pafs.FileSelector(self.root)))

    def parts(self) -> list[str]:
        """Committed part files (full paths inside the file system), sorted."""
        return sorted(e.path for e in self._entries() if e.base_name.startswith("part-") and e.base_name.endswith(".parquet"))

    def is_empty(self) -> bool:
        return not self._entries()

    def stale(self) -> list[str]:
        """Temporary files of parts that were never committed (a killed run's)."""
        return [e.path for e in self._entries() if e.base_name.startswith(".part-") and e.base_name.endswith(".tmp")]

    def read_job(self) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{JOB_FILE}") as f:
                job: dict[str, Any] = json.loads(f.read())
                return job
        except FileNotFoundError:
            return None

    def write_job(self, job: dict[str, Any]) -> None:
        self._put(JOB_FILE, (json.dumps(job, indent=2, sort_keys=True) + "\n").encode())

    def _put(self, name: str, data: bytes) -> None:
        if self.local:
            from pathlib import Path

            atomic_write(Path(self.root) / name, data)  # temp name, fsync, rename
        else:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(f"{self.root}/{name}") as f:  # visible when the upload completes
                f.write(data)

    def commit(self, table: pa.Table, sch: pa.Schema, run: str) -> bool:
        """Write ``table`` as one new part, atomically; ``False`` (nothing written) when ``run`` no
        longer owns the folder (a resumed run took over)."""
        import pyarrow.parquet as pq

        job = self.read_job() or {}
        if job.get("run") != run:
            return False
        buf = io.BytesIO()
        pq.write_table(table.cast(sch), buf, compression="zstd")
        self._put(f"part-{run}-{uuid.uuid4().hex[:12]}.parquet", buf.getvalue())
        return True

    def read_part(self, path: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        with self.fs.open_input_file(path) as f:
            return pq.read_table(f, columns=columns)

    def part_metadata(self, path: str) -> dict[str, Any] | None:
        import pyarrow.parquet as pq

        with self.fs.open_input_file(path) as f:
            return metadata_of(pq.read_schema(f))

    def done_paths(self) -> tuple[set[str], int]:
        """The paths in committed parts and the row count (rows of a path written twice count twice)."""
        done: set[str] = set()
        rows = 0
        for part in self.parts():
            paths = self.read_part(part, ["path"]).column("path").to_pylist()
            rows += len(paths)
            done.update(paths)
        return done, rows


def new_run() -> str:
    return uuid.uuid4().hex[:8]


@dataclass
class FeatureSet:
    """A ``--features`` output read back as what extracting its source folder gives training: the
    photos as a :class:`app.learning.features.Dataset` (in :meth:`~app.learning.features.Dataset.from_folder` order) and
    their features as an :class:`app.learning.features.Extracted` (unreadable files in ``skipped``)."""

    data: Dataset
    extracted: Extracted
    rows: int
    metadata: dict[str, Any]


def read_features(uri: str, feature_space: str) -> FeatureSet:
    """Every committed row of a features dataset; refused (before reading rows) when it was written by
    another extractor than ``feature_space``, holds no classes, or is not a features dataset. Rows of
    files directly in the source folder (outside the class folders) are counted and left out, as
    :meth:`app.learning.features.Dataset.from_folder` does."""
    from collections import Counter
    from pathlib import Path

    from app.core.labelled import refuse_split
    from app.learning.features import Dataset, Extracted

    need_pyarrow("tlserve train --features")
    out = Output.open(uri)
    parts = out.parts()
    if not parts:
        raise DatasetError(f"{uri} holds no committed part files (is it a `tlserve batch --features` output?)")
    metas = [out.part_metadata(p) for p in parts]
    meta = metas[0]
    if meta is None or meta.get("format") != FORMAT:
        raise DatasetError(f"{parts[0]} carries no tlserve batch metadata: not written by `tlserve batch`")
    if any(m is None or any(m.get(k) != meta.get(k) for k in JOB_KEYS) for m in metas[1:]):
        raise DatasetError(f"the parts in {uri} come from different jobs (their metadata differ)")
    if meta["kind"] != "features":
        raise DatasetError(f"{uri} holds {meta['kind']} results, not features: write it with `tlserve batch --features`")
    theirs = str(meta["extractor"]["feature_space"])
    if theirs != feature_space:
        raise IncompatibleFeatures(
            f"features in {uri} were extracted by extractor {theirs[:12]} ({meta['extractor'].get('file')}), "
            f"the model store's extractor is {feature_space[:12]}: features differ between extractors; "
            f"extract them again with `tlserve batch {meta['source']} --features --output DIR`"
        )
    classes = meta.get("classes")
    if not classes:
        raise DatasetError(f"features in {uri} have no classes: their source {meta['source']} is not a labelled folder "
                         "(at least two class sub-folders)")  # fmt: skip
    import pyarrow as pa

    table = pa.concat_tables([out.read_part(p) for p in parts])
    paths = table.column("path").to_pylist()
    deep = {p.split("/", 1)[0] for p in paths if p.count("/") > 1}  # class folders that hold folders
    refuse_split(f"the source {meta['source']} of the features in {uri}", classes, deep.__contains__, lambda train, _: (
        f"Extract the folder that holds the class folders, e.g. `tlserve batch {meta['source']}/{train} --features`"))  # fmt: skip
    if len(set(paths)) != len(paths):
        raise DatasetError(f"{uri} holds some paths more than once (parts of two jobs mixed by hand?)")
    errors = table.column("error").to_pylist()
    klass = table.column("class").to_pylist()
    sha = table.column("sha256").to_pylist()
    order = {c: i for i, c in enumerate(classes)}
    rows = sorted((i for i, k in enumerate(klass) if k is not None), key=lambda i: (order[klass[i]], paths[i].split("/")))
    root = Path(meta["source"])
    labels = np.array([order[klass[i]] for i in rows], np.int64)
    nested = Counter(str(klass[i]) for i in rows if paths[i].count("/") > 1)
    data = Dataset(root, list(classes), [root / paths[i] for i in rows], labels, dict(nested), len(paths) - len(rows))
    kept = np.array([j for j, i in enumerate(rows) if errors[i] is None], np.int64)
    dim = int(meta["extractor"]["feature_dim"])
    take = pa.array([rows[j] for j in kept], pa.int64())
    flat = table.column("features").combine_chunks().take(take).flatten()
    x = np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(len(kept), dim)
    skipped = [(root / paths[i], str(errors[i]["message"])) for i in rows if errors[i] is not None]
    extracted = Extracted(x, kept, skipped, 0, [sha[i] for i in rows])
    return FeatureSet(data, extracted, len(paths), meta)
