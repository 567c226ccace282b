"""Model: schema-validated records, one per key in a bucket, read from a live in-memory replica.

A record and its unique markers (the bucket layout is in :mod:`natskv.models.store`) are written in
one atomic batch with compare-and-set, so two processes racing for the same unique value can never
both win: the server decides. Autoincrement values come from a counter stream next to the bucket
(``ModelStore.next_ids``). Reads and queries run on the model's replica through its
:class:`~natskv.models.planner.Planner`; a write is applied to the replica as soon as the server
acknowledges it, so the writing client reads its own writes.

Every call runs on the caller's thread. ``timeout=None`` is the client's default
(``request_timeout``), for each request a call makes.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import orjson

from natskv._collector import collector_paused
from natskv._runner import check_timeout
from natskv._speedups import core
from natskv.errors import (
    InvalidArgumentError,
    KeyExistsError,
    RevisionMismatchError,
    UniqueConstraintError,
    ValidationError,
)
from natskv.models import bounded
from natskv.models.bulk import BulkInsert
from natskv.models.fields import (
    MISSING,
    Field,
    check_schema,
    primary_key_name,
    validate_record,
    validate_rows,
)
from natskv.models.group_commit import group_commit
from natskv.models.planner import read_options
from natskv.models.store import (
    UNIQUE,
    ModelStore,
    record_key,
    resolve_timeout,
    unique_key,
)
from natskv.ops import Create, Update, as_op, check_ttl

if TYPE_CHECKING:
    from natskv.models.live import LiveQuery, ModelEvent, ModelWatcher

log = logging.getLogger("natskv")

M = TypeVar("M", bound="Model")

META_FIELDS = ("_version", "_created_at", "_updated_at", "_expires_at", "_changes", "_slot")
_CAS_RETRIES = 20
MAX_BATCH = 1000  # writes in one atomic batch (the server's limit)


class ModelMeta(type):
    """Collects a model class's :class:`Field` attributes into ``_fields`` and checks the schema."""

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> ModelMeta:
        cls = super().__new__(mcls, name, bases, namespace, **kwargs)
        fields: dict[str, Field] = {}
        for base in reversed(cls.__mro__[1:]):
            fields.update(getattr(base, "_fields", {}))
        fields.update({attr: value for attr, value in namespace.items() if isinstance(value, Field)})
        if namespace.get("__abstract__") or (name == "Model" and not fields):
            cls._fields = fields  # type: ignore[attr-defined]
            return cls
        bounded.check_limit(name, getattr(cls, "__max_records__", None))
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
        # Clean value -> stored form (Model._to_stored): only these fields' values change.
        cls._to_json = [  # type: ignore[attr-defined]
            (n, f) for n, f in fields.items() if f.type in (dt.datetime, dt.date, uuid.UUID)
        ]
        cls._pk = primary_key_name(fields)  # type: ignore[attr-defined]
        cls._store = None  # type: ignore[attr-defined]
        return cls


class Model(metaclass=ModelMeta):
    """Base class of natskv models. Declare fields as class attributes, then ``db.register(Cls)``.

    Class methods (``create``, ``get``, ``find`` ...) need the model registered with a client.
    Every record carries ``_version`` (its revision), ``_created_at``, ``_updated_at`` and
    ``_changes`` (writes since its creation), and ``_expires_at`` when it expires.
    """

    __abstract__: ClassVar[bool] = True
    __bucket__: ClassVar[str | None] = None
    # Seconds a record lives after it is created (None: for ever); create(ttl=) and save(ttl=) set
    # one record's. The server removes an expired record and its unique values.
    __ttl__: ClassVar[float | None] = None
    # The most records the model keeps (None: no limit). An insert at the limit evicts the oldest
    # record (by _created_at), which every replica and watch sees as an ``evicted`` event; the
    # server enforces it for every writer (see natskv.models.bounded). Needs nats-server 2.12.
    __max_records__: ClassVar[int | None] = None
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
    def _require_store(cls) -> ModelStore:
        """The store of this model class (its own, never a base class's); raises when the class
        is not registered with a client."""
        store: ModelStore | None = cls.__dict__.get("_store")
        if store is None:
            raise InvalidArgumentError(
                f"model {cls.__name__} is not registered: call db.register({cls.__name__}) first"
            )
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
    def _build(cls: type[M], records: Iterable[Any]) -> list[M]:
        """Instances of stored records (``_core.Record`` s, or ``(stored dict, revision)`` pairs),
        built by ``_core``."""
        return cls._builder.build(records)  # type: ignore[attr-defined, no-any-return]

    @property
    def _created_at(self) -> dt.datetime | None:
        """When the record was first stored (UTC), None before."""
        return _parse_dt(self._stored.get("_created_at")) if self._stored else None

    @property
    def _updated_at(self) -> dt.datetime | None:
        """When the record was last stored (UTC), None before."""
        return _parse_dt(self._stored.get("_updated_at")) if self._stored else None

    @property
    def _changes(self) -> int:
        """How many times the record was written after its creation (0 for a new one)."""
        return int(self._stored.get("_changes") or 0) if self._stored else 0

    @property
    def _expires_at(self) -> dt.datetime | None:
        """When the server removes the record (UTC; it may take up to a second more), None when it
        does not expire or was never stored."""
        return _parse_dt(self._stored.get("_expires_at")) if self._stored else None

    @classmethod
    def _to_stored(cls, clean: dict[str, Any]) -> dict[str, Any]:
        """The stored (JSON) form of validated values: only datetime, date and UUID fields differ."""
        out = dict(clean)
        for name, field in cls._to_json:  # type: ignore[attr-defined]
            value = out.get(name)
            if value is not None:
                out[name] = field.to_json(value)
        return out

    @property
    def pk(self) -> Any:
        """The primary key value."""
        return getattr(self, self._pk)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields)
        return f"{type(self).__name__}({shown})"

    __hash__ = None  # type: ignore[assignment]  # compared by value, and mutable: unhashable

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values() and self._version == other._version

    def to_dict(self) -> dict[str, Any]:
        """The record's values (Python form), fields not in the schema included."""
        return self._values()

    # -- changes since the record was read -------------------------------------------------------

    def changed(self) -> list[str]:
        """The fields set on this instance since it was read or last saved, in schema order (a
        field set back to its stored value does not count). For a record never stored: the fields
        that hold a value. Fields not in the schema count by name too."""
        stored = self._stored
        if stored is None:
            return [name for name in self._values()]
        out = [name for name, field in self._fields.items()
               if _stored_form(field, getattr(self, name)) != stored.get(name)]
        out.extend(name for name, value in self._extra.items() if stored.get(name) != value)
        return out

    def previous(self, name: str) -> Any:
        """The stored value of field ``name`` (as ``get`` would return it), whatever this instance
        holds now; None for a record never stored."""
        field = self._fields.get(name)
        if field is None:
            if name in self._extra:
                return None if self._stored is None else self._stored.get(name)
            raise InvalidArgumentError(f"{type(self).__name__} has no field {name!r}")
        if self._stored is None:
            return None
        value = self._stored.get(name)
        return None if value is None else field.from_json(value)

    # -- writes ----------------------------------------------------------------------------------

    @classmethod
    def create(cls: type[M], values: Mapping[str, Any] | None = None, /, *, timeout: float | None = None,
               ttl: float | None = None, **fields: Any) -> M:
        """Validate and store a new record made of ``values`` and the keyword ``fields``; return
        it. Raises ValidationError (every issue at once) or UniqueConstraintError; nothing is
        written (and no autoincrement value spent) when validation fails.

        ``ttl`` (seconds; default the model's ``__ttl__``) expires the record: the server removes
        it and its unique values, every replica and watch sees an ``expired`` event.
        ``timeout=`` and ``ttl=`` are the write's options, as in every write call: a field named
        ``timeout`` or ``ttl`` goes in the ``values`` mapping, ``Job.create({"timeout": 30},
        name="x")``.
        """
        check_timeout(timeout)
        if values is not None and not isinstance(values, Mapping):
            raise InvalidArgumentError(f"create() takes a mapping of field values, not {type(values).__name__}")
        for option, given in (("timeout", timeout), ("ttl", ttl)):
            if given is not None and option in cls._fields and option not in (values or {}):
                raise InvalidArgumentError(
                    f"{cls.__name__} has a field named {option!r}, but {option}= is the write's {option}: pass "
                    f"the field in the values mapping, {cls.__name__}.create({{{option!r}: ...}}, ...)"
                )
        obj = cls(**{**values, **fields}) if values else cls(**fields)
        obj._insert(timeout, cls._lifetime(ttl))
        return obj

    @classmethod
    def _lifetime(cls, ttl: float | None) -> float | None:
        """The TTL of a new record: ``ttl``, else the model's ``__ttl__`` (both checked)."""
        chosen = cls.__ttl__ if ttl is None else ttl
        check_ttl(chosen)  # InvalidArgumentError before anything is written
        return chosen

    @classmethod
    def bulk_create(cls: type[M], rows: Iterable[Mapping[str, Any]], *, timeout: float | None = None) -> list[M]:
        """Create many records in atomic batches (up to 1000 writes each, a record's unique
        markers always in its record's batch), several batches in flight at once.

        Every row is validated before anything is written (ValidationError names rows as
        ``[i].field``), and rows that clash with each other (the same primary key or unique value)
        raise UniqueConstraintError before anything is written. A clash with a stored record
        rejects the batch it occurs in; batches already sent may still be stored, those not yet
        sent are not: the UniqueConstraintError's ``row`` is the clashing row, ``written`` the
        indexes of the rows stored and ``not_written`` of those not stored. Rows stored are in
        this client's replica when the call returns or raises. ``timeout=`` applies to each batch.
        """
        check_timeout(timeout)
        given = [dict(row) for row in rows]
        if not given:
            return []
        if cls.__max_records__ is not None:
            return cls._bulk_create_bounded(given, timeout)
        store = cls._require_store()
        # Everything made from here on stays alive (clean rows, stored forms, instances, the
        # replica's records): the collector's passes over the growing heap would free nothing.
        with collector_paused():
            # Validated as ``cls(**row)`` would be, without the instances: they are made as
            # their batches are stored, while later batches are out.
            prepared, problems = validate_rows(cls._fields, given)
            if problems:
                raise ValidationError(problems)
            for name, field in cls._fields.items():
                if field.generated == "autoincrement":
                    missing = [c for c in prepared if c.get(name) is None]
                    if missing:
                        ids = store.next_ids(name, len(missing), timeout)
                        for clean, value in zip(missing, ids, strict=True):
                            clean[name] = value
            return BulkInsert(cls, store, given, prepared, timeout).run()

    @classmethod
    def _bulk_create_bounded(cls: type[M], rows: list[dict[str, Any]], timeout: float | None) -> list[M]:
        """bulk_create for a model with ``__max_records__``: every row validated first, then
        created one at a time, each taking a slot (and evicting at the limit) as ``create`` does."""
        problems: list[tuple[str, str, str]] = []
        for i, row in enumerate(rows):
            _, issues = cls._validate(cls(**row)._values(), partial=False)
            problems.extend((f"[{i}].{f}", m, c) for f, m, c in issues)
        if problems:
            raise ValidationError(problems)
        done: list[M] = []
        for i, row in enumerate(rows):
            try:
                done.append(cls.create(row, timeout=timeout))
            except UniqueConstraintError as exc:
                raise UniqueConstraintError(
                    cls.__name__, exc.field, exc.value, row=i,
                    written=list(range(i)), not_written=list(range(i, len(rows))),
                ) from exc
        return done

    @classmethod
    def _validate(cls, values: dict[str, Any], partial: bool) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
        return validate_record(cls._fields, values, partial=partial)

    def _insert(self, timeout: float | None, ttl: float | None = None) -> None:
        cls = type(self)
        clean, stored, ops = self._new_ops(timeout, ttl)
        if cls.__max_records__ is None:
            revision = cls._write(ops, timeout)
        else:
            revision = bounded.insert(cls, stored, ops, () if ttl is None else ({"ttl": ttl},), timeout)
        self._stored_as(clean, stored)
        self._version = revision

    def _new_ops(
        self, timeout: float | None, ttl: float | None = None
    ) -> tuple[dict[str, Any], dict[str, Any], list[tuple[Any, ...]]]:
        """Validate this new record, draw its autoincrement values; return its clean values, stored
        form and the writes that create it (expiring after ``ttl`` seconds when given)."""
        cls = type(self)
        cls._require_store()  # registered? (fails before validating)
        clean, issues = cls._validate(self._values(), partial=False)
        if issues:
            raise ValidationError(issues)
        for name, field in cls._fields.items():
            if clean.get(name) is None and field.generated == "autoincrement":
                clean[name] = cls._require_store().next_ids(name, 1, timeout)[0]
        stored, ops = cls._insert_ops(clean, dt.datetime.now(dt.timezone.utc), ttl)
        return clean, stored, ops

    @classmethod
    def _insert_ops(
        cls, clean: dict[str, Any], now: dt.datetime, ttl: float | None = None
    ) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
        """The stored form of a validated new record and the writes that create it; with ``ttl``,
        the record and its unique markers expire together."""
        for name, field in cls._fields.items():
            if clean.get(name) is None and field.generated in ("uuid", "timestamp"):
                clean[name] = field.generate_value()
        stored = cls._to_stored(clean)
        stored["_created_at"] = stored["_updated_at"] = now.isoformat()
        stored["_changes"] = 0
        options: tuple[dict[str, float], ...] = ()
        if ttl is not None:
            stored["_expires_at"] = (now + dt.timedelta(seconds=ttl)).isoformat()
            options = ({"ttl": ttl},)
        key = record_key(clean[cls._pk])
        ops: list[tuple[Any, ...]] = [
            ("create", unique_key(name, stored[name]), key, *options)
            for name, field in cls._fields.items()
            if field.unique and stored.get(name) is not None
        ]
        ops.append(("create", key, stored, *options))  # last: a commit's revision is its record's
        return stored, ops

    def _stored_as(self, clean: dict[str, Any], stored: dict[str, Any]) -> None:
        for name in self._fields:
            object.__setattr__(self, name, clean.get(name))
        self._stored = stored

    @classmethod
    def _write(cls, ops: list[tuple[Any, ...]], timeout: float | None) -> int:
        store = cls._require_store()
        try:
            if len(ops) == 1:
                op = as_op(ops[0])
                if isinstance(op, Create):
                    revision = store.bucket.create(op.key, op.value, ttl=op.ttl, timeout=timeout)
                else:
                    assert isinstance(op, Update)
                    revision = store.bucket.update(op.key, op.value, op.revision, ttl=op.ttl, timeout=timeout)
            else:
                # Joined with other threads' writes of this model into one atomic batch (see
                # natskv.models.group_commit): the server takes a stream's batches one at a time.
                revision = group_commit(store, store.bucket).commit(ops, timeout)
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

    def save(self, *, timeout: float | None = None, ttl: float | None = None) -> M:  # type: ignore[type-var]
        """Store this record: create it if new, else update it with compare-and-set on
        ``_version`` (RevisionMismatchError if someone else changed it since it was read). A
        stored record with nothing :meth:`changed` (and no ``ttl``) is not written (its
        ``_version`` stays). ``ttl`` (seconds) gives it a new expiry from now; without it a new
        record gets the model's ``__ttl__`` and a stored one keeps the expiry it has."""
        check_timeout(timeout)
        cls = type(self)
        if self._stored is None:
            self._insert(timeout, cls._lifetime(ttl))
            return self  # type: ignore[return-value]
        if ttl is not None:
            cls._lifetime(ttl)
        elif not self.changed():
            return self  # type: ignore[return-value]  # nothing to write: no revision spent
        stored, ops = self._update_ops(ttl)
        self._version = cls._write(ops, timeout)
        self._stored = stored
        return self  # type: ignore[return-value]

    def _update_ops(self, ttl: float | None = None) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
        """This stored record's new stored form and the writes that store it (validated; CAS on
        ``_version``; unique markers moved). With ``ttl`` the record and all its unique markers
        expire ``ttl`` seconds from now; without it they keep the expiry the record has."""
        cls = type(self)
        assert self._stored is not None
        clean, issues = cls._validate(self._values(), partial=False)
        if issues:
            raise ValidationError(issues)
        stored = cls._to_stored(clean)
        if stored.get(cls._pk) != self._stored.get(cls._pk):
            raise InvalidArgumentError("the primary key of a stored record cannot change; create a new record")
        now = dt.datetime.now(dt.timezone.utc)
        stored["_created_at"] = self._stored.get("_created_at")
        if "_slot" in self._stored:
            stored["_slot"] = self._stored["_slot"]  # held while the record lives
        stored["_updated_at"] = now.isoformat()
        stored["_changes"] = int(self._stored.get("_changes") or 0) + 1
        lifetime, renew = ttl, ttl is not None
        if ttl is not None:
            stored["_expires_at"] = (now + dt.timedelta(seconds=ttl)).isoformat()
        elif self._stored.get("_expires_at"):
            # Keep the expiry: what is left of it, to the second (the server counts whole ones).
            stored["_expires_at"] = self._stored.get("_expires_at")
            expires = _parse_dt(stored["_expires_at"])
            lifetime = max(1.0, math.ceil((expires - now).total_seconds())) if expires else None
        return stored, cls._replace_ops(self._stored, stored, self._version, lifetime, renew)

    @classmethod
    def _replace_ops(
        cls, old: dict[str, Any], new: dict[str, Any], revision: int, ttl: float | None = None, renew: bool = False
    ) -> list[tuple[Any, ...]]:
        """The writes that replace a stored record. ``ttl``: the record's (and new unique
        markers') TTL; ``renew``: unchanged unique markers take it too, so they do not expire
        before their record."""
        key = record_key(cls._fields[cls._pk].from_json(new[cls._pk]))
        options: tuple[dict[str, float], ...] = () if ttl is None else ({"ttl": ttl},)
        ops: list[tuple[Any, ...]] = []
        for name, field in cls._fields.items():
            if not field.unique:
                continue
            if old.get(name) != new.get(name):
                if old.get(name) is not None:
                    ops.append(("delete", unique_key(name, old[name])))
                if new.get(name) is not None:
                    ops.append(("create", unique_key(name, new[name]), key, *options))
            elif renew and new.get(name) is not None:
                ops.append(("set", unique_key(name, new[name]), key, *options))
        if cls.__max_records__ is not None:
            ops.extend(bounded.slot_ops(new, key, cls.__max_records__, options, renew))
        ops.append(("update", key, new, revision, *options))
        return ops

    def delete(self, *, timeout: float | None = None) -> None:
        """Delete this record (compare-and-set on ``_version``) and free its unique values."""
        check_timeout(timeout)
        cls = type(self)
        if self._stored is None:
            raise InvalidArgumentError("this record was never stored")
        cls._delete_stored(self._stored, self._version, timeout)
        self._stored = None

    @classmethod
    def _delete_ops(cls, stored: dict[str, Any], revision: int, reason: str | None = None) -> list[tuple[Any, ...]]:
        """The writes that delete a stored record (CAS on ``revision``) and free its unique values
        (and its slot, in a bounded model); ``reason`` goes into the record's delete marker."""
        key = record_key(cls._fields[cls._pk].from_json(stored[cls._pk]))
        ops: list[tuple[Any, ...]] = [
            ("delete", unique_key(name, stored[name]))
            for name, field in cls._fields.items()
            if field.unique and stored.get(name) is not None
        ]
        if stored.get("_slot") is not None:  # a bounded model's record frees its slot
            ops.append(("delete", unique_key("_slot", stored["_slot"])))
        ops.append(("delete", key, revision) if reason is None else ("delete", key, revision, {"reason": reason}))
        return ops

    @classmethod
    def _delete_stored(cls, stored: dict[str, Any], revision: int, timeout: float | None) -> None:
        ops = cls._delete_ops(stored, revision)
        store = cls._require_store()
        if len(ops) == 1:
            _, key, revision = ops[0]
            rev = store.bucket.delete(key, revision=revision, timeout=timeout)
        else:
            rev = group_commit(store, store.bucket).commit(ops, timeout)
        store.written(ops, rev)

    def refresh(self, *, timeout: float | None = None) -> M:  # type: ignore[type-var]
        """Reload this record from the replica (InvalidArgumentError if it was deleted)."""
        check_timeout(timeout)
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
        check_timeout(timeout)
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
        check_timeout(timeout)
        return cls._for_each_match(where, lookups, lambda obj: obj.delete(timeout=timeout))

    @classmethod
    def _for_each_match(cls, where: Mapping[str, Any] | None, lookups: Mapping[str, Any],
                        action: Callable[[Model], None]) -> int:
        """Run ``action`` on every matching record with compare-and-set; on a conflict, re-read
        the record and retry while it still matches. Returns how many records it was applied to."""
        pairs, flt = cls._require_store().planner.for_update(where, lookups)
        done = 0
        for record in cls._build(pairs):
            obj = record  # replaced by a fresh read after each conflict
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

    # -- backups ----------------------------------------------------------------------------------

    @classmethod
    def backup(cls, path: str | os.PathLike[str], *, progress: Callable[[int, int | None], None] | None = None,
               timeout: float | None = None) -> int:
        """Write every record (with the time left to records that expire) to the JSON Lines file
        ``path``; return how many. Unique markers and counters follow from the records:
        :meth:`restore` makes them again."""
        from natskv.models import archive

        return archive.backup(cls, path, progress=progress, timeout=timeout)

    @classmethod
    def restore(cls, path: str | os.PathLike[str], *, clear: bool = False,
                progress: Callable[[int, int | None], None] | None = None, timeout: float | None = None) -> int:
        """Write the records of a model backup into this model, with their unique markers, and
        move its autoincrement counters past them; return how many. The whole file is checked
        first, and so is uniqueness (within the file, and against records the file does not
        replace): BackupError or UniqueConstraintError, and nothing is written. ``clear=True``
        truncates the model first. Records keep the time they had left."""
        from natskv.models import archive

        return archive.restore(cls, path, clear=clear, progress=progress, timeout=timeout)

    @classmethod
    def truncate(cls, *, timeout: float | None = None) -> int:
        """Remove every record, unique marker and autoincrement counter of this model; return the
        number of records removed. Replicas and watches see each record deleted; a record
        created meanwhile may survive."""
        from natskv.models import archive

        return archive.truncate(cls, timeout=timeout)

    @classmethod
    def ensure_loaded(cls, *, timeout: float | None = None) -> None:
        """Return once this model's replica holds the bucket's records. Only a forked worker
        waits here (its replica reloads through its own connection, which reads otherwise do on
        first use): call it in a post-fork hook to load before serving."""
        store = cls._require_store()
        assert store.replica is not None
        check_timeout(timeout)
        store.replica.revive(timeout)

    @classmethod
    def get(cls: type[M], pk: Any, default: Any = None, *, consistency: str = "replica",
            timeout: float | None = None) -> M | Any:
        """The record with primary key ``pk``, or ``default``.

        ``consistency="replica"`` (default) reads this client's in-memory replica: it has every
        write made through this client and others' writes as the watch delivers them
        (milliseconds). ``consistency="server"`` asks the server instead, within ``timeout``
        (None: the client's default).
        """
        store = cls._require_store()
        field = cls._fields[cls._pk]
        try:
            stored_pk = field.to_json(field.coerce(pk))
        except InvalidArgumentError:
            return default
        if read_options(consistency, timeout).server:
            entry = store.bucket.entry(record_key(field.coerce(pk)), timeout=timeout)
            return cls._from_stored(entry.value, entry.revision) if entry is not None else default
        assert store.replica is not None
        with store.replica.lock:
            hit = store.records.get(stored_pk)
        if hit is None:
            return default
        return cls._build([hit])[0]

    @classmethod
    def find(cls: type[M], *, where: Mapping[str, Any] | None = None, order_by: Any = None,
             limit: int | None = None, offset: int = 0, **lookups: Any) -> list[M]:
        """Matching records. Filters: ``where=`` dict ($eq $ne $gt $gte $lt $lte $in $nin
        $contains $startswith $endswith $regex $exists $and $or $not) and/or Django-style lookups
        (``age__gte=18``). ``order_by`` takes field names, ``-`` for descending; records without a
        value come last either way. Without ``order_by``, every match comes in primary key
        order, but with a ``limit`` the planner returns the first ``limit`` matches it finds
        along an index, in that index's order (as SQL without ORDER BY): the cost then follows
        ``limit``, not the number of matches. Reads run on the replica; pass ``consistency="server"`` (with
        an optional ``timeout=``, None: the client's default) to read every record from the
        server instead. ``consistency`` and ``timeout`` are read options in every read call
        (count, exists, paginate, aggregates too): query fields so named with ``where=``."""
        return cls._build(cls._require_store().planner.find(where, lookups, order_by, limit, offset))

    @classmethod
    def get_or_create(cls: type[M], defaults: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                      **lookups: Any) -> tuple[M, bool]:
        """``(record, created)``: the first record matching the equality ``lookups``, or a new one
        made from them and ``defaults``. When another client creates the same record at the same
        moment, the server refuses one of the two creates (a primary key or unique value taken)
        and this returns the winner's record with ``created`` False; lookups on fields that are
        neither the primary key nor unique cannot be protected that way."""
        check_timeout(timeout)
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
        store = cls._require_store()
        key = getattr(exc.__cause__, "key", None)  # the record key, or the unique marker's
        if isinstance(key, str) and key.startswith(f"{UNIQUE}:"):
            key = store.bucket.get(key, timeout=timeout)  # a marker holds its record's key
        entry = store.bucket.entry(key, timeout=timeout) if isinstance(key, str) else None
        if entry is not None:
            assert store.replica is not None
            store.replica.wait_for(entry.revision, resolve_timeout(store.client, timeout))

    @classmethod
    def find_one(cls: type[M], *, where: Mapping[str, Any] | None = None, **lookups: Any) -> M | None:
        """A matching record, or None. When several match, which one is the planner's choice
        (the first it finds along an index, see ``find``); pass ``order_by`` to ``find(...,
        limit=1)`` to choose."""
        found = cls._require_store().planner.find_one(where, lookups)
        return cls._build([found])[0] if found is not None else None

    @classmethod
    def count(cls, *, where: Mapping[str, Any] | None = None, **lookups: Any) -> int:
        """The number of matching records (every record without filters)."""
        return cls._require_store().planner.count(where, lookups)

    @classmethod
    def exists(cls, *, where: Mapping[str, Any] | None = None, **lookups: Any) -> bool:
        """Whether any record matches."""
        return bool(cls._require_store().planner.select(where, lookups, first=1))

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
        pairs, cursor = cls._require_store().planner.page(where, lookups, order_by, after, limit)
        return Page(cls._build(pairs), cursor is not None, cursor)

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
        values = (stored.get(field) for stored in cls._require_store().planner.select(where, lookups))
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


class Page(Generic[M]):
    """One page of :meth:`Model.paginate`: ``records``, ``has_more`` and ``next_cursor``."""

    __slots__ = ("has_more", "next_cursor", "records")

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


def _stored_form(field: Field, value: Any) -> Any:
    """``value`` as the record stores it (JSON form), for comparing with a stored record."""
    return None if value is None else field.to_json(value)
