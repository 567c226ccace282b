"""The Flask-Session store :class:`NatsKVSessionInterface`: sessions in a bucket, with a TTL."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

from flask import Flask
from flask_session.base import ServerSideSession, ServerSideSessionInterface
from flask_session.defaults import Defaults

import natskv
from natskv.contrib.flask._shared import DEFAULT_SESSION_BUCKET, Servers, check_options, servers_key, shared_client
from natskv.errors import InvalidKeyError


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
        servers_key(self.url)
        self.options = check_options(
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
