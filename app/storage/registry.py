"""The head store on disk and the registry of served heads: the only code that reads or writes ``heads/``.

Layout (card schema 2)::

    model_store/heads/<name>/
        current                    the served version's id ("3"), replaced atomically; absent: the highest version
        .lock                      flock'ed while a version id is allocated or ``current`` is swapped
        <version>/                 one immutable version; ids 1, 2, 3, … allocated by an atomic mkdir
            head-<sha12>.pkl       the pickled estimator (interchange: what scikit-learn users load)
            head_coef.npy, …       the estimator's arrays (:data:`app.storage.heads.ARRAY_FILES`): what is served;
                                   a version without them (written before them) is served from its pickle
            confusion_matrix.png   …and any other file of the version
            card.json              written last and atomically: the commit point. ``schema``: 2,
                                   ``name``, ``version``, ``artifacts`` {file: sha256} listing every other file
        card.json, head-*.pkl      a flat head from before versions: read as version 1 (by :meth:`HeadStore.get`
                                   alone), never rewritten; ``tlserve heads migrate`` moves it to ``1/``
        examples/                  the head's example store (:mod:`app.storage.examples`), not a version
        review/                    the head's review queue from production (:mod:`app.serving.review`), not a version
    model_store/heads/.jobs/, .spool/   training jobs' records (:mod:`app.learning.jobs`) and uploads being checked
                                   (:mod:`app.learning.uploads`): not heads (a head name never starts with '.')

:class:`HeadStore` owns this tree: every path under ``heads/`` is one of its properties or methods, and
product code gets it in one way only, ``ModelStore.open(settings).heads`` (:mod:`app.storage.store`), so a store
never reads heads without the verify keys that are configured.

A version folder without ``card.json`` is a training that did not finish (or is still running):
it is invisible. Every file is checked against the card's ``artifacts`` before it is used, and the
card's ``name`` and ``version`` (signed with it) against the folder it is in: a version copied to
another head or another version number is refused (``head_misplaced``). Files are read by
:func:`app.storage.store.read_regular`: regular files only, never through a link, never past their cap.

:class:`HeadRegistry` holds the heads a service serves (the
current version of each, verified and loaded), the exception each refused head got, and the
poller that picks up new, promoted and deleted versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.core.errors import (
    ArtifactError,
    HeadNotFound,
    IncompatibleHead,
    Int8Mismatch,
    MisplacedHead,
    TlserveError,
    VersionConflict,
    VersionNotFound,
)
from app.core.hashing import sha256_bytes
from app.core.names import HEAD_NAME, valid_head_name
from app.core.settings import Settings
from app.core.signing import load_private_key, load_public_keys, sign, verify
from app.storage.card import Card
from app.storage.files import atomic_write, locked, read_json, read_regular, write_json
from app.storage.heads import (
    ARRAY_FILES,
    MAX_PICKLE_BYTES,
    Head,
    build_head,
    dump_estimator,
    estimator_files,
    from_arrays,
    from_pickle,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

HEADS = "heads"
CARD = "card.json"
CURRENT = "current"
LOCK = ".lock"
EXAMPLES = "examples"
REVIEW = "review"
JOBS = ".jobs"
SPOOL = ".spool"
SCHEMA = 2
LEGACY_VERSION = 1
_VERSION_DIR = re.compile(r"[1-9][0-9]{0,8}")
_ARTIFACT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_CURRENT_BYTES = 64
_MAX_CARD_BYTES = 64 * 1024 * 1024


def valid_artifact_name(file: str) -> str:
    if not _ARTIFACT.fullmatch(file) or ".." in file or file == CARD:
        raise ArtifactError(f"invalid artifact file name {file[:80]!r}")
    return file


@dataclass(frozen=True)
class Version:
    """One committed version of a head: where it lives and what its card says. ``card`` is the JSON
    object as written (what a signature covers); :attr:`info` is the same card, typed."""

    name: str
    version: int
    folder: Path
    card: dict[str, Any]

    @property
    def where(self) -> str:
        return f"head {self.name!r} version {self.version}"

    @cached_property
    def info(self) -> Card:
        """The typed card (an :class:`ArtifactError` naming the field when it does not parse)."""
        return Card.parse(self.card, self.where)

    @property
    def legacy(self) -> bool:
        return self.info.legacy

    @property
    def artifacts(self) -> dict[str, str]:
        """file → sha256 of every file of this version (a flat head's card lists only its pickle)."""
        info = self.info
        if info.legacy:
            return {info.pickle: info.pickle_sha256}
        if info.artifacts is None:
            raise ArtifactError(f"{self.where}: card has no artifacts map")
        return dict(info.artifacts)

    def read(self, file: str, max_bytes: int = MAX_PICKLE_BYTES) -> bytes:
        """An artifact's bytes, checked against the card before they are used."""
        where = self.where
        expected = self.artifacts.get(file)
        if expected is None or "/" in file or not file:
            raise ArtifactError(f"{where}: card names an invalid or unlisted file {file[:80]!r}")
        try:
            data = read_regular(self.folder / file, max_bytes)
        except FileNotFoundError:
            raise ArtifactError(f"{where}: {file} is missing") from None
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc.message}") from None
        actual = sha256_bytes(data)
        if actual != expected:
            raise ArtifactError(
                f"{where}: {file} sha256 {actual[:12]} does not match its card ({expected[:12]}); "
                f"refusing to {'unpickle' if file.endswith('.pkl') else 'use'} it"
            )
        return data


@dataclass(frozen=True)
class HeadKeys:
    """The keys a head store signs with (trainers) and verifies with (every replica that loads heads)."""

    signing: Ed25519PrivateKey | None = None
    verify: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> HeadKeys:
        signing = load_private_key(settings.head_signing_key) if settings.head_signing_key else None
        return cls(signing, load_public_keys(settings.head_verify_keys))


class HeadStore:
    """The tree under one ``heads/`` folder (see the module docstring). With a signing key every version
    written is signed; with verify keys every load checks it."""

    def __init__(self, root: Path, keys: HeadKeys, *, spool: Path | None = None) -> None:
        self.root = root
        self.keys = keys
        self.spool = spool or root / SPOOL

    stale_since: float | None = None
    """When a store that is copied from elsewhere (:class:`app.storage.mirror.MirroredHeadStore`) was last found
    unreachable; a local folder is never stale."""

    def refresh(self) -> bool:
        """Bring what is read up to the store (a local folder already is); False while it cannot be reached."""
        return True

    @property
    def signing_key(self) -> Ed25519PrivateKey | None:
        return self.keys.signing

    @property
    def verify_keys(self) -> dict[str, Ed25519PublicKey]:
        return self.keys.verify

    @property
    def jobs_dir(self) -> Path:
        """Training jobs' records (:class:`app.learning.jobstore.JobStore`)."""
        return self.root / JOBS

    def examples_dir(self, name: str) -> Path:
        """``name``'s example store (:class:`app.storage.examples.ExampleStore`)."""
        return self.folder(name) / EXAMPLES

    def review_dir(self, name: str) -> Path:
        """``name``'s review queue from production (:class:`app.serving.review.ReviewQueue`)."""
        return self.folder(name) / REVIEW

    # --- reading -----------------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        return self.root / valid_head_name(name)

    def names(self) -> list[str]:
        """Heads with at least one committed version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if HEAD_NAME.fullmatch(p.name) and self._has_versions(p))

    def _has_versions(self, folder: Path) -> bool:
        return self._flat(folder) or any(True for _ in self._version_dirs(folder))

    def _version_dirs(self, folder: Path) -> Iterator[tuple[int, Path]]:
        with contextlib.suppress(OSError):
            for p in folder.iterdir():
                if _VERSION_DIR.fullmatch(p.name) and (p / CARD).is_file():
                    yield int(p.name), p

    def versions(self, name: str) -> list[int]:
        """Committed version ids of ``name``, ascending (a flat head is version 1)."""
        folder = self.folder(name)
        found = {v for v, _ in self._version_dirs(folder)}
        if self._flat(folder):
            found.add(LEGACY_VERSION)
        return sorted(found)

    # --- flat heads (from before versions): the one place that knows them ---------------------------
    @staticmethod
    def _flat(folder: Path) -> bool:
        """A card in the head's own folder: a head from before versions, read as version 1 (its ``1/``
        wins once there is one: :meth:`migrate` writes it)."""
        return (folder / CARD).is_file()

    def _flat_folder(self, name: str, version: int) -> Path | None:
        folder = self.folder(name)
        if version == LEGACY_VERSION and self._flat(folder) and not (folder / str(version) / CARD).is_file():
            return folder
        return None

    def migrate(self, name: str) -> bool:
        """Move a flat head into ``1/`` (its files and card as they are, so a signature still holds):
        the files first, the card last (the commit point: readers see the flat head or ``1/``, never
        neither), then the flat copies go. False when ``name`` is not flat."""
        with self._locked(name) as folder:
            if not self._flat(folder):
                return False
            target = folder / str(LEGACY_VERSION)
            card = read_regular(folder / CARD, _MAX_CARD_BYTES)
            if (target / CARD).is_file():
                if read_regular(target / CARD, _MAX_CARD_BYTES) != card:
                    raise VersionConflict(f"head {name!r} has a flat card and a version 1 that differ; remove one by hand")
            else:
                files = [p for p in folder.iterdir() if p.is_file() and not p.is_symlink()
                         and p.name not in (CARD, CURRENT, LOCK)]  # fmt: skip
                target.mkdir(exist_ok=True)
                for p in files:
                    atomic_write(target / p.name, read_regular(p, MAX_PICKLE_BYTES))
                atomic_write(target / CARD, card)
            if not (folder / CURRENT).exists():
                atomic_write(folder / CURRENT, f"{LEGACY_VERSION}\n".encode())
            for p in [p for p in folder.iterdir() if p.is_file() and p.name not in (CURRENT, LOCK)]:
                if (target / p.name).is_file():
                    p.unlink()
        return True

    def _unknown(self, name: str) -> HeadNotFound:
        return HeadNotFound(f"no head named {name!r} (known: {', '.join(self.names()) or 'none'})")

    def current_version(self, name: str) -> int:
        """The ``current`` pointer, or the highest version when there is none."""
        folder = self.folder(name)
        versions = self.versions(name)
        if not versions:
            raise self._unknown(name)
        try:
            text = read_regular(folder / CURRENT, _MAX_CURRENT_BYTES).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return versions[-1]
        except ArtifactError as exc:
            raise ArtifactError(f"head {name!r}: {exc.message}") from None
        if not _VERSION_DIR.fullmatch(text):
            raise ArtifactError(f"head {name!r}: {CURRENT} holds {text[:20]!r}, not a version id")
        if int(text) not in versions:
            raise ArtifactError(f"head {name!r}: {CURRENT} points to version {text}, which is not committed")
        return int(text)

    def version_folder(self, name: str, version: int) -> Path:
        return self._flat_folder(name, version) or self.folder(name) / str(version)

    def current_folder(self, name: str) -> Path:
        return self.version_folder(name, self.current_version(name))

    def get(self, name: str, version: int | None = None) -> Version:
        """A committed version (default: the current one) with its card; 404 names what exists."""
        versions = self.versions(name)
        if not versions:
            raise self._unknown(name)
        if version is None:
            version = self.current_version(name)
        elif version not in versions:
            raise VersionNotFound(f"head {name!r} has no version {version} (versions: {', '.join(map(str, versions))})")
        folder = self.version_folder(name, version)
        card = read_json(folder / CARD)
        return Version(name, version, folder, card)

    def stamp(self, name: str) -> tuple[object, ...]:
        """Changes whenever what ``get(name)`` returns may have changed (for polling)."""
        folder = self.folder(name)
        parts: list[object] = []
        for path in (folder / CURRENT, folder / CARD):  # CARD: a flat head's
            try:
                st = path.stat()
                parts.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                parts.append(None)
        parts.append(tuple(self.versions(name)))
        return tuple(parts)

    # --- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        folder = self.folder(name)
        with locked(folder, LOCK):
            yield folder

    def save(self, name: str, files: dict[str, bytes], card: dict[str, Any], *, promote: bool = True) -> Version:
        """Write a new immutable version: its files, then its card (the commit point), then, with
        ``promote``, make it current. Version ids never collide, even across replicas sharing the store."""
        for file in files:
            valid_artifact_name(file)
        Card.parse({**card, "schema": SCHEMA}, f"head {name!r}'s new version")  # nothing that would not load is written
        with self._locked(name) as folder:
            served = self.versions(name) and self.current_version(name)
            if not promote and served and not (folder / CURRENT).exists():
                atomic_write(folder / CURRENT, f"{served}\n".encode())  # "no pointer: the highest" must not move
            version = max([0, *self.versions(name), *self._uncommitted(folder)]) + 1
            target = folder / str(version)
            target.mkdir()  # under the lock; an id already on disk (even uncommitted) is never reused
        artifacts = {}
        for file, data in files.items():
            atomic_write(target / file, data)
            artifacts[file] = sha256_bytes(data)
        full = self.committed_card(card, name, version, artifacts)
        write_json(target / CARD, full)
        if promote:
            self.promote(name, version)
        return Version(name, version, target, full)

    def committed_card(self, card: dict[str, Any], name: str, version: int, artifacts: dict[str, str]) -> dict[str, Any]:
        """The card a new version commits: what the trainer wrote plus what the store vouches for (schema, name,
        version, every file's sha256, the time), signed with this store's key where it has one."""
        full = {**card, "schema": SCHEMA, "name": name, "version": version, "artifacts": artifacts,
                "created_at": card.get("created_at") or datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
        full.pop("signature", None)
        return sign(full, self.signing_key) if self.signing_key is not None else full

    def _uncommitted(self, folder: Path) -> list[int]:
        return [int(p.name) for p in folder.iterdir() if _VERSION_DIR.fullmatch(p.name) and p.is_dir()]

    def promote(self, name: str, version: int, *, expected: int | None = None) -> None:
        """Make ``version`` current; with ``expected``, only if the current version is still that
        (compare-and-swap, so two admins promoting at once cannot silently overwrite each other)."""
        with self._locked(name) as folder:
            versions = self.versions(name)
            if version not in versions:
                raise VersionNotFound(f"head {name!r} has no version {version} (versions: {', '.join(map(str, versions))})")
            if expected is not None and (now := self.current_version(name)) != expected:
                raise VersionConflict(f"head {name!r}: current version is {now}, not {expected}; nothing changed")
            atomic_write(folder / CURRENT, f"{version}\n".encode())

    def rollback(self, name: str) -> int:
        """Make the version below the current one current; returns it."""
        current = self.current_version(name)
        older = [v for v in self.versions(name) if v < current]
        if not older:
            raise VersionNotFound(f"head {name!r}: version {current} is the oldest; there is nothing to roll back to")
        self.promote(name, older[-1], expected=current)
        return older[-1]

    def delete_version(self, name: str, version: int) -> None:
        """Remove a version that is not current (the served version cannot be deleted)."""
        with self._locked(name):
            if version not in self.versions(name):
                raise VersionNotFound(f"head {name!r} has no version {version}")
            if version == self.current_version(name):
                raise VersionConflict(f"head {name!r}: version {version} is current; promote another one first")
            if self._flat_folder(name, version) is not None:
                raise VersionConflict(f"head {name!r}: version 1 is a flat head from before versions; delete the head "
                                      "instead, or move it to 1/ with `tlserve heads migrate` first")  # fmt: skip
            folder = self.version_folder(name, version)
            (folder / CARD).unlink()  # uncommit first: readers stop seeing it at once
            shutil.rmtree(folder, ignore_errors=True)

    def delete(self, name: str) -> None:
        folder = self.folder(name)
        if not self.versions(name):
            raise self._unknown(name)
        shutil.rmtree(folder)


def save_head(heads: HeadStore, name: str, estimator: Any, card: dict[str, Any], files: dict[str, bytes] | None = None,
              *, promote: bool = True) -> Version:  # fmt: skip
    """A new version holding ``estimator`` (pickled, named by its sha256 prefix, and its arrays as ``.npy``:
    :data:`app.storage.heads.ARRAY_FILES`, what is served) and ``files``."""
    blob = dump_estimator(estimator)
    sha = sha256_bytes(blob)
    pickle_file = f"head-{sha[:12]}.pkl"
    arrays = estimator_files(estimator)
    card = {**{k: v for k, v in card.items() if k != "arrays"}, "pickle": pickle_file, "pickle_sha256": sha}
    if arrays:
        card["arrays"] = dict(ARRAY_FILES)
    return heads.save(name, {pickle_file: blob, **arrays, **(files or {})}, card, promote=promote)


def check_version(version: Version) -> Head:
    """Everything a load checks but the signature and the extractor (what ``tlserve sign`` vouches for):
    the card in its folder, every artifact's sha256, the estimator; and where the version has arrays,
    that its pickle (safely unpickled) holds the very same arrays."""
    head = load_version(version, None, None)
    if version.info.arrays is not None:
        pickled = from_pickle(version.read(version.info.pickle), version.where)
        for attr in ARRAY_FILES:
            if not np.array_equal(getattr(pickled, attr), getattr(head.estimator, attr)):
                raise ArtifactError(f"{version.where}: its pickle's {attr} differs from {ARRAY_FILES[attr]}")
    for file in version.artifacts:
        version.read(file)
    return head


def copy_version(heads: HeadStore, name: str, version: int | None = None, *, promote: bool = True,
                 note: dict[str, Any] | None = None) -> Version:  # fmt: skip
    """A new version with the files and card of ``version`` (e.g. to sign a head trained before signing
    keys existed, or a flat head), after :func:`check_version`; the source stays as it is. A source
    without ``.npy`` arrays (written before them) gets them, from its safely unpickled estimator."""
    source = heads.get(name, version)
    head = check_version(source)
    files = {f: source.read(f) for f in source.artifacts}
    card = {k: v for k, v in source.card.items() if k not in ("schema", "version", "artifacts", "name", "created_at")}
    if source.info.arrays is None:
        files.update(estimator_files(head.estimator))
        card["arrays"] = dict(ARRAY_FILES)
    return heads.save(name, files, {**card, **(note or {"copied_from": source.version})}, promote=promote)


def check_place(version: Version) -> None:
    """The card names the head and version of the folder it is in (both are in what is signed), so a
    version copied to another name (``cp -r heads/toy/1 heads/triage/7``) or replayed as a newer version is
    refused. A flat card from before versions (no ``schema``) is version 1 and may omit them."""
    info, where = version.info, version.where
    name, number = info.name, info.version
    if not info.legacy and (name is None or number is None):
        raise MisplacedHead(f"{where}: its card does not name its head and version; re-sign it with `tlserve sign`")
    if name is not None and name != version.name:
        raise MisplacedHead(f"{where}: its card is head {str(name)[:80]!r}'s; a version is never served under another name")
    if number is not None and (type(number) is not int or number != version.version):
        raise MisplacedHead(f"{where}: its card is version {str(number)[:20]}'s; a version is never served under another number")


def load_version(version: Version, feature_space: str | None, verify_keys: dict[str, Ed25519PublicKey] | None = None,
                 *, int8: bool = False) -> Head:  # fmt: skip
    """Verified load of one version: signature → card in its folder → extractor fingerprint → artifact
    sha256 → the estimator from its ``.npy`` arrays (or, for a version without them, its safely unpickled pickle)."""
    where = version.where
    verify(version.card, verify_keys or {}, where)
    info = version.info
    check_place(version)
    if "/" in info.pickle or not info.pickle.endswith(".pkl"):
        raise ArtifactError(f"{where}: card names an invalid pickle file")
    if version.artifacts.get(info.pickle) != info.pickle_sha256:
        raise ArtifactError(f"{where}: the card's pickle_sha256 and its artifacts map disagree")
    if feature_space is not None and info.extractor.sha256 != feature_space:
        raise IncompatibleHead(
            f"{where} was trained on extractor {info.extractor.sha256[:12]}{info.extractor.described()}, the loaded "
            f"extractor is {feature_space[:12]}: retrain it with `tlserve train` (features differ between extractors)"
        )
    if int8:
        _check_int8(info, where)
    arrays = None if info.legacy else info.arrays  # a flat card (from before versions) has only its pickle
    if arrays is None:
        estimator = from_pickle(version.read(info.pickle), where)
    elif arrays != ARRAY_FILES:
        raise ArtifactError(f"{where}: card's arrays {str(arrays)[:120]} are not {ARRAY_FILES}")
    else:
        version.read(info.pickle)  # checked against the card like every file it lists, never parsed here
        files = {f: version.read(f) for f in ARRAY_FILES.values()}
        estimator = from_arrays(files, where, c=info.estimator.C)
    return build_head(version.name, version.version, info.classes, estimator, version.card, info.extractor.feature_dim)


def _check_int8(info: Card, where: str) -> None:
    """Served on the INT8 copy: refuse a head whose own check (its card's ``int8``, written when it was trained)
    found its answers on INT8 features below the gate. Refused rather than served on fp32 features: that would
    take a second engine (its memory, its own batches, 3.5x the CPU) for one head; the error names the fixes."""
    check = info.int8
    if check is not None and check.checked and check.passed is False:
        raise Int8Mismatch(
            f"{where} agrees with its fp32 answers on only {check.agreement:.1%} of its {check.images} held-out "
            f"photos on the INT8 extractor (the gate is {check.min_agreement:.1%}): serve it with "
            "TLSERVE_PRECISION=fp32, or retrain it after `tlserve export --calibration-dir DIR` with photos like its own"
        )


def load_head(heads: HeadStore, name: str, feature_space: str | None = None, version: int | None = None,
              *, int8: bool = False) -> Head:  # fmt: skip
    return load_version(heads.get(name, version), feature_space, heads.verify_keys, int8=int8)


class HeadRegistry:
    """The heads one service serves: the current version of each, loaded and verified, and for each
    head that could not be served, the exception it got (re-raised when a request names it)."""

    def __init__(self, store: HeadStore, feature_space: str, *, pinned_cache: int = 4) -> None:
        self.store = store
        self.feature_space = feature_space
        self.int8 = False  # the served extractor is the INT8 copy (set by the service): heads that fail it are refused
        self.heads: dict[str, Head] = {}
        self.errors: dict[str, TlserveError] = {}
        self._stamps: dict[str, tuple[object, ...]] = {}
        self._lock = asyncio.Lock()
        self.pinned_cache = pinned_cache
        self._pinned: OrderedDict[tuple[str, int, str], tuple[tuple[int, int, int], Head]] = OrderedDict()
        self._pinned_lock = threading.Lock()

    def load_all(self) -> None:
        self.store.refresh()  # an unreachable object store: the mirror's last verified heads are served
        for name in self.store.names():
            try:
                self._load(name)
            except TlserveError as exc:
                self.errors[name] = exc
                log.warning("head %s not loaded: %s", name, exc.message)

    def _load(self, name: str) -> Head:
        self._stamps[name] = self.store.stamp(name)
        head = load_head(self.store, name, self.feature_space, int8=self.int8)
        self.heads[name] = head  # one dict assignment: requests see the old or the new head, never a mix
        self.errors.pop(name, None)
        return head

    def get(self, name: str) -> Head:
        name = valid_head_name(name)
        head = self.heads.get(name)
        if head is not None:
            return head
        if name in self.errors:
            raise self.errors[name]
        self.store.get(name)  # raises HeadNotFound with the known names
        raise HeadNotFound(f"head {name!r} exists but is not loaded yet; POST /v1/models/{name}/reload")

    def _card_stamp(self, name: str, version: int) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.store.version_folder(name, version) / CARD, follow_symlinks=False)
        except (OSError, TlserveError):
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def cached_version(self, name: str, version: int) -> Head | None:
        """A pinned version without reading a file: the served one when it is current, or one verified
        earlier whose card is still the same file (one ``stat``); None when it must be loaded."""
        head = self.heads.get(name)
        if head is not None and head.version == version:
            return head
        key = (name, version, self.feature_space)
        with self._pinned_lock:
            entry = self._pinned.get(key)
        if entry is None or entry[0] != self._card_stamp(name, version):
            return None
        with self._pinned_lock:
            if key in self._pinned:
                self._pinned.move_to_end(key)
        return entry[1]

    def get_version(self, name: str, version: int) -> Head:
        """A pinned version: the served one when it is current, one verified earlier (the
        ``pinned_cache`` most recently used are kept, each checked by a ``stat`` of its card), else loaded
        and verified now. Versions are immutable; a card replaced on disk is loaded and verified again."""
        name = valid_head_name(name)
        cached = self.cached_version(name, version)
        if cached is not None:
            return cached
        stamp = self._card_stamp(name, version)
        head = load_head(self.store, name, self.feature_space, version, int8=self.int8)
        if self.pinned_cache > 0 and stamp is not None and stamp == self._card_stamp(name, version):
            key = (name, version, self.feature_space)
            with self._pinned_lock:
                self._pinned[key] = (stamp, head)
                self._pinned.move_to_end(key)
                while len(self._pinned) > self.pinned_cache:
                    self._pinned.popitem(last=False)
        return head

    def error(self, name: str) -> TlserveError | None:
        return self.errors.get(name)

    async def reload(self, name: str) -> Head:
        """Verify and load ``name`` again; on any failure the previous version keeps serving."""
        valid_head_name(name)
        async with self._lock:
            try:
                head = await asyncio.get_running_loop().run_in_executor(None, self._load, name)
            except HeadNotFound:
                self._forget(name)
                raise
            except TlserveError as exc:
                self.errors[name] = exc
                raise
        log.info("head %s version %d loaded (pickle %s)", name, head.version, head.sha256[:12])
        return head

    def _forget(self, name: str) -> None:
        if self.heads.pop(name, None) is not None:
            log.warning("head %s was deleted from the model store: no longer served", name)
        self.errors.pop(name, None)
        self._stamps.pop(name, None)

    async def poll(self) -> None:
        """One look at the store: new, changed, promoted and deleted heads."""
        await asyncio.get_running_loop().run_in_executor(None, self.store.refresh)
        present = set(self.store.names())
        for name in set(self.heads) | set(self.errors):
            if name not in present:
                self._forget(name)
        for name in sorted(present):
            try:
                stamp = self.store.stamp(name)
            except OSError:
                continue
            if stamp != self._stamps.get(name):
                self._stamps[name] = stamp  # a bad card is tried once, not every poll
                with contextlib.suppress(TlserveError):
                    await self.reload(name)

    async def watch(self, interval_s: float) -> None:
        """Poll every ``interval_s`` for as long as the service runs: whatever one poll meets (a store file
        that is unreadable, a folder that vanished mid-listing), the next poll still comes."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll()
            except Exception:  # the poller outlives any one bad look at the store
                log.exception("head poll failed; polling again in %g s", interval_s)
