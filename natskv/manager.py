"""BucketManager: many buckets per process, the idle ones closed by a background sweep.

A process that serves many tenants may open a bucket per tenant. :meth:`natskv.Client.bucket_manager`
starts a sweep that closes the buckets nobody used for ``keep_alive`` seconds. A bucket is
never closed while it has a running watcher (``kv.watch``) or a registered model. Closing drops
the client's open bucket (its settings and protocol state) from the client's table. The next
``db.bucket(name)``, or the next call on a ``Bucket`` object someone still holds, opens it
again, so closing is invisible to callers. Observers hear of it through ``on("opened", cb)``
and ``on("closed", cb)``; callbacks get the bucket name and run on the manager's thread, never
on natskv's loop thread.

Use is what the client's statistics record (:mod:`natskv.stats`): every Bucket call and watch
event.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from natskv.errors import InvalidArgumentError

if TYPE_CHECKING:
    from natskv.client import Client
    from natskv.kv import Bucket

log = logging.getLogger("natskv")
EVENTS = ("opened", "closed")


class BucketManager:
    """The sweep of one client's idle buckets (see the module docstring). Thread-safe."""

    def __init__(self, client: Client, keep_alive: float = 3600, sweep_every: float = 60) -> None:
        for label, value in (("keep_alive", keep_alive), ("sweep_every", sweep_every)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise InvalidArgumentError(f"{label} is a positive number of seconds, not {value!r}")
        self.client = client
        self.keep_alive = float(keep_alive)
        self.sweep_every = float(sweep_every)
        self._handlers: dict[str, list[Callable[[str], Any]]] = {event: [] for event in EVENTS}
        self._events: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._opened_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="natskv-buckets", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<natskv.BucketManager keep_alive={self.keep_alive:g} s, {len(self.open_buckets())} open>"

    def on(self, event: str, callback: Callable[[str], Any]) -> Callable[[], None]:
        """Call ``callback(bucket_name)`` on each ``"opened"`` or ``"closed"`` event; returns a
        function that removes it."""
        if event not in EVENTS:
            raise InvalidArgumentError(f"event is 'opened' or 'closed', not {event!r}")
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
        self._events.put(("opened", name))

    # -- sweeping (the manager's thread) --------------------------------------------------------

    def sweep(self) -> list[str]:
        """Close the buckets idle for ``keep_alive`` seconds now; their names."""
        client = self.client
        now = time.monotonic()
        last_used = client._stats.last_used
        busy = {w.bucket.name for w in list(client._watchers) if not w.stopped}
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
            self._events.put(("closed", name))
        return closed

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

    def stop(self) -> None:
        """Stop sweeping (the open buckets stay open)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
