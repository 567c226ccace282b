"""natskv's Key-Value protocol over plain NATS messages, from the caller's thread.

A bucket is a stream ``KV_<bucket>`` holding subjects ``$KV.<bucket>.<encoded key>``; the latest
message of a subject is the key's value. Reads use JetStream direct get (one key, or many in one
batch request); writes are publishes whose PubAck carries the revision (stream sequence); CAS uses
``Nats-Expected-Last-Subject-Sequence``; per-key TTL uses ``Nats-TTL``; multi-key commits use atomic
batch publish. Every method runs on the caller's thread and blocks it (through the caller half of
the multiplexer); the loop thread's reads of a bucket (watch consumers) are in :mod:`natskv.aio.watch`.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from natskv._speedups import core
from natskv.codec import RAW_HEADER
from natskv.errors import (
    BatchError,
    BucketNotFoundError,
    ConfigurationError,
    InvalidArgumentError,
    InvalidBucketNameError,
    JetStreamError,
    NatsKVError,
    NatsKVTimeoutError,
    PayloadTooLargeError,
)
from natskv.wire import headers as h
from natskv.wire import jsapi
from natskv.wire.headers import OP_DEL, OP_PURGE, OP_PUT, ttl_header
from natskv.wire.jsapi import (
    API_LEVEL_ATOMIC,
    API_LEVEL_TTL,
    ERR_BATCH_DUPLICATE,
    ERR_DUPLICATE_IN_PROCESS,
    ERR_NO_MESSAGE,
    ERR_STREAM_NAME_IN_USE,
    check_pub_ack,
    is_ack,
)
from natskv.wire.replies import RawReply, encode_batch, encode_command, fresh_error, parse_reply_headers, status_of
from natskv.wire.retry import FIRST_DELAY, RESEND_AFTER, publish_resending, request_retrying_on_503, sleep_before_retry
from natskv.wire.waiters import Waiter

if TYPE_CHECKING:
    from natskv.aio.connection import Connection

BUCKET_NAME_RE = re.compile(r"\A[A-Za-z0-9_-]+\Z")
MAX_STREAM_NAME = 255  # nats-server's JSMaxNameLen
# A bucket's streams are KV_<bucket> and, for autoincrement fields, KVC_<bucket>: both must fit.
MAX_BUCKET_NAME = MAX_STREAM_NAME - len("KVC_")

MAX_SUBJECTS_PER_BATCH_GET = 1024
# Subjects per request when a batch get is split into several requests in flight at once.
PIPELINED_BATCH_GET = 128
MAX_ATOMIC_BATCH = 1000
DEFAULT_MAX_CONSUMERS = 10_000
HEADER_ROOM = 512  # bytes of headers natskv may add to a value (TTL, CAS, batch, raw marker)
NANOS = 1_000_000_000


def validate_bucket_name(name: str) -> None:
    if not isinstance(name, str) or not BUCKET_NAME_RE.match(name):
        raise InvalidBucketNameError(
            f"invalid bucket name {name!r}: use letters, digits, '_' and '-' only (e.g. 'user_sessions')"
        )
    if len(name) > MAX_BUCKET_NAME:
        raise InvalidBucketNameError(
            f"bucket name of {len(name)} characters is too long: at most {MAX_BUCKET_NAME} "
            f"(nats-server limits stream names, here 'KV_<bucket>' and 'KVC_<bucket>', to {MAX_STREAM_NAME})"
        )


@dataclass(slots=True)  # one per key in a shared watch feed's state: keep it small
class RawEntry:
    """A stored message as read from the server, before key decoding and value decoding."""

    subject: str
    data: bytes
    revision: int
    timestamp: str
    operation: str
    delta: int = 0  # for watches: messages still pending after this one
    raw_bytes: bool = False  # stored as bytes by natskv's JSON codec (see natskv.codec)
    reason: str = ""  # on a delete marker: why, when the writer said (headers.REASON)

    @property
    def absent(self) -> bool:
        return self.operation != OP_PUT


def entry_from_headers(hdrs: dict[str, str], data: bytes, subject: str = "") -> RawEntry:
    op = hdrs.get(h.KV_OPERATION, OP_PUT)
    if h.MARKER_REASON in hdrs:  # a TTL / max-age / purge marker: the key is gone
        op = OP_PURGE if hdrs[h.MARKER_REASON] == "Purge" else OP_DEL
    return RawEntry(
        subject=hdrs.get(h.SUBJECT, subject),
        data=data,
        revision=int(hdrs.get(h.SEQUENCE, 0)),
        timestamp=hdrs.get(h.TIME_STAMP, ""),
        operation=op,
        raw_bytes=RAW_HEADER in hdrs,
        reason=hdrs.get(h.REASON, "") if op != OP_PUT else "",
    )


# The headers a stored message's RawEntry is made of, in the order entry_of_reply reads them.
_ENTRY_FIELDS = tuple(
    name.encode() for name in (h.SUBJECT, h.SEQUENCE, h.TIME_STAMP, h.KV_OPERATION, h.MARKER_REASON, RAW_HEADER)
)


# The headers that say whether a batch get's message is a value, and how it was stored.
_VALUE_FIELDS = tuple(name.encode() for name in (h.SUBJECT, h.KV_OPERATION, h.MARKER_REASON, RAW_HEADER))


def entry_of_reply(headers: bytes | dict[str, str] | None, data: bytes) -> tuple[int, str, RawEntry | None]:
    """``(status, description, entry)`` of one message of a direct get's reply: the entry is None
    when the message is a status (404, 204 ...). The same entry as :func:`entry_from_headers`
    over :func:`~natskv.wire.replies.parse_reply_headers`, but raw header bytes (the frame
    reader's) are read in one pass in ``_core`` that builds only the six strings it needs: the
    per-message cost of ``get`` and ``get_many``. Any thread."""
    if type(headers) is not bytes:
        status, desc, hdrs = parse_reply_headers(headers)
        return status, desc, None if status else entry_from_headers(hdrs, data)
    status, desc, (subject, seq, stamp, op, marker, raw) = core.parse_header_fields(headers, _ENTRY_FIELDS)
    if status:
        return status, desc, None
    if marker is not None:  # a TTL / max-age / purge marker: the key is gone
        op = OP_PURGE if marker == "Purge" else OP_DEL
    return status, desc, RawEntry(
        "" if subject is None else subject,
        data,
        0 if seq is None else int(seq),
        "" if stamp is None else stamp,
        OP_PUT if op is None else op,
        0,
        raw is not None,
    )


def _subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject ``subject`` matches ``pattern`` (``*`` one token, ``>`` the rest)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":  # noqa: S105 - a subject token, not a secret
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):  # noqa: S105 - likewise
            return False
    return len(want) == len(have)


class KVProtocol:
    """The wire protocol of one bucket on one connection."""

    def __init__(self, conn: Connection, bucket: str) -> None:
        validate_bucket_name(bucket)
        self.conn = conn
        self.bucket = bucket
        self.stream = "KV_" + bucket
        self.subject_prefix = f"$KV.{bucket}."
        self.direct_prefix = f"$JS.API.DIRECT.GET.{self.stream}.{self.subject_prefix}"
        self.direct_batch = f"$JS.API.DIRECT.GET.{self.stream}"
        self._config: dict[str, Any] = {}
        self._replicated = False  # more than one replica: reads check they see this client's writes
        self._max_value: int | None = None

    # -- bucket management (any thread) -------------------------------------------------------

    def stream_config(
        self, history: int, ttl: float | None, replicas: int, max_value_size: int | None, storage: str, max_bytes: int
    ) -> dict[str, Any]:
        def whole(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not whole(history) or not 1 <= history <= 64:
            raise ConfigurationError(f"history must be an int from 1 to 64, not {history!r}")
        if storage not in ("file", "memory"):
            raise ConfigurationError(f"storage must be 'file' or 'memory', not {storage!r}")
        if not whole(replicas) or not 1 <= replicas <= 5:
            raise ConfigurationError(f"replicas must be an int from 1 to 5, not {replicas!r}")
        if max_value_size is not None and (not whole(max_value_size) or max_value_size < 1):
            raise ConfigurationError(f"max_value_size must be a positive int (bytes) or None, not {max_value_size!r}")
        if not whole(max_bytes) or (max_bytes < 1 and max_bytes != -1):
            raise ConfigurationError(f"max_bytes must be a positive int or -1 (no limit), not {max_bytes!r}")
        if ttl is not None:
            ttl_header(ttl)  # same rules as a per-key ttl
        max_age = int((ttl or 0) * NANOS)
        config: dict[str, Any] = {
            "name": self.stream,
            "subjects": [self.subject_prefix + ">"],
            "retention": "limits",
            "max_msgs_per_subject": history,
            "max_msgs": -1,
            "max_bytes": max_bytes,
            "max_age": max_age,
            # The server counts headers in a message's size; natskv checks the value itself
            # against max_value_size (kept in the metadata) and leaves the server room for headers.
            "max_msg_size": max_value_size + HEADER_ROOM if max_value_size else -1,
            "metadata": {"natskv.max_value_size": str(max_value_size or 0)},
            "storage": storage,
            "num_replicas": replicas,
            "discard": "new",
            "allow_rollup_hdrs": True,
            "deny_delete": True,
            "allow_direct": True,
            "max_consumers": DEFAULT_MAX_CONSUMERS,
            "duplicate_window": min(max_age, 120 * NANOS) if max_age else 120 * NANOS,
        }
        if self.conn.api_level >= API_LEVEL_TTL:
            config["allow_msg_ttl"] = True
            # Watchers see a delete marker when a key expires, instead of silence. The server
            # raises every per-key TTL to at least the marker's TTL unless history is 1, so
            # buckets with history keep markers for the minimum of one second.
            config["subject_delete_marker_ttl"] = (15 * 60 if history == 1 else 1) * NANOS
        if self.conn.api_level >= API_LEVEL_ATOMIC:
            config["allow_atomic"] = True
        return config

    def ensure(self, config: dict[str, Any], create: bool, timeout: float | None) -> dict[str, Any]:
        """Return the bucket's stream config, creating the stream if it is missing and allowed."""
        try:
            info = jsapi.call(self.conn, f"STREAM.INFO.{self.stream}", None, timeout)
        except BucketNotFoundError:
            if not create:
                raise BucketNotFoundError(
                    f"bucket {self.bucket!r} does not exist; call client.bucket({self.bucket!r}) to create it"
                ) from None
            try:
                info = jsapi.call(self.conn, f"STREAM.CREATE.{self.stream}", config, timeout)
            except JetStreamError as exc:
                if exc.err_code != ERR_STREAM_NAME_IN_USE:  # created concurrently by another client: read it
                    raise
                info = jsapi.call(self.conn, f"STREAM.INFO.{self.stream}", None, timeout)
        self.config = info["config"]
        if not self.config.get("allow_direct"):
            # Buckets made by other tools may lack direct get, which every read here uses.
            self.config = self.update_config({"allow_direct": True}, timeout)
        return self.config

    def update_config(self, changes: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        config = dict(self.config, **changes)
        info = jsapi.call(self.conn, f"STREAM.UPDATE.{self.stream}", config, timeout)
        self.config = info["config"]
        return self.config

    def info(self, timeout: float | None) -> dict[str, Any]:
        return jsapi.call(self.conn, f"STREAM.INFO.{self.stream}", None, timeout)

    def destroy(self, timeout: float | None) -> None:
        self.conn.written.pop(self.stream, None)
        jsapi.call(self.conn, f"STREAM.DELETE.{self.stream}", None, timeout)

    # -- reads (any thread) -----------------------------------------------------------------

    def get(self, encoded_key: str, timeout: float | None) -> RawEntry | None:
        """The latest message of one key (None when it has none; deletes come back as entries)."""
        assert self.conn.mux is not None
        if self.stream in self.conn.written:
            return self._get_after_write(encoded_key, timeout)
        return self._entry_of(self._request(self.direct_prefix + encoded_key, b"", None, timeout))

    def message(
        self, encoded_key: str, timeout: float | None, *, leader: bool = True
    ) -> tuple[RawEntry, dict[str, str]] | None:
        """The latest message of one key with all its headers (``Nats-TTL`` among them), None when
        the key has none. Read through the stream leader by default, so never older than a write
        that was acknowledged before: the read of a read-modify-write (``Bucket.incr``, locks).
        ``leader=False`` asks any replica with a direct get (about half the cost; a follower may
        lag): for reads a watch keeps right, such as the near cache's."""
        if leader:
            return self._leader_message({"last_by_subj": self.subject_prefix + encoded_key}, timeout)
        data, raw_headers, _ = self._request(self.direct_prefix + encoded_key, b"", None, timeout)
        status, desc, hdrs = parse_reply_headers(raw_headers)
        if status == 404:
            return None
        if status:
            raise self._status_error(status, desc)
        return entry_from_headers(hdrs, data), hdrs

    def messages(self, encoded_keys: list[str], timeout: float | None) -> list[tuple[RawEntry, dict[str, str]]]:
        """The latest message of each key (no wildcards) with all its headers, in batch direct
        gets (several in flight); keys without a message are left out. Backups' read path: it
        keeps the TTL header that :meth:`get_last_many`'s entries drop. Any replica answers."""
        assert self.conn.mux is not None
        if self.conn.api_level < API_LEVEL_TTL:  # no batch get before nats-server 2.11
            found = (self.message(key, timeout, leader=False) for key in encoded_keys)
            return [m for m in found if m is not None]
        out: list[tuple[RawEntry, dict[str, str]]] = []
        answers = self._pipelined_batch_get([self.subject_prefix + k for k in encoded_keys], timeout)
        try:
            for replies in answers:
                for data, raw_headers, _ in replies:
                    status, desc, hdrs = parse_reply_headers(raw_headers)
                    if status in (204, 404):
                        break
                    if status:
                        raise self._status_error(status, desc)
                    out.append((entry_from_headers(hdrs, data), hdrs))
        finally:
            answers.close()
        return out

    def get_value(self, encoded_key: str, timeout: float | None) -> tuple[bytes, bool] | None:
        """``(payload, stored as raw bytes)`` of one key's latest message when it is a value;
        None when the key is absent, deleted, purged or expired. ``Bucket.get``'s path: the
        answer of :meth:`get` without a RawEntry."""
        assert self.conn.mux is not None
        if self.stream in self.conn.written:
            entry = self._get_after_write(encoded_key, timeout)
            return None if entry is None or entry.operation != OP_PUT else (entry.data, entry.raw_bytes)
        data, headers, _ = self._request(self.direct_prefix + encoded_key, b"", None, timeout)
        if type(headers) is bytes:
            status, desc, (_, op, marker, raw) = core.parse_header_fields(headers, _VALUE_FIELDS)
            if not status:
                return (data, raw is not None) if (op is None or op == OP_PUT) and marker is None else None
        else:  # nats-py's own message path: a parsed dict
            status, desc, entry = entry_of_reply(headers, data)
            if entry is not None:
                return None if entry.operation != OP_PUT else (entry.data, entry.raw_bytes)
        if status == 404:
            return None
        raise self._status_error(status, desc)

    def get_revision(self, encoded_key: str, revision: int, timeout: float | None) -> RawEntry | None:
        """The message at ``revision`` if it belongs to this key."""
        assert self.conn.mux is not None
        body = orjson.dumps({"seq": revision})
        entry = self._entry_of(self._request(self.direct_batch, body, None, timeout))
        if entry is None and revision <= self.conn.written.get(self.stream, (0, ""))[0]:
            entry = self._leader_get({"seq": revision}, timeout)  # answered by a replica behind us
        return entry if entry is not None and entry.subject == self.subject_prefix + encoded_key else None

    def _entry_of(self, reply: RawReply) -> RawEntry | None:
        """The message of a direct get's reply; None when there is none (404)."""
        status, desc, entry = entry_of_reply(reply[1], reply[0])
        if status:
            if status == 404:
                return None
            raise self._status_error(status, desc)
        return entry

    def get_last_many(self, subjects: list[str], timeout: float | None) -> list[RawEntry] | None:
        """Latest message of each subject (wildcards allowed) in batch direct gets.

        Returns None when a request matched more subjects than one batch get may answer (413):
        the caller then reads through a consumer instead.
        """
        assert self.conn.mux is not None
        if self.conn.api_level < API_LEVEL_TTL:  # no batch get before nats-server 2.11
            if any(s.endswith(">") or "*" in s.split(".") for s in subjects):
                return None
            return self._get_each(subjects, timeout)
        out: list[RawEntry] = []
        if self.stream not in self.conn.written and len(subjects) > PIPELINED_BATCH_GET:
            answers = self._pipelined_batch_get(subjects, timeout)
            try:
                for replies in answers:
                    entries = self.batch_entries(replies)
                    if entries is None:
                        return None
                    out.extend(entries)
            finally:
                answers.close()
            return out
        deadline = None if timeout is None else time.monotonic() + timeout
        for i in range(0, len(subjects), MAX_SUBJECTS_PER_BATCH_GET):
            chunk = subjects[i : i + MAX_SUBJECTS_PER_BATCH_GET]
            if self.stream in self.conn.written:
                entries = self._batch_after_write(chunk, deadline)
            else:
                body = orjson.dumps({"multi_last": chunk})
                entries = self.batch_entries(self.conn.mux.request_stream(self.direct_batch, body, timeout))
            if entries is None:
                return None
            out.extend(entries)
        return out

    def _pipelined_batch_get(self, subjects: list[str], timeout: float | None) -> Generator[list[RawReply], None, None]:
        """The replies of batch gets of ``subjects`` split into several requests in flight at
        once: this thread reads the first answers while the server still sends the later ones."""
        assert self.conn.mux is not None
        bodies = [
            orjson.dumps({"multi_last": subjects[i : i + PIPELINED_BATCH_GET]})
            for i in range(0, len(subjects), PIPELINED_BATCH_GET)
        ]
        return self.conn.mux.request_streams(self.direct_batch, bodies, timeout)

    def latest_values(self, subjects: list[str], timeout: float | None) -> dict[str, tuple[bytes, bool]]:
        """``{subject: (payload, stored as raw bytes)}`` of the subjects (no wildcards) whose
        latest message is a value: deleted, purged, expired and never-set keys are left out.

        ``get_many``'s path: the same answer as :meth:`get_last_many`, without a RawEntry (nor
        its revision and time) per key."""
        assert self.conn.mux is not None
        if self.stream in self.conn.written or self.conn.api_level < API_LEVEL_TTL:
            raws = self.get_last_many(subjects, timeout)
            assert raws is not None  # explicit subjects never exceed the per-request cap
            return {raw.subject: (raw.data, raw.raw_bytes) for raw in raws if raw.operation == OP_PUT}
        found: dict[str, tuple[bytes, bool]] = {}
        answers = self._pipelined_batch_get(subjects, timeout)
        parse = core.parse_header_fields
        try:
            for replies in answers:
                for data, headers, _ in replies:
                    if type(headers) is bytes:
                        status, desc, (subject, op, marker, raw) = parse(headers, _VALUE_FIELDS)
                        if not status:
                            if (op is None or op == OP_PUT) and marker is None:
                                found["" if subject is None else subject] = (data, raw is not None)
                            continue
                    else:  # nats-py's own message path: a parsed dict
                        status, desc, entry = entry_of_reply(headers, data)
                        if entry is not None:
                            if entry.operation == OP_PUT:
                                found[entry.subject] = (entry.data, entry.raw_bytes)
                            continue
                    if status in (204, 404):
                        break
                    raise self._status_error(status, desc)
        finally:
            answers.close()
        return found

    def _get_each(self, subjects: list[str], timeout: float | None) -> list[RawEntry]:
        """Pipelined single direct gets, for servers without batch get."""
        assert self.conn.mux is not None
        commands: list[tuple[str, bytes, dict[str, str] | None]] = [
            (f"$JS.API.DIRECT.GET.{self.stream}.{subject}", b"", None) for subject in subjects
        ]
        out: list[RawEntry] = []
        for reply in self.conn.mux.request_many(commands, timeout):
            if reply is None:
                raise self.conn.mux.timeout_error(self.direct_batch, timeout)
            entry = self._entry_of(reply)
            if entry is not None:
                out.append(entry)
        return out

    def batch_entries(self, replies: list[RawReply]) -> list[RawEntry] | None:
        """Entries of a batch direct get's replies; None when it matched too many subjects (413)."""
        out: list[RawEntry] = []
        append = out.append
        for data, headers, _ in replies:
            status, desc, entry = entry_of_reply(headers, data)
            if entry is None:
                if status in (204, 404):
                    break
                if status == 413:
                    return None
                raise self._status_error(status, desc)
            append(entry)
        return out

    def history(self, encoded_key: str, timeout: float | None) -> list[RawEntry]:
        """Every stored revision of one key, oldest first."""
        assert self.conn.mux is not None
        subject = self.subject_prefix + encoded_key
        if self.conn.api_level < API_LEVEL_TTL:  # no batch get before nats-server 2.11
            return self._history_each(subject, timeout)
        out: list[RawEntry] = []
        seq = 1
        while True:
            body = orjson.dumps({"batch": 256, "seq": seq, "next_by_subj": subject})
            replies = self.conn.mux.request_stream(self.direct_batch, body, timeout)
            pending = 0
            for data, headers, _ in replies:
                status, desc, hdrs = parse_reply_headers(headers)
                if status:
                    if status not in (204, 404):
                        raise self._status_error(status, desc)
                    pending = int(hdrs.get(h.NUM_PENDING, 0) or 0)
                    break
                out.append(entry_from_headers(hdrs, data))
            if not pending or not out:
                return out
            seq = out[-1].revision + 1

    def _history_each(self, subject: str, timeout: float | None) -> list[RawEntry]:
        """History by single direct gets, one revision per request (an older server answers
        a batch get with one message and no end-of-batch status). At most ``history`` (64)
        round trips, all within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[RawEntry] = []
        seq = 1
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            body = orjson.dumps({"seq": seq, "next_by_subj": subject})
            entry = self._entry_of(self._request(self.direct_batch, body, None, left))
            if entry is None:
                return out
            out.append(entry)
            seq = entry.revision + 1

    # -- writes (any thread) ----------------------------------------------------------------

    def put(self, encoded_key: str, payload: bytes, headers: dict[str, str] | None, timeout: float | None) -> int:
        """Publish one message and return its revision. CAS failures raise JetStreamError."""
        assert self.conn.mux is not None
        if self._replicated:
            return self._put_resending(self.subject_prefix + encoded_key, payload, headers, timeout)
        data, hdrs, _ = self._request(self.subject_prefix + encoded_key, payload, headers, timeout)
        if not data:
            status, desc, _ = parse_reply_headers(hdrs)
            raise self._status_error(status, desc)
        return self._written(int(check_pub_ack(data)["seq"]), self.subject_prefix + encoded_key)

    def _put_resending(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float | None
    ) -> int:
        """A write to a replicated bucket, sent again while its stream leader does not answer
        (see publish_resending)."""
        assert self.conn.mux is not None
        ack = publish_resending(
            self.conn.mux, subject, payload, headers, timeout, f"bucket {self.bucket!r}", self._exists
        )
        return self._written(int(ack["seq"]), subject)

    def put_many(
        self, items: list[tuple[str, bytes, dict[str, str] | None]], timeout: float | None
    ) -> list[int | Exception]:
        """Pipeline many publishes; return each one's revision or the error it got, in order."""
        assert self.conn.mux is not None
        commands = [(self.subject_prefix + k, p, h) for k, p, h in items]
        results: list[int | Exception] = []
        for reply in self.conn.mux.request_many(commands, timeout):
            if reply is None:
                results.append(NatsKVTimeoutError(f"no acknowledgement within {timeout} s"))
                continue
            try:
                if not reply[0]:
                    status, desc, _ = parse_reply_headers(reply[1])
                    raise self._status_error(status, desc)
                results.append(self._written(int(check_pub_ack(reply[0])["seq"]), commands[len(results)][0]))
            except Exception as exc:
                results.append(exc)
        return results

    def commit_batch(self, items: list[tuple[str, bytes, dict[str, str]]], timeout: float | None) -> int:
        """Write all messages as one atomic batch; return the revision of the last one.

        All or nothing: one failed CAS check rejects the whole batch and nothing is stored.
        """
        self.conn.require(API_LEVEL_ATOMIC, "atomic multi-key commit (atomic batch publish)")
        if not items:
            raise InvalidArgumentError("commit() needs at least one operation")
        if len(items) > MAX_ATOMIC_BATCH:
            raise BatchError(f"an atomic commit holds at most {MAX_ATOMIC_BATCH} operations, not {len(items)}")
        if not self.config.get("allow_atomic"):
            self.update_config({"allow_atomic": True}, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        resend_after: float | None = None
        if self._replicated:
            # As single writes (see publish_resending): a batch in flight when its leader dies is
            # sent again, each message under its first message id. If the first copy was stored,
            # the server rejects the copy as a duplicate (all or nothing: then all was stored).
            ids = h.new_msg_id()
            items = [(k, p, h.with_msg_id(hd, f"{ids}-{i}")) for i, (k, p, hd) in enumerate(items)]
            resend_after = RESEND_AFTER + 0.002 * len(items)  # a big batch takes longer to store
        delay = FIRST_DELAY
        unanswered = False
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise NatsKVTimeoutError(
                    f"a commit to bucket {self.bucket!r} was not acknowledged within {timeout} s (its stream "
                    "leader did not answer, and no new one took over in time); all of it or none of it is stored"
                    if unanswered else
                    f"bucket {self.bucket!r} had no stream leader to commit to for {timeout} s "
                    "(an election that did not end?). Nothing was stored."
                )
            attempt = left if resend_after is None else (resend_after if left is None else min(left, resend_after))
            try:
                data, hdrs, first_status = self._send_batch(items, attempt)
                if resend_after is not None and data and not is_ack(data):
                    check_pub_ack(data)  # a duplicate or in-process answer to a resent batch
            except NatsKVTimeoutError:
                if resend_after is None:
                    raise
                unanswered = True
                continue
            except JetStreamError as exc:
                if resend_after is None or exc.err_code not in (ERR_BATCH_DUPLICATE, ERR_DUPLICATE_IN_PROCESS):
                    raise
                if exc.err_code == ERR_BATCH_DUPLICATE:
                    return self._written(self._stored_batch(items, timeout), self.subject_prefix + items[-1][0])
                first_status = 0
                data, hdrs = b"", b"NATS/1.0 503\r\n\r\n"  # the first copy is being stored: ask again
            # A batch is stored only when a stream leader receives its commit message. A commit
            # answered 503 reached no leader (no stream leader during an election); one answered
            # with an error after its first message got 503 reached a leader that never saw the
            # start of the batch and rejected it. Either way nothing was stored: send the whole
            # batch again, under a new id so it cannot join messages staged for the old one.
            status = status_of(hdrs) if not data else 0
            if status != 503 and not (first_status == 503 and not is_ack(data)):
                return self._written(self._batch_ack(data, hdrs), self.subject_prefix + items[-1][0])
            delay = sleep_before_retry(delay, deadline)

    def _stored_batch(self, items: list[tuple[str, bytes, dict[str, str]]], timeout: float | None) -> int:
        """The revision of a resent batch whose first copy was stored: that of its last message,
        read through the leader."""
        key, _, headers = items[-1]
        found = self._leader_message({"last_by_subj": self.subject_prefix + key}, timeout)
        if found is None or found[1].get(h.MSG_ID) != headers[h.MSG_ID]:
            raise JetStreamError(
                f"the commit to bucket {self.bucket!r} was stored, but its key {key!r} changed again before "
                "its revision could be read back; read the keys to see the current values"
            )
        return found[0].revision

    def _send_batch(
        self, items: list[tuple[str, bytes, dict[str, str]]], timeout: float | None
    ) -> tuple[bytes, Any, int]:
        """Send one atomic batch; return the commit's reply and the status the first message
        got (0 when it got none: the server answers the first message only when it fails)."""
        assert self.conn.mux is not None
        batch_id = h.new_batch_id()
        n = len(items)
        commands: list[tuple[str, bytes, dict[str, str] | None]] = []
        for i, (key, payload, headers) in enumerate(items, start=1):
            commands.append((self.subject_prefix + key, payload, h.batch_part(headers, batch_id, i, i == n)))
        # The first message and the commit are requests (errors come back on them); the middle
        # ones are plain publishes. Wait for the commit's answer alone.
        mux = self.conn.mux
        if n == 1:
            data, hdrs, _ = mux.request(commands[0][0], commands[0][1], commands[0][2], timeout)
            return data, hdrs, 0
        first_token = mux.new_token()
        first_reply: list[RawReply] = []

        def on_first(data: bytes, headers: Any, reply: str) -> bool:
            first_reply.append((data, headers, reply))
            return True

        mux.add_route(first_token, on_first)
        parts = [encode_command(commands[0][0], mux.prefix + first_token, commands[0][1], commands[0][2])]
        for subject, payload, part_headers in commands[1:-1]:
            parts.append(encode_command(subject, "", payload, part_headers))
        try:
            mux.send(b"".join(parts), len(parts), sum(len(c[1]) for c in commands[:-1]))
            last = commands[-1]
            data, hdrs, _ = mux.request(last[0], last[1], last[2], timeout)
        finally:
            mux.remove_route(first_token)
        if not first_reply:
            return data, hdrs, 0
        first_data, first_headers, _ = first_reply[0]
        if first_data:
            check_pub_ack(first_data)  # the first message's own error (a failed CAS check...)
            return data, hdrs, 0
        return data, hdrs, status_of(first_headers)

    def _batch_ack(self, data: bytes, headers: Any) -> int:
        if not data:
            status, desc, _ = parse_reply_headers(headers)
            raise self._status_error(status, desc)
        return int(check_pub_ack(data)["seq"])

    # -- read-your-writes --------------------------------------------------------------------

    def _written(self, revision: int, subject: str) -> int:
        """Note a write of this client, so its later reads show nothing older."""
        if self._replicated and revision > self.conn.written.get(self.stream, (0, ""))[0]:
            self.conn.written[self.stream] = (revision, subject)
        return revision

    def _get_after_write(self, encoded_key: str, timeout: float | None) -> RawEntry | None:
        """A single-key read that shows nothing older than this client's writes.

        Direct gets are answered by any replica, and a follower may lag the leader that
        acknowledged a write (nats-server 2.12 dropped its ``min_last_seq`` request field before
        release). A one-subject batch get ends with ``Nats-UpTo-Sequence``, the answering
        replica's last sequence: when that is behind this client's last write, or the replica
        found nothing (which says nothing of its position), the stream leader answers instead
        (``STREAM.MSG.GET``, which only the leader serves).
        """
        assert self.conn.mux is not None
        subject = self.subject_prefix + encoded_key
        replies = self.conn.mux.request_stream(self.direct_batch, orjson.dumps({"multi_last": [subject]}), timeout)
        fresh = self._fresh(replies)
        if fresh is not True:
            if fresh is False:
                self._check_mark(timeout)
            return self._leader_get({"last_by_subj": subject}, timeout)
        entries = self.batch_entries(replies)
        return entries[0] if entries else None

    def _batch_after_write(self, subjects: list[str], deadline: float | None) -> list[RawEntry] | None:
        """A batch get of the latest message of ``subjects`` that shows nothing older than this
        client's writes: asked again while a replica behind them answers. A "no results" answer
        carries no position, so it is checked by asking again with the subject of this client's
        last write added, which a replica that is not behind has."""
        assert self.conn.mux is not None
        anchor = ""
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            asked = [*subjects, anchor] if anchor else subjects
            replies = self.conn.mux.request_stream(self.direct_batch, orjson.dumps({"multi_last": asked}), left)
            fresh = self._fresh(replies)
            if fresh is None and not anchor and self.stream in self.conn.written:
                anchor = self.conn.written[self.stream][1]
                continue
            if fresh is not False and not (fresh is None and anchor):
                break
            if fresh is None and self._leader_get({"last_by_subj": anchor}, left) is None:
                # The leader lacks this client's last write too: the stream was deleted and
                # created again, or purged. Nothing newer to wait for.
                self.conn.written.pop(self.stream, None)
                anchor = ""
                continue
            # A replica behind this client's writes answered: ask again (another replica, or this
            # one caught up), after making sure the stream was not recreated since.
            self._check_mark(left)
            time.sleep(0.002)
        entries = self.batch_entries(replies)
        if entries is not None and anchor and not any(_subject_matches(s, anchor) for s in subjects):
            entries = [e for e in entries if e.subject != anchor]
        return entries

    def _fresh(self, replies: list[RawReply]) -> bool | None:
        """Whether a batch get's answering replica had this client's last write (None: it
        cannot tell, having found no message; True when this client wrote nothing)."""
        mark = self.conn.written.get(self.stream, (0, ""))[0]
        if not mark or not replies:
            return True
        status, _, hdrs = parse_reply_headers(replies[-1][1])
        if status == 204:
            return int(hdrs.get(h.UP_TO_SEQUENCE, mark)) >= mark
        return None if status == 404 else True

    def _check_mark(self, timeout: float | None) -> None:
        """Forget this client's write mark when the stream is behind it: it was deleted and
        created again (by another client) after this client wrote to it."""
        last = int(self.info(timeout).get("state", {}).get("last_seq", 0))
        if last < self.conn.written.get(self.stream, (0, ""))[0]:
            self.conn.written.pop(self.stream, None)

    def _leader_get(self, request: dict[str, Any], timeout: float | None) -> RawEntry | None:
        """One message read through the stream leader (consistent; about twice a direct get)."""
        found = self._leader_message(request, timeout)
        return None if found is None else found[0]

    def _leader_message(self, request: dict[str, Any], timeout: float | None) -> tuple[RawEntry, dict[str, str]] | None:
        """``STREAM.MSG.GET``: a message and its headers, from the stream leader."""
        try:
            reply = jsapi.call_leader(self.conn, f"STREAM.MSG.GET.{self.stream}", request, timeout)
        except JetStreamError as exc:
            if exc.err_code == ERR_NO_MESSAGE:
                return None
            raise
        msg = reply["message"]
        _, _, hdrs = parse_reply_headers(base64.b64decode(msg["hdrs"])) if msg.get("hdrs") else (0, "", {})
        hdrs.update({h.SUBJECT: msg["subject"], h.SEQUENCE: str(msg["seq"]), h.TIME_STAMP: msg["time"]})
        return entry_from_headers(hdrs, base64.b64decode(msg.get("data") or b"")), hdrs

    # -- helpers ------------------------------------------------------------------------------

    def _request(self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float | None) -> RawReply:
        """One request; "no responders" (503) is retried until the timeout (see request_retrying_on_503)."""
        assert self.conn.mux is not None
        reply = self.conn.mux.request(subject, payload, headers, timeout)
        if reply[0] or status_of(reply[1]) != 503:
            return reply
        return request_retrying_on_503(
            self.conn.mux, subject, payload, headers, timeout, f"bucket {self.bucket!r}", self._exists, reply
        )

    def _exists(self, timeout: float) -> None:
        # Deleted by someone else? Say so instead of retrying until the timeout.
        try:
            self.info(timeout)
        except BucketNotFoundError:
            raise BucketNotFoundError(
                f"bucket {self.bucket!r} does not exist (deleted?); create it again with client.bucket({self.bucket!r})"
            ) from None
        except NatsKVError:
            pass  # JetStream not answering yet (restarting): keep retrying

    @property
    def config(self) -> dict[str, Any]:
        """The bucket's stream config as last read from the server."""
        return self._config

    @config.setter
    def config(self, config: dict[str, Any]) -> None:
        self._config = config
        self._replicated = config.get("num_replicas", 1) > 1 and self.conn.api_level >= API_LEVEL_TTL
        meta = config.get("metadata") or {}
        limit = int(meta.get("natskv.max_value_size", 0) or 0) or config.get("max_msg_size", -1)
        self._max_value = limit if limit and limit > 0 else None

    def require_ttl(self) -> None:
        """Make sure per-key TTL works here: the server has it and the stream allows it."""
        self.conn.require(API_LEVEL_TTL, "per-key TTL")
        if not self.config.get("allow_msg_ttl"):
            # A bucket made before natskv (or by another tool): allow it, as nats.go does.
            self.update_config({"allow_msg_ttl": True}, self.conn.options.request_timeout)

    def max_value_size(self) -> int | None:
        """The bucket's value size limit: natskv's own (in the metadata), else the stream's."""
        return self._max_value

    def check_size(self, size: int) -> None:
        limit = self.conn.max_payload
        max_value = self._max_value
        if max_value is not None and size > max_value:
            raise PayloadTooLargeError(
                f"value of {size} bytes exceeds bucket {self.bucket!r}'s max_value_size of {max_value} bytes"
            )
        # Leave room for the subject and headers inside the server's max payload.
        if size > limit - HEADER_ROOM:
            raise PayloadTooLargeError(
                f"value of {size} bytes exceeds the server's max payload ({limit} bytes, less room for headers); "
                "store large values in NATS Object Store or raise max_payload in the server config"
            )

    def _status_error(self, status: int, desc: str) -> Exception:
        if status == 503:
            return JetStreamError(
                f"no JetStream responders for bucket {self.bucket!r} "
                "(is JetStream enabled, does the stream have a leader?)",
                code=503,
            )
        if status == 408:
            return NatsKVTimeoutError(f"the server timed out answering a request on bucket {self.bucket!r}")
        return JetStreamError(desc or f"unexpected status {status}", code=status)

    # -- pipelined atomic batches (caller's thread) ----------------------------------------------

    def commit_batches(
        self,
        batches: Sequence[list[tuple[str, bytes, dict[str, str]]]],
        timeout: float | None,
        inflight: int = 4,
        on_ack: Callable[[int, int], None] | None = None,
    ) -> list[int | NatsKVError | None]:
        """Commit several independent atomic batches, up to ``inflight`` of them in flight at once
        (the server allows 50 per stream); return, in order, each batch's last revision, the error
        that rejected it, or None for a batch not sent.

        Each batch is all or nothing on its own. After the first failure no further batch is sent,
        but those already sent are answered, so an ack may follow a failure. ``timeout`` applies
        to each batch, counted from its sending: a batch not acknowledged by then is returned as
        a NatsKVTimeoutError (its outcome is unknown). On a replicated stream the
        batches go one after another through :meth:`commit_batch`, which re-sends a batch whose
        leader died (a pipeline of resends could store them out of order).

        ``on_ack(i, revision)`` is called (on this thread) for each batch stored, in order, once
        the batches that its acknowledgement let go out are sent. ``batches`` is read in order,
        up to ``inflight`` batches ahead of those sent (so it may be built lazily, while the
        server works); one that is empty or over 1000 messages raises BatchError when sent.
        """
        self.conn.require(API_LEVEL_ATOMIC, "atomic multi-key commit (atomic batch publish)")
        results: list[int | NatsKVError | None] = [None] * len(batches)
        if not batches:
            return results
        if not self.config.get("allow_atomic"):
            self.update_config({"allow_atomic": True}, timeout)
        if self._replicated or inflight <= 1:
            for i, items in enumerate(batches):
                try:
                    results[i] = revision = self.commit_batch(items, timeout)
                except NatsKVError as exc:
                    results[i] = exc
                    break
                if on_ack is not None:
                    on_ack(i, revision)
            return results
        assert self.conn.mux is not None
        mux = self.conn.mux
        window: list[tuple[int, Waiter, str, str, list[RawReply], float | None]] = []
        sent = 0
        failed = False
        acked: tuple[int, int] | None = None  # told to on_ack once the next batch is out
        try:
            while window or (sent < len(batches) and not failed):
                while not failed and sent < len(batches) and len(window) < inflight:
                    started = self._start_batch(sent, batches[sent])
                    window.append((*started, None if timeout is None else time.monotonic() + timeout))
                    sent += 1
                # The server answers the batches it holds together, once it has stored them
                # all, and then waits for more: the next batches go out before anything else is
                # done with an answer, and they are built while the server works on these (a
                # lazily built sequence builds on access).
                if acked is not None:
                    if on_ack is not None:
                        on_ack(*acked)
                    acked = None
                if not failed:
                    for ahead in range(sent, min(sent + inflight, len(batches))):
                        batches[ahead]
                i, waiter, token, first_token, first_reply, deadline = window.pop(0)
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    answered = waiter.wait(left)
                finally:
                    mux._waiting.discard(waiter)
                    mux.remove_route(first_token)
                if waiter.error is not None:
                    raise fresh_error(waiter.error)
                if not answered:
                    mux.remove_route(token)
                    results[i] = NatsKVTimeoutError(
                        f"a commit to bucket {self.bucket!r} was not acknowledged within {timeout} s; "
                        "all of it or none of it is stored"
                    )
                    failed = True
                    continue
                assert waiter.reply is not None
                try:
                    results[i] = revision = self._pipelined_ack(batches[i], waiter.reply, first_reply)
                except NatsKVError as exc:
                    results[i] = exc
                    failed = True
                    continue
                acked = (i, revision)
        finally:
            if acked is not None and on_ack is not None:  # the last batch, or one before an error
                on_ack(*acked)
            for _, waiter, token, first_token, _, _ in window:  # only on an exception (Ctrl-C, close)
                mux._waiting.discard(waiter)
                mux.remove_route(token)
                mux.remove_route(first_token)
        return results

    def _start_batch(
        self, index: int, items: list[tuple[str, bytes, dict[str, str]]]
    ) -> tuple[int, Waiter, str, str, list[RawReply]]:
        """Send one batch of :meth:`commit_batches` without waiting: the first message and the
        commit are requests (errors come back on the first), the rest plain publishes, all in
        one write."""
        assert self.conn.mux is not None
        mux = self.conn.mux
        n = len(items)
        if not items or n > MAX_ATOMIC_BATCH:
            raise BatchError(f"an atomic commit holds 1 to {MAX_ATOMIC_BATCH} operations, not {n}")
        batch_id = h.new_batch_id()
        prefix = self.subject_prefix
        first_token = mux.new_token()
        first_reply: list[RawReply] = []

        def on_first(data: bytes, headers: Any, reply: str) -> bool:
            first_reply.append((data, headers, reply))
            return True

        token = mux.new_token()
        waiter = Waiter(prefix + items[-1][0])
        data = encode_batch(prefix, items, batch_id, mux.prefix + first_token, mux.prefix + token)
        size = sum([len(payload) for _, payload, _ in items])
        if n > 1:
            mux.add_route(first_token, on_first)
        mux.add_route(token, waiter.deliver)
        mux._waiting.add(waiter)
        try:
            mux.send(data, n, size)
        except BaseException:
            mux._waiting.discard(waiter)
            mux.remove_route(token)
            mux.remove_route(first_token)
            raise
        return index, waiter, token, first_token, first_reply

    def _pipelined_ack(
        self, items: list[tuple[str, bytes, dict[str, str]]], reply: RawReply, first_reply: list[RawReply]
    ) -> int:
        """The revision of a batch of :meth:`commit_batches` from its commit's reply (and its first
        message's, which the server sends only on failure), or the error that rejected it."""
        data, hdrs, _ = reply
        if first_reply and first_reply[0][0]:
            check_pub_ack(first_reply[0][0])  # the first message's own error (a failed CAS check...)
        if not data and first_reply and status_of(first_reply[0][1]) == 503:
            raise self._status_error(503, "")
        return self._written(self._batch_ack(data, hdrs), self.subject_prefix + items[-1][0])
