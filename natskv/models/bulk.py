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
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, overload

from natskv.errors import KeyExistsError, NatsKVError, UniqueConstraintError
from natskv.models.store import record_keys, resolve_timeout, unique_keys

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
        self.rows: list[range] = []  # per batch: the rows it holds
        self.items: list[list[Item] | None] = []  # per batch, once built: its messages
        self.ops: list[list[tuple[Any, ...]]] = []  # per batch, once built: the same writes as commit() ops
        self.stored: list[list[dict[str, Any]]] = []  # per batch, once built: its records' stored form
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
        cls, bucket, prepared = self.cls, self.store.bucket, self.prepared
        fields = cls._fields
        for name, field in fields.items():
            if field.generated in ("uuid", "timestamp"):
                for clean in prepared:
                    if clean.get(name) is None:
                        clean[name] = field.generate_value()
        pk = cls._pk
        keys = record_keys([clean[pk] for clean in prepared])
        key_tokens = bucket._tokens(keys)
        self.keys = list(zip(keys, key_tokens, strict=True))
        clash = len(set(key_tokens)) < len(key_tokens)
        self.markers = [[] for _ in prepared]
        uniform = True  # every row has a value in every unique field: as many messages each
        for name, field in fields.items():
            if not field.unique:
                continue
            values = [clean.get(name) for clean in prepared]
            rows: Sequence[int] = range(len(prepared))
            if None in values:
                rows = [row for row, value in enumerate(values) if value is not None]
                values = [values[row] for row in rows]
                uniform = False
            if field.type in (dt.datetime, dt.date, uuid.UUID):
                values = [field.to_json(value) for value in values]
            markers = unique_keys(name, values)
            tokens = bucket._tokens(markers)
            clash = clash or len(set(tokens)) < len(tokens)
            per_row = self.markers
            for row, marker, marker_token in zip(rows, markers, tokens, strict=True):
                per_row[row].append((marker, marker_token))
        if clash:  # two rows share a key or a unique value: nothing is sent
            self._first_clash()
        if uniform:
            per_batch = MAX_BATCH // (len(self.markers[0]) + 1)
            for first in range(0, len(prepared), per_batch):
                self._add_batch(first, min(first + per_batch, len(prepared)))
            return
        size = first = 0
        for row, row_markers in enumerate(self.markers):
            if size + len(row_markers) + 1 > MAX_BATCH:
                self._add_batch(first, row)
                size, first = 0, row
            size += len(row_markers) + 1
        self._add_batch(first, len(prepared))

    def _first_clash(self) -> NoReturn:
        """Raise the UniqueConstraintError of the first row, in row order, that repeats an earlier
        row's primary key or unique value (nothing is written)."""
        cls, prepared = self.cls, self.prepared
        unique = [name for name, field in cls._fields.items() if field.unique]
        seen: dict[str, int] = {}
        for row, ((_, key_token), markers) in enumerate(zip(self.keys, self.markers, strict=True)):
            names = [name for name in unique if prepared[row].get(name) is not None]
            for (field, value), (_, token) in zip(
                [(name, prepared[row][name]) for name in names] + [(cls._pk, prepared[row][cls._pk])],
                [*markers, (None, key_token)], strict=True,
            ):
                if seen.setdefault(token, row) != row:
                    everything = list(range(len(self.given)))
                    raise UniqueConstraintError(cls.__name__, field, value, row=row, written=[],
                                                not_written=everything)
        raise AssertionError("no clash found between the rows")

    def _add_batch(self, first: int, end: int) -> None:
        self.rows.append(range(first, end))
        self.items.append(None)
        self.ops.append([])
        self.stored.append([])
        self.done.append(False)

    def batch(self, b: int) -> list[Item]:
        """The messages of batch ``b`` (built on first use): per row, its unique markers, then the
        record, each with a "must not exist" check."""
        built = self.items[b]
        if built is not None:
            return built
        cls, bucket = self.cls, self.store.bucket
        must_be_new = bucket._must_not_exist(None)  # shared by the messages: the wire copies it
        moment = dt.datetime.now(dt.timezone.utc)
        now = moment.isoformat()
        meta: dict[str, Any] = {"_created_at": now, "_updated_at": now, "_changes": 0}
        ttl = cls.__ttl__
        if ttl is not None:  # the model's records expire: so do these, with their unique markers
            meta["_expires_at"] = (moment + dt.timedelta(seconds=ttl)).isoformat()
            must_be_new = bucket._expiring(must_be_new, ttl)
        rows, prepared = self.rows[b], self.prepared
        if cls._to_json:  # type: ignore[attr-defined]  # datetime, date or UUID fields: converted
            to_stored = cls._to_stored
            stored = [{**to_stored(prepared[row]), **meta} for row in rows]
        else:
            stored = [{**prepared[row], **meta} for row in rows]
        payloads = bucket._encode_many(stored)
        key_payload = bucket.codec.encode
        keys, markers = self.keys, self.markers
        items: list[Item] = []
        ops: list[tuple[Any, ...]] = []
        for row, record, payload in zip(rows, stored, payloads, strict=True):
            key, key_token = keys[row]
            if markers[row]:
                points_to = key_payload(key)  # a record key: short, always a JSON string
                for marker, marker_token in markers[row]:
                    items.append((marker_token, points_to, must_be_new))
                    ops.append(("create", marker, key))
            items.append((key_token, payload, must_be_new))
            ops.append(("create", key, record))
        self.items[b] = items
        self.ops[b] = ops
        self.stored[b] = stored
        return items

    def _stored(self, b: int, revision: int) -> None:
        """Batch ``b`` was stored, its last message at ``revision``: give each of its records its
        revision (a batch is stored at consecutive revisions) and make their instances."""
        self.done[b] = True
        self.acked.append((b, revision))
        at = revision - len(self.ops[b])
        markers, pairs = self.markers, []
        for row, record in zip(self.rows[b], self.stored[b], strict=True):
            at += len(markers[row]) + 1  # a record's message comes after its markers'
            pairs.append((record, at))
        # Built by _core from the stored form, as a read of the record would build them.
        first = self.rows[b].start
        self.objs[first:first + len(pairs)] = self.cls._build(pairs)
        self.items[b] = None  # sent and stored: let it go (its ops go once in the replica)
        self.stored[b] = []

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
        token = self.store.bucket._token(exc.key)
        row = next((r for r, (_, key_token) in enumerate(self.keys) if key_token == token), None)
        if row is None:
            row = next((r for r, markers in enumerate(self.markers) if any(t == token for _, t in markers)), None)
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
