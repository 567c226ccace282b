"""Flask integration: an extension owning the client, a Flask-Caching backend, a Flask-Session store.

- :class:`NatsKV` (``NatsKV(app)`` or ``init_app(app)``) reads ``NATSKV_URL``, ``NATSKV_BUCKET`` and
  ``NATSKV_OPTIONS`` and gives handlers ``ext.client`` and ``ext.bucket(name)``.
- :class:`NatsKVCache` is a Flask-Caching backend: ``CACHE_TYPE = "natskv.contrib.flask.NatsKVCache"``,
  with an optional near cache (hits answered from process memory, kept coherent by a watch).
- :class:`NatsKVSessionInterface` stores Flask-Session sessions in a bucket of their own, each
  with a per-key TTL of the session lifetime (``SESSION_TYPE = "natskv"`` with :class:`NatsKV`).

One client per process and configuration serves every request, thread, app, cache and session
store that names the same servers and options. It connects on first use, never at import or at
``init_app``, so gunicorn's master with ``--preload`` holds no connection. In a forked worker the
client reconnects by itself on first use, and natskv closes it at interpreter exit: nothing here
needs a teardown hook.

Every call blocks the caller's thread (a request thread; never natskv's loop thread).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

try:
    from flask import Flask, current_app
    from flask_caching.backends.base import BaseCache
    from flask_session.base import ServerSideSession, ServerSideSessionInterface
    from flask_session.defaults import Defaults
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"natskv.contrib.flask needs Flask, Flask-Caching and Flask-Session ({exc}): "
        'pip install "natskv[flask]"'
    ) from exc

import natskv
from natskv.contrib.cache import KVCache, codec_named
from natskv.errors import ConfigurationError, InvalidArgumentError, InvalidKeyError

__all__ = ["NatsKV", "NatsKVCache", "NatsKVSession", "NatsKVSessionInterface", "shared_client"]

Servers = str | Sequence[str] | None

DEFAULT_BUCKET = "flask"
DEFAULT_CACHE_BUCKET = "flask_cache"
DEFAULT_SESSION_BUCKET = "flask_sessions"

# -- one client (and one cache per bucket) per process and configuration ------------------------------

_clients: dict[tuple[Any, ...], natskv.Client] = {}
_caches: dict[tuple[Any, ...], KVCache] = {}
_lock = threading.Lock()


def _after_fork() -> None:
    # Another thread of the parent may have held the lock at fork(): the child needs a free one.
    # The clients themselves reconnect in the child on their first call.
    global _lock  # noqa: PLW0603 - the child's module state is replaced, as the runner does
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_after_fork)


def _servers_key(servers: Servers) -> tuple[str, ...]:
    if not servers:
        return ()
    if isinstance(servers, str):
        return tuple(s.strip() for s in servers.split(",") if s.strip())
    if not isinstance(servers, Sequence) or not all(isinstance(s, str) for s in servers):
        raise ConfigurationError(
            f"a NATS server setting (NATSKV_URL, CACHE_NATSKV_URL, SESSION_NATSKV_URL) is a URL, comma-separated "
            f"URLs or a list of them, not {servers!r}"
        )
    return tuple(servers)


def _options(options: Mapping[str, Any] | None, setting: str) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(
            f"{setting} must be a dict of natskv.connect() options, not {type(options).__name__}"
        )
    return dict(options)


def _config_key(servers: Servers, options: Mapping[str, Any]) -> tuple[Any, ...]:
    return (_servers_key(servers), tuple(sorted((k, repr(v)) for k, v in options.items())))


def shared_client(servers: Servers = None, options: Mapping[str, Any] | None = None) -> natskv.Client:
    """This process's client for ``servers`` and ``options`` (of :func:`natskv.connect`), connected
    on the first call and shared afterwards. ``servers`` None or empty: ``NATS_URL``, else natskv's
    embedded server (development). Do not close it: natskv closes it at interpreter exit."""
    opts = _options(options, "options")
    key = _config_key(servers, opts)
    client = _clients.get(key)
    if client is not None:
        return client
    with _lock:
        client = _clients.get(key)
        if client is None:
            urls = list(_servers_key(servers)) or None
            client = _clients[key] = natskv.connect(urls, **opts)
    return client


def _shared_cache(
    servers: Servers,
    options: Mapping[str, Any],
    *,
    bucket: str,
    serializer: str,
    near_cache: bool,
    near_cache_size: int,
    near_cache_bytes: int,
    replicas: int,
    storage: str,
) -> KVCache:
    """This process's :class:`KVCache` for a configuration, on the shared client."""
    key = (*_config_key(servers, options), bucket, serializer, near_cache, near_cache_size, near_cache_bytes,
           replicas, storage)
    cache = _caches.get(key)
    if cache is not None:
        return cache
    client = shared_client(servers, options)
    with _lock:
        cache = _caches.get(key)
        if cache is None:
            kv = client.bucket(bucket, history=1, replicas=replicas, storage=storage, codec=codec_named(serializer))
            cache = _caches[key] = KVCache(kv, near_cache=near_cache, near_cache_size=near_cache_size,
                                           near_cache_bytes=near_cache_bytes)
    return cache


# -- the extension --------------------------------------------------------------------------------------


class NatsKVState:
    """What :class:`NatsKV` keeps for one app, in ``app.extensions["natskv"]``."""

    def __init__(self, url: Servers, bucket: str, options: dict[str, Any]) -> None:
        self.url = url
        self.default_bucket = bucket
        self.options = options

    @property
    def client(self) -> natskv.Client:
        """The process's shared client for this app's settings (connected on first use)."""
        return shared_client(self.url, self.options)

    def bucket(self, name: str | None = None, **options: Any) -> natskv.Bucket:
        """The bucket ``name`` (default: ``NATSKV_BUCKET``), created with ``options`` (those of
        :meth:`natskv.Client.bucket`) if it does not exist."""
        return self.client.bucket(name or self.default_bucket, **options)


class NatsKV:
    """The Flask extension: ``NatsKV(app)``, or ``ext = NatsKV()`` then ``ext.init_app(app)``.

    Settings: ``NATSKV_URL`` (a URL, comma-separated URLs or a list; unset or empty: ``NATS_URL``,
    else natskv's embedded server, for development), ``NATSKV_BUCKET`` (the bucket ``ext.bucket()`` opens;
    default ``"flask"``) and ``NATSKV_OPTIONS`` (a dict of :func:`natskv.connect` options:
    credentials, TLS files, timeouts, name). With ``SESSION_TYPE = "natskv"`` it also installs
    :class:`NatsKVSessionInterface` as the app's session interface (do not call Flask-Session's
    ``Session(app)`` then: it does not know that type).

    Apps with the same settings share one client per process. Nothing connects before the first
    use of ``ext.client`` or ``ext.bucket()``.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self.app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read and check ``app``'s settings and register the extension (no connection yet)."""
        config = app.config
        url = config.get("NATSKV_URL") or None
        _servers_key(url)
        bucket = config.get("NATSKV_BUCKET") or DEFAULT_BUCKET
        if not isinstance(bucket, str):
            raise ConfigurationError(f"NATSKV_BUCKET must be a bucket name, not {bucket!r}")
        options = _options(config.get("NATSKV_OPTIONS"), "NATSKV_OPTIONS")
        app.extensions["natskv"] = NatsKVState(url, bucket, options)
        if str(config.get("SESSION_TYPE", "")).lower() == "natskv":
            app.session_interface = NatsKVSessionInterface.from_app(app)

    def _state(self) -> NatsKVState:
        app = self.app if self.app is not None else current_app
        try:
            state: NatsKVState = app.extensions["natskv"]
        except KeyError:
            raise ConfigurationError("NatsKV is not set up on this app: call ext.init_app(app) first") from None
        return state

    @property
    def client(self) -> natskv.Client:
        """The shared client of the app (``NatsKV(app)``'s, else the current app's)."""
        return self._state().client

    def bucket(self, name: str | None = None, **options: Any) -> natskv.Bucket:
        """The bucket ``name`` (default: ``NATSKV_BUCKET``), created with ``options`` (those of
        :meth:`natskv.Client.bucket`) if it does not exist."""
        return self._state().bucket(name, **options)


# -- Flask-Caching ----------------------------------------------------------------------------------------

Timeout = int | float | dt.timedelta | None


class NatsKVCache(BaseCache):
    """A Flask-Caching backend on a bucket: ``CACHE_TYPE = "natskv.contrib.flask.NatsKVCache"``.

    Settings (read by :meth:`factory`): ``CACHE_NATSKV_URL`` (default ``NATSKV_URL``; unset: ``NATS_URL``, else the
    embedded server), ``CACHE_NATSKV_BUCKET`` (default ``"flask_cache"``), ``CACHE_NATSKV_OPTIONS``
    (default ``NATSKV_OPTIONS``), ``CACHE_NATSKV_NEAR_CACHE`` (bool), ``CACHE_NATSKV_NEAR_CACHE_SIZE``
    (entries, default 10000), ``CACHE_NATSKV_NEAR_CACHE_BYTES`` (of values, default 64 MiB),
    ``CACHE_NATSKV_SERIALIZER`` (``"pickle"`` or ``"json"``), plus
    Flask-Caching's ``CACHE_DEFAULT_TIMEOUT`` and ``CACHE_KEY_PREFIX``.

    Timeouts follow Flask-Caching: ``None`` means the default timeout, ``0`` never expires, a
    negative number expires at once; seconds may be an int, a float or a ``timedelta``. Each key
    gets its own TTL on the server. ``inc``/``dec`` are atomic across processes; a missing key
    starts from 0. ``clear`` with a key prefix deletes the keys with that prefix; without one it
    empties the bucket (one purge); either way the bucket stays. Backend errors raise natskv
    errors (Flask-Caching's decorators log them and call the view).

    The client connects on the first cache call, not when the app is set up.
    """

    def __init__(
        self,
        url: Servers = None,
        *,
        bucket: str = DEFAULT_CACHE_BUCKET,
        options: Mapping[str, Any] | None = None,
        near_cache: bool = False,
        near_cache_size: int = 10_000,
        near_cache_bytes: int = 64 << 20,
        serializer: str = "pickle",
        replicas: int = 1,
        storage: str = "file",
        default_timeout: Timeout = 300,
        key_prefix: str | Callable[[], str] | None = None,
        ignore_delete_many_errors: bool = False,
    ) -> None:
        super().__init__(default_timeout=300, ignore_delete_many_errors=ignore_delete_many_errors)
        # Checked here, so that a bad setting fails when the app is set up, not on a request.
        seconds = _seconds(default_timeout, "default_timeout")
        if seconds is None:
            raise InvalidArgumentError("default_timeout must be a number of seconds (0: never expire), not None")
        self.default_timeout = math.ceil(seconds)  # whole seconds, as in cachelib
        _servers_key(url)
        codec_named(serializer)
        if not isinstance(near_cache, bool):
            raise ConfigurationError(f"CACHE_NATSKV_NEAR_CACHE must be True or False, not {near_cache!r}")
        if isinstance(near_cache_size, bool) or not isinstance(near_cache_size, int) or near_cache_size < 1:
            raise ConfigurationError(f"CACHE_NATSKV_NEAR_CACHE_SIZE must be a positive int, not {near_cache_size!r}")
        if isinstance(near_cache_bytes, bool) or not isinstance(near_cache_bytes, int) or near_cache_bytes < 1:
            raise ConfigurationError(
                f"CACHE_NATSKV_NEAR_CACHE_BYTES must be a positive int, not {near_cache_bytes!r}"
            )
        self.key_prefix = key_prefix or ""
        self._settings: dict[str, Any] = {
            "bucket": bucket, "serializer": serializer, "near_cache": near_cache,
            "near_cache_size": near_cache_size, "near_cache_bytes": near_cache_bytes,
            "replicas": replicas, "storage": storage,
        }
        self._url = url
        self._options = _options(options, "CACHE_NATSKV_OPTIONS")
        self._kv: KVCache | None = None

    @classmethod
    def factory(cls, app: Flask, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]) -> NatsKVCache:
        """Flask-Caching's constructor hook: ``kwargs`` holds ``default_timeout``,
        ``ignore_delete_many_errors`` and ``CACHE_OPTIONS``; the ``CACHE_NATSKV_*`` settings fill in
        what those do not give."""
        settings = {
            "url": ("CACHE_NATSKV_URL", "NATSKV_URL"),
            "bucket": ("CACHE_NATSKV_BUCKET",),
            "options": ("CACHE_NATSKV_OPTIONS", "NATSKV_OPTIONS"),
            "near_cache": ("CACHE_NATSKV_NEAR_CACHE",),
            "near_cache_size": ("CACHE_NATSKV_NEAR_CACHE_SIZE",),
            "near_cache_bytes": ("CACHE_NATSKV_NEAR_CACHE_BYTES",),
            "serializer": ("CACHE_NATSKV_SERIALIZER",),
            "key_prefix": ("CACHE_KEY_PREFIX",),
        }
        for arg, names in settings.items():
            for setting in names:
                if config.get(setting) is not None and arg not in kwargs:
                    kwargs[arg] = config[setting]
        return cls(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<natskv.contrib.flask.NatsKVCache on bucket {self._settings['bucket']!r}>"

    @property
    def kv(self) -> KVCache:
        """The process's :class:`~natskv.contrib.cache.KVCache` under this backend (made on first use)."""
        kv = self._kv
        if kv is None:
            kv = self._kv = _shared_cache(self._url, self._options, **self._settings)
        return kv

    def _key(self, key: str) -> str:
        prefix = self.key_prefix if isinstance(self.key_prefix, str) else self.key_prefix()
        return f"{prefix}{key}"

    def _ttl(self, timeout: Timeout) -> float | None:
        """A Flask-Caching timeout as KVCache's: None forever, <= 0 remove now, else seconds."""
        seconds = self.default_timeout if timeout is None else _seconds(timeout, "timeout")
        assert seconds is not None
        if seconds == 0:
            return None
        return seconds if seconds > 0 else -1.0

    # -- reads --------------------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The value of ``key``, or None when absent or expired."""
        return self.kv.get(self._key(key))

    def get_many(self, *keys: str) -> list[Any]:
        """The values of ``keys`` in order (None for the absent), in batch reads."""
        if len(keys) == 1:
            # One direct get is cheaper than a batch read, and it enters the near cache (a batch
            # read does not): memoize reads its single version key this way on every call.
            return [self.get(keys[0])]
        full = [self._key(k) for k in keys]
        found = self.kv.get_many(full)
        return [found.get(k) for k in full]

    def has(self, key: str) -> bool:
        """Whether ``key`` holds an unexpired value."""
        return self.kv.has(self._key(key))

    # -- writes -------------------------------------------------------------------------------------

    def set(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        """Store ``value`` (see the class docstring for ``timeout``); True."""
        self.kv.set(self._key(key), value, self._ttl(timeout))
        return True

    def add(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        """Store ``value`` only if ``key`` is absent; whether it was stored."""
        return self.kv.add(self._key(key), value, self._ttl(timeout))

    def set_many(self, mapping: Mapping[str, Any], timeout: Timeout = None) -> list[Any]:
        """Store many values in pipelined writes; the keys stored (all of them, or an error)."""
        self.kv.set_many({self._key(k): v for k, v in mapping.items()}, self._ttl(timeout))
        return list(mapping)

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it held a value."""
        return self.kv.delete(self._key(key))

    def delete_many(self, *keys: str) -> list[Any]:
        """Remove ``keys`` in pipelined writes; the keys now absent (absent ones count as
        deleted). A failed delete raises, unless ``CACHE_IGNORE_ERRORS`` is set: then the keys
        that could not be deleted are left out of the answer."""
        if not keys:
            return []
        try:
            self.kv.delete_many([self._key(k) for k in keys])
            return list(keys)
        except Exception:
            if not self.ignore_delete_many_errors:
                raise
        deleted = []
        for key in keys:
            try:
                self.kv.delete(self._key(key))
            except Exception:  # noqa: S112 - asked to ignore: the key is left out of the answer
                continue
            deleted.append(key)
        return deleted

    def clear(self) -> bool:
        """Remove this cache's keys (see the class docstring) and keep the bucket; True."""
        prefix = self.key_prefix if isinstance(self.key_prefix, str) else self.key_prefix()
        if not prefix:
            self.kv.clear()
            return True
        keys = self.kv.bucket.keys(re.compile("^" + re.escape(prefix), re.DOTALL))
        if keys:
            self.kv.delete_many(keys)
        return True

    def inc(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` atomically (a missing key starts from 0); the new value."""
        return self.kv.incr(self._key(key), delta, missing_ok=True)

    def dec(self, key: str, delta: int = 1) -> int:
        """Subtract ``delta`` atomically (a missing key starts from 0); the new value."""
        return self.kv.incr(self._key(key), -delta, missing_ok=True)


def _seconds(timeout: Timeout, what: str) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, dt.timedelta):
        return timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
        raise InvalidArgumentError(f"{what} must be a number of seconds or a timedelta, not {timeout!r}")
    return timeout


# -- Flask-Session ------------------------------------------------------------------------------------------


class NatsKVSession(ServerSideSession):
    """A server-side session stored in a natskv bucket."""


class NatsKVSessionInterface(ServerSideSessionInterface):
    """Flask-Session's server-side sessions in a bucket of their own: one key per session
    (``key_prefix`` + session id) whose per-key TTL is ``app.permanent_session_lifetime``
    (renewed on every save), so expired sessions vanish from the server by themselves.

    Install it with ``app.session_interface = NatsKVSessionInterface(app)``, or set
    ``SESSION_TYPE = "natskv"`` and use :class:`NatsKV`. Settings read when an argument is not
    given: ``SESSION_NATSKV_URL`` (default ``NATSKV_URL``), ``SESSION_NATSKV_OPTIONS`` (default
    ``NATSKV_OPTIONS``), ``SESSION_NATSKV_BUCKET`` (default ``"flask_sessions"``) and
    Flask-Session's ``SESSION_KEY_PREFIX``, ``SESSION_PERMANENT``, ``SESSION_ID_LENGTH``,
    ``SESSION_SERIALIZATION_FORMAT`` (msgpack or json). ``client`` may be any natskv client.

    Session ids come from cookies, that is from anyone: an id natskv cannot use as a key opens a
    new session. The bucket is opened on the first request, not here.
    """

    session_class = NatsKVSession
    ttl = True

    def __init__(
        self,
        app: Flask,
        *,
        client: natskv.Client | None = None,
        url: Servers = None,
        options: Mapping[str, Any] | None = None,
        bucket: str | None = None,
        replicas: int = 1,
        storage: str = "file",
        key_prefix: str | None = None,
        permanent: bool | None = None,
        sid_length: int | None = None,
        serialization_format: str | None = None,
    ) -> None:
        config = app.config

        def setting(value: Any, name: str, default: Any) -> Any:
            return value if value is not None else config.get(name, default)

        super().__init__(
            app,
            key_prefix=setting(key_prefix, "SESSION_KEY_PREFIX", Defaults.SESSION_KEY_PREFIX),
            use_signer=False,
            permanent=setting(permanent, "SESSION_PERMANENT", Defaults.SESSION_PERMANENT),
            sid_length=setting(sid_length, "SESSION_ID_LENGTH", Defaults.SESSION_ID_LENGTH),
            serialization_format=setting(
                serialization_format, "SESSION_SERIALIZATION_FORMAT", Defaults.SESSION_SERIALIZATION_FORMAT
            ),
        )
        self.client = client
        self.url = url if url is not None else (config.get("SESSION_NATSKV_URL") or config.get("NATSKV_URL") or None)
        _servers_key(self.url)
        self.options = _options(
            options if options is not None else config.get("SESSION_NATSKV_OPTIONS", config.get("NATSKV_OPTIONS")),
            "SESSION_NATSKV_OPTIONS",
        )
        self.bucket_name: str = setting(bucket, "SESSION_NATSKV_BUCKET", DEFAULT_SESSION_BUCKET)
        self.replicas = replicas
        self.storage = storage
        self._bucket: natskv.Bucket | None = None

    @classmethod
    def from_app(cls, app: Flask) -> NatsKVSessionInterface:
        """The interface for ``app``'s settings (what ``SESSION_TYPE = "natskv"`` installs)."""
        return cls(app)

    @property
    def bucket(self) -> natskv.Bucket:
        """The sessions' bucket (raw bytes: Flask-Session serializes), created if missing."""
        bucket = self._bucket
        if bucket is None:
            client = self.client if self.client is not None else shared_client(self.url, self.options)
            bucket = self._bucket = client.bucket(
                self.bucket_name, history=1, replicas=self.replicas, storage=self.storage, codec="bytes"
            )
        return bucket

    def _retrieve_session_data(self, store_id: str) -> dict[str, Any] | None:
        try:
            data = self.bucket.get(store_id)
        except InvalidKeyError:
            return None  # not an id this interface made: open a new session
        if not data:
            return None
        decoded: dict[str, Any] = self.serializer.decode(data)
        return decoded

    def _delete_session(self, store_id: str) -> None:
        try:
            self.bucket.delete(store_id)
        except InvalidKeyError:
            pass

    def _upsert_session(self, session_lifetime: dt.timedelta, session: ServerSideSession, store_id: str) -> None:
        # The server counts TTLs in whole seconds, at least one.
        ttl = max(1, math.ceil(session_lifetime.total_seconds()))
        self.bucket.set(store_id, self.serializer.encode(session), ttl=ttl)
