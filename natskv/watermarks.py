"""Watermarks: per-key versions that only move forward, shared by every process.

A watermark records how far something got: the last offset a consumer processed, the last
migration applied, the newest snapshot taken. :class:`WatermarkStore` keeps one per key in a KV
bucket. Versions are strings compared lexicographically (by Unicode code point, which for ASCII
is byte order). :meth:`WatermarkStore.set` moves a watermark forward only: a compare-and-set loop
writes the new version only if the stored one is lower, so concurrent writers in any number of
processes never move it back. For integer versions, :class:`LexiVersion` encodes integers as
strings in the same order.

Every method blocks the caller's thread (any thread but natskv's loop thread).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from natskv.errors import InvalidArgumentError, KeyExistsError, RevisionMismatchError

if TYPE_CHECKING:
    from natskv.client import Client
    from natskv.kv import Bucket
    from natskv.watch import Change, Watcher


@dataclass(frozen=True)
class Watermark:
    """A watermark: its ``key``, ``version``, when it was set (``timestamp``, UTC) and the
    ``data`` stored with it. From a watch, ``deleted`` marks a watermark that was deleted (its
    version and data are then None)."""

    key: str
    version: str | None
    timestamp: datetime | None
    data: Any = None
    deleted: bool = False


class WatermarkStore:
    """Watermarks in the bucket ``bucket`` (created with ``replicas`` when missing)."""

    def __init__(self, db: Client, bucket: str = "watermarks", replicas: int = 1, *,
                 timeout: float | None = None) -> None:
        self.db = db
        self.bucket: Bucket = db.bucket(bucket, replicas=replicas, timeout=timeout)

    def __repr__(self) -> str:
        return f"<natskv.WatermarkStore on bucket {self.bucket.name!r}>"

    def get(self, key: str, *, timeout: float | None = None) -> Watermark | None:
        """The watermark of ``key``, or None when it was never set (or was deleted)."""
        entry = self.bucket.entry(key, timeout=timeout)
        return None if entry is None else _watermark(key, entry.value)

    def set(self, key: str, version: str, data: Any = None, *, force: bool = False,
            timeout: float | None = None) -> bool:
        """Move the watermark of ``key`` to ``version`` (with ``data``, any JSON value); True when
        it moved.

        It only moves forward: when the stored version is equal or higher, nothing is written and
        the answer is False (the caller was behind; nothing is raised). ``force=True`` writes
        ``version`` whatever is stored (a deliberate reset).
        """
        _check_version(version)
        value = {"version": version, "at": datetime.now(timezone.utc).isoformat(), "data": data}
        self.bucket._encode(value)  # data that JSON cannot store fails before anything is read
        if force:
            self.bucket.set(key, value, timeout=timeout)
            return True
        while True:
            entry = self.bucket.entry(key, timeout=timeout)
            if entry is None:
                try:
                    self.bucket.create(key, value, timeout=timeout)
                    return True
                except KeyExistsError:
                    continue  # set by another writer meanwhile: compare with theirs
            stored = _watermark(key, entry.value)
            if stored.version is not None and stored.version >= version:
                return False
            try:
                self.bucket.update(key, value, entry.revision, timeout=timeout)
                return True
            except RevisionMismatchError:
                continue

    def delete(self, key: str, *, timeout: float | None = None) -> None:
        """Delete the watermark of ``key`` (the next ``set`` starts it again from any version)."""
        self.bucket.delete(key, timeout=timeout)

    def get_all(self, *, timeout: float | None = None) -> dict[str, Watermark]:
        """Every watermark, by key."""
        return {key: _watermark(key, value) for key, value in self.bucket.items(timeout=timeout)}

    def watch(
        self, callback: Callable[[Watermark], None] | None = None, *, pattern: str = "*",
        updates_only: bool = False, timeout: float | None = None,
    ) -> WatermarkWatch:
        """Watermarks as they move: the current ones first (unless ``updates_only``), then each
        change, deletes included (``Watermark.deleted``). Iterate the result, or pass
        ``callback``, which runs on a dispatcher thread (never natskv's loop thread). Stop it
        with ``stop()`` or a ``with`` block."""
        return WatermarkWatch(self, callback, pattern, updates_only, timeout)


class WatermarkWatch:
    """A running watch of a :class:`WatermarkStore` (see :meth:`WatermarkStore.watch`)."""

    def __init__(self, store: WatermarkStore, callback: Callable[[Watermark], None] | None, pattern: str,
                 updates_only: bool, timeout: float | None) -> None:
        self._watcher: Watcher
        if callback is None:
            self._watcher = store.bucket.watch(pattern, updates_only=updates_only, timeout=timeout)
        else:
            if not callable(callback):
                raise InvalidArgumentError(f"callback must be a function, not {callback!r}")
            self._watcher = store.bucket.watch(pattern, lambda change: callback(_of_change(change)),
                                               updates_only=updates_only, timeout=timeout)

    def __iter__(self) -> Iterator[Watermark]:
        for change in self._watcher:
            if not change.initial_done:
                yield _of_change(change)

    def get(self, timeout: float | None = None) -> Watermark | None:
        """The next watermark change, or None when stopped or ``timeout`` passed first."""
        while True:
            change = self._watcher.get(timeout)
            if change is None or not change.initial_done:
                return None if change is None else _of_change(change)

    def stop(self) -> None:
        self._watcher.stop()

    def __enter__(self) -> WatermarkWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _of_change(change: Change) -> Watermark:
    if change.deleted:
        return Watermark(change.key, None, change.created, None, deleted=True)
    return _watermark(change.key, change.value)


def _watermark(key: str, value: Any) -> Watermark:
    """A stored value as a Watermark (values another tool wrote without natskv's shape count as
    a bare version)."""
    if isinstance(value, dict) and isinstance(value.get("version"), str):
        at = value.get("at")
        return Watermark(key, value["version"], datetime.fromisoformat(at) if isinstance(at, str) else None,
                         value.get("data"))
    return Watermark(key, value if isinstance(value, str) else None, None, None)


def _check_version(version: object) -> None:
    if not isinstance(version, str):
        raise InvalidArgumentError(
            f"a watermark version is a str compared lexicographically, not {type(version).__name__} "
            f"({version!r}); encode integers with natskv.watermarks.LexiVersion.encode()"
        )


_LEXI = re.compile(r"([a-z])(0|[1-9][0-9]*)\Z")


class LexiVersion:
    """Integers as strings whose lexicographic order is their numeric order.

    ``encode(n)`` is one letter giving the number of digits (``a`` for 1 ... ``z`` for 26), then
    the digits: ``encode(9) == "a9"`` sorts before ``encode(10) == "b10"``. Non-negative integers
    below 10**26 (64-bit offsets and nanosecond times fit with room to spare).
    """

    MAX = 10**26 - 1

    @staticmethod
    def encode(number: int) -> str:
        if type(number) is not int or not 0 <= number <= LexiVersion.MAX:
            raise InvalidArgumentError(f"LexiVersion encodes ints from 0 to 10**26 - 1, not {number!r}")
        digits = str(number)
        return chr(ord("a") + len(digits) - 1) + digits

    @staticmethod
    def decode(version: str) -> int:
        match = _LEXI.match(version) if isinstance(version, str) else None
        if match is None or ord(match.group(1)) - ord("a") + 1 != len(match.group(2)):
            raise InvalidArgumentError(f"{version!r} is not a LexiVersion (like 'a7' or 'c123')")
        return int(match.group(2))
