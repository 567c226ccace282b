"""BucketManager: many buckets per process, the idle ones closed by a background sweep.

A process that serves many tenants may open a bucket per tenant, and a replica or a near cache
of some of them. :meth:`natskv.Client.bucket_manager` (or the connect options
``bucket_keep_alive=`` and ``bucket_sweep_every=``) starts a sweep that closes what nobody used for
``keep_alive`` seconds; the next use opens it again, so closing is invisible to callers except
for the latency of that use. Three kinds of things are closed:

- **buckets**: the client's open bucket (its settings and protocol state) leaves the client's
  table. The next ``db.bucket(name)``, or the next call on a ``Bucket`` object someone still
  holds, opens it again. Use is what the client's statistics record (:mod:`natskv.stats`): every
  Bucket call and watch event.
- **replicas** (:class:`~natskv.replica.LocalReplica`, from ``kv.replica()``): the replica's
  watch stops (its server consumer is deleted) and its values are dropped. The next read (``get``,
  ``in``, ``len``, iteration, ``snapshot``, ``wait_for``, ...) loads them again, blocking that read
  until they are loaded. Use is counted by the replica itself (one integer increment per read);
  the sweep compares the count with the one it saw before.
- **watch feeds** of near caches (:class:`natskv.contrib.cache.NearCache`): the updates-only
  watch stops and the cached entries are dropped (while no watch runs they could go stale). The
  next read of the cache starts the watch again and fills the cache anew.

Never closed: a bucket with a running watcher (``kv.watch``), a registered model, or an open
replica or near cache; a replica with hooks (``on_apply`` / ``on_loaded``: someone follows its
changes, as a model's replica does), a replica with a ``wait_for`` in progress, a near cache with
a read in flight. A replica stopped by its owner is left alone.

Observers hear of it through :meth:`BucketManager.on`: ``"opened"`` / ``"closed"`` for buckets,
``"replica_opened"`` / ``"replica_closed"`` for replicas and ``"feed_opened"`` /
``"feed_closed"`` for near caches' watches. Every callback gets the bucket's name and runs on the
manager's thread, never on natskv's loop thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from natskv._runner import follow_fork
from natskv.errors import InvalidArgumentError

if TYPE_CHECKING:
    from natskv.client import Client
    from natskv.kv import Bucket

log = logging.getLogger("natskv")
EVENTS = ("opened", "closed", "replica_opened", "replica_closed", "feed_opened", "feed_closed")


class Sweepable(Protocol):
    """What the sweep asks of a replica or a near cache (registered with :func:`track`)."""

    sweep_kind: str
    """``"replica"`` or ``"feed"``: the prefix of its events."""

    def _sweep_state(self) -> tuple[Client, str, int, bool] | None:
        """``(client, bucket name, use count, closable)`` while it is open in this process, else
        None. Manager's thread: must not block."""

    def _close_idle(self, uses: int) -> bool:
        """Close it if its use count is still ``uses`` and nothing holds it open; whether it
        closed. Manager's thread; may wait for the server."""


# Every replica and near cache of this process (held weakly): each sweep takes its client's own.
_tracked: weakref.WeakSet[Any] = weakref.WeakSet()


def track(obj: Sweepable) -> None:
    """Let bucket managers close ``obj`` when it is idle (any thread)."""
    _tracked.add(obj)


def report(client: Client, event: str, name: str) -> None:
    """Tell ``client``'s bucket manager, if it has one, of ``event`` (one of :data:`EVENTS`) on the
    bucket ``name``; its observers hear of it on the manager's thread. Any thread, never blocks."""
    manager = client._manager
    if manager is not None:
        manager._post(event, name)


class BucketManager:
    """The sweep of one client's idle buckets, replicas and near caches' feeds (see the module
    docstring). Thread-safe. In a forked child the sweep thread starts again on the first event
    (the child's first reopen), since threads do not cross a fork."""

    def __init__(self, client: Client, keep_alive: float = 3600, sweep_every: float = 60) -> None:
        for label, value in (("keep_alive", keep_alive), ("sweep_every", sweep_every)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise InvalidArgumentError(f"{label} is a positive number of seconds, not {value!r}")
        self.client = client
        self.keep_alive = float(keep_alive)
        self.sweep_every = float(sweep_every)
        self._handlers: dict[str, list[Callable[[str], Any]]] = {event: [] for event in EVENTS}
        self._events: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        # Buckets open before the manager started get a whole keep_alive from now.
        self._opened_at: dict[str, float] = dict.fromkeys(self.open_buckets(), time.monotonic())
        # Replicas and near caches: the use count each had when it last changed, and when.
        self._seen: weakref.WeakKeyDictionary[Any, tuple[int, float]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._start_thread()
        follow_fork(self)

    def __repr__(self) -> str:
        return f"<natskv.BucketManager keep_alive={self.keep_alive:g} s, {len(self.open_buckets())} open>"

    def on(self, event: str, callback: Callable[[str], Any]) -> Callable[[], None]:
        """Call ``callback(bucket_name)`` on each ``event`` (one of :data:`EVENTS`: ``"opened"``,
        ``"closed"``, ``"replica_opened"``, ``"replica_closed"``, ``"feed_opened"``,
        ``"feed_closed"``), on the manager's thread; returns a function that removes it."""
        if event not in EVENTS:
            raise InvalidArgumentError(f"event is one of {', '.join(map(repr, EVENTS))}, not {event!r}")
        if not callable(callback):
            raise InvalidArgumentError(f"callback must be a function, not {callback!r}")
        with self._lock:
            self._handlers[event].append(callback)

        def off() -> None:
            with self._lock:
                if callback in self._handlers[event]:
                    self._handlers[event].remove(callback)

        return off

    def open_buckets(self) -> list[str]:
        """Names of the buckets the client has open, sorted."""
        return sorted({key[0] for key in list(self.client._buckets)})

    # -- the client tells (caller's thread) ------------------------------------------------------

    def opened(self, name: str) -> None:
        """A bucket was opened (or opened again)."""
        with self._lock:
            self._opened_at[name] = time.monotonic()
        self._post("opened", name)

    def _post(self, event: str, name: str) -> None:
        if self._thread is None:  # a forked child's first event
            self._start_thread()
        self._events.put((event, name))

    # -- sweeping (the manager's thread) --------------------------------------------------------

    def sweep(self) -> list[str]:
        """Close the replicas, near caches' feeds and then buckets idle for ``keep_alive`` seconds
        now; the names of the buckets closed. Any thread (the manager's, every ``sweep_every``)."""
        client = self.client
        busy = self._sweep_tracked()
        now = time.monotonic()
        last_used = client._stats.last_used
        for watcher in list(client._watchers):
            if not watcher.stopped:
                busy.add(watcher.bucket.name)
                if watcher.bucket._dormant:  # closed just before its watch started: open again
                    client._reopen(watcher.bucket)
        if client._registry is not None:
            busy.update(client._registry.bucket_names())
        closed = []
        for name in self.open_buckets():
            used = max(last_used.get(name, 0.0), self._opened_at.get(name, 0.0))
            if name in busy or now - used < self.keep_alive:
                continue
            with client._lock:
                dropped: list[Bucket] = [client._buckets.pop(k) for k in [k for k in client._buckets if k[0] == name]]
            for bucket in dropped:
                bucket._dormant = True
            closed.append(name)
            self._post("closed", name)
        return closed

    def _sweep_tracked(self) -> set[str]:
        """Close the idle replicas and feeds of this client; the buckets of those left open."""
        busy: set[str] = set()
        for obj in list(_tracked):
            state = obj._sweep_state()
            if state is None or state[0] is not self.client:
                continue
            _, name, uses, closable = state
            now = time.monotonic()
            seen = self._seen.get(obj)
            if not closable or seen is None or seen[0] != uses or now - seen[1] < self.keep_alive:
                if seen is None or seen[0] != uses:
                    self._seen[obj] = (uses, now)
                busy.add(name)
                continue
            try:
                closed = obj._close_idle(uses)
            except Exception:
                log.exception("natskv: error closing an idle %s of bucket %r", obj.sweep_kind, name)
                closed = False
            if closed:
                self._post(f"{obj.sweep_kind}_closed", name)
            else:
                busy.add(name)
        return busy

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="natskv-buckets", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_every
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=max(0.0, min(next_sweep - time.monotonic(), 0.5)))
            except queue.Empty:
                event = None
            if event is not None:
                self._tell(*event)
            if time.monotonic() >= next_sweep:
                try:
                    self.sweep()
                except Exception:
                    log.exception("natskv: error sweeping idle buckets")
                next_sweep = time.monotonic() + self.sweep_every

    def _tell(self, event: str, name: str) -> None:
        with self._lock:
            handlers = list(self._handlers[event])
        for handler in handlers:
            try:
                handler(name)
            except Exception:
                log.exception("natskv: error in a bucket %s handler", event)

    def _after_fork(self) -> None:
        # In a forked child: the sweep thread stayed in the parent, and the parent's other threads
        # may have held the lock. The thread starts again with the child's first event.
        self._lock = threading.Lock()
        self._events = queue.SimpleQueue()
        self._thread = None
        stopped, self._stop = self._stop.is_set(), threading.Event()
        if stopped:
            self._stop.set()
        self._pid = os.getpid()

    def stop(self) -> None:
        """Stop sweeping (what is open stays open; what is closed still opens on use)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(5.0)
