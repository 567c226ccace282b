"""Counter: a distributed counter that the server adds to (nats-server 2.12 counter streams).

A :class:`Counter` lives in the counter stream beside its bucket (``KVC_<bucket>``, the stream that
also holds the bucket's autoincrement counters, with the bucket's replicas and storage). An
increment is one message carrying ``Nats-Incr``: the server adds it and answers with the new
value, so concurrent writers never retry and never lose an increment, however many there are.
That is the difference from :meth:`natskv.Bucket.incr`, a compare-and-set loop on an ordinary
key, which ``get`` reads like any value and which works on every server with per-key TTL.

Every method blocks the caller's thread (any thread but natskv's loop thread).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from natskv.errors import InvalidArgumentError
from natskv.wire import counters

if TYPE_CHECKING:
    from natskv.kv import Bucket


class Counter:
    """A named counter of a bucket. Get one with :meth:`natskv.Bucket.counter` or
    :meth:`natskv.Client.counter`. Thread-safe; cheap to create (nothing is sent until used)."""

    def __init__(self, bucket: Bucket, name: str) -> None:
        self.bucket = bucket
        self.name = name
        self._stream = counters.stream_of(bucket.name)
        self._subject = counters.named_subject(bucket.name, bucket._token(name))

    def __repr__(self) -> str:
        return f"<natskv.Counter {self.name!r} of bucket {self.bucket.name!r}>"

    def incr(self, by: int = 1, *, timeout: float | None = None) -> int:
        """Add ``by`` (an int, negative to subtract) and return the counter's new value.

        Exact under any number of concurrent writers: the server does the adding. On a
        replicated stream an increment whose acknowledgement was lost with a failing leader is
        sent again under the same message id, so it counts once. Raises
        FeatureNotSupportedError before nats-server 2.12.
        """
        step = _step(by, "incr")
        limit, replicas = self._prepare(timeout)
        return counters.add(self.bucket._proto.conn, self._stream, self._subject, step, replicas, limit)

    def decr(self, by: int = 1, *, timeout: float | None = None) -> int:
        """Subtract ``by`` and return the counter's new value (see :meth:`incr`)."""
        return self.incr(-_step(by, "decr"), timeout=timeout)

    def value(self, *, timeout: float | None = None) -> int:
        """The counter's current value: 0 if it was never added to or was reset. Read through the
        stream leader, so it includes every increment acknowledged before the call."""
        limit, _ = self._prepare(timeout)
        return counters.read(self.bucket._proto.conn, self._stream, self._subject, limit)

    def reset(self, *, timeout: float | None = None) -> None:
        """Set the counter back to 0. An increment racing the reset is either wiped by it or
        counted after it."""
        limit, _ = self._prepare(timeout)
        counters.reset(self.bucket._proto.conn, self._stream, self._subject, limit)

    def _prepare(self, timeout: float | None) -> tuple[float | None, int]:
        """The call's limit and the counter stream's replicas (the stream made on first use)."""
        limit = self.bucket._timeout(timeout)
        client = self.bucket._client
        first = limit if limit is not None else client.options.request_timeout
        replicas = counters.prepare(client._conn, client._counters, self.bucket.name, "counters", first)
        return limit, replicas


def _step(by: object, call: str) -> int:
    if type(by) is not int:  # bool is an int subclass: refused with the rest
        raise InvalidArgumentError(f"{call}(by=...) takes an int, not {type(by).__name__} ({by!r})")
    return by
