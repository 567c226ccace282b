"""Model: schema-validated records, one per key in a bucket, read from a live in-memory replica.

Storage layout in the model's bucket (keys use natskv's ``:`` hierarchy):

- ``r:<type>:<pk>`` holds a record as JSON (``<type>`` is ``i``, ``s`` or ``u`` for int, str and
  UUID primary keys, so ``1`` and ``"1"`` are different records);
- ``u:<field>:<json value>`` marks a value of a unique field as taken (its value is the record key).

A record and its unique markers are written in one atomic batch with compare-and-set, so two
processes racing for the same unique value can never both win: the server decides. Autoincrement
values come from a counter stream next to the bucket. Reads and queries run on a
:class:`~natskv.replica.LocalReplica` of the ``r:`` keys, whose indexes (``_core.SortedIndex`` /
``UniqueIndex``) are kept current by the replica's apply hook; a write waits until the replica has
applied it before returning, so the writing client reads its own writes.
"""

from __future__ import annotations

import datetime as dt
import heapq
import uuid
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import orjson

from natskv._runner import check_timeout
from natskv._speedups import core
from natskv.errors import (
    InvalidArgumentError,
    KeyExistsError,
    RevisionMismatchError,
    UniqueConstraintError,
    ValidationError,
)
from natskv.models import query
from natskv.models.fields import MISSING, Field, check_schema, primary_key_name, validate_record

if TYPE_CHECKING:
    from natskv.client import Client
    from natskv.models.live import LiveQuery, ModelEvent, ModelWatcher
    from natskv.kv import Bucket
    from natskv.replica import LocalReplica

log = logging.getLogger("natskv")

M = TypeVar("M", bound="Model")

RECORD, UNIQUE = "r", "u"
META_FIELDS = ("_version", "_created_at", "_updated_at")
# paginate() and find(order_by=<indexed field>, limit=) sort a filtered selection of up to this
# many records rather than walk the order field's index past every non-matching record.
_PAGE_SORT_MAX = 2000
_CAS_RETRIES = 20
MAX_BATCH = 1000  # writes in one atomic batch (the server's limit)


def record_key(pk: Any) -> str:
    """The bucket key of the record with primary key ``pk`` (int, str or UUID)."""
    if isinstance(pk, bool):
        raise InvalidArgumentError(f"a primary key is an int, str or UUID, not {pk!r}")
    if isinstance(pk, int):
        return f"{RECORD}:i:{pk}"
    if isinstance(pk, str):
        return f"{RECORD}:s:{pk}"
    if isinstance(pk, uuid.UUID):
        return f"{RECORD}:u:{pk}"
    raise InvalidArgumentError(f"a primary key is an int, str or UUID, not {type(pk).__name__} ({pk!r})")


def unique_key(field: str, json_value: Any) -> str:
    return f"{UNIQUE}:{field}:{orjson.dumps(json_value).decode()}"


class ModelStore:
    """What a registered model holds at run time: its bucket, replica and indexes."""

    def __init__(self, model: type[Model], client: Client, bucket: Bucket) -> None:
        self.model = model
        self.client = client
        self.bucket = bucket
        fields = model._fields
        self.pk = model._pk
        # Unique values (and the primary key) map to one record; indexed fields to many.
        self.unique: dict[str, Any] = {
            name: core.UniqueIndex(pk_order=name == self.pk)
            for name, field in fields.items()
            if name == self.pk or field.unique
        }
        self.sorted: dict[str, Any] = {
            name: core.SortedIndex() for name, field in fields.items() if field.index and name not in self.unique
        }
        self.indexes: dict[str, Any] = {**self.unique, **self.sorted}
        # By primary key (stored form): (stored record, revision), replaced whole on each change
        # so a reader always gets a record and its own revision together.
        self.records: dict[Any, tuple[dict[str, Any], int]] = {}
        self.index_set = core.IndexSet(self.pk, self.unique, self.sorted, self.records)  # keeps both in step
        self.replica: LocalReplica | None = None
        # Model watches, live queries and db.on(): called as listener(old, new, revision,
        # old_revision) on the loop thread under the replica's lock; they only match and queue.
        self.listeners: list[Callable[[Any, Any, int, int], None]] = []
        # In a forked child reloading its replica: the records inherited from the parent, by
        # primary key, so the reload tells listeners only what changed since the fork.
        self.inherited: dict[Any, tuple[dict[str, Any], int]] | None = None
        self._plans: dict[str, tuple[dict[str, Any], Any]] = {}
        # Model._indexed_equalities: lookup names -> ((field, type), ...), () when not all are
        # equalities on indexed str/int fields.
        self.equality_shapes: dict[tuple[str, ...], tuple[tuple[str, type], ...]] = {}

    def compiled(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """The compiled plan input and filter of a query, cached by its text (queries repeat)."""
        cache_key = repr((where, sorted(lookups.items())))
        hit = self._plans.get(cache_key)
        if hit is None:
            compiled_where = query.compile_where(self.model._fields, where, lookups)
            hit = (compiled_where, query.compile_filter(compiled_where))
            if len(self._plans) >= 512:
                self._plans.clear()
            self._plans[cache_key] = hit
        return hit

    def reset(self) -> None:
        """Forget every record (the replica calls this in a forked child before it reloads).

        Model watches and live queries stay with the process that started them; db.on() handlers
        (marked ``carry_over_fork``) follow the client into the child, and hear of the reload
        only what changed since the fork (see :meth:`loaded`).
        """
        self.inherited = dict(self.records)
        self.records.clear()
        for index in self.indexes.values():
            index.clear()
        self.listeners[:] = [f for f in self.listeners if getattr(f, "carry_over_fork", False)]

    def written(self, ops: list[tuple[Any, ...]], revision: int) -> None:
        """Apply a write that the server acknowledged at ``revision`` (one op, or an atomic batch
        whose last op got ``revision``) to the replica at once: this client reads its own write
        back without waiting for the watch, whose later delivery of it is skipped."""
        assert self.replica is not None
        self.replica.apply_written([(op[1], op[0] != "delete", op[2] if op[0] != "delete" else None) for op in ops],
                                   revision)

    # -- replica hook (loop thread, under the replica's lock) -------------------------------------

    def apply(self, key: str, old: Any, new: Any, revision: int) -> None:
        """Keep records and indexes in step with one change of a record key."""
        old_revision = self.index_set.apply(old, new, revision)
        if self.listeners:
            old = old if type(old) is dict else None
            new = new if type(new) is dict else None
            if self.inherited is not None and old is None and new is not None:
                hit = self.inherited.pop(new.get(self.pk), None)
                if hit is not None:
                    if hit[1] == revision:
                        return  # reloaded as it was at the fork: not news
                    old, old_revision = hit
            self._tell(old, new, revision, old_revision)

    def loaded(self) -> None:
        """The replica's initial values are in: after a fork's reload, the inherited records
        that did not come back were deleted meanwhile."""
        gone, self.inherited = self.inherited, None
        if gone and self.listeners and self.replica is not None:
            for stored, revision in gone.values():
                self._tell(stored, None, self.replica.revision, revision)

    def _tell(self, old: dict[str, Any] | None, new: dict[str, Any] | None, revision: int, old_revision: int) -> None:
        for listener in list(self.listeners):
            try:
                listener(old, new, revision, old_revision)
            except Exception:  # noqa: BLE001 - one broken listener must not stop the replica
                log.exception("natskv: error in a model listener")


class ModelMeta(type):
    """Collects a model class's :class:`Field` attributes into ``_fields`` and checks the schema."""

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> ModelMeta:
        cls = super().__new__(mcls, name, bases, namespace, **kwargs)
        fields: dict[str, Field] = {}
        for base in reversed(cls.__mro__[1:]):
            fields.update(getattr(base, "_fields", {}))
        for attr, value in namespace.items():
            if isinstance(value, Field):
                fields[attr] = value
        if namespace.get("__abstract__") or (name == "Model" and not fields):
            cls._fields = fields  # type: ignore[attr-defined]
            return cls
        if primary_key_name(fields) is None:
            auto = Field(str, primary_key=True, generated="uuid", name="id")
            fields = {"id": auto, **fields}
            cls.id = auto  # type: ignore[attr-defined]
        check_schema(fields)
        cls._fields = fields  # type: ignore[attr-defined]
        # Stored dict -> instance (Model._build): fields, other keys in _extra, _version, _stored;
        # converted only where the stored form differs (datetime, date, UUID; ints of floats).
        cls._builder = core.RecordBuilder(  # type: ignore[attr-defined]
            cls, fields, META_FIELDS,
            converters=[(n, f.from_json) for n, f in fields.items() if f.type in (dt.datetime, dt.date, uuid.UUID)],
            floats=[n for n, f in fields.items() if f.type is float],
        )
        cls._pk = primary_key_name(fields)  # type: ignore[attr-defined]
        cls._store = None  # type: ignore[attr-defined]
        return cls


class Model(metaclass=ModelMeta):
    """Base class of natskv models. Declare fields as class attributes, then ``db.register(Cls)``.

    Class methods (``create``, ``get``, ``find`` ...) need the model registered with a client.
    Every record carries ``_version`` (its revision), ``_created_at`` and ``_updated_at``.
    """

    __abstract__: ClassVar[bool] = True
    __bucket__: ClassVar[str | None] = None
    _fields: ClassVar[dict[str, Field]]
    _pk: ClassVar[str]
    _store: ClassVar[ModelStore | None]

    def __init__(self, **values: Any) -> None:
        for name in self._fields:
            object.__setattr__(self, name, values.pop(name, None))
        self._extra = values  # fields not in the schema are kept
        self._version = 0
        self._stored: dict[str, Any] | None = None  # what the server holds, stored form

    # -- plumbing ------------------------------------------------------------------------------

    @classmethod
    def _s(cls) -> ModelStore:
        store = cls.__dict__.get("_store")
        if store is None:
            raise InvalidArgumentError(f"model {cls.__name__} is not registered: call db.register({cls.__name__}) first")
        return store

    def _values(self) -> dict[str, Any]:
        """The record's values; unset fields (None) are left out, so defaults and generated values
        apply and a required field is reported missing."""
        values = dict(self._extra)
        for name in self._fields:
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        return values

    @classmethod
    def _from_stored(cls: type[M], stored: dict[str, Any], revision: int) -> M:
        """An instance of a stored record (the hot path of every read)."""
        return cls._build([(stored, revision)])[0]

    @classmethod
    def _build(cls: type[M], pairs: Iterable[tuple[dict[str, Any], int]]) -> list[M]:
        """Instances of (stored record, revision) pairs, built by ``_core``."""
        return cls._builder.build(pairs)  # type: ignore[attr-defined, no-any-return]

    @property
    def _created_at(self) -> dt.datetime | None:
        """When the record was first stored (UTC), None before."""
        return _parse_dt(self._stored.get("_created_at")) if self._stored else None

    @property
    def _updated_at(self) -> dt.datetime | None:
        """When the record was last stored (UTC), None before."""
        return _parse_dt(self._stored.get("_updated_at")) if self._stored else None

    @classmethod
    def _to_stored(cls, clean: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in clean.items():
            field = cls._fields.get(key)
            out[key] = field.to_json(value) if field is not None and value is not None else value
        return out

    @property
    def pk(self) -> Any:
        """The primary key value."""
        return getattr(self, self._pk)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields)
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values() and self._version == other._version  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """The record's values (Python form), fields not in the schema included."""
        return self._values()

    # -- writes ----------------------------------------------------------------------------------

    @classmethod
    def create(cls: type[M], values: Mapping[str, Any] | None = None, /, *, timeout: float | None = None,
               **fields: Any) -> M:
        """Validate and store a new record made of ``values`` and the keyword ``fields``; return
        it. Raises ValidationError (every issue at once) or UniqueConstraintError; nothing is
        written (and no autoincrement value spent) when validation fails.

        ``timeout=`` is the write's timeout, as in every write call: a field named ``timeout``
        goes in the ``values`` mapping, ``Job.create({"timeout": 30}, name="x")``.
        """
        check_timeout(timeout)
        if values is not None and not isinstance(values, Mapping):
            raise InvalidArgumentError(f"create() takes a mapping of field values, not {type(values).__name__}")
        if timeout is not None and "timeout" in cls._fields and "timeout" not in (values or {}):
            raise InvalidArgumentError(
                f"{cls.__name__} has a field named 'timeout', but timeout= is the write's timeout: pass the "
                f"field in the values mapping, {cls.__name__}.create({{'timeout': ...}}, ...)"
            )
        obj = cls(**{**values, **fields}) if values else cls(**fields)
        obj._insert(timeout)
        return obj

    @classmethod
    def bulk_create(cls: type[M], rows: Iterable[Mapping[str, Any]], *, timeout: float | None = None) -> list[M]:
        """Create many records in atomic batches (up to 1000 writes each, a record's unique
        markers always in its record's batch). Every row is validated before anything is written
        (ValidationError names rows as ``[i].field``); a UniqueConstraintError rejects the batch
        it occurs in, and batches before it stay written."""
        objs = [cls(**dict(row)) for row in rows]
        if not objs:
            return []
        cls._s()
        prepared = []
        problems: list[tuple[str, str, str]] = []
        for i, obj in enumerate(objs):
            clean, issues = cls._validate(obj._values(), partial=False)
            problems.extend((f"[{i}].{f}", m, c) for f, m, c in issues)
            prepared.append(clean)
        if problems:
            raise ValidationError(problems)
        for name, field in cls._fields.items():
            if field.generated == "autoincrement":
                missing = [c for c in prepared if c.get(name) is None]
                if missing:
                    last = cls._next_value(name, timeout, len(missing))
                    for offset, clean in enumerate(missing):
                        clean[name] = last - len(missing) + 1 + offset
        batch: list[tuple[Any, ...]] = []
        done: list[tuple[M, dict[str, Any], dict[str, Any]]] = []
        pending: list[tuple[M, dict[str, Any], dict[str, Any]]] = []
        now = dt.datetime.now(dt.timezone.utc)
        for obj, clean in zip(objs, prepared):
            stored, ops = cls._insert_ops(clean, now)
            if len(batch) + len(ops) > MAX_BATCH:
                cls._write(batch, timeout)
                done.extend(pending)
                batch, pending = [], []
            batch.extend(ops)
            pending.append((obj, clean, stored))
        revision = cls._write(batch, timeout)
        done.extend(pending)
        for obj, clean, stored in done:
            obj._stored_as(clean, stored)
        store = cls._s()
        assert store.replica is not None
        with store.replica.lock:
            for obj, clean, stored in done:
                obj._version = store.records.get(stored[cls._pk], (None, revision))[1]
        return objs

    @classmethod
    def _validate(cls, values: dict[str, Any], partial: bool) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
        return validate_record(cls._fields, values, partial=partial)

    def _insert(self, timeout: float | None) -> None:
        cls = type(self)
        clean, stored, ops = self._new_ops(timeout)
        revision = cls._write(ops, timeout)
        self._stored_as(clean, stored)
        self._version = revision

    def _new_ops(self, timeout: float | None) -> tuple[dict[str, Any], dict[str, Any], list[tuple[Any, ...]]]:
        """Validate this new record, draw its autoincrement values; return its clean values, stored
        form and the writes that create it."""
        cls = type(self)
        cls._s()  # registered? (fails before validating)
        clean, issues = cls._validate(self._values(), partial=False)
        if issues:
            raise ValidationError(issues)
        for name, field in cls._fields.items():
            if clean.get(name) is None and field.generated == "autoincrement":
                clean[name] = cls._next_value(name, timeout)
        stored, ops = cls._insert_ops(clean, dt.datetime.now(dt.timezone.utc))
        return clean, stored, ops

    @classmethod
    def _insert_ops(cls, clean: dict[str, Any], now: dt.datetime) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
        """The stored form of a validated new record and the writes that create it."""
        for name, field in cls._fields.items():
            if clean.get(name) is None and field.generated in ("uuid", "timestamp"):
                clean[name] = field.generate_value()
        stored = cls._to_stored(clean)
        stored["_created_at"] = stored["_updated_at"] = now.isoformat()
        key = record_key(clean[cls._pk])
        ops: list[tuple[Any, ...]] = [
            ("create", unique_key(name, stored[name]), key)
            for name, field in cls._fields.items()
            if field.unique and stored.get(name) is not None
        ]
        ops.append(("create", key, stored))  # last: a commit's revision is its record's
        return stored, ops

    def _stored_as(self, clean: dict[str, Any], stored: dict[str, Any]) -> None:
        for name in self._fields:
            object.__setattr__(self, name, clean.get(name))
        self._stored = stored

    @classmethod
    def _write(cls, ops: list[tuple[Any, ...]], timeout: float | None) -> int:
        store = cls._s()
        try:
            if len(ops) == 1:
                kind, key, value, *rest = ops[0]
                if kind == "create":
                    revision = store.bucket.create(key, value, timeout=timeout)
                else:
                    revision = store.bucket.update(key, value, rest[0], timeout=timeout)
            else:
                revision = store.bucket.commit(ops, timeout=timeout)
        except KeyExistsError as exc:
            raise cls._unique_error(exc.key) from exc
        store.written(ops, revision)
        return revision

    @classmethod
    def _unique_error(cls, key: str) -> Exception:
        kind, _, rest = key.partition(":")
        if kind == UNIQUE:
            name, _, raw = rest.partition(":")
            return UniqueConstraintError(cls.__name__, name, orjson.loads(raw))
        return UniqueConstraintError(cls.__name__, cls._pk, rest.partition(":")[2])

    @classmethod
    def _next_value(cls, field: str, timeout: float | None, count: int = 1) -> int:
        """Reserve ``count`` values of an autoincrement field from the model's counter stream;
        return the last one."""
        store = cls._s()
        return store.client._next_counter(store.bucket.name, field, timeout, count)

    def save(self, *, timeout: float | None = None) -> M:  # type: ignore[type-var]
        """Store this record: create it if new, else update it with compare-and-set on
        ``_version`` (RevisionMismatchError if someone else changed it since it was read)."""
        if self._stored is None:
            self._insert(timeout)
            return self  # type: ignore[return-value]
        cls = type(self)
        stored, ops = self._update_ops()
        self._version = cls._write(ops, timeout)
        self._stored = stored
        return self  # type: ignore[return-value]

    def _update_ops(self) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
        """This stored record's new stored form and the writes that store it (validated; CAS on
        ``_version``; unique markers moved)."""
        cls = type(self)
        assert self._stored is not None
        clean, issues = cls._validate(self._values(), partial=False)
        if issues:
            raise ValidationError(issues)
        stored = cls._to_stored(clean)
        if stored.get(cls._pk) != self._stored.get(cls._pk):
            raise InvalidArgumentError("the primary key of a stored record cannot change; create a new record")
        stored["_created_at"] = self._stored.get("_created_at")
        stored["_updated_at"] = dt.datetime.now(dt.timezone.utc).isoformat()
        return stored, cls._replace_ops(self._stored, stored, self._version)

    @classmethod
    def _replace_stored(cls, old: dict[str, Any], new: dict[str, Any], revision: int, timeout: float | None) -> int:
        return cls._write(cls._replace_ops(old, new, revision), timeout)

    @classmethod
    def _replace_ops(cls, old: dict[str, Any], new: dict[str, Any], revision: int) -> list[tuple[Any, ...]]:
        key = record_key(cls._fields[cls._pk].from_json(new[cls._pk]))
        ops: list[tuple[Any, ...]] = []
        for name, field in cls._fields.items():
            if field.unique and old.get(name) != new.get(name):
                if old.get(name) is not None:
                    ops.append(("delete", unique_key(name, old[name])))
                if new.get(name) is not None:
                    ops.append(("create", unique_key(name, new[name]), key))
        ops.append(("update", key, new, revision))
        return ops

    def delete(self, *, timeout: float | None = None) -> None:
        """Delete this record (compare-and-set on ``_version``) and free its unique values."""
        cls = type(self)
        if self._stored is None:
            raise InvalidArgumentError("this record was never stored")
        cls._delete_stored(self._stored, self._version, timeout)
        self._stored = None

    @classmethod
    def _delete_ops(cls, stored: dict[str, Any], revision: int) -> list[tuple[Any, ...]]:
        """The writes that delete a stored record (CAS on ``revision``) and free its unique values."""
        key = record_key(cls._fields[cls._pk].from_json(stored[cls._pk]))
        ops: list[tuple[Any, ...]] = [
            ("delete", unique_key(name, stored[name]))
            for name, field in cls._fields.items()
            if field.unique and stored.get(name) is not None
        ]
        ops.append(("delete", key, revision))
        return ops

    @classmethod
    def _delete_stored(cls, stored: dict[str, Any], revision: int, timeout: float | None) -> None:
        ops = cls._delete_ops(stored, revision)
        store = cls._s()
        if len(ops) == 1:
            _, key, revision = ops[0]
            rev = store.bucket.delete(key, revision=revision, timeout=timeout)
        else:
            rev = store.bucket.commit(ops, timeout=timeout)
        store.written(ops, rev)

    def refresh(self, *, timeout: float | None = None) -> M:  # type: ignore[type-var]
        """Reload this record from the replica (KeyError-like error if it was deleted)."""
        fresh = type(self).get(self.pk)
        if fresh is None:
            raise InvalidArgumentError(f"{type(self).__name__} {self.pk!r} no longer exists")
        self.__dict__.update(fresh.__dict__)
        return self  # type: ignore[return-value]

    @classmethod
    def update(cls, values: Mapping[str, Any], /, *, where: Mapping[str, Any] | None = None,
               timeout: float | None = None, **lookups: Any) -> int:
        """Set ``values`` on every matching record (CAS per record, retried on conflict).
        Returns how many records changed (0 when none matched)."""
        if not values:
            raise InvalidArgumentError("update() needs values to set")
        _, issues = cls._validate(dict(values), partial=True)
        if issues:
            raise ValidationError(issues)
        def apply(obj: Model) -> None:
            for name, value in values.items():
                setattr(obj, name, value)
            obj.save(timeout=timeout)

        return cls._for_each_match(where, lookups, apply)

    @classmethod
    def destroy(cls, *, where: Mapping[str, Any] | None = None, timeout: float | None = None, **lookups: Any) -> int:
        """Delete every matching record; return how many were deleted."""
        return cls._for_each_match(where, lookups, lambda obj: obj.delete(timeout=timeout))

    @classmethod
    def _for_each_match(cls, where: Mapping[str, Any] | None, lookups: Mapping[str, Any],
                        action: Callable[[Model], None]) -> int:
        """Run ``action`` on every matching record with compare-and-set; on a conflict, re-read
        the record and retry while it still matches. Returns how many records it was applied to."""
        _, flt = cls._s().compiled(where, _without_options(lookups))
        done = 0
        for obj in cls.find(where=where, **lookups):
            for _ in range(_CAS_RETRIES):
                try:
                    action(obj)
                    done += 1
                    break
                except RevisionMismatchError:
                    fresh = cls.get(obj.pk)
                    if fresh is None or fresh._stored is None or not flt.match(fresh._stored):
                        break  # deleted, or changed so that it no longer matches
                    obj = fresh
        return done

    # -- reads (in-memory replica) -----------------------------------------------------------------

    @classmethod
    def ensure_loaded(cls, *, timeout: float | None = None) -> None:
        """Return once this model's replica holds the bucket's records. Only a forked worker
        waits here (its replica reloads through its own connection, which reads otherwise do on
        first use): call it in a post-fork hook to load before serving."""
        store = cls._s()
        assert store.replica is not None
        check_timeout(timeout)
        store.replica.revive(timeout)

    @classmethod
    def get(cls: type[M], pk: Any, default: Any = None, *, consistency: str = "replica",
            timeout: float | None = None) -> M | Any:
        """The record with primary key ``pk``, or ``default``.

        ``consistency="replica"`` (default) reads this client's in-memory replica: it has every
        write made through this client and others' writes as the watch delivers them
        (milliseconds). ``consistency="server"`` asks the server instead.
        """
        store = cls._s()
        field = cls._fields[cls._pk]
        try:
            stored_pk = field.to_json(field.coerce(pk))
        except InvalidArgumentError:
            return default
        if _server_read(consistency):
            entry = store.bucket.entry(record_key(field.coerce(pk)), timeout=timeout)
            return cls._from_stored(entry.value, entry.revision) if entry is not None else default
        assert store.replica is not None
        with store.replica.lock:
            hit = store.records.get(stored_pk)
        if hit is None:
            return default
        stored, revision = hit
        return cls._from_stored(stored, revision)

    @classmethod
    def _select(cls, where: Mapping[str, Any] | None, lookups: Mapping[str, Any],
                first: int | None = None) -> list[tuple[dict[str, Any], int]]:
        """Matching (stored record, revision) pairs. With ``first``, the caller wants only the
        first ``first`` matches in primary-key order (it still sorts what it gets)."""
        store = cls._s()
        lookups = dict(lookups)
        server = _server_read(lookups.pop("consistency", "replica"))
        timeout = lookups.pop("timeout", None)
        check_timeout(timeout)
        if not server and where is None and lookups:
            # The commonest queries, find_one(email=...) or find(role=..., age=...): equalities
            # on indexed str/int fields need no plan: probe the most selective index, then
            # compare the other fields directly.
            equalities = cls._indexed_equalities(store, lookups)
            if equalities is not None:
                return cls._select_equal(store, equalities, first)
        compiled_where, flt = store.compiled(where, lookups)
        if server:  # every record from the server (one batch read), filtered here
            entries = [e for _, e in store.bucket._latest(f"{RECORD}:*", False, timeout)]
            pairs = [(store.bucket._decode(e).value, e.revision) for e in entries]
        else:
            assert store.replica is not None
            equality = query.single_equality(compiled_where)
            if equality is not None and (equality[0] in store.unique or equality[0] in store.sorted):
                return cls._select_equal(store, {equality[0]: equality[1]}, first)
            with store.replica.lock:
                pks = query.candidate_pks(compiled_where, store.indexes)
                records = store.records
                pairs = list(records.values()) if pks is None else [records[pk] for pk in pks if pk in records]
        if not compiled_where:
            return pairs
        return [pairs[i] for i in flt.filter([p[0] for p in pairs])]

    @classmethod
    def _indexed_equalities(cls, store: ModelStore, lookups: Mapping[str, Any]) -> dict[str, Any] | None:
        """``{field: value}`` when every lookup is an equality on an indexed str/int field."""
        shape = tuple(lookups)
        fields = store.equality_shapes.get(shape)
        if fields is None:  # first query of this shape: which fields, of which types (or none)
            found: list[tuple[str, type]] = []
            for key in shape:
                field = cls._fields.get(key.removesuffix("__exact"))
                if field is None or field.type not in (str, int) or field.name not in store.indexes:
                    found = []
                    break
                found.append((field.name, field.type))
            fields = tuple(found)
            if len(store.equality_shapes) >= 512:
                store.equality_shapes.clear()
            store.equality_shapes[shape] = fields
        if not fields:
            return None
        out = {}
        for (name, kind), value in zip(fields, lookups.values()):
            if type(value) is not kind:
                return None
            out[name] = value
        return out

    @classmethod
    def _select_equal(cls, store: ModelStore, equal: dict[str, Any], first: int | None) -> list[tuple[dict[str, Any], int]]:
        """Records whose indexed fields equal the given str/int values (all of them)."""
        assert store.replica is not None
        unique, sorted_ = store.unique, store.sorted
        with store.replica.lock:
            records = store.records
            for name in equal:
                if name in unique:  # one index probe, then the other fields compared
                    pk = unique[name].get(equal[name])
                    hit = records.get(pk) if pk is not None else None
                    if hit is None:
                        return []
                    stored = hit[0]
                    for other, value in equal.items():
                        if stored.get(other) != value:
                            return []
                    return [hit]
            if len(equal) == 1:  # primary keys in order; only as many as wanted
                ((name, value),) = equal.items()
                index = sorted_[name]
                candidates = index.eq(value) if first is None else index.range(value, value, limit=first)
            else:  # the rarest value; eq() lists primary keys in order
                name = min(equal, key=lambda n: sorted_[n].count_eq(equal[n]))
                candidates = sorted_[name].eq(equal[name])
            out = []
            for pk in candidates:
                hit = records.get(pk)
                if hit is not None and all(hit[0].get(n) == v for n, v in equal.items()):
                    out.append(hit)
                    if len(out) == first:
                        break
            return out

    @classmethod
    def find(cls: type[M], *, where: Mapping[str, Any] | None = None, order_by: Any = None,
             limit: int | None = None, offset: int = 0, **lookups: Any) -> list[M]:
        """Matching records. Filters: ``where=`` dict ($eq $ne $gt $gte $lt $lte $in $nin
        $contains $startswith $endswith $regex $exists $and $or $not) and/or Django-style lookups
        (``age__gte=18``). ``order_by`` takes field names, ``-`` for descending; records without a
        value come last either way. Reads run on the replica; pass ``consistency="server"`` (with
        an optional ``timeout=``) to read every record from the server instead. ``consistency``
        and ``timeout`` are read options in every read call (count, exists, paginate, aggregates
        too): query fields so named with ``where=``."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidArgumentError(f"limit must be None or an int >= 0, not {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgumentError(f"offset must be an int >= 0, not {offset!r}")
        order = query.parse_order_by(order_by, cls._fields)
        if limit is not None and len(order) == 1 and not _server_read(lookups.get("consistency", "replica")):
            # One indexed order field and a limit: walk the index, as paginate does.
            store = cls._s()
            field, descending = order[0]
            index = store.indexes.get(field)
            if index is not None:
                walked = cls._page_by_index(store, index, field, descending, None, limit + offset, where, lookups)
                if walked is not None:
                    return cls._build(walked[offset : offset + limit])
        pairs = cls._select(where, lookups, first=limit + offset if limit is not None and not order else None)
        if not order and limit is not None and len(pairs) > limit + offset:
            # Default order (primary key, one type per model) with a limit: select, don't sort.
            pk = cls._pk
            pairs = heapq.nsmallest(limit + offset, pairs, key=lambda p: p[0][pk])
        elif len(pairs) > 1:
            pairs = query.sort_records(pairs, order, cls._pk)
        if offset:
            pairs = pairs[offset:]
        if limit is not None:
            pairs = pairs[:limit]
        return cls._build(pairs)

    @classmethod
    def get_or_create(cls: type[M], defaults: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                      **lookups: Any) -> tuple[M, bool]:
        """``(record, created)``: the first record matching the equality ``lookups``, or a new one
        made from them and ``defaults``. When another client creates the same record at the same
        moment, the server refuses one of the two creates (a primary key or unique value taken)
        and this returns the winner's record with ``created`` False; lookups on fields that are
        neither the primary key nor unique cannot be protected that way."""
        values = {k: v for k, v in lookups.items() if "__" not in k}
        if len(values) != len(lookups) or not values:
            raise InvalidArgumentError("get_or_create() takes equality lookups (field=value) only")
        found = cls.find_one(**lookups)
        if found is not None:
            return found, False
        try:
            created = cls(**{**(defaults or {}), **values})
            created._insert(timeout)
            return created, True
        except UniqueConstraintError as exc:
            cls._await_holder(exc, timeout)
            found = cls.find_one(**lookups)
            if found is None:  # the conflict was on another unique value: not the record asked for
                raise
            return found, False

    @classmethod
    def _await_holder(cls, exc: UniqueConstraintError, timeout: float | None) -> None:
        """Wait until this client's replica has the record that holds the value a create lost
        on (the winner's write may still be on its way to this replica)."""
        store = cls._s()
        key = getattr(exc.__cause__, "key", None)  # the record key, or the unique marker's
        if isinstance(key, str) and key.startswith(f"{UNIQUE}:"):
            key = store.bucket.get(key, timeout=timeout)  # a marker holds its record's key
        entry = store.bucket.entry(key, timeout=timeout) if isinstance(key, str) else None
        if entry is not None:
            assert store.replica is not None
            store.replica.wait_for(entry.revision, timeout or 5.0)

    @classmethod
    def find_one(cls: type[M], *, where: Mapping[str, Any] | None = None, **lookups: Any) -> M | None:
        """The first matching record (by primary key), or None."""
        if where is None and lookups:  # the commonest query: equalities on indexed fields
            store = cls._s()
            equal = cls._indexed_equalities(store, lookups)
            if equal is not None:
                return next(iter(cls._build(cls._select_equal(store, equal, 1))), None)
        found = cls.find(where=where, limit=1, **lookups)
        return found[0] if found else None

    @classmethod
    def count(cls, *, where: Mapping[str, Any] | None = None, **lookups: Any) -> int:
        """The number of matching records (every record without filters)."""
        if where is None and not lookups:
            store = cls._s()
            with store.replica.lock:  # type: ignore[union-attr]
                return len(store.records)
        return len(cls._select(where, lookups))

    @classmethod
    def exists(cls, *, where: Mapping[str, Any] | None = None, **lookups: Any) -> bool:
        """Whether any record matches."""
        return bool(cls._select(where, lookups, first=1))

    @classmethod
    def first(cls: type[M], n: int = 1, *, order_by: Any = None) -> list[M]:
        """The first ``n`` records in ``order_by`` order (default: primary key)."""
        return cls.find(order_by=order_by or cls._pk, limit=n)

    @classmethod
    def last(cls: type[M], n: int = 1, *, order_by: Any = None) -> list[M]:
        """The last ``n`` records in ``order_by`` order (default: primary key), in that order."""
        order = order_by or cls._pk
        if order in (cls._pk, "-" + cls._pk):  # never null: the flipped order is the exact reverse
            flipped = order[1:] if order.startswith("-") else "-" + order
            return list(reversed(cls.find(order_by=flipped, limit=n)))
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError(f"n must be an int >= 0, not {n!r}")
        # Nulls come last in both directions, so no flipped order ends where this one does.
        return cls.find(order_by=order)[-n:] if n else []

    @classmethod
    def paginate(cls: type[M], limit: int = 20, after: str | None = None, *, order_by: str | None = None,
                 where: Mapping[str, Any] | None = None, **lookups: Any) -> Page[M]:
        """One page of matching records in ``order_by`` order (one field, ``-`` for descending;
        default: primary key). Ties are broken by primary key in the same direction.

        ``after`` is the ``next_cursor`` of the previous page. The cursor names a position (the
        last record's sort value and primary key), so records inserted or deleted elsewhere never
        make a page repeat or skip the records around it. On an indexed field (or the primary
        key) a page walks the index from the cursor: its cost follows the page, not the table.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgumentError(f"limit must be a positive int, not {limit!r}")
        if order_by is not None and not isinstance(order_by, str):
            raise InvalidArgumentError(f"paginate orders by one field name (optionally '-name'), not {order_by!r}")
        ((field, descending),) = query.parse_order_by(order_by or cls._pk, cls._fields)
        mark = None
        if after is not None:
            try:
                mark = tuple(orjson.loads(after))
                if len(mark) != 2:
                    raise ValueError
            except (orjson.JSONDecodeError, ValueError, TypeError):
                raise InvalidArgumentError(f"invalid pagination cursor {after!r}: pass a next_cursor unchanged") from None
        store = cls._s()
        if not _server_read(lookups.get("consistency", "replica")):
            index = store.indexes.get(field)
            if index is not None:
                page = cls._page_by_index(store, index, field, descending, mark, limit + 1, where, lookups)
                if page is not None:
                    return cls._page(page, limit, field)
        pairs = query.sort_records(cls._select(where, lookups), [(field, descending)], cls._pk)
        return cls._page(_after(pairs, mark, field, cls._pk, descending)[: limit + 1], limit, field)

    @classmethod
    def _page(cls: type[M], pairs: list[tuple[dict[str, Any], int]], limit: int, field: str) -> Page[M]:
        """A Page of the first ``limit`` of ``pairs`` (``limit + 1`` of them means there is more)."""
        more = len(pairs) > limit
        pairs = pairs[:limit]
        cursor = None
        if more:
            last = pairs[-1][0]
            cursor = orjson.dumps([last.get(field), last.get(cls._pk)]).decode()
        return Page(cls._build(pairs), more, cursor)

    @classmethod
    def _page_by_index(cls, store: ModelStore, index: Any, field: str, descending: bool, mark: tuple[Any, Any] | None,
                       want: int, where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> list[tuple[dict[str, Any], int]] | None:
        """Up to ``want`` matches after ``mark``, walking ``index`` in order; None when the
        filter selects so few records through another index that sorting them is cheaper."""
        lookups = _without_options(lookups)
        compiled_where, flt = store.compiled(where, lookups)
        pk_name = cls._pk
        records = store.records
        out: list[tuple[dict[str, Any], int]] = []
        if want <= 0:
            return out

        def keep(pairs: list[tuple[dict[str, Any], int]]) -> None:
            out.extend(pairs if not compiled_where else [pairs[i] for i in flt.filter([p[0] for p in pairs])])

        assert store.replica is not None
        with store.replica.lock:
            if compiled_where and query.candidate_pks(compiled_where, store.indexes, at_most=_PAGE_SORT_MAX) is not None:
                return None
            # The walk covers only the order field's values the query allows, if it bounds them.
            scan, bounded = query.ordered_scan(compiled_where, field, index, descending)
            # Records whose value the index cannot hold are sorted here: "others" (dicts, lists)
            # sort after every indexed value (descending: before), nulls last in both directions.
            has_tail = not bounded and len(records) > len(index)
            tails: dict[str, list[tuple[dict[str, Any], int]]] = {}
            at = None
            if mark is not None:
                at = "nulls" if mark[0] is None else "others" if core.index_key(mark[0]) is None else "index"
            segments = ["index", "others", "nulls"] if not descending else ["others", "index", "nulls"]
            if at is not None:  # start in the segment that holds the cursor
                segments = segments[segments.index(at):]
            for segment in segments:
                if len(out) >= want:
                    break
                if segment != "index":
                    if has_tail and not tails:
                        for p in query.sort_records(
                            [p for p in records.values() if core.index_key(p[0].get(field)) is None],
                            [(field, descending)], pk_name,
                        ):
                            tails.setdefault("nulls" if p[0].get(field) is None else "others", []).append(p)
                    keep(_after(tails.get(segment, []), mark if segment == at else None, field, pk_name, descending))
                    continue
                cursor = None if at != "index" else mark
                chunk = want
                while len(out) < want:
                    try:
                        pks = scan(cursor, chunk)
                    except (ValueError, TypeError):  # a cursor no page of this order gives
                        raise InvalidArgumentError(f"invalid pagination cursor {list(mark or ())!r} for order {field!r}") from None
                    keep([records[pk] for pk in pks if pk in records])
                    if len(pks) < chunk:
                        break
                    last = pks[-1]
                    cursor = (records[last][0].get(field), last)
                    chunk = min(chunk * 2, 4096)
        return out[:want]

    # -- watching --------------------------------------------------------------------------------

    @classmethod
    def watch(cls, callback: Callable[[ModelEvent], None], *, where: Mapping[str, Any] | None = None,
              columns: Iterable[str] | None = None, on_error: Callable[[BaseException], None] | None = None,
              **lookups: Any) -> ModelWatcher:
        """Call ``callback(event)`` (on a dispatcher thread) for each insert, update and delete of
        a matching record, with ``event.old`` and ``event.new``; with ``columns``, updates only
        when one of them changed. Returns a watcher with ``stop()``."""
        from natskv.models.live import ModelWatcher

        return ModelWatcher(cls, callback, where=where, columns=columns, on_error=on_error, **lookups)

    @classmethod
    def live(cls, *, where: Mapping[str, Any] | None = None, order_by: Any = None, limit: int | None = None,
             on_error: Callable[[BaseException], None] | None = None, **lookups: Any) -> LiveQuery:
        """A query kept current: ``.result``, ``.subscribe(cb)`` (called only when the result
        really changes), ``.stop()``."""
        from natskv.models.live import LiveQuery

        return LiveQuery(cls, where=where, order_by=order_by, limit=limit, on_error=on_error, **lookups)

    # -- aggregates ----------------------------------------------------------------------------------

    @classmethod
    def _numbers(cls, field: str, where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> list[float]:
        if field not in cls._fields:
            raise InvalidArgumentError(f"{cls.__name__} has no field {field!r}")
        values = (stored.get(field) for stored, _ in cls._select(where, lookups))
        return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]

    @classmethod
    def sum(cls, field: str, *, where: Mapping[str, Any] | None = None, **lookups: Any) -> float:
        """Sum of the numeric values of ``field`` (non-numbers skipped; 0 on no rows)."""
        return sum(cls._numbers(field, where, lookups))

    @classmethod
    def avg(cls, field: str, *, where: Mapping[str, Any] | None = None, **lookups: Any) -> float:
        """Mean of the numeric values of ``field`` (0 on no rows)."""
        values = cls._numbers(field, where, lookups)
        return sum(values) / len(values) if values else 0

    @classmethod
    def min(cls, field: str, *, where: Mapping[str, Any] | None = None, **lookups: Any) -> float | None:
        """Smallest numeric value of ``field`` (non-numbers skipped; None on no rows)."""
        values = cls._numbers(field, where, lookups)
        return min(values) if values else None

    @classmethod
    def max(cls, field: str, *, where: Mapping[str, Any] | None = None, **lookups: Any) -> float | None:
        """Largest numeric value of ``field`` (non-numbers skipped; None on no rows)."""
        values = cls._numbers(field, where, lookups)
        return max(values) if values else None


def _after(pairs: list[tuple[dict[str, Any], int]], mark: tuple[Any, Any] | None, field: str, pk: str,
           descending: bool) -> list[tuple[dict[str, Any], int]]:
    """The pairs (sorted by ``field``, ties by primary key) strictly after the cursor ``mark``."""
    if mark is None:
        return pairs
    return [p for p in pairs if query.follows(p[0], mark, field, pk, descending)]


# Keywords that the read calls take among their lookups: how to read, not what to match.
_READ_OPTIONS = frozenset({"consistency", "timeout"})


def _without_options(lookups: Mapping[str, Any]) -> Mapping[str, Any]:
    """The lookups without the read options (checked here, so a bad one fails on every path)."""
    if _READ_OPTIONS.isdisjoint(lookups):
        return lookups
    check_timeout(lookups.get("timeout"))
    _server_read(lookups.get("consistency", "replica"))
    return {k: v for k, v in lookups.items() if k not in _READ_OPTIONS}


def _server_read(consistency: str) -> bool:
    if consistency not in ("replica", "server"):
        raise InvalidArgumentError(f"consistency is 'replica' or 'server', not {consistency!r}")
    return consistency == "server"


class Page(Generic[M]):
    """One page of :meth:`Model.paginate`: ``records``, ``has_more`` and ``next_cursor``."""

    __slots__ = ("records", "has_more", "next_cursor")

    def __init__(self, records: list[M], has_more: bool, next_cursor: str | None) -> None:
        self.records = records
        self.has_more = has_more
        self.next_cursor = next_cursor

    def __iter__(self) -> Iterator[M]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"Page({len(self.records)} records, has_more={self.has_more}, next_cursor={self.next_cursor!r})"


def _parse_dt(raw: Any) -> dt.datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        return dt.datetime.fromisoformat(raw)
    except ValueError:
        return None


__all__ = ["MISSING", "Model", "ModelStore", "Page", "record_key", "unique_key"]
