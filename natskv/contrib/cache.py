"""A cache on a KV bucket, with an optional near cache: what the Django and Flask backends share.

:class:`KVCache` gives a bucket the semantics web caches expect. Keys are the framework's
finished keys (prefix and version already in them). TTLs are per key: ``None`` keeps a value
forever, and ``0`` or less removes it at once. ``add`` only stores absent keys, ``touch`` changes
an expiry, ``incr`` is atomic, and ``clear`` empties the bucket but keeps it. Values go through a
:class:`CacheCodec`: pickle by default (any picklable value, the Django convention), with plain
integers stored as digits so that ``incr`` adds on the server's copy.

:class:`NearCache` answers repeated reads from process memory: a bounded LRU of encoded values.
One watch per process and bucket keeps it coherent: a write or a delete in any process removes the
entry in every other process within milliseconds. Expiry is honoured locally too, since each entry
carries its key's expiry time. Reads then cost microseconds instead of a round trip. A client's
bucket manager (:mod:`natskv.manager`) stops the watch of a near cache nobody used for its
``keep_alive`` seconds and drops its entries (coherence ends with the watch); the next read starts
the watch again.

Security: with the pickle codec, whoever can write to the bucket can make every reader run code.
This is the same as Django's Redis and file caches. Give write access to the cache bucket only to
your application, or use the JSON codec.

Every call blocks the caller's thread (any thread but natskv's loop thread). :func:`shared_cache`
keeps one bucket and one near cache per process for each configuration, on one client per
process (:func:`shared_client`) shared by every thread and every framework integration. Django
makes a backend object per thread.
"""

from __future__ import annotations

import math
import os
import pickle
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import natskv
from natskv._runner import runner
from natskv.aio.watch import INITIAL_DONE, FeedClosed, subscribe_feed, unsubscribe_feed
from natskv.codec import RAW_HEADER, JSONCodec
from natskv.errors import (
    InvalidArgumentError,
    JetStreamError,
    KeyExistsError,
    KeyNotFoundError,
    NatsKVError,
    NotConnectedError,
    SerializationError,
)
from natskv.kv import Bucket
from natskv.manager import report, track
from natskv.wire import headers as h
from natskv.wire import jsapi
from natskv.wire.jsapi import CAS_ERROR_CODES
from natskv.wire.kv import RawEntry

# Written (after the stream is purged) by clear(): near caches drop everything when they see it.
# A Django or Flask key always has a prefix and a version separated by ':', which this one lacks.
CLEAR_KEY = "natskv-cache-cleared"
_FOREVER = math.inf


class CacheCodec:
    """Pickle for any value, except that a plain ``int`` is stored as its digits, so that
    :meth:`natskv.Bucket.incr` can add to it. The two never meet: a pickle starts with the
    byte ``0x80`` (protocol 2 and newer), digits never do."""

    name = "natskv-cache"

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        if not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise InvalidArgumentError(f"pickle protocol must be 2..{pickle.HIGHEST_PROTOCOL}, not {protocol!r}")
        self.protocol = protocol

    def encode(self, value: Any) -> bytes:
        if type(value) is int:
            return str(value).encode()
        try:
            return pickle.dumps(value, self.protocol)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise SerializationError(f"cannot pickle a value of type {type(value).__name__}: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        if data[:1] == b"\x80":
            return pickle.loads(data)  # noqa: S301 - the cache's own bucket (see the module's security note)
        return int(data)


def codec_named(name: str) -> CacheCodec | JSONCodec:
    """The codec of a ``serializer`` option: ``"pickle"`` (default) or ``"json"``."""
    if name == "pickle":
        return CacheCodec()
    if name == "json":
        return JSONCodec()
    raise InvalidArgumentError(f"serializer must be 'pickle' or 'json', not {name!r}")


def ttl_seconds(timeout: float | None) -> float | None:
    """A cache timeout as a per-key TTL: None stays None (forever); positive numbers are seconds
    (the server rounds up to whole seconds). Callers handle 0 and below (remove now) first."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
        raise InvalidArgumentError(f"a cache timeout is a number of seconds or None, not {timeout!r}")
    return float(timeout)


class NearCache:
    """Recently read values of one bucket, in this process, kept coherent by a watch.

    Entries are ``key -> (payload, revision, expires)``, where ``expires`` is on the monotonic
    clock; at most ``max_entries`` of them and ``max_bytes`` of payloads (least recently used
    go first; a value over an eighth of ``max_bytes`` is not kept). The watch removes an entry
    when its key changes anywhere: its sink runs on natskv's loop thread (no hand-off). A value
    fetched from the server, or just written, is only entered if the watch saw no newer change
    of its key meanwhile (``_pending``), so an older value never replaces a newer one. After a
    fork the child drops everything and starts its own watch on first use: watches do not
    cross a fork. The same happens after the bucket manager closed an idle near cache.
    """

    sweep_kind = "feed"  # its bucket manager events: feed_opened, feed_closed

    def __init__(self, bucket: Bucket, max_entries: int = 10_000, max_bytes: int = 64 << 20) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InvalidArgumentError(f"near_cache_size must be a positive int, not {max_entries!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise InvalidArgumentError(f"near_cache_bytes must be a positive int, not {max_bytes!r}")
        # The watch needs no decoding: a bytes view of the same bucket hands it payloads as they are.
        self._raw = bucket._client.bucket(bucket.name, codec="bytes", sep=bucket.sep, create=False)
        self.max_entries = max_entries
        self.max_bytes = max_bytes  # of payloads: a few large values must not take the memory
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[bytes, int, float]] = OrderedDict()
        self._pending: dict[str, list[int]] = {}  # key -> [reads or writes in flight, newest revision seen]
        self._lock = threading.Lock()
        self._starting = threading.Lock()
        self._feed: tuple[Any, Any] | None = None  # (shared feed, this cache's place on it)
        self._prefix_len = 0
        self._pid = -1
        self.hits = self.misses = 0
        self._uses = 0  # lookups and reads or writes begun: the bucket manager compares it
        _near_caches.add(self)

    def __len__(self) -> int:
        return len(self._entries)

    # -- the watch --------------------------------------------------------------------------------

    def _watching(self) -> bool:
        return self._pid == os.getpid() and self._feed is not None

    def _ensure_watch(self) -> bool:
        """Start the watch in this process if it is not running; whether it runs. The feed's sink
        runs on natskv's loop thread and takes ``_lock``: the feed is started without holding it
        (under ``_starting``), or the loop thread would wait on this thread waiting on it."""
        if self._watching():
            return True
        with self._starting:
            if self._watching():
                return True
            with self._lock:
                self._entries.clear()
                self._bytes = 0
                self._pending.clear()
            raw = self._raw
            client = raw._client
            try:
                client._check()
                self._prefix_len = len(raw._proto.subject_prefix)
                self._feed = runner.call(
                    subscribe_feed(client._conn, raw._proto, ">", "new", self._on_event, self._on_events),
                    client.options.request_timeout,
                )
            except NotConnectedError:
                self._feed = None
                return False
            self._pid = os.getpid()
            track(self)
            report(client, "feed_opened", raw.name)
            return True

    def _sweep_state(self) -> tuple[natskv.Client, str, int, bool] | None:
        # See natskv.manager.Sweepable: open while its watch runs in this process.
        if not self._watching():
            return None
        return self._raw._client, self._raw.name, self._uses, True

    def _close_idle(self, uses: int) -> bool:
        # The bucket manager's thread. Under _starting, so no watch starts meanwhile; a read in
        # flight (in _pending) or one counted since the sweep looked keeps it open.
        with self._starting:
            with self._lock:
                feed = self._feed
                if feed is None or self._pid != os.getpid() or self._uses != uses or self._pending:
                    return False
                self._feed = None
                self._entries.clear()
                self._bytes = 0
            try:
                runner.call(unsubscribe_feed(*feed), self._raw._client.options.request_timeout)
            except NatsKVError:
                pass  # closed meanwhile: the feed went with the connection
            return True

    def _on_events(self, entries: list[Any]) -> None:
        for entry in entries:
            self._on_event(entry)

    def _on_event(self, event: Any) -> None:
        """A change of a key anywhere: forget its value. Loop thread: a few dict operations under
        ``_lock``, no decoding of values, no thread hand-off."""
        if type(event) is FeedClosed:
            # The connection closed for good: entries could go stale, so none are served.
            with self._lock:
                self._entries.clear()
                self._bytes = 0
                self._feed = None
            return
        if event is INITIAL_DONE:
            return
        key = self._raw._key_of_token(event.subject[self._prefix_len:])
        revision = event.revision
        with self._lock:
            if key == CLEAR_KEY:
                self._entries.clear()
                self._bytes = 0
                for waiting in self._pending.values():
                    waiting[1] = max(waiting[1], revision)
                return
            entry = self._entries.get(key)
            if entry is not None and entry[1] < revision:
                self._drop(key)
            pending = self._pending.get(key)
            if pending is not None and revision > pending[1]:
                pending[1] = revision

    def _after_fork(self) -> None:
        # The parent's feed, and its locks' state, do not belong to this process.
        self._lock = threading.Lock()
        self._starting = threading.Lock()
        self._entries = OrderedDict()
        self._bytes = 0
        self._pending = {}
        self._feed = None
        self._pid = -1

    # -- entries ----------------------------------------------------------------------------------

    def lookup(self, key: str) -> bytes | None:
        """The cached payload of ``key``, or None (not cached, or its expiry passed)."""
        with self._lock:
            self._uses += 1
            entry = self._entries.get(key)
            if entry is not None:
                if entry[2] > time.monotonic():
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[0]
                self._drop(key)
            self.misses += 1
            return None

    def begin(self, key: str) -> bool:
        """Note that ``key`` is being read or written, before asking the server; False when the
        watch cannot run (then nothing may be entered)."""
        if not self._ensure_watch():
            return False
        with self._lock:
            if self._feed is None:  # closed since (idle, or its connection): read uncached
                return False
            self._uses += 1
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = [1, 0]
            else:
                pending[0] += 1
        return True

    def end(self, key: str, payload: bytes | None, revision: int, expires: float) -> None:
        """Finish a :meth:`begin`: enter ``payload`` at ``revision`` (None: forget the key), unless
        the watch saw a newer change of the key meanwhile."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                # The watch started again since begin() (its connection closed, or a fork): what
                # it missed in between is unknown, so this value is not kept.
                self._drop(key)
                return
            newer = pending[1] > revision
            pending[0] -= 1
            if pending[0] <= 0:
                del self._pending[key]
            if payload is None or newer or expires <= time.monotonic() or len(payload) > self.max_bytes // 8:
                self._drop(key)  # gone, stale, expired, or too large to be worth its memory
                return
            current = self._entries.get(key)
            if current is not None and current[1] > revision:
                return
            self._drop(key)
            self._entries[key] = (payload, revision, expires)
            self._bytes += len(payload)
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, (old, _, _) = self._entries.popitem(last=False)
                self._bytes -= len(old)

    def _drop(self, key: str) -> None:
        """Remove ``key``'s entry (under the lock)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[0])

    def forget(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stop(self) -> None:
        """Stop the watch and drop every entry."""
        with self._lock:
            feed, self._feed = self._feed, None
            self._entries.clear()
            self._bytes = 0
        if feed is not None and self._pid == os.getpid() and not runner.in_loop_thread():
            try:
                runner.call(unsubscribe_feed(*feed), self._raw._client.options.request_timeout)
            except NatsKVError:
                pass  # closed meanwhile: the feed went with the connection


_near_caches: weakref.WeakSet[NearCache] = weakref.WeakSet()


def _near_caches_after_fork() -> None:
    for near in list(_near_caches):
        near._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_near_caches_after_fork)


class KVCache:
    """Cache semantics on a bucket (see the module docstring). Thread-safe; keys are final."""

    def __init__(
        self, bucket: Bucket, *, near_cache: bool = False, near_cache_size: int = 10_000,
        near_cache_bytes: int = 64 << 20,
    ) -> None:
        self.bucket = bucket
        self.codec = bucket.codec
        self.near: NearCache | None = (
            NearCache(bucket, near_cache_size, near_cache_bytes) if near_cache else None
        )

    def __repr__(self) -> str:
        near = f", near cache of {self.near.max_entries}" if self.near is not None else ""
        return f"<natskv.contrib.cache.KVCache on bucket {self.bucket.name!r}{near}>"

    # -- reads ------------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when it is absent or expired."""
        near = self.near
        if near is None:
            return self.bucket.get(key, default)
        payload = near.lookup(key)
        if payload is None:
            payload = self._fetch(key)
            if payload is None:
                return default
        return self.codec.decode(payload)

    def _fetch(self, key: str) -> bytes | None:
        """Read ``key`` from the server (any replica: the watch corrects a lagging one) and enter
        it in the near cache; its payload, or None when it holds no value."""
        near = self.near
        assert near is not None
        bucket = self.bucket
        enc = bucket._token(key)
        if not near.begin(key):
            return _payload(bucket._proto.message(enc, bucket._timeout(None), leader=False))
        found = None
        try:
            found = bucket._proto.message(enc, bucket._timeout(None), leader=False)
        finally:
            payload = _payload(found)
            if payload is None or found is None:
                near.end(key, None, 0, 0.0)
            else:
                near.end(key, payload, found[0].revision, _expires(found[1]))
        return payload

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """``{key: value}`` of the keys present: near-cache hits first, the rest in batch reads."""
        keys = list(keys)
        near = self.near
        out: dict[str, Any] = {}
        missing = keys
        if near is not None:
            missing = []
            for key in keys:
                payload = near.lookup(key)
                if payload is None:
                    missing.append(key)
                else:
                    out[key] = self.codec.decode(payload)
        if not missing:
            return out
        if near is None:
            out.update(self.bucket.get_many(missing))
            return out
        # Read with their headers (the expiry of each) and enter them, as get() does one by one.
        bucket = self.bucket
        tokens = {bucket._token(key): key for key in missing}
        entering = [key for key in missing if near.begin(key)]
        found: dict[str, tuple[Any, dict[str, str]]] = {}
        try:
            prefix = len(bucket._proto.subject_prefix)
            for raw, headers in bucket._proto.messages(list(tokens), bucket._timeout(None)):
                read = tokens.get(raw.subject[prefix:])
                if read is not None:
                    found[read] = (raw, headers)
        finally:
            for key in entering:
                hit = found.get(key)
                payload = _payload(hit)
                if payload is None or hit is None:
                    near.end(key, None, 0, 0.0)
                else:
                    near.end(key, payload, hit[0].revision, _expires(hit[1]))
        for key, hit in found.items():
            payload = _payload(hit)
            if payload is not None:
                out[key] = self.codec.decode(payload)
            elif _live(hit):  # raw bytes given to a JSON bucket: read as the bucket reads them
                out[key] = bucket._value(hit[0])
        return out

    def has(self, key: str) -> bool:
        """Whether ``key`` holds an unexpired value."""
        if self.near is not None:
            return self.near.lookup(key) is not None or self._fetch(key) is not None
        bucket = self.bucket
        return _payload(bucket._proto.message(bucket._token(key), bucket._timeout(None), leader=False)) is not None

    # -- writes -----------------------------------------------------------------------------------

    def set(self, key: str, value: Any, timeout: float | None) -> None:
        """Store ``value`` for ``timeout`` seconds (None: forever; 0 or less: remove the key)."""
        ttl = ttl_seconds(timeout)
        if ttl is not None and ttl <= 0:
            self.bucket._token(key)
            self.codec.encode(value)  # a value that cannot be stored fails as it would otherwise
            self.delete(key)
            return
        self._write(key, value, ttl, create=False)

    def add(self, key: str, value: Any, timeout: float | None) -> bool:
        """Store ``value`` only if ``key`` is absent; whether it was stored. With ``timeout`` 0 or
        less nothing stays: the answer is whether it would have been stored."""
        ttl = ttl_seconds(timeout)
        if ttl is not None and ttl <= 0:
            try:
                self.bucket.create(key, value, ttl=1)
            except KeyExistsError:
                return False
            self.delete(key)
            return True
        try:
            self._write(key, value, ttl, create=True)
        except KeyExistsError:
            return False
        return True

    def _write(self, key: str, value: Any, ttl: float | None, *, create: bool) -> int:
        """Store one value (encoded once) and enter it in the near cache; its revision."""
        near = self.near
        bucket = self.bucket
        if near is None:
            return bucket.create(key, value, ttl=ttl) if create else bucket.set(key, value, ttl=ttl)
        enc = bucket._token(key)
        payload, headers = bucket._encode(value, ttl)
        entering = (headers is None or RAW_HEADER not in headers) and near.begin(key)
        revision = 0
        try:
            if create:
                revision = bucket.create(key, value, ttl=ttl)
            else:
                revision = bucket._proto.put(enc, payload, headers, bucket._timeout(None))
        finally:
            if entering:
                expires = _FOREVER if ttl is None else time.monotonic() + ttl
                near.end(key, payload if revision else None, revision, expires)
        return revision

    def set_many(self, mapping: Mapping[str, Any], timeout: float | None) -> None:
        """Store many values in pipelined writes (not atomic: the first error is raised once all
        writes are answered)."""
        ttl = ttl_seconds(timeout)
        if ttl is not None and ttl <= 0:
            self.delete_many(mapping)
            return
        try:
            self.bucket.set_many(mapping, ttl=ttl)
        finally:
            if self.near is not None:
                for key in mapping:
                    self.near.forget(key)

    def touch(self, key: str, timeout: float | None) -> bool:
        """Give ``key`` a new expiry (None: never) keeping its value; False when it is absent."""
        ttl = ttl_seconds(timeout)
        if ttl is not None and ttl <= 0:
            return self.delete(key)
        bucket = self.bucket
        enc = bucket._token(key)
        limit = bucket._timeout(None)
        ttl_value = h.ttl_header(ttl)
        if ttl_value is not None:
            bucket._proto.require_ttl()
        try:
            while True:
                found = bucket._proto.message(enc, limit)
                if found is None or not _live(found):
                    return False
                raw, stored = found
                headers = h.with_expected_revision({RAW_HEADER: "1"} if RAW_HEADER in stored else None, raw.revision)
                if ttl_value is not None:
                    headers = h.with_ttl(headers, ttl_value)
                try:
                    bucket._proto.put(enc, raw.data, headers, limit)
                    return True
                except JetStreamError as exc:
                    if exc.err_code not in CAS_ERROR_CODES:
                        raise
                    # written meanwhile: look again
        finally:
            if self.near is not None:
                self.near.forget(key)

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it held a value."""
        bucket = self.bucket
        enc = bucket._token(key)
        found = bucket._proto.message(enc, bucket._timeout(None), leader=False)
        try:
            bucket.delete(key)
        finally:
            if self.near is not None:
                self.near.forget(key)
        return found is not None and _live(found)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove many keys in pipelined writes."""
        keys = list(keys)
        try:
            self.bucket._delete_many(keys, None)
        finally:
            if self.near is not None:
                for key in keys:
                    self.near.forget(key)

    def incr(self, key: str, delta: int, *, missing_ok: bool = False) -> int:
        """Add ``delta`` to the integer under ``key`` atomically, keeping its expiry, and return
        the new value. A missing key raises KeyNotFoundError (a ``KeyError``), or with
        ``missing_ok=True`` counts as 0 (and then never expires)."""
        if not missing_ok and not self.has(key):
            raise KeyNotFoundError(key, self.bucket.name)
        try:
            return self.bucket.incr(key, delta)
        finally:
            if self.near is not None:
                self.near.forget(key)

    def clear(self) -> None:
        """Remove every key and keep the bucket: one purge of its stream, then a marker that tells
        every near cache to drop its entries."""
        bucket = self.bucket
        proto = bucket._proto
        jsapi.call(proto.conn, f"STREAM.PURGE.{proto.stream}", {}, bucket._timeout(None))
        if self.near is not None:
            self.near.clear()
        bucket.set(CLEAR_KEY, 0, ttl=60 if proto.conn.api_level >= jsapi.API_LEVEL_TTL else None)

    def close(self) -> None:
        """Stop the near cache's watch (the client stays open: it is shared)."""
        if self.near is not None:
            self.near.stop()


def _live(found: tuple[RawEntry, dict[str, str]]) -> bool:
    """Whether a stored message is a value whose expiry has not passed."""
    return found[0].operation == h.OP_PUT and _expires(found[1]) > time.monotonic()


def _payload(found: tuple[RawEntry, dict[str, str]] | None) -> bytes | None:
    """The payload of a live stored value that the near cache may hold (not raw bytes given to a
    JSON bucket, which need their header to be read back)."""
    if found is None or not _live(found) or RAW_HEADER in found[1]:
        return None
    data: bytes = found[0].data
    return data


def _expires(headers: Mapping[str, str]) -> float:
    """The monotonic time a stored message expires (``inf``: never)."""
    wall = h.expiry(headers)
    return _FOREVER if wall is None else time.monotonic() + (wall - time.time())


# -- one client, and one cache per bucket, per process and configuration ----------------------------

_clients: dict[tuple[Any, ...], natskv.Client] = {}
_shared: dict[tuple[Any, ...], KVCache] = {}
_shared_lock = threading.Lock()


def _shared_after_fork() -> None:
    # Another thread of the parent may have held the lock at fork(): the child needs a free one.
    # The clients reconnect in the child on their first call.
    global _shared_lock  # noqa: PLW0603 - the child's module state is replaced, as the runner does
    _shared_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_shared_after_fork)


def _options_key(options: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def shared_client(servers: str | list[str] | tuple[str, ...] | None,
                  connect: Mapping[str, Any] | None = None) -> natskv.Client:
    """This process's client for ``servers`` and ``connect`` (options of :func:`natskv.connect`),
    connected on the first call and shared by every framework integration afterwards.
    ``servers`` None or empty: ``NATS_URL``, else natskv's embedded server (development). Do not
    close it: natskv closes it at interpreter exit."""
    options = dict(connect or {})
    key = (_servers_key(servers), _options_key(options))
    client = _clients.get(key)
    if client is not None:
        return client
    with _shared_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = natskv.connect(list(key[0]) or None, **options)
    return client


def shared_cache(
    servers: str | list[str] | tuple[str, ...] | None,
    *,
    bucket: str,
    serializer: str = "pickle",
    near_cache: bool = False,
    near_cache_size: int = 10_000,
    near_cache_bytes: int = 64 << 20,
    replicas: int = 1,
    history: int = 1,
    storage: str = "file",
    connect: Mapping[str, Any] | None = None,
) -> KVCache:
    """The process's :class:`KVCache` for this configuration, on :func:`shared_client`'s client:
    made (its bucket created if missing) on first use, then shared by every thread and backend
    object."""
    options = dict(connect or {})
    key = (_servers_key(servers), _options_key(options), bucket, serializer, near_cache, near_cache_size,
           near_cache_bytes, replicas, history, storage)
    cache = _shared.get(key)
    if cache is not None:
        return cache
    codec = codec_named(serializer)
    client = shared_client(servers, options)
    with _shared_lock:
        cache = _shared.get(key)
        if cache is None:
            kv = client.bucket(bucket, history=history, replicas=replicas, storage=storage, codec=codec)
            cache = _shared[key] = KVCache(kv, near_cache=near_cache, near_cache_size=near_cache_size,
                                           near_cache_bytes=near_cache_bytes)
    return cache


def _servers_key(servers: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if not servers:
        return ()
    if isinstance(servers, str):
        return tuple(s.strip() for s in servers.split(",") if s.strip())
    return tuple(servers)
