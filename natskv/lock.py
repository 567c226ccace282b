"""Lock: a distributed mutex on a KV key, for threads and processes anywhere on the NATS system.

Holding the lock means owning its key in the locks bucket:

- **acquire** creates the key (compare-and-set on "absent") with a value naming the holder and a
  per-key TTL. A holder that dies (SIGKILL, a lost machine) never releases; the server removes
  its key when the TTL passes, and the lock is free again.
- **waiting** is woken by a watch on the key, never by polling: when the holder's key is deleted,
  purged or expires, the server tells the watch and the waiter tries again. Where no expiry
  marker comes (a bucket made by another tool) the waiter also wakes when the holder's TTL
  runs out, computed from the holder's message.
- **release** deletes the key only if it is still at the revision this holder wrote (a
  compare-and-set delete), so a holder whose TTL ran out cannot release a lock someone else
  holds since: it gets :class:`~natskv.errors.LockNotOwnedError` instead, which says its critical
  section was not protected to the end.
- **extend** rewrites the key with a fresh TTL, on the same condition.

Every method blocks the caller's thread (any thread but natskv's loop thread).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any

from natskv._runner import wait_limit
from natskv.errors import (
    JetStreamError,
    KeyExistsError,
    LockNotOwnedError,
    NatsKVTimeoutError,
    RevisionMismatchError,
)
from natskv.wire import headers as h
from natskv.wire.jsapi import CAS_ERROR_CODES

if TYPE_CHECKING:
    from natskv.kv import Bucket
    from natskv.watch import Watcher

_GLOB = re.compile(r"[*?\[]")
# A holder's key outlives its TTL by the server's expiry sweep; a waiter that computed the expiry
# itself looks again this much later.
_EXPIRY_SLACK = 0.25


class Lock:
    """A distributed mutex named ``name``. Get one with :meth:`natskv.Client.lock`.

    Use it as a context manager (``with db.lock("report"):``) or call :meth:`acquire` and
    :meth:`release`. One Lock object is one holder: acquiring it again while it is held waits
    like any other contender (it is not re-entrant); share the name, not the object, between
    threads that should exclude each other, or guard the object as you would a
    ``threading.Lock``.

    ``ttl`` (seconds, whole seconds on the server) bounds how long a holder that stops
    without releasing keeps the lock; call :meth:`extend` to hold it longer. ``timeout`` and
    ``blocking`` are the defaults of :meth:`acquire` (and of the ``with`` statement).
    """

    def __init__(
        self, bucket: Bucket, name: str, *, ttl: float = 30, timeout: float | None = None, blocking: bool = True
    ) -> None:
        self._ttl_header = h.ttl_header(ttl)  # checks ttl before anything is sent
        bucket._token(name)  # and the name
        bucket._proto.require_ttl()
        self.bucket = bucket
        self.name = name
        self.ttl = ttl
        self.timeout = timeout
        self.blocking = blocking
        self._token: str | None = None
        self._revision = 0
        self._state = threading.Lock()  # guards _token and _revision, not the distributed lock

    def __repr__(self) -> str:
        held = "held" if self._token is not None else "not held"
        return f"<natskv.Lock {self.name!r} ({held} by this object)>"

    # -- acquiring ----------------------------------------------------------------------------------

    def acquire(self, blocking: bool | None = None, timeout: float | None = None) -> bool:
        """Take the lock; return True once held, False if it was not taken.

        ``blocking=False`` tries once. Otherwise waits up to ``timeout`` seconds (None: the
        lock's ``timeout``, and if that is None too the client's ``request_timeout``;
        ``math.inf``: without limit) for the holder to release it or for its TTL to run out.
        """
        blocking = self.blocking if blocking is None else blocking
        limit = wait_limit(self.timeout if timeout is None else timeout, self.bucket._client.options.request_timeout)
        deadline = None if limit is None else time.monotonic() + limit
        token = secrets.token_hex(16)
        value = {"owner": token, "host": socket.gethostname(), "pid": os.getpid(),
                 "since": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        watcher: Watcher | None = None
        try:
            while True:
                revision = self._try_create(value, deadline)
                if revision:
                    with self._state:
                        self._token, self._revision = token, revision
                    return True
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    return False
                if watcher is None:
                    # Watch first, then look at the holder: a release between the two is seen
                    # either by the look or by the watch.
                    watcher = self.bucket.watch(_pattern(self.name), updates_only=True, timeout=_left(deadline))
                wake = self._holder_expiry(deadline)
                if wake is None:
                    continue  # released meanwhile: try again at once
                change = watcher.get(timeout=_until(wake, deadline))
                while change is not None and not change.deleted:
                    # Someone else took it first: wait for that holder instead.
                    wake = self._holder_expiry(deadline)
                    if wake is None:
                        break
                    change = watcher.get(timeout=_until(wake, deadline))
        finally:
            if watcher is not None:
                watcher.stop()

    def _try_create(self, value: dict[str, Any], deadline: float | None) -> int:
        """The revision of the holder's key when this call created it; 0 when someone holds it."""
        try:
            return self.bucket.create(self.name, value, ttl=self.ttl, timeout=_left(deadline))
        except KeyExistsError:
            return 0

    def _holder_expiry(self, deadline: float | None) -> float | None:
        """The monotonic time by which the current holder's TTL has run out (None: the lock is
        free now)."""
        found = self.bucket._proto.message(self.bucket._token(self.name), _left(deadline))
        if found is None or found[0].operation != h.OP_PUT:
            return None
        wall = h.expiry(found[1])
        if wall is None:
            return math.inf  # no TTL on the holder's key: only a release or a delete frees it
        left = wall - time.time()
        return time.monotonic() + max(left, 0) + _EXPIRY_SLACK

    # -- holding ------------------------------------------------------------------------------------

    def release(self, *, timeout: float | None = None) -> None:
        """Give the lock up. Raises :class:`~natskv.errors.LockNotOwnedError` when this object
        does not hold it, or held it but its TTL ran out (the lock may have had another holder
        since: the protected work was not exclusive to the end)."""
        with self._state:
            token, revision = self._token, self._revision
            self._token, self._revision = None, 0
        if token is None:
            raise LockNotOwnedError(f"release() of lock {self.name!r}, which this Lock object does not hold")
        bucket = self.bucket
        # A purge marker with a TTL: the name leaves nothing behind in the bucket for long.
        headers = h.with_ttl(h.tombstone(h.OP_PURGE, revision), self._ttl_header or "1s")
        try:
            bucket._proto.put(bucket._token(self.name), b"", headers, bucket._timeout(timeout))
        except JetStreamError as exc:
            if exc.err_code in CAS_ERROR_CODES:
                raise self._lost("released") from None
            raise

    def extend(self, ttl: float | None = None, *, timeout: float | None = None) -> None:
        """Hold the lock for ``ttl`` more seconds from now (default: the lock's ``ttl``). Raises
        :class:`~natskv.errors.LockNotOwnedError` when it is no longer held by this object."""
        with self._state:
            token, revision = self._token, self._revision
        if token is None:
            raise LockNotOwnedError(f"extend() of lock {self.name!r}, which this Lock object does not hold")
        seconds = self.ttl if ttl is None else ttl
        h.ttl_header(seconds)  # checked before anything is sent
        found = self.bucket._proto.message(self.bucket._token(self.name), self.bucket._timeout(timeout))
        value = self.bucket._value(found[0]) if found is not None and found[0].revision == revision else None
        if value is None:
            with self._state:
                self._token = None
            raise self._lost("extended")
        try:
            new_revision = self.bucket.update(self.name, value, revision, ttl=seconds, timeout=timeout)
        except RevisionMismatchError:
            with self._state:
                self._token = None
            raise self._lost("extended") from None
        with self._state:
            if self._token == token:
                self._revision = new_revision

    def locked(self, *, timeout: float | None = None) -> bool:
        """Whether anyone holds the lock now (this object or another holder)."""
        return self.bucket.get(self.name, timeout=timeout) is not None

    def owned(self, *, timeout: float | None = None) -> bool:
        """Whether this object holds the lock now: it acquired it and its key is still the one
        it wrote (its TTL has not run out)."""
        with self._state:
            revision = self._revision if self._token is not None else 0
        if not revision:
            return False
        entry = self.bucket.entry(self.name, timeout=timeout)
        return entry is not None and entry.revision == revision

    def _lost(self, verb: str) -> LockNotOwnedError:
        return LockNotOwnedError(
            f"lock {self.name!r} could not be {verb}: its TTL of {self.ttl} s ran out and it may have had "
            "another holder since; hold it longer with a larger ttl= or call extend() in time"
        )

    # -- context manager ----------------------------------------------------------------------------

    def __enter__(self) -> Lock:
        if not self.acquire():
            waited = wait_limit(self.timeout, self.bucket._client.options.request_timeout)
            raise NatsKVTimeoutError(
                f"lock {self.name!r} is held by another holder; gave up after {waited} s. Pass a larger "
                "timeout= to db.lock() (math.inf waits without limit) or blocking=False to skip the work"
                if self.blocking else f"lock {self.name!r} is held by another holder (blocking=False)"
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _pattern(name: str) -> str | re.Pattern[str]:
    """A watch pattern matching exactly ``name`` (a name with glob characters becomes a regex)."""
    return re.compile(re.escape(name)) if _GLOB.search(name) else name


def _left(deadline: float | None) -> float | None:
    """What is left of the wait (at least a moment, so a last request can still be answered)."""
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 0.05)


def _until(wake: float, deadline: float | None) -> float:
    """Seconds to wait for a watch event: until the holder's TTL runs out or the deadline."""
    end = wake if deadline is None else min(wake, deadline)
    if end == math.inf:
        return math.inf
    return max(end - time.monotonic(), 0.0) or 0.001
