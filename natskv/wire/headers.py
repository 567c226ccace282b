"""NATS and JetStream header names natskv sends and reads, and the small builders of its headers.

Pure functions; they run on whichever thread calls them (the caller's, for writes).
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Mapping

from natskv._time import parse_duration, parse_timestamp
from natskv.errors import InvalidArgumentError

# -- names ----------------------------------------------------------------------------------------

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"  # CAS on one subject
EXPECTED_LAST_SEQUENCE = "Nats-Expected-Last-Sequence"  # CAS on the whole stream
TTL = "Nats-TTL"  # per-message TTL (nats-server 2.11)
ROLLUP = "Nats-Rollup"  # "sub": drop the subject's older messages once this one is stored
KV_OPERATION = "KV-Operation"  # "DEL" / "PURGE" on a tombstone; absent on a value
MSG_ID = "Nats-Msg-Id"  # deduplication within the stream's duplicate window
INCR = "Nats-Incr"  # counter streams: add this to the subject's counter (nats-server 2.12)
# natskv's own: the absolute expiry (Unix seconds) that ``Bucket.incr`` carries from write to write,
# so a key's expiry does not creep by a rounded-up second at every increment.
EXPIRES = "Natskv-Expires"
# natskv's own: why a key was deleted, on a delete marker that says (``"evicted"``: a bounded
# model's insert removed its oldest record); a model's replicas report it as the event's type.
REASON = "Natskv-Reason"
BATCH_ID = "Nats-Batch-Id"  # atomic batch publish (nats-server 2.12)
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
# Read from direct get replies and consumer deliveries.
SUBJECT = "Nats-Subject"
SEQUENCE = "Nats-Sequence"
TIME_STAMP = "Nats-Time-Stamp"
MARKER_REASON = "Nats-Marker-Reason"  # a TTL / max-age / purge marker: the key is gone
UP_TO_SEQUENCE = "Nats-UpTo-Sequence"  # the answering replica's last sequence (batch get)
NUM_PENDING = "Nats-Num-Pending"

OP_PUT, OP_DEL, OP_PURGE = "PUT", "DEL", "PURGE"

# The server keeps expiry times as int64 nanoseconds since 1970: a Nats-TTL past the year 2262
# overflows, and the server then stores the key and expires it at once (seen on 2.15 from about
# 7.5e9 s). A bucket's max_age is an int64 of nanoseconds too. A century is far inside both.
MAX_TTL = 100 * 365 * 86400

# -- builders -------------------------------------------------------------------------------------


def ttl_header(ttl: float | None) -> str | None:
    """The ``Nats-TTL`` value for a per-key TTL in seconds (whole seconds, at least 1)."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise InvalidArgumentError(f"ttl must be a positive number of seconds, not {ttl!r}")
    if ttl > MAX_TTL:
        raise InvalidArgumentError(
            f"ttl={ttl!r} is longer than natskv's limit of {MAX_TTL} s (100 years), beyond which the "
            "server's expiry time overflows; pass ttl=None for values that never expire"
        )
    seconds = int(ttl) if float(ttl).is_integer() else int(ttl) + 1
    return f"{max(seconds, 1)}s"


def with_ttl(headers: dict[str, str] | None, ttl_value: str) -> dict[str, str]:
    """``headers`` plus a per-key TTL (a :func:`ttl_header` value).

    The server removes an expiring message quietly when its subject has older ones (it places a
    delete marker only when the last message of a subject expires): the older value would come
    back. Rolling the key's history up leaves nothing behind the TTL.
    """
    return dict(headers or {}, **{TTL: ttl_value, ROLLUP: "sub"})


def with_expected_revision(headers: dict[str, str] | None, revision: int) -> dict[str, str]:
    """``headers`` plus a compare-and-set check: stored only if the key's last revision is
    ``revision`` (0: the key has no message at all)."""
    return dict(headers or {}, **{EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision)})


def tombstone(operation: str, revision: int | None = None, reason: str | None = None) -> dict[str, str]:
    """The headers of a delete (``"DEL"``, history kept) or purge (``"PURGE"``, history dropped)
    marker; with ``revision``, only if the key is still at that revision; with ``reason``, saying
    why (see :data:`REASON`)."""
    headers = {KV_OPERATION: operation}
    if reason is not None:
        headers[REASON] = reason
    if operation == OP_PURGE:
        headers[ROLLUP] = "sub"
    if revision is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQUENCE] = str(revision)
    return headers


def new_msg_id() -> str:
    """A fresh ``Nats-Msg-Id``: 64 random bits, unique within a duplicate window and small in the
    servers' memory of it."""
    return os.urandom(8).hex()


def new_batch_id() -> str:
    """A fresh ``Nats-Batch-Id``: 96 random bits in 16 URL-safe characters. The server scans
    each message's headers several times, so they are kept short; the id need only be unique
    among the batches open on a stream at once (at most 50)."""
    return base64.urlsafe_b64encode(os.urandom(12)).decode()


def with_msg_id(headers: dict[str, str] | None, msg_id: str) -> dict[str, str]:
    """``headers`` plus a deduplication id (see :func:`new_msg_id`)."""
    return dict(headers or {}, **{MSG_ID: msg_id})


def batch_part(headers: dict[str, str], batch_id: str, sequence: int, commit: bool) -> dict[str, str]:
    """``headers`` of message ``sequence`` (from 1) of atomic batch ``batch_id``; ``commit`` on
    the last one."""
    h = dict(headers)
    h[BATCH_ID] = batch_id
    h[BATCH_SEQUENCE] = str(sequence)
    if commit:
        h[BATCH_COMMIT] = "1"
    return h


def increment(count: int) -> dict[str, str]:
    """The headers of a counter increment by ``count`` (negative: a decrement)."""
    return {INCR: f"{count:+d}"}


def expiry(headers: Mapping[str, str]) -> float | None:
    """The Unix time a stored message expires, from its headers (None: never): natskv's carried
    expiry (``Natskv-Expires``), else the message's time plus its ``Nats-TTL``."""
    carried = headers.get(EXPIRES)
    if carried is not None:
        try:
            return float(carried)
        except ValueError:
            pass  # not natskv's: fall back to the TTL
    ttl = headers.get(TTL)
    seconds = parse_duration(ttl) if ttl else None
    stamp = headers.get(TIME_STAMP)
    if seconds is None or not stamp:
        return None
    return parse_timestamp(stamp).timestamp() + seconds
