"""The Flask extension :class:`NatsKV`: settings, and the app's shared client and buckets."""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app

import natskv
from natskv.contrib.flask._shared import DEFAULT_BUCKET, Servers, check_options, servers_key, shared_client
from natskv.contrib.flask.sessions import NatsKVSessionInterface
from natskv.errors import ConfigurationError


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
        servers_key(url)
        bucket = config.get("NATSKV_BUCKET") or DEFAULT_BUCKET
        if not isinstance(bucket, str):
            raise ConfigurationError(f"NATSKV_BUCKET must be a bucket name, not {bucket!r}")
        options = check_options(config.get("NATSKV_OPTIONS"), "NATSKV_OPTIONS")
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
