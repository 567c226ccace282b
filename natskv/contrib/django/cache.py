"""``natskv.contrib.django.NatsKVCache``: Django's cache API on a NATS KV bucket.

``LOCATION`` is a NATS URL, several comma-separated, or a list; empty means natskv's embedded
server (development). ``OPTIONS``:

- ``bucket`` (default ``"django_cache"``), ``replicas`` (1), ``history`` (1), ``storage``
  (``"file"`` or ``"memory"``): the bucket, created on first use if missing;
- ``near_cache`` (False), ``near_cache_size`` (10,000 entries) and ``near_cache_bytes`` (64 MiB of
  values): answer repeated reads from process memory, kept coherent across processes by a watch
  (see :mod:`natskv.contrib.cache`);
- ``serializer``: ``"pickle"`` (default: any picklable value, as Django's own backends) or
  ``"json"``;
- anything else is passed to :func:`natskv.connect`: ``user``, ``password``, ``token``,
  ``creds``, ``nkey_seed``, the ``tls_*`` options, ``request_timeout`` ...

``TIMEOUT`` works as Django documents: a number of seconds (the server keeps whole seconds),
``None`` for no expiry, ``0`` to expire at once. ``KEY_PREFIX``, ``VERSION`` and ``KEY_FUNCTION``
work as for every backend. Keys are checked against natskv's rules, not memcached's, so keys
natskv stores (spaces, any length up to about 3,000 bytes) raise no ``CacheKeyWarning``.

Django makes one backend object per thread. They all share one client, one bucket and one near
cache per process. The client connects on first use, so a ``gunicorn --preload`` master does
not hold a connection that its workers would inherit. ``close()`` is called at the end of every
request, and does nothing: the shared connection stays open.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, InvalidCacheKey

from natskv._speedups import core
from natskv.contrib.cache import KVCache, shared_cache
from natskv.errors import KeyNotFoundError
from natskv.kv import MAX_ENCODED_KEY

_BACKEND_OPTIONS = (
    "bucket", "replicas", "history", "storage", "near_cache", "near_cache_size", "near_cache_bytes", "serializer",
)


class NatsKVCache(BaseCache):
    """A Django cache backend storing entries in a NATS KV bucket (see the module docstring)."""

    def __init__(self, server: str | list[str] | tuple[str, ...] | None, params: dict[str, Any]) -> None:
        super().__init__(params)
        options = dict(params.get("OPTIONS") or {})
        self._servers = server or None
        self._settings: dict[str, Any] = {k: options.pop(k) for k in _BACKEND_OPTIONS if k in options}
        self._settings.setdefault("bucket", "django_cache")
        self._connect = options
        self._kv: KVCache | None = None

    @property
    def kv(self) -> KVCache:
        """The process's shared :class:`~natskv.contrib.cache.KVCache` (connected on first use)."""
        kv = self._kv
        if kv is None:
            kv = self._kv = shared_cache(self._servers, connect=self._connect, **self._settings)
        return kv

    # -- keys and timeouts ------------------------------------------------------------------------

    def validate_key(self, key: str) -> None:
        """Raise InvalidCacheKey for a key natskv cannot store (no memcached warnings)."""
        try:
            encoded = core.encode_key(key, ":")
        except (TypeError, ValueError) as exc:
            raise InvalidCacheKey(f"natskv cannot store the cache key {key!r}: {exc}") from None
        if len(encoded) > MAX_ENCODED_KEY:
            raise InvalidCacheKey(
                f"cache key of {len(key)} characters is too long for natskv (encoded: {len(encoded)} > "
                f"{MAX_ENCODED_KEY}); hash long keys"
            )

    def _key(self, key: str, version: int | None) -> str:
        made: str = self.make_and_validate_key(key, version=version)
        return made

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> float | None:
        """Seconds until expiry (None: never; 0 or less: expire at once)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        return None if timeout is None else float(timeout)

    # -- the cache API ------------------------------------------------------------------------------

    def add(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self.kv.add(self._key(key, version), value, self.get_backend_timeout(timeout))

    def get(self, key: str, default: Any = None, version: int | None = None) -> Any:
        return self.kv.get(self._key(key, version), default)

    def set(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        self.kv.set(self._key(key, version), value, self.get_backend_timeout(timeout))

    def touch(self, key: str, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self.kv.touch(self._key(key, version), self.get_backend_timeout(timeout))

    def delete(self, key: str, version: int | None = None) -> bool:
        return self.kv.delete(self._key(key, version))

    def get_many(self, keys: Iterable[str], version: int | None = None) -> dict[str, Any]:
        made = {self._key(key, version): key for key in keys}
        return {made[k]: v for k, v in self.kv.get_many(made).items()}

    def has_key(self, key: str, version: int | None = None) -> bool:
        return self.kv.has(self._key(key, version))

    def incr(self, key: str, delta: int = 1, version: int | None = None) -> int:
        """Add ``delta`` atomically (across processes: the server checks each write); ValueError
        when the key is absent, as for every Django backend."""
        try:
            return self.kv.incr(self._key(key, version), delta)
        except KeyNotFoundError:
            raise ValueError(f"Key '{key}' not found") from None

    def set_many(
        self, data: Mapping[str, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[str]:
        """Store many values in pipelined writes; returns the keys that failed: none, since a
        failure raises."""
        if data:
            self.kv.set_many({self._key(k, version): v for k, v in data.items()}, self.get_backend_timeout(timeout))
        return []

    def delete_many(self, keys: Iterable[str], version: int | None = None) -> None:
        made = [self._key(key, version) for key in keys]
        if made:
            self.kv.delete_many(made)

    def clear(self) -> None:
        """Remove every entry of the bucket (and of every process's near cache); the bucket stays."""
        self.kv.clear()

    def close(self, **kwargs: Any) -> None:
        """Called by Django after every request: the shared connection stays open."""
