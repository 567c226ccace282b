"""The JetStream API from the caller's thread: its answers, error codes and feature levels.

:func:`call` sends a ``$JS.API.<api>`` request and blocks the caller's thread for the answer (the
loop thread's own form is :meth:`natskv.aio.connection.Connection.js_api`); the rest are pure
functions that any thread uses.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from natskv.errors import (
    BucketNotFoundError,
    ConfigurationError,
    FeatureNotSupportedError,
    JetStreamError,
    NatsKVError,
    NatsKVTimeoutError,
    PayloadTooLargeError,
)
from natskv.wire.replies import RawReply, status_of

if TYPE_CHECKING:
    from natskv.aio.connection import Connection

# JetStream API levels (reported in $JS.API.INFO) and the server versions that introduced them.
API_LEVEL_TTL = 1  # per-message TTL, batch direct get (2.11)
API_LEVEL_ATOMIC = 2  # atomic batch publish, counters (2.12)
LEVEL_VERSIONS = {API_LEVEL_TTL: "2.11", API_LEVEL_ATOMIC: "2.12"}

# JetStream error codes natskv acts on.
ERR_STREAM_NOT_FOUND = 10059
ERR_MESSAGE_TOO_LARGE = 10054
ERR_JETSTREAM_NOT_ENABLED = (10039, 10076)
ERR_STREAM_NAME_IN_USE = 10058  # created concurrently by another client
CAS_ERROR_CODES = (10071, 10164)  # a PubAck's failed CAS check ("wrong last sequence", newer variant)
ERR_NO_MESSAGE = 10037  # STREAM.MSG.GET: no message found
ERR_DUPLICATE_IN_PROCESS = 10158  # a resent Nats-Msg-Id whose first copy is not stored yet
ERR_BATCH_DUPLICATE = 10201  # a resent atomic batch whose first copy was stored



def call(conn: Connection, api: str, payload: dict[str, Any] | None, timeout: float | None) -> dict[str, Any]:
    """Call ``$JS.API.<api>`` and return the decoded answer. Any thread but the loop thread."""
    assert conn.mux is not None
    body = orjson.dumps(payload) if payload is not None else b""
    return api_reply(api, conn.mux.request("$JS.API." + api, body, None, timeout), conn.server_version)


# A stream API call answered by the stream leader gets no answer at all while the stream has none
# (its leader died; the election takes seconds): each attempt waits this long, then asks again.
LEADER_ATTEMPT = 2.0


def call_leader(conn: Connection, api: str, payload: dict[str, Any] | None, timeout: float | None) -> dict[str, Any]:
    """:func:`call` for a read that only the stream leader answers (``STREAM.MSG.GET``): asked
    again every :data:`LEADER_ATTEMPT` seconds, and on a 503 answer, until ``timeout``, so a
    leader election in between costs the election, not the whole timeout. Only for reads:
    asking twice must be harmless."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        attempt = LEADER_ATTEMPT if left is None else min(left, LEADER_ATTEMPT)
        try:
            return call(conn, api, payload, max(attempt, 0.001))
        except NatsKVTimeoutError:
            if deadline is not None and time.monotonic() >= deadline - 0.001:
                raise
        except JetStreamError as exc:
            if exc.code != 503 or (deadline is not None and time.monotonic() >= deadline - 0.05):
                raise
            time.sleep(0.05)


def check_api_reply(api: str, data: bytes) -> dict[str, Any]:
    """Decode a JetStream API answer; raise the matching natskv error when it carries one."""
    try:
        reply: dict[str, Any] = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JetStreamError(f"malformed JetStream answer to {api}: {data[:200]!r}") from exc
    err = reply.get("error")
    if err:
        code, err_code, desc = err.get("code", 0), err.get("err_code", 0), err.get("description", "")
        if err_code == ERR_STREAM_NOT_FOUND:
            raise BucketNotFoundError(f"{desc} ({api}); create the bucket first with client.bucket(name)")
        if err_code == ERR_MESSAGE_TOO_LARGE:
            raise PayloadTooLargeError(f"{desc}: the value is larger than the bucket or server allows")
        if err_code in ERR_JETSTREAM_NOT_ENABLED:
            raise ConfigurationError(f"JetStream is not enabled for this account: {desc}")
        raise JetStreamError(desc, code=code, err_code=err_code)
    return reply


def api_reply(api: str, reply: RawReply, server_version: str) -> dict[str, Any]:
    """The decoded answer to a ``$JS.API.<api>`` request; "no responders" means no JetStream."""
    data, headers, _ = reply
    if not data and status_of(headers) == 503:
        raise FeatureNotSupportedError("JetStream (no JetStream responders)", "2.2", server_version)
    return check_api_reply(api, data)


def check_pub_ack(data: bytes) -> dict[str, Any]:
    """Decode a PubAck. CAS failures raise :class:`JetStreamError` with ``err_code`` set."""
    return check_api_reply("publish", data)


def is_ack(data: bytes) -> bool:
    """Whether a reply is a successful PubAck."""
    if not data:
        return False
    try:
        check_pub_ack(data)
    except NatsKVError:
        return False
    return True
