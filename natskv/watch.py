"""Watcher: changes to a bucket's keys, as an iterator or through a callback.

Events travel from the loop thread (where the consumer receives them) over a queue to the thread
that consumes them: the thread iterating the watcher, or the watcher's dispatcher thread, which runs
the callback. Callbacks therefore never run on the loop thread, may block, and may call natskv. An
exception in a callback is logged and passed to ``on_error``; the watch goes on.

The end of the initial values is a marker ``Change`` for iterators, and a call of
``on_initial_done()`` for callback watchers: ``callback`` only ever receives real key changes.

A watch follows reconnects and lost consumers on its own. Only when the connection is closed for
good (nats-py gave up reconnecting, or the server withdrew the credentials) does it end: an
iterator raises the :class:`~natskv.NotConnectedError` (or ``AuthenticationError``) saying why,
and a callback watcher passes it to ``on_error`` and stops.

Threads: the consumer runs on the loop thread (:mod:`natskv.aio.watch`); ``get``, iteration and
``stop`` run on the caller's thread; callbacks run on the watcher's dispatcher thread.

Timeouts: ``timeout=None`` (the default of :meth:`Watcher.get`, :meth:`Watcher.wait_initial` and
:meth:`Watcher.stop`) means the client's default (``request_timeout``); ``timeout=math.inf`` waits
without limit and ``timeout=0`` only looks. Iterating a watcher waits without limit for the next
change.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from natskv._runner import runner, wait_limit
from natskv._speedups import core
from natskv._time import parse_timestamp
from natskv.aio.watch import INITIAL_DONE, FeedClosed, FeedSubscriber, SharedFeed, subscribe_feed, unsubscribe_feed
from natskv.errors import InvalidArgumentError, InvalidKeyError
from natskv.wire.kv import RawEntry
from natskv.wire.replies import fresh_error

if TYPE_CHECKING:
    from natskv.kv import Bucket

log = logging.getLogger("natskv")

_STOP = object()


class Change:
    """One change seen by a watch.

    ``operation`` is ``"PUT"``, ``"DEL"`` or ``"PURGE"`` (value None for the last two). ``delta`` is
    how many more messages the server had queued for the watch when this one was sent.
    ``initial_done`` is True on the single marker event that ends the initial values of an
    iterated watcher (never with ``updates_only=True``, never passed to a callback); its other
    fields are empty. ``created`` is when this revision was written (UTC), as on
    :attr:`natskv.Entry.created`.
    """

    __slots__ = ("_timestamp", "bucket", "delta", "initial_done", "key", "operation", "revision", "value")

    def __init__(
        self, key: str, value: Any, revision: int, operation: str, timestamp: str, delta: int, bucket: str,
        initial_done: bool = False,
    ) -> None:
        self.key = key
        self.value = value
        self.revision = revision
        self.operation = operation
        self._timestamp = timestamp
        self.delta = delta
        self.bucket = bucket
        self.initial_done = initial_done

    @property
    def created(self) -> datetime | None:
        return parse_timestamp(self._timestamp) if self._timestamp else None

    @property
    def timestamp(self) -> datetime | None:
        """Deprecated: the same as :attr:`created`, the name ``Entry`` uses."""
        warnings.warn("Change.timestamp is deprecated; use Change.created", DeprecationWarning, stacklevel=2)
        return self.created

    @property
    def deleted(self) -> bool:
        return self.operation != "PUT"

    def __repr__(self) -> str:
        if self.initial_done:
            return "Change(initial_done=True)"
        return f"Change(key={self.key!r}, value={self.value!r}, revision={self.revision}, operation={self.operation!r})"


class Watcher:
    """A running watch. Create it with :meth:`natskv.Bucket.watch`.

    Iterate it (``for change in watcher``) or pass ``callback``; stop it with :meth:`stop` or by
    leaving its ``with`` block. Iteration ends when the watcher is stopped.

    An iterator receives one marker ``Change`` (``initial_done=True``) after the initial values;
    ``callback`` receives key changes only, and ``on_initial_done()`` (on the same dispatcher
    thread, after the callbacks for every initial value) marks the end of the initial values.
    ``updates_only=True`` has no initial values and so no marker.
    """

    def __init__(
        self,
        bucket: Bucket,
        pattern: str | re.Pattern[str],
        callback: Callable[[Change], None] | None,
        *,
        include_history: bool,
        updates_only: bool,
        ignore_deletes: bool,
        on_error: Callable[[BaseException], None] | None,
        timeout: float | None,
        on_initial_done: Callable[[], None] | None = None,
    ) -> None:
        if include_history and updates_only:
            raise InvalidArgumentError("include_history and updates_only cannot both be set")
        if on_initial_done is not None:
            if not callable(on_initial_done):
                raise InvalidArgumentError(f"on_initial_done must be a function, not {on_initial_done!r}")
            if callback is None:
                raise InvalidArgumentError(
                    "on_initial_done needs callback=; an iterated watcher gets the end of the initial "
                    "values as a Change with initial_done=True"
                )
            if updates_only:
                raise InvalidArgumentError("updates_only=True has no initial values: drop on_initial_done")
        try:
            self._pattern = core.compile_pattern(pattern, bucket.sep)
        except (ValueError, TypeError) as exc:
            raise InvalidKeyError(f"invalid key pattern {pattern!r}: {exc}") from exc
        self.bucket = bucket
        self._callback = callback
        self._on_initial_done = on_initial_done
        self._on_error = on_error
        self._ignore_deletes = ignore_deletes
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped = False
        self._initial_done = threading.Event()
        self._dispatcher: threading.Thread | None = None
        policy = "all" if include_history else "new" if updates_only else "last_per_subject"
        client = bucket._client
        self._subscription: tuple[SharedFeed, FeedSubscriber] | None = None
        # Watchers of the same bucket and server-side filter share one consumer (see subscribe_feed).
        self._subscription = runner.call(
            subscribe_feed(client._conn, bucket._proto, self._pattern.filter, policy, self._queue.put),
            timeout,
        )
        if updates_only:
            self._initial_done.set()
        client._watchers.add(self)
        if callback is not None:
            self._dispatcher = threading.Thread(target=self._dispatch, name=f"natskv-watch-{bucket.name}", daemon=True)
            self._dispatcher.start()

    # -- consuming -------------------------------------------------------------------------

    def _convert(self, event: Any) -> Change | None:
        if event is INITIAL_DONE:
            self._initial_done.set()
            return Change("", None, 0, "", "", 0, self.bucket.name, initial_done=True)
        raw: RawEntry = event
        if raw.operation != "PUT" and self._ignore_deletes:
            return None
        bucket = self.bucket
        key = bucket._key_of_token(raw.subject[len(bucket._proto.subject_prefix) :])
        if not self._pattern.exact and not self._pattern.match(key):
            return None
        entry = bucket._decode(raw, key)
        stamp = raw.timestamp
        # A watch event's latency is its age: from the server storing it to its delivery here.
        age = time.time() - int(stamp) / 1e9 if stamp.isdigit() else 0.0
        bucket._client._stats.record_elapsed("watch", bucket.name, key, max(age, 0.0), received=len(raw.data))
        return Change(key, entry.value, raw.revision, raw.operation, stamp, raw.delta, bucket.name)

    def get(self, timeout: float | None = None) -> Change | None:
        """The next change, waiting up to ``timeout`` seconds (None: the client's default,
        ``math.inf``: without limit). None when stopped or timed out. Raises NotConnectedError
        (saying why) once the connection is closed for good."""
        runner.check_not_loop_thread("Watcher.get()")
        return self._next(self._limit(timeout))

    def _limit(self, timeout: float | None) -> float | None:
        if timeout == 0 and not isinstance(timeout, bool):
            return 0.0  # look without waiting
        return wait_limit(timeout, self.bucket._client.options.request_timeout)

    def _next(self, limit: float | None) -> Change | None:
        """The next change within ``limit`` seconds (None: without limit)."""
        while True:
            try:
                event = self._queue.get(timeout=limit)
            except queue.Empty:
                return None
            if event is _STOP:
                self._queue.put(_STOP)  # keep later calls returning at once
                return None
            if type(event) is FeedClosed:
                self._queue.put(event)  # keep later calls raising at once
                self._end()
                raise fresh_error(event.error)
            change = self._convert(event)
            if change is not None:
                return change

    def __iter__(self) -> Iterator[Change]:
        if self._callback is not None:
            raise TypeError("this watcher delivers to its callback; it cannot also be iterated")
        runner.check_not_loop_thread("iterating a Watcher")
        while True:
            change = self._next(None)
            if change is None:
                return
            yield change

    def wait_initial(self, timeout: float | None = None) -> bool:
        """Block until the initial values have been delivered: to the callback (and
        ``on_initial_done`` has returned), or to the iterator (its marker was read). True at once
        with ``updates_only=True``; False when ``timeout`` passed first (None: the client's
        default, ``math.inf``: without limit)."""
        return self._initial_done.wait(self._limit(timeout))

    def _dispatch(self) -> None:
        callback = self._callback
        assert callback is not None
        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            if type(event) is FeedClosed:
                log.error("natskv: watch on bucket %r ended: %s", self.bucket.name, event.error)
                self._end()
                if self._on_error is not None:
                    try:
                        self._on_error(fresh_error(event.error))
                    except Exception:
                        log.exception("natskv: error in the on_error hook")
                return
            try:
                if event is INITIAL_DONE:
                    try:
                        if self._on_initial_done is not None:
                            self._on_initial_done()
                    finally:
                        self._initial_done.set()
                    continue
                change = self._convert(event)
                if change is not None:
                    callback(change)
            except Exception as exc:
                log.exception("natskv: error in watch callback on bucket %r", self.bucket.name)
                if self._on_error is not None:
                    try:
                        self._on_error(exc)
                    except Exception:
                        log.exception("natskv: error in the on_error hook")

    # -- stopping --------------------------------------------------------------------------

    def _end(self) -> None:
        # The connection was closed for good: the feed is gone already, nothing to unsubscribe.
        self._stopped = True
        self._subscription = None
        self.bucket._client._watchers.discard(self)

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching and delete the server consumer, waiting up to ``timeout`` for each (None:
        the client's default). Safe to call twice and from the callback."""
        if self._stopped:
            return
        timeout = self._limit(timeout)
        self._stopped = True
        self.bucket._client._watchers.discard(self)
        if self._subscription is not None and not runner.in_loop_thread():
            try:
                runner.call(unsubscribe_feed(*self._subscription), timeout)
            except Exception:
                log.debug("natskv: error stopping watch", exc_info=True)
        self._queue.put(_STOP)
        dispatcher = self._dispatcher
        if dispatcher is not None and dispatcher is not threading.current_thread():
            dispatcher.join(timeout)

    @property
    def stopped(self) -> bool:
        """Whether the watch has stopped (stop(), or the client was closed)."""
        return self._stopped

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if not getattr(self, "_stopped", True) and self._callback is None:
            # An abandoned iterator watch: stop its consumer without waiting.
            subscription = getattr(self, "_subscription", None)
            if subscription is not None:
                try:
                    loop = runner.loop
                    loop.call_soon_threadsafe(lambda: loop.create_task(unsubscribe_feed(*subscription)))
                except RuntimeError:
                    pass
