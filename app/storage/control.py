"""The control plane of a head store: list a head's versions, promote one, roll back, delete, migrate
flat heads. ``/v1/heads`` (:mod:`app.api.heads`) and ``tlserve heads`` both call :class:`HeadControl`,
so each rule is stated once: the default head cannot be deleted, a promotion can be a compare-and-swap,
and a store this process cannot write is a named error, not an ``OSError``.

What a change means for a running service (reloading the head it serves) is the service's business:
the routes reload after calling here; other replicas see the change at their next poll.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from app.core.errors import ArtifactError, TlserveError, VersionConflict
from app.storage.registry import HeadStore, Version, copy_version


@dataclass(frozen=True)
class Listing:
    """A head's committed versions (those whose card reads; an unreadable one is reported where it is
    served) and the one ``current`` points to."""

    name: str
    current: int
    versions: list[Version]


@contextlib.contextmanager
def _writing(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise ArtifactError(f"cannot {what}: the model store is not writable here ({type(exc).__name__})") from None


class HeadControl:
    def __init__(self, heads: HeadStore, default_head: str) -> None:
        self.heads = heads
        self.default_head = default_head

    def names(self) -> list[str]:
        return self.heads.names()

    def listing(self, name: str) -> Listing:
        current = self.heads.current_version(name)
        versions: list[Version] = []
        for number in self.heads.versions(name):
            try:
                version = self.heads.get(name, number)
                version.info  # noqa: B018 - parsed here: a card that does not parse is left out of the listing
            except TlserveError:
                continue
            versions.append(version)
        return Listing(name, current, versions)

    def promote(self, name: str, version: int, *, expected: int | None = None) -> int:
        """Make ``version`` current (with ``expected``: only if the current version is still that one)."""
        with _writing("promote"):
            self.heads.promote(name, version, expected=expected)
        return version

    def rollback(self, name: str) -> int:
        """Make the version below the current one current; returns it."""
        with _writing("roll back"):
            return self.heads.rollback(name)

    def delete_version(self, name: str, version: int) -> None:
        with _writing("delete"):
            self.heads.delete_version(name, version)

    def delete(self, name: str) -> None:
        """Delete a head and every version of it, unless it is the default head."""
        if name == self.default_head:
            raise VersionConflict(f"head {name!r} is the default head (TLSERVE_DEFAULT_HEAD); it cannot be deleted")
        with _writing("delete"):
            self.heads.delete(name)

    def sign(self, name: str, version: int | None = None) -> Version:
        """A new current version, signed, with the files and card of ``version`` once every check passes."""
        with _writing("sign"):
            return copy_version(self.heads, name, version)

    def migrate(self) -> list[str]:
        """Move every flat head (from before versions) into ``1/``; returns the names moved."""
        with _writing("migrate"):
            return [name for name in self.heads.names() if self.heads.migrate(name)]
