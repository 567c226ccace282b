"""Model watches, live queries and client-wide model events.

Changes reach these from the model's replica, on natskv's loop thread, where they are only
matched and queued. Each watcher, live query and event handler has a dispatcher thread that runs
the user's callback, so callbacks never run on the loop thread, may block, and may call natskv.
An exception in a callback is logged and handed to ``on_error``; the watch goes on.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from natskv._runner import follow_fork
from natskv._speedups import core
from natskv.errors import InvalidArgumentError
from natskv.models import query
from natskv.models.store import resolve_timeout

if TYPE_CHECKING:
    from natskv.models.model import Model, ModelStore

log = logging.getLogger("natskv")

_STOP = object()

INSERTED, UPDATED, DELETED, EXPIRED, EVICTED = "inserted", "updated", "deleted", "expired", "evicted"
# A record removed within this long of its _expires_at was removed by its TTL: the server expires
# on a sweep (up to about a second late) and counts whole seconds.
_EXPIRY_SLACK = dt.timedelta(seconds=2)


def event_kind(old: Any, new: Any, reason: str = "") -> str:
    """``inserted``, ``updated``, ``deleted``, ``expired`` (a record gone at its
    ``_expires_at``) or ``evicted`` (removed by an insert into a model at its ``__max_records__``:
    the delete's ``reason``)."""
    if old is None:
        return INSERTED
    if new is not None:
        return UPDATED
    if reason == EVICTED:
        return EVICTED
    expires = old.get("_expires_at")
    if expires:
        try:
            when = dt.datetime.fromisoformat(expires)
        except ValueError:
            return DELETED
        if when <= dt.datetime.now(dt.timezone.utc) + _EXPIRY_SLACK:
            return EXPIRED
    return DELETED


class ModelEvent:
    """One change to a record: ``type`` is ``"inserted"``, ``"updated"``, ``"deleted"``,
    ``"expired"`` (removed by the server when its TTL ran out: see ``Model.__ttl__``) or
    ``"evicted"`` (removed by an insert into a model at its ``__max_records__``);
    ``old`` / ``new`` are the record before and after (None where there is none); ``name`` is
    ``"<bucket>.<type>"``, as matched by ``db.on()``."""

    __slots__ = ("model", "new", "old", "revision", "type")

    def __init__(self, type: str, model: type[Model], old: Model | None, new: Model | None, revision: int) -> None:
        self.type = type
        self.model = model
        self.old = old
        self.new = new
        self.revision = revision

    @property
    def name(self) -> str:
        """``"<bucket>.<type>"``, the name db.on() patterns match."""
        return f"{self.model._require_store().bucket.name}.{self.type}"

    @property
    def record(self) -> Model | None:
        """The record as it is now (``old`` for a delete)."""
        return self.new if self.new is not None else self.old

    def __repr__(self) -> str:
        return f"ModelEvent({self.name!r}, old={self.old!r}, new={self.new!r})"


def _event(
    model: type[Model], old: dict[str, Any] | None, new: dict[str, Any] | None, revision: int, old_rev: int,
    reason: str = "",
) -> ModelEvent:
    kind = event_kind(old, new, reason)
    return ModelEvent(
        kind,
        model,
        model._from_stored(old, old_rev) if old is not None else None,
        model._from_stored(new, revision) if new is not None else None,
        revision,
    )


class _Dispatcher:
    """A queue and the thread that runs callbacks from it."""

    def __init__(self, name: str, on_error: Callable[[BaseException], None] | None) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            try:
                job()
            except Exception as exc:
                log.exception("natskv: error in a model callback")
                if self._on_error is not None:
                    try:
                        self._on_error(exc)
                    except Exception:
                        log.exception("natskv: error in the on_error hook")

    def stop(self, timeout: float | None) -> None:
        """Stop after the queued callbacks; wait for that up to ``timeout`` seconds (None: no
        limit) unless called from the dispatcher thread itself."""
        self._queue.put(_STOP)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


class ModelWatcher:
    """Calls ``callback(event)`` for inserts, updates and deletes of matching records.

    A change matches when the record matched ``where`` before or after it. With ``columns``, an
    update is reported only when one of those fields changed. Stop it with :meth:`stop`.
    """

    def __init__(
        self,
        model: type[Model],
        callback: Callable[[ModelEvent], None],
        where: Mapping[str, Any] | None = None,
        columns: Iterable[str] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        **lookups: Any,
    ) -> None:
        if not callable(callback):
            raise InvalidArgumentError("watch() needs a callback function")
        self.model = model
        self._store: ModelStore = model._require_store()
        self._filter = query.compile_filter(query.compile_where(model._fields, where, lookups))
        self._columns = tuple(columns) if columns is not None else None
        for column in self._columns or ():
            if column not in model._fields:
                raise InvalidArgumentError(f"{model.__name__} has no field {column!r} to watch")
        self._callback = callback
        self._dispatcher = _Dispatcher(f"natskv-model-watch-{model.__name__}", on_error)
        self._store.listeners.append(self._on_change)

    def _on_change(self, old: dict[str, Any] | None, new: dict[str, Any] | None, revision: int, old_rev: int,
                   reason: str = "") -> None:
        # Loop thread, under the replica's lock: match and queue only.
        match = self._filter.match
        if not ((old is not None and match(old)) or (new is not None and match(new))):
            return
        if (
            self._columns is not None
            and old is not None
            and new is not None
            and all(old.get(c) == new.get(c) for c in self._columns)
        ):
            return
        model, callback = self.model, self._callback
        self._dispatcher.put(lambda: callback(_event(model, old, new, revision, old_rev, reason)))

    def stop(self, timeout: float | None = None) -> None:
        """Stop calling the callback, waiting up to ``timeout`` (None: the client's default) for
        a callback that is running to return. Safe to call twice, and from the callback."""
        wait = resolve_timeout(self._store.client, timeout)
        if self._on_change in self._store.listeners:
            self._store.listeners.remove(self._on_change)
        self._dispatcher.stop(wait)

    def __enter__(self) -> ModelWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LiveQuery:
    """A query kept current: ``result`` always holds the latest answer.

    Subscribers (``subscribe(cb)``) are called with the new result only when it really changed:
    other records, or the same records at new versions, in a different order or number.
    """

    def __init__(
        self,
        model: type[Model],
        where: Mapping[str, Any] | None = None,
        order_by: Any = None,
        limit: int | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        **lookups: Any,
    ) -> None:
        self.model = model
        self._args = dict(where=where, order_by=order_by, limit=limit, **lookups)
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[list[Model]], None]] = []
        self.result: list[Model] = model.find(**self._args)
        self._signature = self._sign(self.result)
        self._pending = threading.Event()
        self._dispatcher = _Dispatcher(f"natskv-live-{model.__name__}", on_error)
        # Any change may move a record into or out of a limited, ordered result: recompute on each.
        self._store: ModelStore = model._require_store()
        self._store.listeners.append(self._on_change)

    @staticmethod
    def _sign(records: list[Model]) -> list[tuple[Any, int]]:
        return [(r.pk, r._version) for r in records]

    def _on_change(self, old: Any, new: Any, revision: int, old_rev: int, reason: str = "") -> None:
        if not self._pending.is_set():  # coalesce a burst of changes into one recomputation
            self._pending.set()
            self._dispatcher.put(self._refresh)

    def _refresh(self) -> None:
        self._pending.clear()
        result = self.model.find(**self._args)
        signature = self._sign(result)
        with self._lock:
            if signature == self._signature:
                return
            self.result, self._signature = result, signature
            subscribers = list(self._subscribers)
        for cb in subscribers:
            cb(result)

    def subscribe(self, callback: Callable[[list[Model]], None]) -> Callable[[], None]:
        """Call ``callback(result)`` on every real change; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def stop(self, timeout: float | None = None) -> None:
        """Stop following changes (``result`` stays as it was), waiting up to ``timeout`` (None:
        the client's default) for a subscriber that is running to return."""
        wait = resolve_timeout(self._store.client, timeout)
        if self._on_change in self._store.listeners:
            self._store.listeners.remove(self._on_change)
        self._dispatcher.stop(wait)

    def __enter__(self) -> LiveQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EventBus:
    """``db.on(pattern, callback)``: model events by name (``"<bucket>.inserted"`` ...).

    Patterns are globs with the rules of key patterns (``_core.compile_pattern``, as
    ``kv.keys()`` takes them): ``*`` any run of characters, ``?`` one, ``[abc]`` / ``[a-z]`` /
    ``[^abc]`` / ``[!abc]`` one of (or none of) a set, ``\\`` escapes the next character.

    Handlers follow a client into a forked child (they are usually registered at import time,
    before a pre-fork server starts its workers): the child gets its own dispatcher thread.
    """

    def __init__(self) -> None:
        self._handlers: list[tuple[str, Any, Callable[[ModelEvent], None]]] = []  # pattern, matcher, callback
        self._lock = threading.Lock()
        self._dispatcher: _Dispatcher | None = None
        follow_fork(self)

    def _after_fork(self) -> None:
        # In the child, right after fork(): the parent's thread and lock holders are gone.
        self._lock = threading.Lock()
        if self._dispatcher is not None:
            self._start_dispatcher()

    def _start_dispatcher(self) -> None:
        self._dispatcher = _Dispatcher("natskv-events", None)
        # The thread ends with the bus (its client dropped without close()); the finalizer
        # holds the queue only, so it keeps neither the bus nor the client alive.
        weakref.finalize(self, self._dispatcher._queue.put, _STOP).atexit = False

    def on(self, pattern: str, callback: Callable[[ModelEvent], None]) -> Callable[[], None]:
        """Add a handler (any thread); returns the function that removes it."""
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgumentError(f"an event pattern is a string like 'users.*' or '*.deleted', not {pattern!r}")
        if not callable(callback):
            raise InvalidArgumentError("on() needs a callback function")
        try:
            # No hierarchy separator: event names are matched whole, never turned into a filter.
            matcher = core.compile_pattern(pattern, "")
        except ValueError as exc:
            raise InvalidArgumentError(f"invalid event pattern {pattern!r}: {exc}") from exc
        handler = (pattern, matcher, callback)
        with self._lock:
            self._handlers.append(handler)
            if self._dispatcher is None:
                self._start_dispatcher()

        def off() -> None:
            with self._lock:
                if handler in self._handlers:
                    self._handlers.remove(handler)

        return off

    def attach(self, model: type[Model]) -> None:
        """Tell the handlers of ``model``'s changes (a listener on its store, which runs on the
        loop thread: it only matches names and queues the callbacks)."""
        store = model._require_store()

        def on_change(old: Any, new: Any, revision: int, old_rev: int, reason: str = "") -> None:
            if not self._handlers or self._dispatcher is None:
                return
            name = f"{store.bucket.name}.{event_kind(old, new, reason)}"
            with self._lock:
                targets = [cb for _, matcher, cb in self._handlers if matcher.match(name)]
            for cb in targets:
                def job(cb: Callable[[ModelEvent], None] = cb) -> None:
                    cb(_event(model, old, new, revision, old_rev, reason))

                self._dispatcher.put(job)

        on_change.carry_over_fork = True  # type: ignore[attr-defined]  # see ModelStore.reset
        # With no handler it ignores every change: the replica may then apply runs in bulk.
        on_change.idle = lambda: not self._handlers  # type: ignore[attr-defined]
        store.listeners.append(on_change)

    def stop(self, timeout: float | None) -> None:
        """Stop the dispatcher after the queued callbacks, waiting up to ``timeout`` seconds."""
        if self._dispatcher is not None:
            self._dispatcher.stop(timeout)
