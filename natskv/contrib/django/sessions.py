"""``SESSION_ENGINE = "natskv.contrib.django.sessions"``: Django sessions in a bucket of their own.

Each session is one key (the session key) holding Django's signed, serialized session data
(``SESSION_SERIALIZER`` applies, as with the database engine), written with a per-key TTL of the
session's expiry age, so expired sessions vanish by themselves and ``clearsessions`` has nothing
to do. Creating a session is a create-if-absent, so two requests can never take the same key.

Settings (all optional)::

    NATSKV_SESSIONS = {
        "LOCATION": "nats://127.0.0.1:4222",  # default: NATS_URL, else natskv's embedded server
        "BUCKET": "django_sessions",
        "OPTIONS": {"replicas": 3, "creds": "/etc/app.creds"},  # replicas, storage, connect options
    }

Django's own ``cache`` and ``cached_db`` engines also work on
:class:`~natskv.contrib.django.NatsKVCache`.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.sessions.backends.base import CreateError, SessionBase, UpdateError

from natskv.contrib.cache import KVCache, shared_cache
from natskv.errors import KeyExistsError


def session_cache() -> KVCache:
    """The process's session bucket, from the ``NATSKV_SESSIONS`` setting."""
    config = dict(getattr(settings, "NATSKV_SESSIONS", None) or {})
    options = dict(config.get("OPTIONS") or {})
    layout = {k: options.pop(k) for k in ("replicas", "history", "storage") if k in options}
    return shared_cache(config.get("LOCATION") or None, bucket=config.get("BUCKET", "django_sessions"),
                        serializer="json", connect=options, **layout)


class SessionStore(SessionBase):
    """A Django session store on NATS KV (see the module docstring)."""

    def __init__(self, session_key: str | None = None) -> None:
        self._kv = session_cache()
        super().__init__(session_key)

    def load(self) -> dict[str, Any]:
        data = None
        if self.session_key is not None:
            try:
                data = self._kv.bucket.get(self.session_key)
            except ValueError:  # a key natskv cannot store (sent by a client): no session
                data = None
        if isinstance(data, str):
            decoded: dict[str, Any] = self.decode(data)
            return decoded
        self._session_key = None
        return {}

    def exists(self, session_key: str | None) -> bool:
        return session_key is not None and session_key != "" and self._kv.bucket.get(session_key) is not None

    def create(self) -> None:
        while True:
            self._session_key = self._get_new_session_key()
            try:
                self.save(must_create=True)
            except CreateError:
                continue  # a key taken meanwhile (2**190 keys: practically never)
            self.modified = True
            return

    def save(self, must_create: bool = False) -> None:
        if self.session_key is None:
            return self.create()
        data = self.encode(self._get_session(no_load=must_create))
        ttl = max(1, self.get_expiry_age())
        bucket = self._kv.bucket
        if must_create:
            try:
                bucket.create(self.session_key, data, ttl=ttl)
            except KeyExistsError:
                raise CreateError from None
        elif not bucket.replace(self.session_key, data, ttl=ttl):
            raise UpdateError  # deleted (logged out elsewhere) or expired meanwhile
        return None

    def delete(self, session_key: str | None = None) -> None:
        if session_key is None:
            if self.session_key is None:
                return
            session_key = self.session_key
        self._kv.bucket.delete(session_key)

    @classmethod
    def clear_expired(cls) -> None:
        """Nothing to do: the server removes a session when its TTL passes."""
