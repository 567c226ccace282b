"""One client, and one cache per bucket, per process and configuration: what the extension, the
cache backend and the session interface share. Runs on the caller's thread."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import natskv
from natskv.contrib import cache
from natskv.contrib.cache import KVCache
from natskv.errors import ConfigurationError

Servers = str | Sequence[str] | None

DEFAULT_BUCKET = "flask"
DEFAULT_CACHE_BUCKET = "flask_cache"
DEFAULT_SESSION_BUCKET = "flask_sessions"


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


def shared_client(servers: Servers = None, options: Mapping[str, Any] | None = None) -> natskv.Client:
    """This process's client for ``servers`` and ``options`` (of :func:`natskv.connect`), checked,
    then shared with every integration (:func:`natskv.contrib.cache.shared_client`). Do not close
    it: natskv closes it at interpreter exit."""
    return cache.shared_client(servers_key(servers), check_options(options, "options"))


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
    return cache.shared_cache(servers_key(servers), bucket=bucket, serializer=serializer, near_cache=near_cache,
                              near_cache_size=near_cache_size, near_cache_bytes=near_cache_bytes,
                              replicas=replicas, storage=storage, connect=check_options(options, "options"))
