"""LocalReplica: the keys of a bucket mirrored in memory, kept current by one shared watch.

Reads from a replica are dictionary lookups (microseconds, no network). The watch's events are
applied on natskv's loop thread as they arrive, under a lock that readers take too, so a reader
never sees half an update.

Read-your-writes: a writer hands its acknowledged writes to :meth:`LocalReplica.apply_written`,
which applies them at once, so a write that was stored is readable here even while the watch is
stalled (its consumer lost with a server, say). Every key keeps the revision of its value (and of
its deletion, until the watch passes it): the watch's later delivery of the same revision, or of
an older one, is skipped, so nothing is applied or reported twice. :meth:`LocalReplica.wait_for`
waits for the watch itself to reach a revision (someone else's write).

The replica subscribes to the client's shared feed for its bucket and filter, so several replicas
and watchers of the same keys cost one server consumer.

Threads: events are applied on the loop thread (and ``on_apply`` / ``on_loaded`` hooks run there);
reads, ``start``, ``stop``, ``wait_for`` and ``apply_written`` run on the caller's thread.

Idle replicas: a client's bucket manager (:mod:`natskv.manager`) closes a replica nobody read for
its ``keep_alive`` seconds: the watch stops (its server consumer is deleted) and the values are
dropped. The next read loads them again, blocking until they are loaded, so a caller notices only
the latency. Reads count their use with one integer increment (no clock read); the sweep compares
the count with the one it saw before. A replica with hooks (``on_apply``, ``on_loaded``: a
model's, or anyone following its changes) or a ``wait_for`` in progress is never closed.

Timeouts: ``timeout=None`` (the default of :meth:`LocalReplica.start`, :meth:`LocalReplica.stop`
and :meth:`LocalReplica.wait_for`) means the client's default (``request_timeout``);
``timeout=math.inf`` waits without limit and ``timeout=0`` only looks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from natskv._collector import collector_paused
from natskv._runner import follow_fork, runner, unfollow_fork, wait_limit
from natskv._speedups import core
from natskv.aio.watch import INITIAL_DONE, FeedClosed, FeedSubscriber, SharedFeed, subscribe_feed, unsubscribe_feed
from natskv.codec import RAW_HEADER, JSONCodec
from natskv.errors import InvalidArgumentError, InvalidKeyError, NatsKVError, NatsKVTimeoutError
from natskv.manager import report, track
from natskv.wire.replies import fresh_error

if TYPE_CHECKING:
    from natskv.client import Client
    from natskv.kv import Bucket

log = logging.getLogger("natskv")

APPLY_SLICE = 256  # changes applied per turn of the loop, once loaded (about 2 ms of a model's)

ApplyHook = Callable[[str, Any, Any, int], None]
"""``hook(key, old_value, new_value, revision)`` after each change (None for absent); loop thread,
under the replica's lock: it must be quick and must not call natskv. ``on_loaded()`` (same rules)
runs where the initial values end, before the changes that follow them."""


class ReplicaStorage(Protocol):
    """Where a replica's values live when its ``on_apply`` hook keeps them (a model's records):
    the replica then holds no copy of its own. The hook stores every change it is given; these
    calls read back what it stored. Called under the replica's lock."""

    def held(self, key: str) -> tuple[Any, int] | None:
        """``(value, revision)`` of ``key`` as last stored, None when absent."""

    def __len__(self) -> int:
        """How many keys are held."""

    def items(self) -> Iterable[tuple[str, Any]]:
        """Every ``(key, value)`` held."""

    def apply_entries(self, entries: list[Any], prefix_len: int, sep: str, deleted: dict[str, int]) -> int | None:
        """Optional (the replica looks it up). Apply a run of raw entries (JSON values, keys that
        the server's filter matched) in one call, as the ``on_apply`` hook would one by one:
        skip what is at or below the revision held for its key or in ``deleted`` (key ->
        revision), store the rest. Return the highest revision among them, or None to decline
        (nothing applied, ``entries`` untouched: the replica then applies them one by one).
        ``entries`` is the replica's own list: it may be consumed (items replaced by None)."""


class LocalReplica:
    """The keys of ``bucket`` that match ``pattern``, with their latest values, in memory.

    Create it with :meth:`natskv.Bucket.replica` (or directly), then :meth:`start`. Thread-safe.
    With ``storage``, the ``on_apply`` hook keeps the values (see :class:`ReplicaStorage`).
    """

    sweep_kind = "replica"  # its bucket manager events: replica_opened, replica_closed

    def __init__(self, bucket: Bucket, pattern: str | re.Pattern[str] = "*", on_apply: ApplyHook | None = None,
                 on_reset: Callable[[], None] | None = None, on_loaded: Callable[[], None] | None = None,
                 storage: ReplicaStorage | None = None) -> None:
        if storage is not None and on_apply is None:
            raise InvalidArgumentError("a replica with a storage needs the on_apply hook that fills it")
        try:
            self._pattern = core.compile_pattern(pattern, bucket.sep)
        except (ValueError, TypeError) as exc:
            raise InvalidKeyError(f"invalid key pattern {pattern!r}: {exc}") from exc
        self.bucket = bucket
        self._on_apply = on_apply
        self._on_reset = on_reset  # called when a forked child drops what it inherited
        self._on_loaded = on_loaded
        self._stale = False  # in a forked child: reload before the next read
        # Why the feed ended when the connection was closed for good: reads then raise it (with
        # _stale set, so the hot path still tests one flag), instead of serving frozen values.
        self._dead: BaseException | None = None
        self._revive_lock = threading.Lock()
        self._storage = storage
        self._values: dict[str, Any] = {}  # without a storage: key -> value, and its revision
        self._revisions: dict[str, int] = {}
        # Keys deleted by apply_written() ahead of the watch: the deleting revision, dropped once
        # the watch has passed it (until then an older PUT from the watch must not revive them).
        self._deleted: dict[str, int] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ready = threading.Event()
        self.revision = 0  # highest stream revision applied
        self._subscription: tuple[SharedFeed, FeedSubscriber] | None = None
        self._pending: list[Any] = []  # events delivered, not yet applied (loop thread only)
        # Closed by a bucket manager (values dropped, _stale set) until the next read reloads it.
        self._dormant = False
        self._uses = 0  # reads so far: the bucket manager compares it between sweeps
        self._waiters = 0  # wait_for() calls waiting (under the lock): the replica is in use

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> LocalReplica:
        """Subscribe and wait up to ``timeout`` until the current values are loaded; return self."""
        limit = self._limit(timeout)
        if self._subscription is None:
            client = self.bucket._client
            self._subscription = runner.call(
                subscribe_feed(client._conn, self.bucket._proto, self._pattern.filter, "last_per_subject", self._apply,
                               self._apply_many),
                limit,
            )
            track(self)
            report(client, "replica_opened", self.bucket.name)
        follow_fork(self)  # a forked child reloads it (see _after_fork)
        if not self._ready.wait(limit):
            raise NatsKVTimeoutError(f"replica of bucket {self.bucket.name!r} not loaded within {limit} s")
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop following the bucket (the values stay readable, frozen; a replica that the bucket
        manager closed has dropped its values, and stays empty)."""
        limit = self._limit(timeout)
        if self._dormant:
            with self._revive_lock:
                if self._dormant:
                    self._dormant = self._stale = False
        subscription, self._subscription = self._subscription, None
        unfollow_fork(self)
        if subscription is not None and not runner.in_loop_thread():
            runner.call(unsubscribe_feed(*subscription), limit)

    def _limit(self, timeout: float | None) -> float | None:
        if timeout == 0 and not isinstance(timeout, bool):
            return 0.0  # look without waiting
        return wait_limit(timeout, self.bucket._client.options.request_timeout)

    def __enter__(self) -> LocalReplica:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fork ----------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        # In a forked child, right after fork(), with one thread: the parent's watch does not
        # follow, and its locks may be held by threads that do not exist here.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ready = threading.Event()
        self._revive_lock = threading.Lock()
        self._pending = []
        self._subscription = None
        self._waiters = 0
        self._dead = None  # the child has a connection of its own
        self._stale = True

    def revive(self, timeout: float | None = None) -> None:
        """In a forked child, reload the replica through the child's own connection. Reads call
        this on their own; it is public for a worker that wants to load before serving."""
        with self._revive_lock:
            if not self._stale:
                return
            if self._dead is not None:
                raise fresh_error(self._dead)
            if self._subscription is None:  # else a reload that timed out is loading still: wait for it
                with self._lock:
                    self._values.clear()
                    self._revisions.clear()
                    self._deleted.clear()
                    self.revision = 0
                    if self._on_reset is not None:
                        self._on_reset()
            self.bucket._client._check()  # the child's own connection
            client = self.bucket._client
            self.start(timeout if timeout is not None else max(client.options.request_timeout, 30.0))
            self._stale = False
            if self._dormant:  # closed by the bucket manager: its bucket opens again with it
                self._dormant = False
                if self.bucket._dormant:
                    client._reopen(self.bucket)

    # -- idle close (the bucket manager's thread) -------------------------------------------------

    @property
    def dormant(self) -> bool:
        """True while the bucket manager has it closed (its next read loads it again)."""
        return self._dormant

    def _sweep_state(self) -> tuple[Client, str, int, bool] | None:
        # See natskv.manager.Sweepable. Open: subscribed and loaded in this process.
        if self._subscription is None or self._stale:
            return None
        closable = self._on_apply is None and self._on_loaded is None and self._storage is None
        return self.bucket._client, self.bucket.name, self._uses, closable

    def _close_idle(self, uses: int) -> bool:
        # Readers take the lock property, which counts the use and then tests _stale. Setting
        # _stale before comparing the count (under the lock) leaves no gap: a read counted
        # after the comparison sees _stale and waits in revive() (on _revive_lock, held here)
        # for the reload, and one counted before it cancels the close.
        with self._revive_lock:
            subscription = self._subscription
            if subscription is None or self._stale:
                return False
            with self._lock:
                self._stale = True
                if self._uses != uses or self._waiters:
                    self._stale = False
                    return False
                self._subscription = None
            try:
                runner.call(self._detach(subscription), self.bucket._client.options.request_timeout)
            except NatsKVError as exc:  # the consumer goes with its connection, or expires
                log.warning("natskv: closing an idle replica of %r: %s", self.bucket.name, exc)
            with self._lock:
                self._values.clear()
                self._revisions.clear()
                self._deleted.clear()
                self._ready.clear()
                self._dormant = True  # once closed: its consumer is gone
            return True

    async def _detach(self, subscription: tuple[SharedFeed, FeedSubscriber]) -> None:
        # Loop thread. Nothing is delivered once the subscriber has left the feed; what was
        # delivered and not yet applied is dropped with the values.
        try:
            await unsubscribe_feed(*subscription)
        finally:
            self._pending.clear()

    # -- applying (loop thread) ------------------------------------------------------------------

    def _apply(self, event: Any) -> None:
        # The feed's sink. Events are applied in batches, one loop step later: a burst of
        # deliveries (the initial values, a busy bucket) takes the lock and wakes waiters once.
        if type(event) is FeedClosed:
            self._subscription = None
            self._dead = event.error
            self._stale = True
            with self._changed:
                self._changed.notify_all()  # wait_for() raises it
            return
        self._pending.append(event)
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._apply_pending)

    def _apply_many(self, entries: list[Any]) -> None:
        # The feed's sink for a run of entries: _apply on each, in one call.
        pending = self._pending
        if not pending:
            asyncio.get_running_loop().call_soon(self._apply_pending)
        pending.extend(entries)

    def _apply_pending(self) -> None:
        batch, self._pending = self._pending, []
        if self._ready.is_set():
            if len(batch) > APPLY_SLICE:
                # A long run is applied a slice per turn of the loop: one _core call holds the
                # GIL throughout, and a caller's thread woken meanwhile (bulk_create's, to send
                # its next batch) would wait for all of it. What arrives meanwhile goes after
                # the rest (_apply_many sees a pending list and leaves the scheduling to this).
                batch, self._pending = batch[:APPLY_SLICE], batch[APPLY_SLICE:]
                asyncio.get_running_loop().call_soon(self._apply_pending)
            self._apply_batch(batch)
            return
        # The initial load allocates a value per key and frees nothing: the collector's passes
        # over that young heap would cost a sixth of it (as in the model store's index rebuild).
        with collector_paused():
            self._apply_batch(batch)

    def _apply_batch(self, batch: list[Any]) -> None:
        bucket = self.bucket
        cut = len(bucket._proto.subject_prefix)
        pattern = self._pattern
        # Keys and values decoded outside the lock, so readers wait only for the dict updates.
        changes: list[Any] = []
        loaded = False
        bulk = getattr(self._storage, "apply_entries", None)
        if bulk is not None and pattern.exact and type(bucket.codec) is JSONCodec:
            self._apply_runs(batch, bulk, cut)
            return
        if pattern.exact and type(bucket.codec) is JSONCodec:
            # The server's filter did the matching: every key is wanted. Keys and JSON values
            # decoded in _core, a run of entries (between markers) per call.
            decode, sep, start = core.decode_entries, bucket.sep, 0
            for i, raw in enumerate(batch):
                if raw is INITIAL_DONE:
                    changes.extend(decode(batch[start:i], cut, sep, orjson.loads))
                    changes.append(None)  # where the initial values end, for on_loaded
                    loaded = True
                    start = i + 1
            changes.extend(decode(batch[start:] if start else batch, cut, sep, orjson.loads))
        else:
            key_of, value_of = bucket._key_of_token, bucket._value
            for raw in batch:
                if raw is INITIAL_DONE:
                    loaded = True
                    changes.append(None)
                    continue
                key = key_of(raw.subject[cut:])
                if pattern.exact or pattern.match(key):
                    put = raw.operation == "PUT"
                    changes.append((raw.revision, key, put, value_of(raw) if put else None))
                else:
                    changes.append((raw.revision, None, False, None))  # passed, not applied
        apply_change = self._change if self._storage is None else self._change_stored
        with self._changed:
            for change in changes:
                if change is None:
                    self._tell_loaded()
                    continue
                revision, key, put, new = change
                # The stream position moves for every event, matched or not: wait_for() relies on it.
                if revision > self.revision:
                    self.revision = revision
                if key is not None:
                    apply_change(key, put, new, revision)
            self._settle()
        if loaded:
            self._ready.set()

    def _apply_runs(self, batch: list[Any], bulk: Callable[..., int | None], cut: int) -> None:
        # _apply_batch when the storage applies runs of entries itself (a model's records): each
        # run between markers goes to it in one call, decoded and stored in _core, under the lock
        # (it stores as it decodes: no list of decoded values in between).
        sep, start, loaded = self.bucket.sep, 0, False
        # Where the runs end: at each marker (found by identity: comparing an entry would call
        # its __eq__), and at the end.
        ends = [i for i, event in enumerate(batch) if event is INITIAL_DONE]
        ends.append(len(batch))
        with self._changed:
            for i in ends:
                run = batch[start:i] if start or i < len(batch) else batch
                if run is not batch:
                    batch[start:i] = [None] * (i - start)  # the run alone holds its entries
                start = i + 1
                if run:
                    top = bulk(run, cut, sep, self._deleted)
                    if top is None:  # declined: one change at a time
                        top = 0
                        decoded = core.decode_entries(run, cut, sep, orjson.loads)
                        for entry, (revision, key, put, new) in zip(run, decoded, strict=True):
                            top = max(top, revision)
                            self._change_stored(key, put, new, revision, entry.reason)
                    if top > self.revision:
                        self.revision = top
                if i < len(batch):
                    loaded = True
                    self._tell_loaded()
            self._settle()
        if loaded:
            self._ready.set()

    def _tell_loaded(self) -> None:
        # Under the lock: the initial values are in.
        if self._on_loaded is not None:
            try:
                self._on_loaded()
            except Exception:
                log.exception("natskv: error in a replica's on_loaded hook")

    def _settle(self) -> None:
        # Under the lock, after a batch: forget deletes the replica has passed, wake the waiters.
        deleted = self._deleted
        if deleted:
            for key in [k for k, r in deleted.items() if r <= self.revision]:
                del deleted[key]
        self._changed.notify_all()

    def _change(self, key: str, put: bool, new: Any, revision: int) -> None:
        # Under the lock. A revision at or below the key's own is one already applied.
        if self._storage is not None:
            self._change_stored(key, put, new, revision)
            return
        values, revisions = self._values, self._revisions
        if revision <= revisions.get(key, 0) or revision <= self._deleted.get(key, 0):
            return
        old = values.get(key)
        if put:
            values[key] = new
            revisions[key] = revision
        elif old is not None or key in values:
            del values[key]
            del revisions[key]
        else:
            return
        on_apply = self._on_apply
        if on_apply is not None and (old is not None or new is not None):
            try:
                on_apply(key, old, new, revision)
            except Exception:
                log.exception("natskv: error applying %r to a replica hook", key)

    def _change_stored(self, key: str, put: bool, new: Any, revision: int, reason: str = "") -> None:
        # _change when the hook keeps the values: it stores the change, and nothing is kept here.
        # A delete's ``reason`` (``"evicted"``) goes to the hook when there is one.
        assert self._storage is not None and self._on_apply is not None
        held = self._storage.held(key)
        old, current = held if held is not None else (None, 0)
        if revision <= current or revision <= self._deleted.get(key, 0):
            return
        if not put:
            if held is None:
                return
            new = None
        try:
            if reason:
                self._on_apply(key, old, new, revision, reason)  # type: ignore[call-arg]
            else:
                self._on_apply(key, old, new, revision)
        except Exception:
            log.exception("natskv: error applying %r to a replica hook", key)

    def apply_written(self, writes: list[tuple[str, bool, Any]], last_revision: int) -> None:
        """Apply this client's own acknowledged writes now (read-your-writes without the watch).

        ``writes`` are ``(key, is_put, value)`` in the order they were stored, ``last_revision``
        the revision of the last one: one write, or an atomic batch (stored at consecutive
        revisions). Values go through the bucket's codec, so they read back exactly as the
        watch would deliver them; a delete's value is its reason (``"evicted"``) or None. Any
        thread; the apply hook runs here, under the lock.
        """
        if self._stale and self._dead is None:  # a forked child's first write
            self.revive()
        pattern = self._pattern
        first = last_revision - len(writes) + 1
        changes: list[tuple[str, bool, Any, int, str]] = []
        for offset, (key, put, value) in enumerate(writes):
            # Always matched here: ``pattern.exact`` says the server's subject filter already
            # did the matching, which is true of the watch's deliveries, not of these writes
            # (a model's batch also writes its unique-value keys).
            if pattern.match(key):
                if put:
                    changes.append((key, put, self._as_delivered(value), first + offset, ""))
                else:
                    changes.append((key, put, None, first + offset, value or ""))
        if not changes:
            return
        stored = self._storage is not None
        with self._changed:
            for key, put, new, revision, reason in changes:
                if stored:
                    self._change_stored(key, put, new, revision, reason)
                else:
                    self._change(key, put, new, revision)
                if not put and revision > self.revision:
                    self._deleted[key] = revision
            self._changed.notify_all()

    def _as_delivered(self, value: Any) -> Any:
        # Encoded and decoded, as the watch would deliver it (a tuple comes back a list, ...).
        payload, headers = self.bucket._encode(value)
        return payload if headers and RAW_HEADER in headers else self.bucket.codec.decode(payload)

    # -- reading (any thread) ------------------------------------------------------------------

    def wait_for(self, revision: int, timeout: float | None = None) -> None:
        """Block until this replica has applied ``revision`` (read-your-writes), at most ``timeout``
        seconds.

        ``revision`` must be that of a write to a key under the replica's pattern: writes to
        other keys are never delivered to it, so their revisions are only passed, not reached.
        """
        runner.check_not_loop_thread("LocalReplica.wait_for()")
        limit = self._limit(timeout)
        self._uses += 1
        if self._stale:  # a forked child's first read, or closed by the bucket manager
            # Loaded as any read loads (revive's own limit): a limit cut short inside the
            # subscribe call would leave a subscription nobody holds.
            self.revive()
        with self._changed:
            self._waiters += 1
            try:
                reached = self._changed.wait_for(lambda: self.revision >= revision or self._dead is not None, limit)
            finally:
                self._waiters -= 1
            if self._dead is not None:
                raise fresh_error(self._dead)
            if not reached:
                raise NatsKVTimeoutError(
                    f"replica of bucket {self.bucket.name!r} did not reach revision {revision} within {limit} s "
                    f"(at {self.revision}); is the watch connected?"
                )

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` as of the last applied change, or ``default``."""
        with self.lock:
            if self._storage is None:
                return self._values.get(key, default)
            held = self._storage.held(key)
            return default if held is None else held[0]

    def revision_of(self, key: str) -> int | None:
        """The revision of ``key``'s current value, None when absent."""
        with self.lock:
            if self._storage is None:
                return self._revisions.get(key)
            held = self._storage.held(key)
            return None if held is None else held[1]

    def snapshot(self) -> dict[str, Any]:
        """A copy of every key and value."""
        with self.lock:
            return dict(self._values) if self._storage is None else dict(self._storage.items())

    def __contains__(self, key: object) -> bool:
        with self.lock:
            if self._storage is None:
                return key in self._values
            return type(key) is str and self._storage.held(key) is not None

    def __len__(self) -> int:
        with self.lock:
            return len(self._values if self._storage is None else self._storage)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.snapshot()))

    @property
    def lock(self) -> threading.Lock:
        """Hold this to read several values (or an index kept by ``on_apply``) consistently."""
        # Counted before _stale is tested: see _close_idle. A lost increment between threads
        # still changes the count, which is all the bucket manager looks at.
        self._uses += 1
        if self._stale:  # a forked child's first read, a dead feed, or closed when idle
            self.revive()
        return self._lock
