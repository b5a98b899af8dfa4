"""Training jobs' records: one JSON file per job in the shared store, and the reports they carry.

**Records** are JSON files, one per job, in the shared store (``model_store/heads/.jobs/<id>.json``,
replaced atomically: tmp + fsync + rename), so ``GET /v1/jobs/{id}`` answers the same on every replica
that shares the store. The replica running a job rewrites its record at every state change and every
``job_heartbeat_s`` (``heartbeat_at``, progress). Any replica reading a ``queued``/``running`` record
whose heartbeat is :data:`STALE_BEATS` beats old reports it ``failed`` with ``replica_lost`` (and writes
that down): a job whose replica died is never left "running" forever. If that replica had committed
the job's version before it died (a card naming the job), the record says ``succeeded`` instead.
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core import calibration
from app.core.errors import JobNotFound, TlserveError
from app.storage.card import Card
from app.storage.files import read_json, write_json
from app.storage.registry import HeadStore, Version

STALE_BEATS = 5
STATES = ("queued", "running", "succeeded", "failed")
_JOB_ID = re.compile(r"[0-9a-f]{32}")  # fullmatch: "$" would accept a trailing newline


def now() -> datetime:
    return datetime.now(UTC)


def iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


# --- reports ---------------------------------------------------------------------------------
def report_dict(metrics: dict[str, Any], n_train: int | None) -> dict[str, Any]:
    """The HTTP shape of a validation report (``Report.as_dict()`` or a card's ``metrics``)."""
    per_class = {
        str(label): {"precision": float(v.get("precision", 0.0)), "recall": float(v.get("recall", 0.0)),
                     "f1": float(v.get("f1-score", v.get("f1", 0.0))), "support": int(v.get("support", 0))}
        for label, v in (metrics.get("per_class") or {}).items()
    }  # fmt: skip
    return {"accuracy": float(metrics.get("accuracy", 0.0)), "classes": [str(c) for c in metrics.get("classes", [])],
            "confusion_matrix": metrics.get("confusion_matrix", []), "per_class": per_class,
            "n_train": n_train, "n_val": int(metrics.get("n", 0))}  # fmt: skip


def card_report(card: Card) -> dict[str, Any] | None:
    """A version's validation report, from its card (None for a card without metrics)."""
    if card.metrics is None or card.metrics.accuracy is None:
        return None
    return calibrated(report_dict(card.metrics.model_dump(), card.training.n_train), card)


def calibrated(report: dict[str, Any], card: Card) -> dict[str, Any]:
    """``report`` with the card's out-of-fold calibration (ECE, reliability diagram: :mod:`app.core.calibration`), if any."""
    if (section := calibration.report_section(card.calibration)) is not None:
        report["calibration"] = section
    return report


# --- the record store ------------------------------------------------------------------------
class JobStore:
    """Job records in ``<heads>/.jobs/`` (see the module docstring)."""

    def __init__(self, heads: HeadStore) -> None:
        self.heads = heads
        self.root = heads.jobs_dir

    def path(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):
            raise JobNotFound(f"no training job {job_id[:40]!r} (job ids are 32 hex digits)")
        return self.root / f"{job_id}.json"

    def write(self, record: dict[str, Any]) -> None:
        write_json(self.path(record["id"]), record)

    def read(self, job_id: str) -> dict[str, Any]:
        path = self.path(job_id)
        if not path.exists():
            raise JobNotFound(f"no training job {job_id!r} in the shared store")
        return read_json(path)

    def get(self, job_id: str) -> dict[str, Any]:
        """The record, with a dead replica's job reported as it ended (see :meth:`settle`)."""
        return self.settle(self.read(job_id))

    def list(self, head: str | None = None) -> list[dict[str, Any]]:
        records = []
        with contextlib.suppress(OSError):
            for path in self.root.glob("*.json"):
                with contextlib.suppress(TlserveError):
                    record = read_json(path)
                    if head is None or record.get("head") == head:
                        records.append(self.settle(record))
        return sorted(records, key=lambda r: str(r.get("created_at")), reverse=True)

    def settle(self, record: dict[str, Any]) -> dict[str, Any]:
        """A ``queued``/``running`` record whose heartbeat is :data:`STALE_BEATS` beats old: its replica is
        gone. Reported (and written) ``succeeded`` if a committed version names the job, else ``failed``."""
        if record.get("state") not in ("queued", "running"):
            return record
        beat = float(record.get("heartbeat_s") or 1.0)
        try:
            age = (now() - datetime.fromisoformat(str(record["heartbeat_at"]))).total_seconds()
        except (KeyError, ValueError):
            age = float("inf")
        if age < STALE_BEATS * beat:
            return record
        record = dict(record)
        committed = self._committed(record)
        if committed is not None:
            record.update(state="succeeded", version=committed.version, report=card_report(committed.info), error=None,
                          promoted=self._is_current(committed))  # fmt: skip
        else:
            record.update(state="failed", error={"code": "replica_lost", "message": (
                f"replica {record.get('replica')} stopped updating this job at {record.get('heartbeat_at')} (no heartbeat for "
                f"{age:.0f} s, {STALE_BEATS} beats of {beat:g} s): it was stopped or died. No version was written; submit "
                "the training again (its photos are in the head's example store)")})  # fmt: skip
        record["updated_at"] = iso(now())
        with contextlib.suppress(OSError, TlserveError):
            self.write(record)
        return record

    def _committed(self, record: dict[str, Any]) -> Version | None:
        with contextlib.suppress(TlserveError, OSError):
            for v in reversed(self.heads.versions(str(record["head"]))):
                version = self.heads.get(str(record["head"]), v)
                if version.info.job_id == record["id"]:
                    return version
        return None

    def _is_current(self, version: Version) -> bool:
        with contextlib.suppress(TlserveError, OSError):
            return self.heads.current_version(version.name) == version.version
        return False
