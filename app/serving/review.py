"""A head's review queue from production: uncertain and unfamiliar answers, sampled, for a person to label.

Off by default: only the heads listed in ``review_heads`` sample, and a head not listed stores nothing.
Layout, in the shared store next to the head's examples (where: :meth:`app.storage.registry.HeadStore.review_dir`)::

    model_store/heads/<name>/review/
        objects/<sha[:2]>/<sha256>   the photo's bytes, named by their sha256 (sent twice: stored once)
        queue.json                   {"items": {sha256: {label, confidence, margin, probabilities, familiarity,
                                      in_distribution, reason, version, queued_at, last_seen_at, seen, bytes}}}
        .lock                        flock'ed while queue.json or the objects change

- **Sampling** (:class:`Sampler`, on the request path): an answer is a candidate when its top-class
  probability is below ``review_confidence`` or it is judged not in distribution; ``review_sample_rate``
  of the candidates are kept; a photo over ``review_max_photo_bytes`` never is. A kept photo is copied
  and handed to one writer thread through a queue of ``review_pending`` photos; when that is full the
  photo is dropped and counted (``dropped_full``): a request never waits for, and never fails by, the
  review queue.
- **Retention** (:meth:`ReviewQueue.prune`, at every write, every listing and at start-up): a photo
  leaves ``review_max_age_days`` after it was first queued (``expired``), and the oldest leave first
  while the queue holds more than ``review_max_items`` photos or ``review_max_bytes`` bytes
  (``evicted``). Leaving deletes the bytes. Labelling moves the photo into the head's example store
  (:mod:`app.storage.examples`: the same bytes under another label are relabelled); dismissing deletes it.
- **Order** (:func:`most_useful_first`): unfamiliar answers first (least familiar first), then the
  rest by margin (top-class minus second-class probability, smallest first).
- Nothing on disk is trusted: ``queue.json`` entries that do not parse are skipped (and dropped at the
  next write), and a photo is read back capped and checked against its sha256 before it is served or labelled.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import re
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core.errors import ArtifactError, ReviewItemNotFound, TlserveError
from app.core.hashing import sha256_bytes
from app.core.names import valid_head_name
from app.core.settings import Settings
from app.storage.examples import ExampleStore, Incoming, Snapshot, valid_label
from app.storage.files import atomic_write, locked, read_json, read_regular, write_json
from app.storage.registry import HeadStore

if TYPE_CHECKING:
    from app.serving.inference import InferResult
    from app.serving.metrics import Metrics

log = logging.getLogger(__name__)

OBJECTS = "objects"
QUEUE = "queue.json"
SHA256 = re.compile(r"[0-9a-f]{64}")
UNFAMILIAR, LOW_CONFIDENCE = "unfamiliar", "low_confidence"


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def valid_sha(sha: str) -> str:
    if not SHA256.fullmatch(sha):
        raise ReviewItemNotFound(
            f"invalid review item {sha[:80]!r}: a review item is named by its photo's sha256 (64 hex digits)"
        )
    return sha


@dataclass(frozen=True)
class Limits:
    """The queue's bounds (the ``review_*`` settings)."""

    max_items: int
    max_bytes: int
    max_age: timedelta
    max_photo_bytes: int

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.review_max_items, s.review_max_bytes, timedelta(days=s.review_max_age_days), s.review_max_photo_bytes)


@dataclass(frozen=True)
class Item:
    """One queued photo: the head's answer when it was (last) sampled."""

    sha256: str
    label: str
    confidence: float
    margin: float
    probabilities: dict[str, float]
    familiarity: float | None
    in_distribution: bool | None
    reason: str
    version: int
    queued_at: str
    last_seen_at: str
    seen: int
    bytes: int

    @classmethod
    def parse(cls, sha: str, doc: Any) -> Item:
        """An entry of ``queue.json`` (``ValueError``/``KeyError``/``TypeError`` when it does not parse)."""
        if not isinstance(doc, dict) or not SHA256.fullmatch(sha):
            raise ValueError("not an item")
        proba = doc["probabilities"]
        if not isinstance(proba, dict):
            raise ValueError("probabilities")
        fam, ind = doc.get("familiarity"), doc.get("in_distribution")
        item = cls(
            sha, str(doc["label"]), float(doc["confidence"]), float(doc["margin"]),
            {str(k): float(v) for k, v in proba.items()}, None if fam is None else float(fam),
            None if ind is None else bool(ind), str(doc["reason"]), int(doc["version"]),
            str(doc["queued_at"]), str(doc.get("last_seen_at", doc["queued_at"])), int(doc.get("seen", 1)), int(doc["bytes"]),
        )  # fmt: skip
        item.queued()  # the time parses
        if item.bytes < 0:
            raise ValueError("bytes")
        return item

    def queued(self) -> datetime:
        t = datetime.fromisoformat(self.queued_at)
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        del out["sha256"]
        return out

    @property
    def unfamiliar(self) -> bool:
        return self.in_distribution is False


def most_useful_first(items: list[Item]) -> list[Item]:
    """Unfamiliar answers first (least familiar first), then by margin (smallest first); newest first on ties."""
    by_time = sorted(items, key=lambda i: i.queued_at, reverse=True)
    return sorted(by_time, key=lambda i: (not i.unfamiliar, (i.familiarity or 0.0) if i.unfamiliar else i.margin))


class ReviewQueue:
    """The review queue of one head (see the module docstring)."""

    def __init__(self, heads: HeadStore, head: str, limits: Limits) -> None:
        self.head = valid_head_name(head)
        self.folder = heads.review_dir(self.head)
        self.spool = heads.spool
        self.limits = limits

    def path(self, sha: str) -> Path:
        return self.folder / OBJECTS / sha[:2] / sha

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with locked(self.folder):
            yield

    # --- reading ---------------------------------------------------------------------------
    def _read(self) -> tuple[dict[str, Item], int]:
        """The parsed items and how many entries did not parse (skipped)."""
        path = self.folder / QUEUE
        if not path.exists():
            return {}, 0
        try:
            doc = read_json(path).get("items")
        except ArtifactError as exc:
            log.warning("review queue of %s: %s; starting it again", self.head, exc.message)
            return {}, 1
        if not isinstance(doc, dict):
            return {}, 1
        items, bad = {}, 0
        for sha, entry in doc.items():
            try:
                items[sha] = Item.parse(str(sha), entry)
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            log.warning("review queue of %s: %d entries of %s do not parse; skipped", self.head, bad, QUEUE)
        return items, bad

    def items(self) -> tuple[list[Item], Counter[str]]:
        """Every queued photo, most useful first, after retention ran; and what retention removed."""
        if not (self.folder / QUEUE).exists():
            return [], Counter()
        with self._locked():
            items, gone = self._pruned(_now())
        return most_useful_first(list(items.values())), gone

    def get(self, sha: str) -> Item:
        item = self._read()[0].get(valid_sha(sha))
        if item is None:
            raise ReviewItemNotFound(
                f"head {self.head!r} has no photo {sha[:12]}… in its review queue (labelled, dismissed or gone)"
            )
        return item

    def photo(self, sha: str) -> bytes:
        """The photo's bytes, capped and checked against their sha256."""
        item = self.get(sha)
        try:
            data = read_regular(self.path(item.sha256), self.limits.max_photo_bytes)
        except FileNotFoundError:
            raise ReviewItemNotFound(f"head {self.head!r}: the photo of review item {sha[:12]}… is gone") from None
        if sha256_bytes(data) != item.sha256:
            raise ArtifactError(f"head {self.head!r}: review photo {sha[:12]}… does not match its sha256; refusing to use it")
        return data

    def size(self) -> tuple[int, int]:
        items = self._read()[0]
        return len(items), sum(i.bytes for i in items.values())

    # --- writing (callers hold the lock) ----------------------------------------------------
    def _write(self, items: dict[str, Item]) -> None:
        write_json(self.folder / QUEUE, {"items": {sha: items[sha].record() for sha in sorted(items)}})

    def _drop(self, sha: str) -> None:
        self.path(sha).unlink(missing_ok=True)

    def _pruned(self, now: datetime) -> tuple[dict[str, Item], Counter[str]]:
        """The items retention keeps, written back (with the photos that left deleted) when any left."""
        items, bad = self._read()
        gone: Counter[str] = Counter()
        oldest = now - self.limits.max_age
        for sha in [s for s, i in items.items() if i.queued() < oldest]:
            del items[sha]
            self._drop(sha)
            gone["expired"] += 1
        order = sorted(items.values(), key=lambda i: (i.queued_at, i.sha256))
        total = sum(i.bytes for i in order)
        while order and (len(order) > self.limits.max_items or total > self.limits.max_bytes):
            old = order.pop(0)
            total -= old.bytes
            del items[old.sha256]
            self._drop(old.sha256)
            gone["evicted"] += 1
        if gone or bad:
            self._write(items)
        return items, gone

    def prune(self) -> Counter[str]:
        """Enforce retention now (also done by every write and listing); what left, by reason."""
        if not (self.folder / QUEUE).exists():
            return Counter()
        with self._locked():
            return self._pruned(_now())[1]

    def add(self, item: Item, data: bytes, known: set[str] | None = None) -> tuple[str, Counter[str]]:
        """Queue ``data`` with its answer: the outcome (``queued``, ``again``: those bytes are queued already and
        get this answer; ``known``: they are an example already; ``too_large``) and what retention removed."""
        if len(data) > min(self.limits.max_photo_bytes, self.limits.max_bytes):
            return "too_large", Counter()
        if known is not None and item.sha256 in known:
            return "known", Counter()
        with self._locked():
            items, _ = self._read()
            old = items.get(item.sha256)
            if old is not None:
                items[item.sha256] = replace(item, queued_at=old.queued_at, seen=old.seen + 1)
                outcome = "again"
            else:
                path = self.path(item.sha256)
                if not path.is_file() or path.stat().st_size != len(data):
                    atomic_write(path, data)
                items[item.sha256] = item
                outcome = "queued"
            self._write(items)
            _, gone = self._pruned(_now())
        return outcome, gone

    def remove(self, sha: str) -> Item:
        """Dismiss: the item leaves the queue and its photo is deleted."""
        valid_sha(sha)
        with self._locked():
            items, _ = self._read()
            item = items.pop(sha, None)
            if item is None:
                raise ReviewItemNotFound(
                    f"head {self.head!r} has no photo {sha[:12]}… in its review queue (labelled, dismissed or gone)"
                )
            self._write(items)
            self._drop(sha)
        return item

    def label(self, sha: str, label: str, examples: ExampleStore) -> tuple[Item, Snapshot]:
        """Move the photo into ``examples`` under ``label`` (a photo already there is relabelled), then out of
        the queue. Under the queue's lock, so two people labelling one photo cannot both move it."""

        valid_label(label, "review label")
        with self._locked():
            data = self.photo(sha)
            self.spool.mkdir(parents=True, exist_ok=True)
            spooled = self.spool / f"review-{sha}-{threading.get_ident()}"
            atomic_write(spooled, data)
            try:
                snap = examples.add([Incoming(spooled, label, f"review-{sha[:12]}")])
            finally:
                spooled.unlink(missing_ok=True)
            items, _ = self._read()
            item = items.pop(sha)
            self._write(items)
            self._drop(sha)
        return item, snap


@dataclass(frozen=True)
class _Pending:
    head: str
    item: Item
    data: bytes


class Sampler:
    """The service's side of the queue: picks answers on the request path (cheap, never blocking) and writes
    them in one thread. One per :class:`app.serving.service.Service`."""

    def __init__(self, settings: Settings, heads: HeadStore, metrics: Metrics) -> None:
        self.settings = settings
        self.heads = heads
        self.metrics = metrics
        self.enabled = settings.review_head_names
        self.limits = Limits.from_settings(settings)
        self._pending: queue.Queue[_Pending | None] = queue.Queue(maxsize=settings.review_pending)
        self._thread: threading.Thread | None = None
        self._random = random.Random()  # noqa: S311 - sampling, not secrets

    def queue(self, head: str) -> ReviewQueue:
        return ReviewQueue(self.heads, head, self.limits)

    def start(self) -> None:
        """Start the writer thread (it enforces retention on every queue in the store first)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="review-writer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Let the writer finish what is pending (up to ``timeout``), then stop it."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._pending.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None

    def offer(self, head_name: str, version: int, result: InferResult) -> int:
        """Sample this request's answers for ``head_name``'s queue; how many photos were handed to the writer.
        On the event loop: a few numpy operations, and a copy of each sampled photo's bytes."""
        proba = result.proba
        if head_name not in self.enabled or proba is None or not len(proba) or result.head is None:
            return 0
        ranked = np.sort(proba, axis=1)
        confidence = ranked[:, -1]
        margin = confidence - (ranked[:, -2] if proba.shape[1] > 1 else 0.0)
        verdicts = result.in_distribution
        unfamiliar = ~verdicts if verdicts is not None else np.zeros(len(proba), bool)
        candidate = (confidence < self.settings.review_confidence) | unfamiliar
        if not candidate.any():
            return 0
        h = self.metrics.head_label(head_name)
        classes, now, handed = result.head.classes, _iso(_now()), 0
        for _, decoded, row in result.rows():
            if row is None or not candidate[row] or self._random.random() >= self.settings.review_sample_rate:
                continue
            data = decoded.item.data
            if len(data) > self.limits.max_photo_bytes:
                self.metrics.review_sampled.labels(h, "too_large").inc()
                continue
            photo = bytes(data)
            best = int(proba[row].argmax())
            familiarity = None if result.familiarity is None else round(float(result.familiarity[row]), 6)
            item = Item(
                sha256_bytes(photo), str(classes[best]), round(float(confidence[row]), 6), round(float(margin[row]), 6),
                {str(c): round(float(p), 6) for c, p in zip(classes, proba[row], strict=True)}, familiarity,
                None if verdicts is None else bool(verdicts[row]), UNFAMILIAR if unfamiliar[row] else LOW_CONFIDENCE,
                version, now, now, 1, len(photo),
            )  # fmt: skip
            try:
                self._pending.put_nowait(_Pending(head_name, item, photo))
            except queue.Full:
                self.metrics.review_sampled.labels(h, "dropped_full").inc()
                continue
            handed += 1
        self.metrics.review_pending.set(self._pending.qsize())
        return handed

    def observe(self, head: str, gone: Mapping[str, int] | None = None, size: tuple[int, int] | None = None) -> None:
        h = self.metrics.head_label(head)
        for outcome, n in (gone or {}).items():
            self.metrics.review_outcomes.labels(h, outcome).inc(n)
        if size is not None:
            self.metrics.review_items.labels(h).set(size[0])
            self.metrics.review_bytes.labels(h).set(size[1])

    def _run(self) -> None:
        self._sweep()
        while True:
            job = self._pending.get()
            self.metrics.review_pending.set(self._pending.qsize())
            if job is None:
                return
            h = self.metrics.head_label(job.head)
            try:
                q = self.queue(job.head)
                known = set(ExampleStore(self.heads, job.head).snapshot().examples)
                outcome, gone = q.add(job.item, job.data, known)
                self.metrics.review_sampled.labels(h, outcome).inc()
                self.observe(job.head, gone, q.size())
            except (OSError, TlserveError) as exc:
                self.metrics.review_sampled.labels(h, "failed").inc()
                log.error("review queue of %s: a sampled photo was not stored: %s", job.head, exc)
            except Exception:  # the writer thread never dies: the next photo gets its chance
                self.metrics.review_sampled.labels(h, "failed").inc()
                log.exception("review queue of %s: a sampled photo was not stored", job.head)

    def _sweep(self) -> None:
        """Retention on every head's queue, on or off (a head taken out of ``review_heads`` keeps its limits)."""
        if not self.heads.root.is_dir():
            return
        for folder in sorted(self.heads.root.iterdir()):
            with contextlib.suppress(TlserveError):
                if not (self.heads.review_dir(folder.name) / QUEUE).is_file():
                    continue
                try:
                    q = self.queue(folder.name)
                    self.observe(folder.name, q.prune(), q.size())
                except (OSError, TlserveError) as exc:
                    log.error("review queue of %s: retention failed: %s", folder.name, exc)
