"""One exception hierarchy for everything natskv raises.

Every error is a :class:`NatsKVError`; where a builtin exception fits, the natskv error subclasses it
too, so ``except KeyError`` and ``except TimeoutError`` keep working in code that does not know
natskv. Errors raised because of a lower-level failure are chained with ``from``.
"""

from __future__ import annotations

from typing import Any


class NatsKVError(Exception):
    """Base class of every error natskv raises."""


class ConfigurationError(NatsKVError, ValueError):
    """Connection options or server settings are invalid. The message says which and how to fix it."""


class ServerError(NatsKVError, RuntimeError):
    """The embedded nats-server could not be found, started or reached."""


class NotConnectedError(NatsKVError, ConnectionError):
    """The client is closed, or the connection to NATS is down and the call could not wait for it."""


class NatsKVTimeoutError(NatsKVError, TimeoutError):
    """A blocking call did not complete within its ``timeout``.

    The server may still apply a write that timed out: read the key back before retrying a
    non-idempotent operation.
    """


class DeadlockError(NatsKVError, RuntimeError):
    """A blocking natskv call was made from natskv's own event-loop thread.

    That call could never complete. It usually means blocking code runs inside something natskv
    schedules on its loop; callbacks given to natskv run on a dispatcher thread and may block.
    """


class InvalidArgumentError(NatsKVError, ValueError):
    """An argument is invalid (a bad revision, ttl, filter, commit operation ...). Nothing was sent."""


class InvalidKeyError(NatsKVError, ValueError):
    """A key, or a key pattern, cannot be used."""


class InvalidBucketNameError(NatsKVError, ValueError):
    """A bucket name does not match ``[A-Za-z0-9_-]+``."""


class KeyNotFoundError(NatsKVError, KeyError):
    """The key does not exist (or was deleted, purged or expired)."""

    def __init__(self, key: str, bucket: str | None = None) -> None:
        self.key = key
        self.bucket = bucket
        where = f" in bucket {bucket!r}" if bucket else ""
        super().__init__(f"key {key!r} not found{where}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class KeyExistsError(NatsKVError, ValueError):
    """``create()`` found the key already present. Use ``update()`` with its revision instead."""

    def __init__(self, key: str, current_revision: int | None = None) -> None:
        self.key = key
        self.current_revision = current_revision
        super().__init__(
            f"key {key!r} already exists (revision {current_revision}); "
            "use update(key, value, revision=...) or set() to overwrite it"
        )


class UniqueConstraintError(KeyExistsError):
    """A record would share the value of a unique field (or its primary key) with another record.

    ``field`` and ``value`` name the clash. The server rejected the whole write: nothing was stored.
    From ``bulk_create``, ``row`` is the index of the clashing row in its input, and ``written`` /
    ``not_written`` list the indexes of the rows that were stored and of those that were not
    (None from other calls).
    """

    def __init__(self, model: str, field: str, value: Any, *, row: int | None = None,
                 written: list[int] | None = None, not_written: list[int] | None = None) -> None:
        self.model = model
        self.field = field
        self.value = value
        self.row = row
        self.written = written
        self.not_written = not_written
        message = f"{model}.{field} must be unique: another record already has {field}={value!r}"
        if row is not None:
            message += f" (row {row})"
        if written is not None and not_written is not None:
            message += f"; {len(written)} rows were stored, {len(not_written)} were not (see .written, .not_written)"
        NatsKVError.__init__(self, message)
        self.key = f"{model}.{field}"
        self.current_revision = None

    def __reduce__(self) -> Any:  # keyword fields survive copy and pickle
        return (_unique_error, (self.model, self.field, self.value, self.row, self.written, self.not_written))


class RevisionMismatchError(NatsKVError, ValueError):
    """A compare-and-set write found another revision than the one expected.

    ``current_revision`` holds the revision the server has now (``None`` when it could not be read,
    0 when the key is absent): read the value again, reapply the change and retry.
    """

    def __init__(
        self, key: str, expected: int, current_revision: int | None = None, detail: str = ""
    ) -> None:
        self.key = key
        self.expected = expected
        self.current_revision = current_revision
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"key {key!r} is not at revision {expected} (current revision: {current_revision}){extra}; "
            "read it again and retry with the current revision"
        )


class BatchError(NatsKVError):
    """An atomic multi-key commit was rejected as a whole; nothing of it was stored."""


class PayloadTooLargeError(NatsKVError, ValueError):
    """A value is larger than the server's max payload (or the bucket's max value size)."""


class SerializationError(NatsKVError, ValueError):
    """A value could not be encoded or decoded by the bucket's codec."""


class PermissionDeniedError(NatsKVError, PermissionError):
    """The NATS user is not allowed to publish or subscribe where the call needed to."""


class AuthenticationError(PermissionDeniedError, NotConnectedError):
    """The server refused the client's credentials (user/password, token, nkey, creds or JWT).

    Raised by ``natskv.connect()`` and, when the credentials expire or are revoked on a live
    connection, by the next call. The message carries the server's reason (e.g. "Authorization
    Violation"). Fix the credentials (or the server's authorization settings) and connect again.
    """


class FeatureNotSupportedError(NatsKVError, NotImplementedError):
    """The connected nats-server is too old for the call. The message names the version it needs."""

    def __init__(self, feature: str, needs: str, has: str | None = None) -> None:
        self.feature = feature
        self.needs = needs
        self.has = has
        running = f" (connected server: {has})" if has else ""
        super().__init__(f"{feature} needs nats-server {needs} or newer{running}; upgrade the server")


class NoRespondersError(NatsKVError, LookupError):
    """A request reached no subscriber: nothing listens on its subject (the server said so at once).

    Start the service that should answer, or check the subject's spelling.
    """


class LockNotOwnedError(NatsKVError, RuntimeError):
    """A lock was released or extended by a holder that no longer holds it: it was never
    acquired, or its TTL ran out (and another holder may have taken it meanwhile)."""


class SlowConsumerError(NatsKVError):
    """A subscription's consumer fell ``max_pending`` messages behind, so newer messages were
    dropped. Consume faster (a callback that hands work to a pool), or subscribe with a larger
    ``max_pending``."""


class ServiceError(NatsKVError):
    """A request's responder answered with an error (the ``Nats-Service-Error`` headers that
    ``Client.respond`` and NATS micro services send): ``code`` and ``description`` are theirs."""

    def __init__(self, subject: str, code: int, description: str) -> None:
        self.subject = subject
        self.code = code
        self.description = description
        super().__init__(f"the responder on {subject!r} failed: {description} (code {code})")


class BackupError(NatsKVError, ValueError):
    """A backup file cannot be restored: unreadable, not a natskv backup, corrupt, or cut short.
    The message names the line. A restore that raises it has written nothing."""


class BucketNotFoundError(NatsKVError, LookupError):
    """The bucket does not exist. ``Client.bucket(name)`` creates it unless ``create=False``."""


class JetStreamError(NatsKVError):
    """The JetStream API answered with an error natskv has no more specific class for."""

    def __init__(self, description: str, code: int = 0, err_code: int = 0, **extra: Any) -> None:
        self.description = description
        self.code = code
        self.err_code = err_code
        self.extra = extra
        super().__init__(f"{description} (status {code}, error code {err_code})")


class ValidationError(NatsKVError, ValueError):
    """Input failed validation; ``issues`` lists every problem as (field, message, code)."""

    def __init__(self, issues: list[tuple[str, str, str]]) -> None:
        self.issues = list(issues)
        lines = "; ".join(f"{f}: {m}" for f, m, _ in self.issues)
        super().__init__(f"{len(self.issues)} validation issue(s): {lines}")


__all__ = [
    "AuthenticationError",
    "BackupError",
    "BatchError",
    "BucketNotFoundError",
    "ConfigurationError",
    "DeadlockError",
    "FeatureNotSupportedError",
    "InvalidArgumentError",
    "InvalidBucketNameError",
    "InvalidKeyError",
    "JetStreamError",
    "KeyExistsError",
    "KeyNotFoundError",
    "LockNotOwnedError",
    "NatsKVError",
    "NatsKVTimeoutError",
    "NoRespondersError",
    "NotConnectedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RevisionMismatchError",
    "SerializationError",
    "ServerError",
    "ServiceError",
    "SlowConsumerError",
    "UniqueConstraintError",
    "ValidationError",
]


def _unique_error(model: str, field: str, value: Any, row: int | None, written: list[int] | None,
                  not_written: list[int] | None) -> UniqueConstraintError:
    return UniqueConstraintError(model, field, value, row=row, written=written, not_written=not_written)
