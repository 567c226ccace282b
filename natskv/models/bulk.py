"""``Model.bulk_create``'s writes: validated rows to atomic batches, several in flight at once.

The rows arrive validated, with their autoincrement values drawn. Each record and its unique
markers become the messages of one batch (with "must not exist" checks), built straight in wire
form (subject token, payload, headers) instead of through ``Bucket.commit``'s general path, and
rows that clash with one another are refused before anything is sent. The batches go out through
``KVProtocol.commit_batches``, a few in flight at once, and each acknowledged batch is applied to
the model's replica as its acknowledgement arrives, while the next ones are out.

A batch the server rejects for a failed check (or because the stream had no leader) goes again
through ``Bucket.commit``, which tells a real clash (raised as UniqueConstraintError naming the
row and the rows stored and not) from a create over a deleted key (retried against its
tombstone); the batches after it then go on as before.

Runs on the caller's thread.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from natskv.errors import JetStreamError, KeyExistsError, NatsKVError, UniqueConstraintError
from natskv.models.store import record_key, unique_key
from natskv.wire import headers as h
from natskv.wire.jsapi import CAS_ERROR_CODES

if TYPE_CHECKING:
    from natskv.models.model import Model
    from natskv.models.store import ModelStore

M = TypeVar("M", bound="Model")

MAX_BATCH = 1000  # messages in one atomic batch (the server's limit)
INFLIGHT = 4  # batches out at once: enough to keep the stream busy (the server allows 50 per stream)

Item = tuple[str, bytes, dict[str, str]]


class BulkInsert(Generic[M]):
    """One ``bulk_create`` call's writes (see the module docstring)."""

    def __init__(self, cls: type[M], store: ModelStore, objs: list[M], prepared: list[dict[str, Any]],
                 timeout: float | None) -> None:
        self.cls = cls
        self.store = store
        self.objs = objs
        self.prepared = prepared
        self.timeout = timeout
        self.stored: list[dict[str, Any] | None] = [None] * len(objs)
        self.items: list[list[Item]] = []  # per batch: its messages
        self.ops: list[list[tuple[Any, ...]]] = []  # per batch: the same writes as commit() ops
        self.rows: list[range] = []  # per batch: the rows it holds
        self.record_at: list[list[int]] = []  # per batch: where its records' messages are
        self.row_of: dict[str, int] = {}  # subject token -> row
        self.done: list[bool] = []

    def run(self) -> list[M]:
        self._build()
        bucket = self.store.bucket
        limit = bucket._timeout(self.timeout)
        todo = list(range(len(self.items)))
        while todo:
            batch_of = todo  # bound for on_ack below

            def on_ack(j: int, revision: int, batch_of: list[int] = batch_of) -> None:
                self._stored(batch_of[j], revision)

            results = bucket._proto.commit_batches([self.items[b] for b in todo], limit, INFLIGHT, on_ack)
            failed = [(todo[j], r) for j, r in enumerate(results) if not isinstance(r, int)]
            if not failed:
                break
            b, error = failed[0]
            if not _retry_alone(error):
                assert error is not None
                raise error
            try:
                revision = bucket.commit(self.ops[b], timeout=self.timeout)
            except KeyExistsError as exc:
                raise self._clash(exc) from exc
            self._stored(b, revision)
            todo = [b for b, _ in failed[1:]]
        return self.objs

    def _build(self) -> None:
        """Every row's messages, in batches; refuses rows that clash with one another."""
        cls, bucket = self.cls, self.store.bucket
        fields = cls._fields
        pk = cls._pk
        unique = [name for name, field in fields.items() if field.unique]
        generated = [(name, field) for name, field in fields.items() if field.generated in ("uuid", "timestamp")]
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        encode, token = bucket._encode, bucket._token
        must_be_new = h.with_expected_revision(None, 0)  # shared: batch_part copies it
        items: list[Item] = []
        ops: list[tuple[Any, ...]] = []
        record_at: list[int] = []
        first = 0
        for i, clean in enumerate(self.prepared):
            for name, field in generated:
                if clean.get(name) is None:
                    clean[name] = field.generate_value()
            stored = cls._to_stored(clean)
            stored["_created_at"] = stored["_updated_at"] = now
            self.stored[i] = stored
            key = record_key(clean[pk])
            mine: list[Item] = []
            my_ops: list[tuple[Any, ...]] = []
            for name in unique:
                value = stored.get(name)
                if value is not None:
                    marker = unique_key(name, value)
                    marker_token = token(marker)
                    self._claim(marker_token, i, name, clean[name])
                    mine.append((marker_token, encode(key)[0], must_be_new))
                    my_ops.append(("create", marker, key))
            key_token = token(key)
            self._claim(key_token, i, pk, clean[pk])
            payload, extra = encode(stored)
            mine.append((key_token, payload, must_be_new if extra is None else h.with_expected_revision(extra, 0)))
            my_ops.append(("create", key, stored))
            if len(items) + len(mine) > MAX_BATCH:
                self._close_batch(items, ops, record_at, first, i)
                items, ops, record_at, first = [], [], [], i
            items += mine
            ops += my_ops
            record_at.append(len(items) - 1)  # the record comes after its markers
        self._close_batch(items, ops, record_at, first, len(self.prepared))

    def _claim(self, subject_token: str, row: int, field: str, value: Any) -> None:
        if self.row_of.setdefault(subject_token, row) != row:  # an earlier row has it too
            everything = list(range(len(self.objs)))
            raise UniqueConstraintError(self.cls.__name__, field, value, row=row, written=[], not_written=everything)

    def _close_batch(self, items: list[Item], ops: list[tuple[Any, ...]], record_at: list[int], first: int,
                     end: int) -> None:
        self.items.append(items)
        self.ops.append(ops)
        self.record_at.append(record_at)
        self.rows.append(range(first, end))
        self.done.append(False)

    def _stored(self, b: int, revision: int) -> None:
        """Batch ``b`` was stored, its last message at ``revision``: apply it to the replica, and
        give each of its records its revision (a batch is stored at consecutive revisions)."""
        self.done[b] = True
        ops = self.ops[b]
        self.store.written(ops, revision)
        first = revision - len(ops) + 1
        objs, prepared, stored = self.objs, self.prepared, self.stored
        for row, at in zip(self.rows[b], self.record_at[b], strict=True):
            obj = objs[row]
            obj._stored_as(prepared[row], stored[row])  # type: ignore[arg-type]
            obj._version = first + at

    def _clash(self, exc: KeyExistsError) -> UniqueConstraintError:
        """The UniqueConstraintError of a batch rejected for ``exc``'s key, with the rows stored."""
        found = self.cls._unique_error(exc.key)
        row = self.row_of.get(self.store.bucket._token(exc.key))
        written = [r for b, rows in enumerate(self.rows) if self.done[b] for r in rows]
        not_written = [r for b, rows in enumerate(self.rows) if not self.done[b] for r in rows]
        assert isinstance(found, UniqueConstraintError)
        return UniqueConstraintError(found.model, found.field, found.value, row=row, written=written,
                                     not_written=not_written)


def _retry_alone(error: NatsKVError | None) -> bool:
    """Whether a batch that got ``error`` stored nothing and may go again through
    ``Bucket.commit``: a failed check (a clash, or a create over a deleted key) or no stream
    leader (503)."""
    return isinstance(error, JetStreamError) and (error.err_code in CAS_ERROR_CODES or error.code == 503)


__all__ = ["BulkInsert"]
