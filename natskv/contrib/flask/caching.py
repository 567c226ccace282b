"""The Flask-Caching backend :class:`NatsKVCache` (``CACHE_TYPE = "natskv.contrib.flask.NatsKVCache"``)."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask
from flask_caching.backends.base import BaseCache

from natskv.contrib.cache import KVCache, codec_named
from natskv.contrib.flask._shared import DEFAULT_CACHE_BUCKET, Servers, check_options, servers_key, shared_kvcache
from natskv.errors import ConfigurationError, InvalidArgumentError

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
        servers_key(url)
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
        self._options = check_options(options, "CACHE_NATSKV_OPTIONS")
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
            kv = self._kv = shared_kvcache(self._url, self._options, **self._settings)
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
