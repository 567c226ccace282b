"""One client, and one cache per bucket, per process and configuration: what the extension, the
cache backend and the session interface share. Runs on the caller's thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import natskv
from natskv.contrib.cache import KVCache, codec_named
from natskv.errors import ConfigurationError

Servers = str | Sequence[str] | None

DEFAULT_BUCKET = "flask"
DEFAULT_CACHE_BUCKET = "flask_cache"
DEFAULT_SESSION_BUCKET = "flask_sessions"

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


def servers_key(servers: Servers) -> tuple[str, ...]:
    """The server URLs of a setting, checked (ConfigurationError when it is no URL or list)."""
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


def check_options(options: Mapping[str, Any] | None, setting: str) -> dict[str, Any]:
    """A copy of the natskv.connect() options of ``setting`` (ConfigurationError when not a dict)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(
            f"{setting} must be a dict of natskv.connect() options, not {type(options).__name__}"
        )
    return dict(options)


def _config_key(servers: Servers, options: Mapping[str, Any]) -> tuple[Any, ...]:
    return (servers_key(servers), tuple(sorted((k, repr(v)) for k, v in options.items())))


def shared_client(servers: Servers = None, options: Mapping[str, Any] | None = None) -> natskv.Client:
    """This process's client for ``servers`` and ``options`` (of :func:`natskv.connect`), connected
    on the first call and shared afterwards. ``servers`` None or empty: ``NATS_URL``, else natskv's
    embedded server (development). Do not close it: natskv closes it at interpreter exit."""
    opts = check_options(options, "options")
    key = _config_key(servers, opts)
    client = _clients.get(key)
    if client is not None:
        return client
    with _lock:
        client = _clients.get(key)
        if client is None:
            urls = list(servers_key(servers)) or None
            client = _clients[key] = natskv.connect(urls, **opts)
    return client


def shared_kvcache(
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
