"""ModelStore: what a registered model holds at run time, and the layout of its bucket.

Storage layout in the model's bucket (keys use natskv's ``:`` hierarchy):

- ``r:<type>:<pk>`` holds a record as JSON (``<type>`` is ``i``, ``s`` or ``u`` for int, str and
  UUID primary keys, so ``1`` and ``"1"`` are different records);
- ``u:<field>:<json value>`` marks a value of a unique field as taken (its value is the record key).

The store keeps the records of a :class:`~natskv.replica.LocalReplica` of the ``r:`` keys with their
indexes (``_core.SortedIndex`` / ``UniqueIndex``), in step through the replica's apply hook, which
runs on natskv's loop thread under the replica's lock; readers on any thread take that lock. Each
record is held as one ``_core.Record``: a tuple of its revision and values in the model's field
order, which reads as a mapping of the stored form (a dict per record would cost twice the memory).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from natskv._collector import collector_paused
from natskv._runner import wait_limit
from natskv._speedups import core
from natskv.errors import InvalidArgumentError
from natskv.models.planner import Planner

if TYPE_CHECKING:
    from natskv.client import Client
    from natskv.kv import Bucket
    from natskv.models.model import Model
    from natskv.replica import LocalReplica

log = logging.getLogger("natskv")

RECORD, UNIQUE = "r", "u"

# A string value that repeats across records (a role, a status, the timestamps of one bulk write)
# is held once: each record gets the first object seen with that value, instead of a copy of its
# own per record. A field whose values turn out not to repeat (more than this many distinct ones:
# names, emails) stops being tracked, so the cost is a few dict lookups per change.
SHARED_VALUES_MAX = 256


def resolve_timeout(client: Client, timeout: float | None) -> float | None:
    """The seconds a model call waits: ``timeout=None`` is the client's default
    (``request_timeout``), ``math.inf`` no limit (returned as None, as thread waits take it).
    The model layer's one timeout rule, the one ``Bucket`` calls follow."""
    return wait_limit(timeout, client.options.request_timeout)


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


def record_keys(pks: list[Any]) -> list[str]:
    """``[record_key(pk) for pk in pks]``, with int primary keys (the common case) formatted
    without the checks of each."""
    if all(type(pk) is int for pk in pks):
        prefix = f"{RECORD}:i:"
        return [prefix + str(pk) for pk in pks]
    return [record_key(pk) for pk in pks]


def stored_pk(key: str) -> Any:
    """The primary key, in its stored (JSON) form, of the record key ``key`` (the inverse of
    :func:`record_key`: a UUID's is its string); None when ``key`` is not a record key in
    exactly that form (``_core.record_pk``)."""
    return core.record_pk(key)


def unique_key(field: str, json_value: Any) -> str:
    """The bucket key that marks ``json_value`` (stored form) of the unique ``field`` as taken."""
    return f"{UNIQUE}:{field}:{orjson.dumps(json_value).decode()}"


def unique_keys(field: str, json_values: list[Any]) -> list[str]:
    """``[unique_key(field, v) for v in json_values]``."""
    prefix = f"{UNIQUE}:{field}:"
    dumps = orjson.dumps
    return [prefix + dumps(value).decode() for value in json_values]


class ModelStore:
    """What a registered model holds at run time: its client and bucket, its replica's records
    and indexes, the listeners of its changes, and the :class:`~natskv.models.planner.Planner`
    of its queries. Made by ``db.register`` (``ModelRegistry.register``)."""

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
        # By primary key (stored form): the record (a core.Record, carrying its revision),
        # replaced whole on each change so a reader always gets a record and its own revision together.
        self.records: dict[Any, Any] = {}
        # The stored meta fields (model.META_FIELDS but _version) have slots too; _expires_at only
        # in a model whose records expire (a record cut short after its last value holds no
        # slot for the absent ones, so the rare expiring record of another model costs a dict).
        meta = ("_created_at", "_updated_at", "_changes", *(("_expires_at",) if model.__ttl__ is not None else ()))
        # A bounded model (``__max_records__``, natskv.models.bounded) also finds records by slot
        # and by age; these indexes are the store's own, not the planner's.
        self.limit: int | None = model.__max_records__
        self.slots: Any = None
        self.by_age: Any = None
        hidden_unique: dict[str, Any] = {}
        hidden_sorted: dict[str, Any] = {}
        if self.limit is not None:
            meta = (*meta, "_slot")
            self.slots = hidden_unique["_slot"] = core.UniqueIndex()
            self.by_age = hidden_sorted["_created_at"] = core.SortedIndex()
        self._hidden = [*hidden_unique.values(), *hidden_sorted.values()]
        self._slot_cursor = 0
        layout = (*fields, *(name for name in meta if name not in fields))
        self.index_set = core.IndexSet(  # keeps records and indexes in step
            self.pk, {**self.unique, **hidden_unique}, {**self.sorted, **hidden_sorted}, self.records, layout
        )
        # Until the replica's initial values are in, only the records are kept: the indexes are
        # then built once, in bulk (loaded()), which costs a fraction of inserting entry by entry.
        # Nobody reads them meanwhile: reads wait for the load (register(), a fork's revive()).
        self.index_set.defer()
        self.index_set.share([n for n in layout if n not in self.unique], SHARED_VALUES_MAX)
        self.replica: LocalReplica | None = None
        self._looked_up: tuple[str | None, Any] = (None, None)  # the last held() key and its pk
        # Model watches, live queries and db.on(): called as listener(old, new, revision,
        # old_revision, reason) on the loop thread under the replica's lock; they only match and queue.
        self.listeners: list[Callable[[Any, Any, int, int, str], None]] = []
        # In a forked child reloading its replica: the records inherited from the parent, by
        # primary key, so the reload tells listeners only what changed since the fork.
        self.inherited: dict[Any, Any] | None = None
        self.planner = Planner(self)

    def next_ids(self, field: str, count: int, timeout: float | None) -> range:
        """Reserve ``count`` consecutive values of the autoincrement ``field`` from the counter
        stream beside the model's bucket (one request, caller's thread); return them in order.
        ``timeout=None`` is the client's default."""
        last = self.client._next_counter(self.bucket.name, field, timeout, count)
        return range(last - count + 1, last + 1)

    def server_records(self, timeout: float | None) -> list[Any]:
        """Every record as the server has it now, as ``core.Record`` s (one batch read of the
        ``r:`` keys; ``consistency="server"`` reads); values that are not JSON objects are no
        records. ``timeout=None`` is the client's default."""
        bucket, record = self.bucket, self.index_set.record
        out = []
        for _, entry in bucket._latest(f"{RECORD}:*", False, timeout):
            value = bucket._decode(entry).value
            if type(value) is dict:
                out.append(record(value, entry.revision))
        return out

    def reset(self) -> None:
        """Forget every record (the replica calls this in a forked child before it reloads).

        Model watches and live queries stay with the process that started them; db.on() handlers
        (marked ``carry_over_fork``) follow the client into the child, and hear of the reload
        only what changed since the fork (see :meth:`loaded`).
        """
        self.inherited = dict(self.records)
        self.records.clear()
        for index in [*self.indexes.values(), *self._hidden]:
            index.clear()
        self.index_set.defer()
        self.listeners[:] = [f for f in self.listeners if getattr(f, "carry_over_fork", False)]

    def written(self, ops: list[tuple[Any, ...]], revision: int) -> None:
        """Apply a write that the server acknowledged at ``revision`` (one op, or an atomic batch
        whose last op got ``revision``) to the replica at once: this client reads its own write
        back without waiting for the watch, whose later delivery of it is skipped."""
        assert self.replica is not None
        self.replica.apply_written([_as_written(op) for op in ops], revision)

    def choose_slot(self, limit: int) -> tuple[int, list[Any]]:
        """For an insert into a bounded model: the slot it takes and the records it evicts
        (``core.Record`` s, oldest first), as this replica sees the model now (see
        :mod:`natskv.models.bounded`). Caller's thread, under the replica's lock."""
        assert self.replica is not None and self.slots is not None and self.by_age is not None
        records = self.records
        with self.replica.lock:
            if len(records) < limit:
                free = self._free_slot(limit)
                if free is not None:
                    return free, []
            # At the limit: the oldest record goes. One that holds no slot (stored before the
            # limit, or past a lowered one) frees none, so a free slot is taken, else the slot of
            # the oldest record that holds one, which goes too.
            oldest = records[self.by_age.ordered(limit=1)[0]]
            slot = slot_of(oldest, limit)
            if slot is not None:
                return slot, [oldest]
            free = self._free_slot(limit)
            if free is not None:
                return free, [oldest]
            after = None
            while True:
                page = self.by_age.ordered(after=after, limit=256)
                for pk in page:
                    record = records[pk]
                    slot = slot_of(record, limit)
                    if slot is not None:
                        return slot, [oldest, record]
                last = records[page[-1]]
                after = self.by_age.position(last["_created_at"], page[-1])

    def _free_slot(self, limit: int) -> int | None:
        """A slot under ``limit`` that no record holds (None: all are held). Probes on from the
        last one given, so a model filling up finds each in one step."""
        taken = self.slots.get
        start = self._slot_cursor % limit
        for step in range(limit):
            slot = (start + step) % limit
            if taken(slot) is None:
                self._slot_cursor = slot + 1
                return slot
        return None

    # -- replica storage and hook (loop thread, or a writer's thread; under the replica's lock) ----

    def held(self, key: str) -> tuple[Any, int] | None:
        """The record stored under the record key ``key`` and its revision (the replica keeps no
        copy of its own: the records are its storage)."""
        pk = stored_pk(key)
        self._looked_up = (key, pk)  # apply() of the same change reads it back
        record = None if pk is None else self.records.get(pk)
        return None if record is None else (record, record.revision)

    def __len__(self) -> int:
        return len(self.records)

    def items(self) -> list[tuple[str, Any]]:
        """Every record under its record key."""
        from_json = self.model._fields[self.pk].from_json
        return [(record_key(from_json(pk)), record) for pk, record in self.records.items()]

    def apply(self, key: str, old: Any, new: Any, revision: int, reason: str = "") -> None:
        """Keep records and indexes in step with one change of a record key (``reason``: why a
        delete happened, when its writer said: ``"evicted"``).

        A value that is not a record stored under its own key (``r:i:7`` holding ``{"id": 7}``)
        is not one of the model's records: the key then holds none."""
        if type(new) is dict:
            looked_up = self._looked_up
            expected = looked_up[1] if looked_up[0] is key else stored_pk(key)
            pk = new.get(self.pk)
            if type(pk) is not type(expected) or pk != expected:
                new = None
        old_revision = self.index_set.apply(old, new, revision)
        if self.listeners:
            new = new if type(new) is dict else None
            if old is None and new is None:
                return
            if self.inherited is not None and old is None and new is not None:
                hit = self.inherited.pop(new.get(self.pk), None)
                if hit is not None:
                    if hit.revision == revision:
                        return  # reloaded as it was at the fork: not news
                    old, old_revision = hit, hit.revision
            self._tell(old, new, revision, old_revision, reason)

    def apply_entries(self, entries: list[Any], prefix_len: int, sep: str, deleted: dict[str, int]) -> int | None:
        """Apply a run of the replica's raw entries in one ``_core`` call, as :meth:`apply` would
        one by one (see ``ReplicaStorage.apply_entries``): the highest revision among them, or
        None, applying nothing, while listeners would have to hear of each change (a listener
        with an ``idle()`` that says True, such as db.on()'s with no handlers, hears nothing)."""
        if self.inherited is not None or any(not _idle(listener) for listener in self.listeners):
            return None
        top: int = self.index_set.apply_entries(entries, prefix_len, sep, orjson.loads, core.record_pk, deleted)
        return top

    def loaded(self) -> None:
        """The replica's initial values are in: after a fork's reload, the inherited records
        that did not come back were deleted meanwhile. Builds the indexes of the records loaded."""
        if self.index_set.deferred:
            # The rebuild allocates an index key per entry and frees nothing: the collector's
            # passes over that young garbage-free heap would cost about a third of it.
            with collector_paused():
                self.index_set.rebuild()
        gone, self.inherited = self.inherited, None
        if gone and self.listeners and self.replica is not None:
            for stored in gone.values():
                self._tell(stored, None, self.replica.revision, stored.revision)

    def _tell(self, old: Any, new: Any, revision: int, old_revision: int, reason: str = "") -> None:
        for listener in list(self.listeners):
            try:
                listener(old, new, revision, old_revision, reason)
            except Exception:
                log.exception("natskv: error in a model listener")


def slot_of(stored: Any, limit: int) -> int | None:
    """The slot a bounded model's stored record holds that counts under ``limit`` (None: it holds
    none; see :mod:`natskv.models.bounded`)."""
    slot = stored.get("_slot")
    return slot if type(slot) is int and 0 <= slot < limit else None


def _idle(listener: Callable[..., Any]) -> bool:
    """Whether a store listener would ignore every change now (its ``idle()``, when it has one)."""
    idle = getattr(listener, "idle", None)
    return idle is not None and bool(idle())


def _as_written(op: tuple[Any, ...]) -> tuple[str, bool, Any]:
    """A model write op as ``LocalReplica.apply_written`` takes it: ``(key, is_put, value)``, a
    delete's value its reason (``("delete", key, revision, {"reason": "evicted"})``) or None."""
    if op[0] != "delete":
        return (op[1], True, op[2])
    return (op[1], False, op[3].get("reason") if len(op) > 3 else None)


__all__ = ["RECORD", "UNIQUE", "ModelStore", "record_key", "resolve_timeout", "slot_of", "stored_pk", "unique_key"]
