"""Bucket: the blocking Key-Value API.

Every method runs on the caller's thread and may be called from any thread except natskv's loop
thread. Single requests go down the wire path (:mod:`natskv.wire.kv`) on that thread; listings too
large for a batch get go through ``runner.call`` to a consumer on the loop thread.

Keys are any ``str``; they are encoded by ``_core.encode_key`` into the NATS subject alphabet
(reversibly), with ``sep`` (``:`` by default) becoming NATS's token separator so patterns like
``"user:*"`` are filtered by the server.

Timeouts: every blocking call takes ``timeout=`` in seconds; ``None`` (the default) means the
client's default (``request_timeout``, 5 s unless set at connect), and ``math.inf`` means no limit.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from threading import get_ident
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar

from natskv._runner import runner, wait_limit
from natskv._speedups import core
from natskv._time import parse_timestamp
from natskv.aio.watch import snapshot
from natskv.codec import RAW_HEADER, Codec, JSONCodec, get_codec, non_finite_path
from natskv.errors import (
    InvalidArgumentError,
    InvalidKeyError,
    JetStreamError,
    KeyExistsError,
    KeyNotFoundError,
    NatsKVError,
    NatsKVTimeoutError,
    RevisionMismatchError,
)
from natskv.ops import Create, Delete, Op, Update, as_op
from natskv.ops import check_revision as _check_revision
from natskv.stats import flow as _flow
from natskv.wire import headers as h
from natskv.wire.jsapi import CAS_ERROR_CODES
from natskv.wire.kv import KVProtocol, RawEntry

if TYPE_CHECKING:
    from natskv.client import Client
    from natskv.counter import Counter
    from natskv.replica import LocalReplica
    from natskv.watch import Watcher

_MISSING: Any = object()
F = TypeVar("F", bound=Callable[..., Any])
_WRONG_SEQ = re.compile(r"wrong last sequence: (\d+)")
# NATS parses protocol lines up to 4 KiB; keep the whole subject comfortably inside.
MAX_ENCODED_KEY = 3000


def _recorded(operation: str, *, many: bool = False) -> Callable[[F], F]:
    """Count each call of a Bucket method in its client's statistics (natskv.stats): latency,
    errors by type, how many results (``many``: the length of what it returns), and the key or
    pattern (its first argument) for published events, and the value bytes it sent and received
    (what the call added to the thread's ``natskv.stats.flow``). A call made by another
    (``replace`` reads, then updates) is counted too. Costs two clock reads and a few integer
    operations, under a microsecond."""

    def wrap(method: F) -> F:
        @functools.wraps(method)
        def call(self: Bucket, *args: Any, **kwargs: Any) -> Any:
            if self._dormant:  # closed by the client's bucket manager: open again
                self._client._reopen(self)
            sent, received = _flow.sent, _flow.received
            started = perf_counter()
            try:
                result = method(self, *args, **kwargs)
            except BaseException as exc:
                self._client._stats.record(operation, self.name, _subject_of(args), started, error=exc,
                                           sent=_flow.sent - sent, received=_flow.received - received)
                raise
            self._client._stats.record(operation, self.name, _subject_of(args), started,
                                       result_count=len(result) if many else 1,
                                       sent=_flow.sent - sent, received=_flow.received - received)
            return result

        return call  # type: ignore[return-value]

    return wrap


def _subject_of(args: tuple[Any, ...]) -> str:
    """What a recorded call was about: its key or pattern, or how many keys it took."""
    if not args:
        return "*"
    first = args[0]
    if type(first) is str:
        return first
    if isinstance(first, (list, tuple, dict, set)):
        return f"<{len(first)} keys>"
    return str(first)


class Entry:
    """One stored revision of a key.

    ``operation`` is ``"PUT"`` for values; history and watches also show ``"DEL"`` and ``"PURGE"``.
    ``created`` is when this revision was written (UTC).
    """

    __slots__ = ("_timestamp", "bucket", "key", "operation", "revision", "value")

    def __init__(self, key: str, value: Any, revision: int, timestamp: str, operation: str, bucket: str) -> None:
        self.key = key
        self.value = value
        self.revision = revision
        self.operation = operation
        self._timestamp = timestamp
        self.bucket = bucket

    @property
    def created(self) -> datetime | None:
        return parse_timestamp(self._timestamp) if self._timestamp else None

    def __repr__(self) -> str:
        return f"Entry(key={self.key!r}, value={self.value!r}, revision={self.revision}, operation={self.operation!r})"

    __hash__ = None  # type: ignore[assignment]  # compared by value, and mutable: unhashable

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.key, self.value, self.revision, self.operation, self.bucket) == (
            other.key, other.value, other.revision, other.operation, other.bucket,
        )


@dataclass(frozen=True)
class BucketStatus:
    """What the server reports about a bucket."""

    bucket: str
    values: int  # messages stored, all revisions and delete markers included
    bytes: int
    history: int
    ttl: float | None
    max_value_size: int | None
    replicas: int
    storage: str
    first_revision: int
    last_revision: int
    supports_atomic: bool
    supports_ttl: bool


class Bucket:
    """A NATS KV bucket. Get one with :meth:`natskv.Client.bucket`."""

    def __init__(self, client: Client, proto: KVProtocol, codec: str | Codec | None, sep: str) -> None:
        self._client = client
        self._proto = proto
        self.name = proto.bucket
        self.codec = get_codec(codec)
        self.sep = sep
        # Bound once: the hot path looks them up on self, not on the core module.
        self._core_encode_key = core.encode_key
        self._core_decode_key = core.decode_key
        self._dormant = False  # closed by a bucket manager (natskv.manager) until used again
        self._forks = -1  # runner.forks when this bucket's client was last checked (see _timeout)

    def __repr__(self) -> str:
        return f"<natskv.Bucket {self.name!r}>"

    # -- helpers -------------------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float | None:
        """The limit of a blocking call (see :func:`wait_limit`), after checking that the call may
        run here: the client is open (a forked child reconnects here) and this is not the loop
        thread."""
        client = self._client
        limit = client.options.request_timeout if timeout is None else wait_limit(timeout, 0.0)
        if client._closed or self._forks != runner.forks:  # closed, or a forked child reconnects
            client._check()
            self._forks = runner.forks
        if get_ident() == runner._ident:
            runner.check_not_loop_thread()  # raises
        return limit

    def _token(self, key: str) -> str:
        """The subject token of ``key``: checked, and encoded into the NATS subject alphabet."""
        if type(key) is not str and not isinstance(key, str):
            raise InvalidKeyError(f"keys are str, not {type(key).__name__} ({key!r}); convert it with str()")
        try:
            encoded = self._core_encode_key(key, self.sep)
        except ValueError as exc:
            raise InvalidKeyError(f"key {key!r} cannot be stored: {exc}") from exc
        if len(encoded) > MAX_ENCODED_KEY:
            raise InvalidKeyError(
                f"key of {len(key)} characters is too long (encoded: {len(encoded)} > {MAX_ENCODED_KEY})"
            )
        return encoded

    def _tokens(self, keys: list[str]) -> list[str]:
        """``[self._token(key) for key in keys]`` in one ``_core`` call; the first bad key raises
        as ``_token`` would."""
        try:
            encoded: list[str] = core.encode_keys(keys, self.sep)
        except (ValueError, TypeError):
            encoded = [self._token(key) for key in keys]  # raises for the first bad key
        if encoded and max(map(len, encoded)) > MAX_ENCODED_KEY:
            for key in keys:
                self._token(key)  # raises for the first key too long
        return encoded

    def _encode_many(self, values: list[Any]) -> list[bytes]:
        """The payloads of many values (never bytes: those take ``_encode``'s raw path), each
        checked against the size limits, counted once in the statistics."""
        encode = self.codec.encode
        payloads = [encode(value) for value in values]
        if payloads:
            self._proto.check_size(max(map(len, payloads)))
            _flow.sent += sum(map(len, payloads))
        return payloads

    def _encode(self, value: Any, ttl: float | None = None) -> tuple[bytes, dict[str, str] | None]:
        headers: dict[str, str] | None = None
        if type(value) is bytes and isinstance(self.codec, JSONCodec):
            payload, headers = value, {RAW_HEADER: "1"}
        else:
            payload = self.codec.encode(value)
        self._proto.check_size(len(payload))
        _flow.sent += len(payload)  # for the statistics (natskv.stats)
        if ttl is not None:
            ttl_value = h.ttl_header(ttl)
            assert ttl_value is not None
            self._proto.require_ttl()
            headers = h.with_ttl(headers, ttl_value)
        return payload, headers

    def _key_of_token(self, encoded: str) -> str:
        """The key of an encoded subject token; keys written by other clients that are not in
        natskv's encoding come back as they are on the wire."""
        try:
            return self._core_decode_key(encoded, self.sep)
        except ValueError:
            return encoded

    def _value(self, raw: RawEntry) -> Any:
        """The decoded value of a PUT message (no Entry built: the replica's hot path)."""
        return raw.data if raw.raw_bytes else self.codec.decode(raw.data)

    def _decode(self, raw: RawEntry, key: str | None = None) -> Entry:
        if key is None:
            key = self._key_of_token(raw.subject[len(self._proto.subject_prefix) :])
        value = None
        if raw.operation == "PUT":
            value = self._value(raw)
            _flow.received += len(raw.data)
        return Entry(key, value, raw.revision, raw.timestamp, raw.operation, self.name)

    def _cas_error(self, exc: JetStreamError, key: str, expected: int) -> Exception:
        m = _WRONG_SEQ.search(exc.description)
        current = int(m.group(1)) if m else None
        if expected == 0:
            return KeyExistsError(key, current)
        return RevisionMismatchError(key, expected, current)

    # -- reads ---------------------------------------------------------------------------------

    @_recorded("get")
    def get(self, key: str, default: Any = None, *, timeout: float | None = None) -> Any:
        """The value of ``key``, or ``default`` when it is absent (never set, deleted or expired)."""
        found = self._proto.get_value(self._token(key), self._timeout(timeout))
        if found is None:
            return default
        _flow.received += len(found[0])
        return found[0] if found[1] else self.codec.decode(found[0])

    @_recorded("get")
    def entry(self, key: str, *, revision: int | None = None, timeout: float | None = None) -> Entry | None:
        """The latest :class:`Entry` of ``key`` (or the one at ``revision``), None when absent."""
        enc = self._token(key)
        if revision is not None and _check_revision(revision) < 1:
            raise InvalidArgumentError("revision must be at least 1 (revisions start at 1), not 0")
        limit = self._timeout(timeout)
        raw = self._proto.get(enc, limit) if revision is None else self._proto.get_revision(enc, revision, limit)
        if raw is None or (revision is None and raw.operation != "PUT"):
            return None
        return self._decode(raw, key)

    @_recorded("get_many", many=True)
    def get_many(self, keys: Iterable[str], *, timeout: float | None = None) -> dict[str, Any]:
        """Values of many keys in batch requests (1024 keys per round trip). Absent keys are left out."""
        keys = _key_list(keys, "get_many")
        if not keys:
            return {}
        prefix = self._proto.subject_prefix
        token = self._token
        by_subject = {prefix + token(k): k for k in keys}
        found = self._proto.latest_values(list(by_subject), self._timeout(timeout))
        decode = self.codec.decode
        out: dict[str, Any] = {}
        received = 0
        for subject, key in by_subject.items():  # in the order asked for
            value = found.get(subject)
            if value is not None:
                received += len(value[0])
                out[key] = value[0] if value[1] else decode(value[0])
        _flow.received += received
        return out

    def _latest(
        self, pattern: str | re.Pattern[str], headers_only: bool, timeout: float | None
    ) -> list[tuple[str, RawEntry]]:
        try:
            compiled = core.compile_pattern(pattern, self.sep)
        except (ValueError, TypeError) as exc:
            raise InvalidKeyError(f"invalid key pattern {pattern!r}: {exc}") from exc
        limit = self._timeout(timeout)
        prefix_len = len(self._proto.subject_prefix)
        raws = None
        if self._client._conn.api_level >= 1:
            raws = self._proto.get_last_many([self._proto.subject_prefix + compiled.filter], limit)
        if raws is None:  # too many subjects for one batch get, or an old server: use a consumer
            raws = runner.call(
                snapshot(self._client._conn, self._proto, compiled.filter, headers_only, limit or 30.0),
                limit and limit * 10,
            )
        out = []
        exact = compiled.exact
        for raw in raws:
            if raw.operation != "PUT":
                continue
            key = self._key_of_token(raw.subject[prefix_len:])
            if exact or compiled.match(key):
                out.append((key, raw))
        out.sort(key=lambda kr: kr[0])
        return out

    @_recorded("keys", many=True)
    def keys(self, pattern: str | re.Pattern[str] = "*", *, timeout: float | None = None) -> list[str]:
        """Sorted keys matching a glob (``*``, ``?``, ``[abc]``, Redis KEYS rules) or compiled regex.

        The pattern's literal leading tokens become a server-side filter, so ``keys("user:*")``
        reads only the ``user:`` keys. A ``re.Pattern`` is searched with RE2 (its IGNORECASE,
        MULTILINE and DOTALL flags kept), in time linear in the key: no backreferences or
        lookaround (:class:`InvalidKeyError` says so), and ``\\w \\d \\s`` are ASCII-only.
        """
        return [k for k, _ in self._latest(pattern, True, timeout)]

    @_recorded("keys", many=True)
    def items(self, pattern: str | re.Pattern[str] = "*", *, timeout: float | None = None) -> list[tuple[str, Any]]:
        """Sorted ``(key, value)`` pairs of the keys matching ``pattern``."""
        return [(k, self._decode(raw, k).value) for k, raw in self._latest(pattern, False, timeout)]

    @_recorded("find", many=True)
    def find(
        self,
        where: Mapping[str, Any] | None = None,
        pattern: str | re.Pattern[str] = "*",
        *,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> list[tuple[str, Any]]:
        """``(key, value)`` pairs whose JSON value matches ``where`` (MongoDB-style operators).

        Example: ``kv.find(where={"age": {"$gte": 18}}, pattern="user:*")``. Supported operators:
        ``$eq $ne $gt $gte $lt $lte $in $nin $contains $startswith $endswith $regex $exists $and
        $or $not``; dotted names reach into nested objects. The filter is compiled (and checked)
        before anything is read. ``$regex`` uses RE2 syntax and runs in linear time (see
        :meth:`keys`).
        """
        if where is not None and not isinstance(where, Mapping):
            raise InvalidArgumentError(
                f"where= takes a dict such as {{'age': {{'$gte': 18}}}}, not {type(where).__name__} ({where!r})"
            )
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidArgumentError(f"limit must be None or an int >= 0, not {limit!r}")
        non_finite = non_finite_path(dict(where or {}), "where")
        if non_finite is not None:
            raise InvalidArgumentError(
                f"{non_finite[0]} is {non_finite[1]!r}: no stored value can equal or compare to it"
            )
        try:
            flt = core.compile_filter(dict(where or {}))
        except ValueError as exc:
            raise InvalidArgumentError(f"invalid where= filter: {exc}") from exc
        pairs = self.items(pattern, timeout=timeout)
        hits = flt.filter([v for _, v in pairs])
        out = [pairs[i] for i in hits]
        return out[:limit] if limit is not None else out

    @_recorded("history", many=True)
    def history(self, key: str, *, timeout: float | None = None) -> list[Entry]:
        """Every stored revision of ``key``, oldest first, deletes included (as many as ``history`` keeps)."""
        return [self._decode(raw, key) for raw in self._proto.history(self._token(key), self._timeout(timeout))]

    # -- writes ----------------------------------------------------------------------------------

    @_recorded("set")
    def set(self, key: str, value: Any, *, ttl: float | None = None, timeout: float | None = None) -> int:
        """Store ``value`` under ``key``; return the new revision.

        ``ttl`` (seconds) expires the key: once it passes the key is absent, whatever the bucket's
        history. A write with a ``ttl`` therefore drops the key's earlier revisions (the same
        holds for the ``ttl`` of create, update, replace and set_many). ``ttl`` is 1 s to 100
        years (rounded up to whole seconds). A value the codec cannot store (with the JSON codec:
        NaN or an infinity anywhere in it, an unsupported type) raises :class:`SerializationError`
        before anything is sent.
        """
        enc = self._token(key)
        payload, headers = self._encode(value, ttl)
        return self._proto.put(enc, payload, headers, self._timeout(timeout))

    put = set

    @_recorded("create")
    def create(self, key: str, value: Any, *, ttl: float | None = None, timeout: float | None = None) -> int:
        """Store ``value`` only if ``key`` is absent; raise :class:`KeyExistsError` otherwise.

        A deleted, purged or expired key counts as absent.
        """
        enc = self._token(key)
        payload, headers = self._encode(value, ttl)
        limit = self._timeout(timeout)
        try:
            return self._proto.put(enc, payload, h.with_expected_revision(headers, 0), limit)
        except JetStreamError as exc:
            if exc.err_code not in CAS_ERROR_CODES:
                raise
            first_error = exc
        # The subject has history: allowed if its latest message is a delete, purge or TTL marker.
        raw = self._proto.get(enc, limit)
        if raw is not None and raw.operation == "PUT":
            raise self._cas_error(first_error, key, 0) from None
        expected = raw.revision if raw is not None else 0
        try:
            return self._proto.put(enc, payload, h.with_expected_revision(headers, expected), limit)
        except JetStreamError as exc:
            if exc.err_code in CAS_ERROR_CODES:
                raise self._cas_error(exc, key, 0) from None
            raise

    @_recorded("update")
    def update(
        self, key: str, value: Any, revision: int, *, ttl: float | None = None, timeout: float | None = None
    ) -> int:
        """Store ``value`` only if ``key`` is still at ``revision`` (compare-and-set).

        Raises :class:`RevisionMismatchError` carrying ``current_revision`` otherwise.
        """
        enc = self._token(key)
        revision = _check_revision(revision)
        payload, headers = self._encode(value, ttl)
        headers = h.with_expected_revision(headers, revision)
        try:
            return self._proto.put(enc, payload, headers, self._timeout(timeout))
        except JetStreamError as exc:
            if exc.err_code in CAS_ERROR_CODES:
                raise self._cas_error(exc, key, revision) from None
            raise

    @_recorded("replace")
    def replace(self, key: str, value: Any, *, ttl: float | None = None, timeout: float | None = None) -> bool:
        """Store ``value`` only if ``key`` exists; return whether it was stored."""
        self._token(key)
        payload, _ = self._encode(value, ttl)  # fail on a bad value before reading anything
        _flow.sent -= len(payload)  # a check: update() counts what it sends
        while True:
            current = self.entry(key, timeout=timeout)
            if current is None:
                return False
            try:
                self.update(key, value, current.revision, ttl=ttl, timeout=timeout)
                return True
            except RevisionMismatchError:
                continue  # changed or deleted meanwhile: look again

    @_recorded("delete")
    def delete(self, key: str, *, revision: int | None = None, timeout: float | None = None) -> int:
        """Delete ``key`` (its history is kept); with ``revision``, only if still at that revision.

        Returns the revision of the delete marker. Deleting an absent key is not an error.
        """
        return self._tombstone(key, h.OP_DEL, revision, timeout)

    @_recorded("delete")
    def purge(self, key: str, *, revision: int | None = None, timeout: float | None = None) -> int:
        """Delete ``key`` and drop its history; with ``revision``, only if still at that revision."""
        return self._tombstone(key, h.OP_PURGE, revision, timeout)

    def _tombstone(self, key: str, op: str, revision: int | None, timeout: float | None) -> int:
        enc = self._token(key)
        headers = h.tombstone(op, None if revision is None else _check_revision(revision))
        try:
            return self._proto.put(enc, b"", headers, self._timeout(timeout))
        except JetStreamError as exc:
            if revision is not None and exc.err_code in CAS_ERROR_CODES:
                raise self._cas_error(exc, key, revision) from None
            raise

    @_recorded("set_many", many=True)
    def set_many(
        self, mapping: Mapping[str, Any], *, ttl: float | None = None, timeout: float | None = None
    ) -> dict[str, int]:
        """Store many values in one pipelined write; return each key's revision.

        Not atomic (see :meth:`commit`): if some writes fail, the others are still stored and the
        first error is raised after all acknowledgements are in.
        """
        if not isinstance(mapping, Mapping):
            raise InvalidArgumentError(
                f"set_many takes a mapping of key -> value (e.g. a dict), not {type(mapping).__name__}"
            )
        items = [(k, self._token(k), *self._encode(v, ttl)) for k, v in mapping.items()]
        results = self._proto.put_many([(enc, p, h) for _, enc, p, h in items], self._timeout(timeout))
        out: dict[str, int] = {}
        for (key, _, _, _), res in zip(items, results, strict=True):
            if isinstance(res, Exception):
                raise res
            out[key] = res
        return out

    @_recorded("commit")
    def commit(self, ops: Iterable[Op | tuple[Any, ...]], *, timeout: float | None = None) -> int:
        """Apply several writes atomically: all are stored, or none (needs nats-server 2.12).

        Each op is a :class:`natskv.Set`, :class:`natskv.Create`, :class:`natskv.Update` or
        :class:`natskv.Delete`, or its tuple form: ``("set", key, value)``, ``("create", key,
        value)``, ``("update", key, value, revision)``, ``("delete", key)`` or ``("delete", key,
        revision)``. Set, Create and Update take a ``ttl`` (seconds; in a tuple, a trailing
        ``{"ttl": seconds}``) that expires the key. ``Create`` and ``Update`` (and ``Delete`` with a revision) are
        compare-and-set checks; if any fails the whole commit is rejected with
        :class:`RevisionMismatchError` / :class:`KeyExistsError` and nothing is stored. A
        malformed op, a bad key or a value the codec cannot store raises before anything is sent.
        Returns the revision of the last write. Keys must be distinct.
        """
        if isinstance(ops, (str, bytes, Mapping)) or not isinstance(ops, Iterable):
            raise InvalidArgumentError(
                f"commit takes a list of operation tuples or natskv.Set/Create/Update/Delete objects, "
                f"not {type(ops).__name__}"
            )
        items: list[tuple[str, bytes, dict[str, str]]] = []
        seen: set[str] = set()
        checks: dict[str, tuple[str, int]] = {}
        for raw_op in ops:
            op = as_op(raw_op)
            key = op.key
            enc = self._token(key)
            if enc in seen:
                raise InvalidArgumentError(f"key {key!r} appears twice in one commit")
            seen.add(enc)
            headers: dict[str, str]
            if isinstance(op, Delete):
                payload = b""
                headers = h.tombstone(h.OP_DEL, op.revision, op.reason)
                if op.revision is not None:
                    checks[enc] = (key, op.revision)
            else:
                payload, extra = self._encode(op.value, op.ttl)
                if isinstance(op, Create):
                    headers = h.with_expected_revision(extra, 0)
                    checks[enc] = (key, 0)
                elif isinstance(op, Update):
                    headers = h.with_expected_revision(extra, op.revision)
                    checks[enc] = (key, op.revision)
                else:
                    headers = dict(extra or {})
            items.append((enc, payload, headers))
        limit = self._timeout(timeout)
        for _ in range(5):
            try:
                return self._proto.commit_batch(items, limit)
            except JetStreamError as exc:
                if exc.err_code not in CAS_ERROR_CODES:
                    raise
                # The server does not say which check failed. Read the checked keys (one batch
                # get): a real conflict raises naming its key; a create over a deleted, purged or
                # expired key is allowed (as in create()) and is retried against its tombstone.
                self._rebase_creates(items, checks, limit, exc)
        raise RevisionMismatchError(next(iter(checks.values()))[0], 0, None, "keys kept changing; retry the commit")

    def _rebase_creates(
        self,
        items: list[tuple[str, bytes, dict[str, str]]],
        checks: dict[str, tuple[str, int]],
        timeout: float | None,
        cause: Exception,
    ) -> None:
        prefix = self._proto.subject_prefix
        latest = {
            raw.subject[len(prefix) :]: raw
            for raw in self._proto.get_last_many([prefix + enc for enc in checks], timeout) or []
        }
        tombstones: dict[str, int] = {}  # creates: the revision of the tombstone they replace
        for enc, (key, expected) in checks.items():
            raw = latest.get(enc)
            if expected == 0:
                if raw is not None and raw.operation == "PUT":
                    raise KeyExistsError(key, raw.revision) from cause
                tombstones[enc] = raw.revision if raw is not None else 0
            elif (raw.revision if raw is not None else 0) != expected:
                raise RevisionMismatchError(key, expected, raw.revision if raw is not None else 0) from cause
        for enc, _, headers in items:
            if enc in tombstones:
                headers[h.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(tombstones[enc])

    # -- watching ------------------------------------------------------------------------------

    def watch(
        self,
        pattern: str | re.Pattern[str] = "*",
        callback: Callable[[Any], None] | None = None,
        *,
        include_history: bool = False,
        updates_only: bool = False,
        ignore_deletes: bool = False,
        on_error: Callable[[BaseException], None] | None = None,
        on_initial_done: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> Watcher:
        """Watch keys matching ``pattern``; see :class:`natskv.Watcher`.

        Iterate the watcher for :class:`natskv.Change` events (the special change with
        ``initial_done=True`` marks the end of the initial values), or pass ``callback``, which
        natskv calls on its dispatcher thread (never the loop thread) with key changes only;
        ``on_initial_done()`` runs on that thread once the initial values have been passed to
        ``callback``. ``updates_only=True`` has no initial values and no marker. Call ``stop()``
        (or use ``with``) to end it and delete its server consumer. ``on_error(exc)`` receives
        what ``callback`` raised, and the NotConnectedError that ends the watch if the connection
        is closed for good (an iterator raises that one).
        """
        from natskv.watch import Watcher

        return Watcher(
            self, pattern, callback,
            include_history=include_history, updates_only=updates_only, ignore_deletes=ignore_deletes,
            on_error=on_error, timeout=self._timeout(timeout), on_initial_done=on_initial_done,
        )

    def replica(self, pattern: str | re.Pattern[str] = "*", *, timeout: float | None = None) -> LocalReplica:
        """A :class:`natskv.LocalReplica` of the keys matching ``pattern``, loaded and kept current.

        Reads on it are in-memory; call ``replica.wait_for(revision)`` after a write to read it back.
        """
        from natskv.replica import LocalReplica

        self._timeout(timeout)  # the checks of every blocking call; start() applies the limit
        return LocalReplica(self, pattern).start(timeout)

    # -- bucket --------------------------------------------------------------------------------

    def status(self, *, timeout: float | None = None) -> BucketStatus:
        """Size and configuration of the bucket, as the server reports them."""
        info = self._proto.info(self._timeout(timeout))
        cfg, state = info["config"], info["state"]
        return BucketStatus(
            bucket=self.name,
            values=state.get("messages", 0),
            bytes=state.get("bytes", 0),
            history=cfg.get("max_msgs_per_subject", 1),
            ttl=(cfg.get("max_age", 0) / 1e9) or None,
            max_value_size=self._proto.max_value_size(),
            replicas=cfg.get("num_replicas", 1),
            storage=cfg.get("storage", "file"),
            first_revision=state.get("first_seq", 0),
            last_revision=state.get("last_seq", 0),
            supports_atomic=bool(cfg.get("allow_atomic")),
            supports_ttl=bool(cfg.get("allow_msg_ttl")),
        )

    # -- mapping protocol ------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyNotFoundError(key, self.name)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        current = self.entry(key)
        if current is None:
            raise KeyNotFoundError(key, self.name)
        try:
            self.delete(key, revision=current.revision)
        except RevisionMismatchError:
            if self.entry(key) is None:
                raise KeyNotFoundError(key, self.name) from None
            self.delete(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, _MISSING) is not _MISSING

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    # -- backups -----------------------------------------------------------------------------------

    def backup(
        self, path: str | os.PathLike[str], pattern: str = "*", *,
        progress: Callable[[int, int | None], None] | None = None, timeout: float | None = None,
    ) -> int:
        """Write the keys matching ``pattern`` (values, and the time left to keys that expire) to
        the JSON Lines file ``path``; return how many. See :mod:`natskv.backup` for the format.
        ``progress(done, total)`` is called after each page of 1,000 keys read, ``total`` being an
        upper bound (delete markers count in it) until the last call, ``(written, written)``.
        Memory stays at one page whatever the bucket's size. ``timeout`` bounds each request, not
        the whole backup."""
        from natskv import backup

        return backup.backup(self, path, pattern, progress=progress, timeout=timeout)

    def restore(
        self, path: str | os.PathLike[str], *, clear: bool = False,
        progress: Callable[[int, int | None], None] | None = None, timeout: float | None = None,
    ) -> int:
        """Write the keys of the backup ``path`` into this bucket; return how many. The whole file
        is checked before anything is written: a truncated or corrupt file raises
        :class:`BackupError` naming the line, and nothing is written. ``clear=True`` empties
        the bucket first. Existing keys not in the backup stay otherwise."""
        from natskv import backup

        return backup.restore(self, path, clear=clear, progress=progress, timeout=timeout)

    # -- counting ----------------------------------------------------------------------------------

    @_recorded("incr")
    def incr(self, key: str, by: int = 1, *, ttl: float | None = None, timeout: float | None = None) -> int:
        """Add ``by`` to the integer stored under ``key`` and return the new value; atomic across
        threads and processes.

        A missing key (never set, deleted or expired) counts as 0, so the first ``incr`` creates
        it. The value stays an ordinary integer that :meth:`get` returns and :meth:`set` may
        overwrite. How: a compare-and-set loop on the key (read it from the stream leader, write
        ``value + by`` only if nothing was written since, otherwise read again), so it works on
        any server with per-key TTL and needs no other stream; under heavy contention on one key
        :meth:`counter` (the server adds, nothing is retried) scales better.

        ``ttl`` (seconds) gives the key a new expiry. Without it the key keeps the expiry it had
        (it may expire up to a second late, the server counting whole seconds), and a new key
        never expires. Raises InvalidArgumentError, having written nothing, when the stored value
        is not an integer; NatsKVTimeoutError when ``timeout`` passes first.
        """
        enc = self._token(key)
        step = _int_step(by, "incr")
        ttl_value = h.ttl_header(ttl)
        if ttl_value is not None:
            self._proto.require_ttl()
        limit = self._timeout(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        for attempt in itertools.count():
            found = self._proto.message(enc, _left(deadline, key))
            current, expected, expires = 0, 0, None
            if found is not None:
                raw, hdrs = found
                expected = raw.revision
                expires = h.expiry(hdrs) if ttl_value is None and raw.operation == h.OP_PUT else None
                if raw.operation == h.OP_PUT and (expires is None or expires > time.time()):
                    current = self._stored_int(key, raw)
                else:
                    expires = None  # gone, or past its expiry and about to be removed: counts as absent
            value = current + step
            payload, headers = self._encode(value)
            headers = h.with_expected_revision(headers, expected)
            if ttl_value is not None:
                headers = h.with_ttl(headers, ttl_value)
            elif expires is not None:
                headers = h.with_ttl(headers, f"{max(1, math.ceil(expires - time.time()))}s")
                headers[h.EXPIRES] = f"{expires:.3f}"
            try:
                self._proto.put(enc, payload, headers, _left(deadline, key))
                return value
            except JetStreamError as exc:
                if exc.err_code not in CAS_ERROR_CODES:
                    raise
            # Another writer got in between: back off a random, growing moment so that many
            # writers on one key do not collide again in lockstep.
            pause = random.uniform(0, min(0.001 * 2**attempt, 0.05))  # noqa: S311 - jitter, not a secret
            if deadline is not None:
                pause = min(pause, max(deadline - time.monotonic(), 0))
            time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def decr(self, key: str, by: int = 1, *, ttl: float | None = None, timeout: float | None = None) -> int:
        """Subtract ``by`` from the integer stored under ``key`` and return the new value (see
        :meth:`incr`; a missing key counts as 0, so the result may go below zero)."""
        return self.incr(key, -_int_step(by, "decr"), ttl=ttl, timeout=timeout)

    def counter(self, name: str) -> Counter:
        """The server-side counter ``name`` of this bucket (nats-server 2.12 or newer); see
        :class:`natskv.Counter`. It lives in the bucket's counter stream, not among its keys."""
        from natskv.counter import Counter

        return Counter(self, name)

    def _stored_int(self, key: str, raw: RawEntry) -> int:
        value = self._value(raw)
        if type(value) is not int:
            raise InvalidArgumentError(
                f"the value of {key!r} is {type(value).__name__} ({value!r:.60}), not an int: incr and "
                "decr count integers only; set an int first (or delete the key to start at 0)"
            )
        return value

    # -- for the model layer's bulk writes (caller's thread) -------------------------------------

    def _commit_batches(
        self,
        batches: Sequence[list[tuple[str, bytes, dict[str, str]]]],
        timeout: float | None,
        inflight: int,
        on_ack: Callable[[int, int], None],
    ) -> list[int | NatsKVError | None]:
        """Several atomic batches of already encoded writes (subject token, payload, headers), up
        to ``inflight`` out at once: see ``KVProtocol.commit_batches``. ``Model.bulk_create``'s
        path; ``commit`` is the checked one."""
        return self._proto.commit_batches(batches, self._timeout(timeout), inflight, on_ack)

    def _expiring(self, headers: dict[str, str], ttl: float) -> dict[str, str]:
        """``headers`` plus a per-key TTL of ``ttl`` seconds (the bucket made to allow it)."""
        ttl_value = h.ttl_header(ttl)
        assert ttl_value is not None
        self._proto.require_ttl()
        return h.with_ttl(headers, ttl_value)

    def _delete_many(self, keys: Sequence[str], timeout: float | None) -> list[int]:
        """Delete many keys in pipelined writes (not atomic); their delete markers' revisions, in
        order. The first error is raised once every write is answered."""
        items: list[tuple[str, bytes, dict[str, str] | None]] = [
            (self._token(key), b"", h.tombstone(h.OP_DEL)) for key in keys
        ]
        results = self._proto.put_many(items, self._timeout(timeout))
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]  # no Exception left in it

    @staticmethod
    def _must_not_exist(headers: dict[str, str] | None) -> dict[str, str]:
        """``headers`` plus the check of a create: stored only if the key has no message."""
        return h.with_expected_revision(headers, 0)

    @staticmethod
    def _rejected_whole(error: NatsKVError | None) -> bool:
        """Whether a batch of ``_commit_batches`` that got ``error`` stored nothing and may go
        again through ``commit``: a failed check (a clash, or a create over a deleted key) or no
        stream leader (503)."""
        return isinstance(error, JetStreamError) and (error.err_code in CAS_ERROR_CODES or error.code == 503)


def _int_step(by: object, call: str) -> int:
    if type(by) is not int:  # bool is an int subclass: refused with the rest
        raise InvalidArgumentError(f"{call}(by=...) takes an int, not {type(by).__name__} ({by!r})")
    return by


def _left(deadline: float | None, key: str) -> float | None:
    """What is left of a call's time; NatsKVTimeoutError once nothing is."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise NatsKVTimeoutError(f"incr of {key!r}: the timeout passed while other writers kept changing the key")
    return left


def _key_list(keys: Any, call: str) -> list[Any]:
    """``keys`` as a list; a lone str (or bytes) is refused rather than read as its characters."""
    if isinstance(keys, (str, bytes, bytearray)) or not isinstance(keys, Iterable):
        raise InvalidArgumentError(
            f"{call} takes a list of keys, not {type(keys).__name__} ({keys!r}); for one key write [{keys!r}]"
        )
    return list(keys)
