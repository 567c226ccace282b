"""``Model.bulk_create``'s writes: validated rows to atomic batches, several in flight at once.

The rows arrive validated, with their autoincrement values drawn. Each record and its unique
markers become the messages of one batch (with "must not exist" checks), built straight in wire
form (subject token, payload, headers) instead of through ``Bucket.commit``'s general path, and
rows that clash with one another are refused before anything is sent. The batches go out through
``Bucket._commit_batches`` (``KVProtocol.commit_batches``), a few in flight at once. The model's
replica takes the stored records from its watch, which delivers them a moment after their
acknowledgements and applies runs of them in one ``_core`` call: the call waits for that before
it returns or raises (a short wait: the watch is usually done when the last batch is
acknowledged), and applies whatever the watch has not delivered by then itself, so the rows
stored are in the replica either way.

A batch the server rejects for a failed check (or because the stream had no leader) goes again
through ``Bucket.commit``, which tells a real clash (raised as UniqueConstraintError naming the
row and the rows stored and not) from a create over a deleted key (retried against its
tombstone); the batches after it then go on as before.

Runs on the caller's thread.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from natskv.errors import KeyExistsError, NatsKVError, UniqueConstraintError
from natskv.models.store import record_key, resolve_timeout, unique_key

if TYPE_CHECKING:
    from natskv.models.model import Model
    from natskv.models.store import ModelStore

M = TypeVar("M", bound="Model")

MAX_BATCH = 1000  # messages in one atomic batch (the server's limit)
INFLIGHT = 4  # batches out at once: enough to keep the stream busy (the server allows 50 per stream)
WATCH_WAIT = 2.0  # seconds the call waits for its watch to deliver the stored records, at most

Item = tuple[str, bytes, dict[str, str]]


class BulkInsert(Generic[M]):
    """One ``bulk_create`` call's writes (see the module docstring)."""

    def __init__(self, cls: type[M], store: ModelStore, given: list[dict[str, Any]], prepared: list[dict[str, Any]],
                 timeout: float | None) -> None:
        self.cls = cls
        self.store = store
        self.given = given  # the rows as given (their indexes name rows in errors)
        self.objs: list[M | None] = [None] * len(given)
        self.prepared = prepared
        self.timeout = timeout
        self.keys: list[tuple[str, str]] = []  # per row: its record's key and subject token
        self.markers: list[list[tuple[str, str]]] = []  # per row: its unique markers' keys and tokens
        self.row_of: dict[str, int] = {}  # subject token -> row
        self.rows: list[range] = []  # per batch: the rows it holds
        self.items: list[list[Item] | None] = []  # per batch, once built: its messages
        self.ops: list[list[tuple[Any, ...]]] = []  # per batch, once built: the same writes as commit() ops
        self.stored: dict[int, dict[str, Any]] = {}  # row -> its stored form, once built
        self.done: list[bool] = []
        self.acked: list[tuple[int, int]] = []  # (batch, revision) stored, maybe not yet in the replica

    def run(self) -> list[M]:
        self._plan()
        try:
            return self._send()
        finally:
            self._settle()

    def _send(self) -> list[M]:
        bucket = self.store.bucket
        todo = list(range(len(self.rows)))
        while todo:
            batches = _Batches(self, todo)

            def on_ack(j: int, revision: int, batches: _Batches = batches) -> None:
                self._stored(batches.order[j], revision)

            results = bucket._commit_batches(batches, self.timeout, INFLIGHT, on_ack)
            failed = [(todo[j], r) for j, r in enumerate(results) if not isinstance(r, int)]
            if not failed:
                break
            b, error = failed[0]
            if not bucket._rejected_whole(error):
                assert error is not None
                raise error
            try:
                revision = bucket.commit(self.ops[b], timeout=self.timeout)
            except KeyExistsError as exc:
                raise self._clash(exc) from exc
            self._stored(b, revision)
            todo = [b for b, _ in failed[1:]]
        return self.objs  # type: ignore[return-value]  # every row stored: no None left

    def _plan(self) -> None:
        """Every row's keys, checked for clashes between rows, and the rows of each batch. The
        messages themselves are built batch by batch as the pipeline sends them."""
        cls, token = self.cls, self.store.bucket._token
        fields = cls._fields
        pk = cls._pk
        unique = [(name, field) for name, field in fields.items() if field.unique]
        generated = [(name, field) for name, field in fields.items() if field.generated in ("uuid", "timestamp")]
        size = 0
        first = 0
        for i, clean in enumerate(self.prepared):
            for name, field in generated:
                if clean.get(name) is None:
                    clean[name] = field.generate_value()
            markers = []
            for name, field in unique:
                value = clean.get(name)
                if value is not None:
                    marker = unique_key(name, field.to_json(value))
                    markers.append((marker, self._claim(token(marker), i, name, value)))
            key = record_key(clean[pk])
            self.keys.append((key, self._claim(token(key), i, pk, clean[pk])))
            self.markers.append(markers)
            if size + len(markers) + 1 > MAX_BATCH:
                self._add_batch(first, i)
                size, first = 0, i
            size += len(markers) + 1
        self._add_batch(first, len(self.prepared))

    def _claim(self, subject_token: str, row: int, field: str, value: Any) -> str:
        if self.row_of.setdefault(subject_token, row) != row:  # an earlier row has it too
            everything = list(range(len(self.given)))
            raise UniqueConstraintError(self.cls.__name__, field, value, row=row, written=[], not_written=everything)
        return subject_token

    def _add_batch(self, first: int, end: int) -> None:
        self.rows.append(range(first, end))
        self.items.append(None)
        self.ops.append([])
        self.done.append(False)

    def batch(self, b: int) -> list[Item]:
        """The messages of batch ``b`` (built on first use): per row, its unique markers, then the
        record, each with a "must not exist" check."""
        built = self.items[b]
        if built is not None:
            return built
        cls, bucket = self.cls, self.store.bucket
        encode = bucket._encode
        key_payload = bucket.codec.encode
        to_stored = cls._to_stored
        must_be_new = bucket._must_not_exist(None)  # shared by the messages: the wire copies it
        moment = dt.datetime.now(dt.timezone.utc)
        now = moment.isoformat()
        ttl = cls.__ttl__
        expires = None
        if ttl is not None:  # the model's records expire: so do these, with their unique markers
            expires = (moment + dt.timedelta(seconds=ttl)).isoformat()
            must_be_new = bucket._expiring(must_be_new, ttl)
        items: list[Item] = []
        ops: list[tuple[Any, ...]] = []
        for row in self.rows[b]:
            stored = to_stored(self.prepared[row])
            stored["_created_at"] = stored["_updated_at"] = now
            stored["_changes"] = 0
            if expires is not None:
                stored["_expires_at"] = expires
            self.stored[row] = stored
            key, key_token = self.keys[row]
            markers = self.markers[row]
            if markers:
                points_to = key_payload(key)  # a record key: short, always a JSON string
                for marker, marker_token in markers:
                    items.append((marker_token, points_to, must_be_new))
                    ops.append(("create", marker, key))
            payload, extra = encode(stored)
            items.append((key_token, payload, must_be_new if extra is None else {**must_be_new, **extra}))
            ops.append(("create", key, stored))
        self.items[b] = items
        self.ops[b] = ops
        return items

    def _stored(self, b: int, revision: int) -> None:
        """Batch ``b`` was stored, its last message at ``revision``: apply it to the replica, and
        give each of its records its revision (a batch is stored at consecutive revisions)."""
        self.done[b] = True
        ops = self.ops[b]
        self.acked.append((b, revision))
        at = revision - len(ops)
        stored, markers, objs = self.stored, self.markers, self.objs
        pairs = []
        for row in self.rows[b]:
            at += len(markers[row]) + 1  # a record's message comes after its markers'
            pairs.append((stored.pop(row), at))
        # Built by _core from the stored form, as a read of the record would build them.
        for row, obj in zip(self.rows[b], self.cls._build(pairs), strict=True):
            objs[row] = obj
        self.items[b] = None  # sent and stored: let it go (its ops go once in the replica)

    def _settle(self) -> None:
        """Return once the replica holds every batch stored: delivered by the watch (a short
        wait), or applied here from the ops (see the module docstring)."""
        if not self.acked:
            return
        replica = self.store.replica
        assert replica is not None
        top = max(revision for _, revision in self.acked)
        limit = resolve_timeout(self.store.client, self.timeout)
        try:
            replica.wait_for(top, WATCH_WAIT if limit is None else min(limit, WATCH_WAIT))
        except NatsKVError:
            for b, revision in self.acked:  # earlier revisions the replica has are passed over
                self.store.written(self.ops[b], revision)
        for b, _ in self.acked:
            self.ops[b] = []
        self.acked.clear()

    def _clash(self, exc: KeyExistsError) -> UniqueConstraintError:
        """The UniqueConstraintError of a batch rejected for ``exc``'s key, with the rows stored."""
        found = self.cls._unique_error(exc.key)
        row = self.row_of.get(self.store.bucket._token(exc.key))
        written = [r for b, rows in enumerate(self.rows) if self.done[b] for r in rows]
        not_written = [r for b, rows in enumerate(self.rows) if not self.done[b] for r in rows]
        assert isinstance(found, UniqueConstraintError)
        return UniqueConstraintError(found.model, found.field, found.value, row=row, written=written,
                                     not_written=not_written)


class _Batches(Sequence[list[Item]]):
    """Batches ``order`` of a :class:`BulkInsert`, built as the pipeline asks for them."""

    def __init__(self, bulk: BulkInsert[Any], order: list[int]) -> None:
        self.bulk = bulk
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    @overload
    def __getitem__(self, j: int) -> list[Item]: ...
    @overload
    def __getitem__(self, j: slice) -> list[list[Item]]: ...
    def __getitem__(self, j: int | slice) -> list[Item] | list[list[Item]]:
        if isinstance(j, slice):
            return [self.bulk.batch(b) for b in self.order[j]]
        return self.bulk.batch(self.order[j])


__all__ = ["BulkInsert"]
