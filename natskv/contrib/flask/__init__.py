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

try:
    import flask  # noqa: F401
    import flask_caching  # noqa: F401
    import flask_session  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"natskv.contrib.flask needs Flask, Flask-Caching and Flask-Session ({exc}): "
        'pip install "natskv[flask]"'
    ) from exc

from natskv.contrib.flask._shared import shared_client
from natskv.contrib.flask.caching import NatsKVCache
from natskv.contrib.flask.ext import NatsKV, NatsKVState
from natskv.contrib.flask.sessions import NatsKVSession, NatsKVSessionInterface

__all__ = ["NatsKV", "NatsKVCache", "NatsKVSession", "NatsKVSessionInterface", "NatsKVState", "shared_client"]
