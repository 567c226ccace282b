"""Transactions: several record changes committed as one atomic batch.

    with db.transaction() as tx:
        a, b = tx.get(Account, 1), tx.get(Account, 2)
        a.balance -= 10
        b.balance += 10
        tx.save(a)
        tx.save(b)

Optimistic: nothing is locked and nothing is sent until the block ends. Then every change goes
to the server in one atomic batch in which each changed record carries a compare-and-set check on
the version it was read at (new records and unique values: on being absent). Either the whole
batch is stored, or, if any check fails because another client got there first, none of it is,
and the commit raises (RevisionMismatchError, UniqueConstraintError): run the block again on
fresh reads. An exception inside the block discards the changes. A record only read (``tx.get``
without ``tx.save`` or ``tx.delete``) is not checked: JetStream checks a version only on a write,
so save a record back unchanged if the commit must depend on it.

A JetStream atomic batch covers one stream, so the records of a transaction belong to models
that share one bucket (most often one model); at most 1,000 writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from natskv._runner import check_timeout
from natskv.errors import InvalidArgumentError, KeyExistsError
from natskv.models import bounded
from natskv.models.model import MAX_BATCH, Model

if TYPE_CHECKING:
    from types import TracebackType

    from natskv.client import Client
    from natskv.models.model import ModelStore

M = TypeVar("M", bound=Model)


class Transaction:
    """Changes collected by ``with db.transaction() as tx:``; see the module docstring.

    Runs on the caller's thread. ``timeout`` (None: the client's default) bounds each request the
    transaction makes: drawing autoincrement values in ``create`` / ``save``, and the commit.
    """

    def __init__(self, client: Client, timeout: float | None = None) -> None:
        check_timeout(timeout)
        self._client = client
        self._timeout = timeout
        self._store: ModelStore | None = None
        self._ops: dict[str, tuple[Any, ...]] = {}  # by key, in order
        self._owners: dict[str, type[Model]] = {}  # key -> the model that wrote it (for errors)
        # After the commit: (instance, clean values, stored form); stored None for a delete.
        self._done: list[tuple[Model, dict[str, Any] | None, dict[str, Any] | None]] = []
        self._state = "open"

    # -- context manager -------------------------------------------------------------------------

    def __enter__(self) -> Transaction:
        self._check_open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != "open":  # committed or rolled back inside the block
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    # -- changes ---------------------------------------------------------------------------------

    def get(self, model: type[M], pk: Any) -> M | None:
        """The record with primary key ``pk`` as this client's replica has it, or None. Saving
        or deleting it in this transaction checks that nobody changed it in between."""
        self._check_open()
        self._join(model)
        return model.get(pk)

    def create(self, model: type[M], values: Mapping[str, Any] | None = None, /, **fields: Any) -> M:
        """A new record of ``values`` and the keyword ``fields``, validated now (ValidationError
        at once) and stored at the commit; its autoincrement values are drawn now (and spent if
        the transaction does not commit)."""
        if values is not None and not isinstance(values, Mapping):
            raise InvalidArgumentError(f"create() takes a mapping of field values, not {type(values).__name__}")
        return self.save(model(**{**values, **fields}) if values else model(**fields))

    def save(self, obj: M) -> M:
        """Store ``obj`` at the commit: create it if new, else update it from the version it was
        read at. Validated now. Returns ``obj``."""
        self._check_open()
        if not isinstance(obj, Model):
            raise InvalidArgumentError(f"save() takes a model instance, not {type(obj).__name__}")
        model = type(obj)
        self._join(model)
        if obj._stored is None:
            if model.__max_records__ is not None:
                bounded.not_in_transaction(model)
            clean, stored, ops = obj._new_ops(self._timeout)
            for name in model._fields:  # the primary key and generated values show at once
                object.__setattr__(obj, name, clean.get(name))
        else:
            clean = None
            stored, ops = obj._update_ops()
        self._add(model, ops)
        self._done.append((obj, clean, stored))
        return obj

    def delete(self, obj: Model) -> None:
        """Delete ``obj`` at the commit, if it is still at the version it was read at."""
        self._check_open()
        if not isinstance(obj, Model) or obj._stored is None:
            raise InvalidArgumentError("delete() takes a stored model instance (one read or saved before)")
        model = type(obj)
        self._join(model)
        self._add(model, model._delete_ops(obj._stored, obj._version))
        self._done.append((obj, None, None))

    def update(self, model: type[Model], values: Mapping[str, Any], *, where: Mapping[str, Any] | None = None,
               **lookups: Any) -> int:
        """Set ``values`` on every record of ``model`` that matches now (as ``Model.update``),
        each checked at the commit against the version read here. Returns how many records."""
        self._check_open()
        if not values:
            raise InvalidArgumentError("update() needs values to set")
        self._join(model)
        matches = model.find(where=where, **lookups)
        for obj in matches:
            for name, value in values.items():
                setattr(obj, name, value)
            self.save(obj)
        return len(matches)

    def destroy(self, model: type[Model], *, where: Mapping[str, Any] | None = None, **lookups: Any) -> int:
        """Delete every record of ``model`` that matches now, each at the commit if it is still
        at the version read here. Returns how many records."""
        self._check_open()
        self._join(model)
        matches = model.find(where=where, **lookups)
        for obj in matches:
            self.delete(obj)
        return len(matches)

    # -- ending ------------------------------------------------------------------------------------

    def commit(self, *, timeout: float | None = None) -> int | None:
        """Send every change as one atomic batch; return its last revision (None if there was
        nothing to send). Called by the ``with`` block when it ends without an exception.
        ``timeout`` defaults to the transaction's (``db.transaction(timeout=)``), and that to the
        client's default."""
        check_timeout(timeout)
        self._check_open()
        self._state = "committing"
        try:
            if not self._ops:
                return None
            store = self._store
            assert store is not None and store.replica is not None
            ops = list(self._ops.values())
            try:
                revision = store.bucket.commit(ops, timeout=timeout if timeout is not None else self._timeout)
            except KeyExistsError as exc:
                owner = self._owners.get(exc.key, store.model)
                raise owner._unique_error(exc.key) from exc
            for written_to in {id(m._require_store()): m._require_store() for m in self._owners.values()}.values():
                written_to.written(ops, revision)  # every model of the bucket reads it back at once
            with store.replica.lock:
                for obj, clean, stored in self._done:
                    if stored is None:
                        obj._stored = None
                        continue
                    if clean is not None:
                        obj._stored_as(clean, stored)
                    else:
                        obj._stored = stored
                    held = store.records.get(stored[type(obj)._pk])
                    obj._version = held.revision if held is not None else revision
            return revision
        finally:
            self._state = "done"

    def rollback(self) -> None:
        """Discard every change (nothing was sent)."""
        self._ops.clear()
        self._done.clear()
        self._state = "done"

    # -- plumbing ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise InvalidArgumentError("this transaction has ended; start a new one with db.transaction()")

    def _join(self, model: type[Model]) -> None:
        store = model._require_store()
        if store.client is not self._client:
            raise InvalidArgumentError(
                f"model {model.__name__} is registered with another client than this transaction's"
            )
        if self._store is None:
            self._store = store
        elif store.bucket.name != self._store.bucket.name:
            raise InvalidArgumentError(
                f"a transaction commits one atomic batch to one bucket: {model.__name__} lives in "
                f"{store.bucket.name!r}, this transaction already writes {self._store.bucket.name!r}"
            )

    def _add(self, model: type[Model], ops: list[tuple[Any, ...]]) -> None:
        """Queue one record's writes. A unique value freed by one record and taken by another in
        the same transaction becomes one write; any other key written twice is refused."""
        record = ops[-1][1]  # a record's own write comes last, after its unique markers
        if record in self._ops:
            raise InvalidArgumentError(f"{model.__name__} record {record!r} is already changed in this transaction")
        merged = dict(self._ops)
        for op in ops:
            key = op[1]
            earlier = merged.get(key)
            if earlier is None:
                merged[key] = op
            elif earlier[0] == "delete" and len(earlier) == 2 and op[0] == "create":
                merged[key] = ("set", key, op[2])  # the value moves from one record to another
            elif earlier[0] == "create" and op[0] == "delete" and len(op) == 2:
                merged[key] = ("set", key, earlier[2])  # the same move, seen from the other side
            else:
                raise InvalidArgumentError(f"key {key!r} is written twice in this transaction")
        if len(merged) > MAX_BATCH:
            raise InvalidArgumentError(
                f"a transaction holds at most {MAX_BATCH} writes; commit in smaller transactions"
            )
        self._ops = merged
        for op in ops:
            self._owners[op[1]] = model


__all__ = ["Transaction"]
