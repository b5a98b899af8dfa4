"""Heads on an object store (``head_store = s3://bucket/prefix``), served from a local mirror.

Layout on the store (keys under the prefix)::

    heads/<name>/<version>/<file>      a version's artifacts, written first
    heads/<name>/<version>/card.json   written last: the commit point (a version without it is invisible)
    heads/<name>/current               the served version's id, moved by compare-and-swap on its ETag
    heads/<name>/.claims/<version>     created with ``If-None-Match: *`` to allocate the id; never deleted,
                                       so an id is never reused (not even after its version is deleted)

:class:`MirroredHeadStore` is a :class:`app.storage.registry.HeadStore` whose folder is this replica's **mirror**
(``head_cache_dir``): :meth:`~MirroredHeadStore.refresh` copies committed versions (their files, then
their card) and ``current`` into it, and every read — :func:`app.storage.registry.load_version`'s signature and
sha256 checks included — runs on the mirror exactly as on a local store. So a request never waits for the
object store, and what is served is verified where it is read. The poller calls ``refresh`` first; while
the store is unreachable the mirror keeps serving the last verified heads, :attr:`stale_since` says since
when (a log line when it starts and ends, the ``tlserve_store_stale_seconds`` metric), and every write
raises :class:`app.core.errors.StoreUnavailable` (503 + ``Retry-After``) before anything is committed.

Writes go to the object store first and then into the mirror; no lock spans replicas: the version id is a
create-only claim and ``current`` a compare-and-swap, so two replicas writing at once never lose an update
or overwrite a version. Each replica has its own mirror folder (one folder shared by replicas on one host
works too: its updates are ``flock``'ed). Example stores, job records and the upload spool stay in the
mirror folder (local to the replica) for now.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.errors import ArtifactError, StoreUnavailable, VersionConflict, VersionNotFound
from app.core.hashing import sha256_bytes
from app.core.names import HEAD_NAME, valid_head_name
from app.storage.card import Card
from app.storage.files import atomic_write, locked
from app.storage.heads import MAX_PICKLE_BYTES
from app.storage.objectstore import ObjectStore
from app.storage.registry import (
    _MAX_CARD_BYTES,
    _MAX_CURRENT_BYTES,
    _VERSION_DIR,
    CARD,
    CURRENT,
    HEADS,
    SCHEMA,
    HeadKeys,
    HeadStore,
    Version,
    valid_artifact_name,
)

log = logging.getLogger(__name__)

CLAIMS = ".claims"
MIRROR_LOCK = ".mirror.lock"
MAX_SWAP_TRIES = 64
"""Compare-and-swap rounds one promotion makes against writers that keep winning, before a VersionConflict."""


@dataclass
class Remote:
    """One head as the object store holds it: committed versions, every id in use, the ``current`` pointer."""

    files: dict[int, list[str]] = field(default_factory=dict)  # version -> its keys' file names (card included)
    claims: set[int] = field(default_factory=set)
    current: bytes | None = None
    current_etag: str | None = None

    @property
    def committed(self) -> list[int]:
        return sorted(v for v, files in self.files.items() if CARD in files)

    @property
    def used(self) -> set[int]:
        return set(self.files) | self.claims

    def current_version(self) -> int | None:
        """What ``current`` names (None when absent or not a committed version: the highest is served)."""
        text = (self.current or b"").decode("ascii", "replace").strip()
        if _VERSION_DIR.fullmatch(text) and int(text) in self.committed:
            return int(text)
        return None

    def served(self) -> int | None:
        committed = self.committed
        return self.current_version() or (committed[-1] if committed else None)


class MirroredHeadStore(HeadStore):
    """A head store on ``objects`` (see the module docstring), read from the mirror folder ``root``."""

    def __init__(self, root: Path, keys: HeadKeys, objects: ObjectStore, *, spool: Path | None = None) -> None:
        super().__init__(root, keys, spool=spool)
        self.objects = objects
        self.stale_since: float | None = None  # time.time() of the first failed refresh since the last good one

    @property
    def location(self) -> str:
        return f"{self.objects.url}/{HEADS}"

    # --- the object store's view -------------------------------------------------------------
    def _key(self, name: str, *parts: str) -> str:
        return "/".join((HEADS, valid_head_name(name), *parts))

    def _remote(self, name: str) -> Remote:
        remote = Remote()
        base = self._key(name) + "/"
        for key in self.objects.keys(base):
            parts = key[len(base) :].split("/")
            if len(parts) == 2 and parts[0] == CLAIMS and _VERSION_DIR.fullmatch(parts[1]):
                remote.claims.add(int(parts[1]))
            elif len(parts) == 2 and _VERSION_DIR.fullmatch(parts[0]):
                remote.files.setdefault(int(parts[0]), []).append(parts[1])
        got = self.objects.get(self._key(name, CURRENT), _MAX_CURRENT_BYTES)
        if got is not None:
            remote.current, remote.current_etag = got.data, got.etag
        return remote

    def remote_names(self) -> list[str]:
        return [n for n in self.objects.children(HEADS + "/") if HEAD_NAME.fullmatch(n) and ".." not in n]

    # --- the mirror --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _mirror_locked(self) -> Iterator[None]:
        with locked(self.root, MIRROR_LOCK):
            yield

    def refresh(self) -> bool:
        """Bring the mirror up to the object store (every head); False, and :attr:`stale_since` set, when the
        store cannot be reached (the mirror is left as it was: still served)."""
        try:
            remote_names = self.remote_names()
            with self._mirror_locked():
                for name in sorted(set(remote_names) | set(self._mirrored_names())):
                    self._pull_locked(name, self._remote(name) if name in remote_names else Remote())
        except StoreUnavailable as exc:
            if self.stale_since is None:
                self.stale_since = time.time()
                log.warning("head store stale since %s: %s; serving the last verified heads from %s",
                            _iso(self.stale_since), exc.message, self.root)  # fmt: skip
            return False
        if self.stale_since is not None:
            log.warning("head store %s reachable again after %.0f s stale", self.location, time.time() - self.stale_since)
            self.stale_since = None
        return True

    def stale_seconds(self) -> float:
        return 0.0 if self.stale_since is None else time.time() - self.stale_since

    def _mirrored_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if HEAD_NAME.fullmatch(p.name) and p.is_dir()]

    def _pull(self, name: str) -> None:
        with self._mirror_locked():
            self._pull_locked(name, self._remote(name))

    def _pull_locked(self, name: str, remote: Remote) -> None:
        folder = self.folder(name)
        committed = set(remote.committed)
        for version, path in list(self._version_dirs(folder)):
            if version not in committed:
                (path / CARD).unlink(missing_ok=True)  # uncommit first, as a local delete does
                shutil.rmtree(path, ignore_errors=True)
        have = {v for v, _ in self._version_dirs(folder)}
        for version in sorted(committed - have):
            self._download(name, version, remote.files[version])
        if remote.current is None:
            (folder / CURRENT).unlink(missing_ok=True)
        elif not (folder / CURRENT).is_file() or (folder / CURRENT).read_bytes() != remote.current:
            atomic_write(folder / CURRENT, remote.current)

    def _download(self, name: str, version: int, present: list[str]) -> None:
        """A committed version into the mirror: the files its card lists, then the card. A file the card names
        that is absent or of another sha256 leaves the version uncommitted here (logged; tried at the next
        refresh). What is written is read and verified again by every load, as on a local store."""
        where = f"head {name!r} version {version} on {self.location}"
        got = self.objects.get(self._key(name, str(version), CARD), _MAX_CARD_BYTES)
        if got is None:
            return
        try:
            artifacts = json.loads(got.data).get("artifacts") or {}
            files = {valid_artifact_name(f): str(sha) for f, sha in dict(artifacts).items()}
        except (ValueError, TypeError, AttributeError, ArtifactError) as exc:
            log.warning("%s: card unreadable (%s); mirrored as it is, refused where it is loaded", where, exc)
            files = {}
        blobs: dict[str, bytes] = {}
        for file, sha in files.items():
            blob = self.objects.get(self._key(name, str(version), file), MAX_PICKLE_BYTES) if file in present else None
            if blob is None or sha256_bytes(blob.data) != sha:
                log.warning("%s: %s is %s; not mirrored", where, file, "missing" if blob is None else "not what its card says")
                return
            blobs[file] = blob.data
        target = self.folder(name) / str(version)
        for file, data in blobs.items():
            atomic_write(target / file, data)
        atomic_write(target / CARD, got.data)

    # --- writing: the object store first, then the mirror --------------------------------------
    def save(self, name: str, files: dict[str, bytes], card: dict[str, Any], *, promote: bool = True) -> Version:
        """A new immutable version: an id claimed create-only, its files, its card (the commit point), then
        with ``promote`` a compare-and-swap of ``current``."""
        for file in files:
            valid_artifact_name(file)
        Card.parse({**card, "schema": SCHEMA}, f"head {name!r}'s new version")
        remote = self._remote(name)
        served = remote.served()
        if not promote and served is not None and remote.current is None:
            self.objects.swap(self._key(name, CURRENT), f"{served}\n".encode(), None)  # "no pointer: the highest" must not move
        version = max([0, *remote.used]) + 1
        while not self.objects.create(self._key(name, CLAIMS, str(version)), b""):
            version += 1  # another writer claimed it first
        artifacts = {}
        for file, data in files.items():
            self.objects.put(self._key(name, str(version), file), data)
            artifacts[file] = sha256_bytes(data)
        full = self.committed_card(card, name, version, artifacts)
        body = (json.dumps(full, indent=2, sort_keys=True) + "\n").encode()
        if not self.objects.create(self._key(name, str(version), CARD), body):
            raise VersionConflict(f"head {name!r} version {version} was committed by another writer; nothing changed")
        if promote:
            self.promote(name, version)
        else:
            self._pull_quietly(name)
        return Version(name, version, self.folder(name) / str(version), full)  # mirrored unless the store just went away

    def _pull_quietly(self, name: str) -> None:
        """After a committed write: the mirror catches up now, or at the next refresh if the store just went away."""
        try:
            self._pull(name)
        except StoreUnavailable as exc:
            log.warning("head %s: written to %s but not yet mirrored (%s)", name, self.location, exc.message)

    def promote(self, name: str, version: int, *, expected: int | None = None) -> None:
        """Make ``version`` current by compare-and-swap on ``current``'s ETag; with ``expected``, only if the
        served version is still that one (a VersionConflict otherwise, nothing changed)."""
        for _ in range(MAX_SWAP_TRIES):
            remote = self._remote(name)
            committed = remote.committed
            if not committed:
                raise self._unknown(name)
            if version not in committed:
                raise VersionNotFound(f"head {name!r} has no version {version} (versions: {', '.join(map(str, committed))})")
            now = remote.served()
            if expected is not None and now != expected:
                raise VersionConflict(f"head {name!r}: current version is {now}, not {expected}; nothing changed")
            if self.objects.swap(self._key(name, CURRENT), f"{version}\n".encode(), remote.current_etag):
                self._pull_quietly(name)
                return
        raise VersionConflict(f"head {name!r}: {MAX_SWAP_TRIES} promotions by other writers won first; nothing changed")

    def rollback(self, name: str) -> int:
        remote = self._remote(name)
        current = remote.served()
        if current is None:
            raise self._unknown(name)
        older = [v for v in remote.committed if v < current]
        if not older:
            raise VersionNotFound(f"head {name!r}: version {current} is the oldest; there is nothing to roll back to")
        self.promote(name, older[-1], expected=current)
        return older[-1]

    def delete_version(self, name: str, version: int) -> None:
        """Remove a version that is not current: its card first (it stops being committed), then its files."""
        remote = self._remote(name)
        if version not in remote.committed:
            raise VersionNotFound(f"head {name!r} has no version {version}")
        if version == remote.served():
            raise VersionConflict(f"head {name!r}: version {version} is current; promote another one first")
        self.objects.delete(self._key(name, str(version), CARD))
        for file in remote.files[version]:
            if file != CARD:
                self.objects.delete(self._key(name, str(version), file))
        self._pull_quietly(name)

    def delete(self, name: str) -> None:
        """Every version of ``name`` (cards first) and its pointer; the claims stay, so ids are never reused."""
        remote = self._remote(name)
        if not remote.committed:
            raise self._unknown(name)
        for version in remote.committed:
            self.objects.delete(self._key(name, str(version), CARD))
        for version, files in remote.files.items():
            for file in files:
                self.objects.delete(self._key(name, str(version), file))
        self.objects.delete(self._key(name, CURRENT))
        self._pull_quietly(name)

    def migrate(self, name: str) -> bool:
        """Flat heads (from before versions) exist only in local stores."""
        return False


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
