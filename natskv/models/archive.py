"""A model's records as a backup file, back, and away: ``Model.backup``, ``Model.restore`` and
``Model.truncate``.

A model backup is a bucket backup (:mod:`natskv.backup`) of the record keys (``r:*``) whose first
line also names the model and its fields. Unique markers and counters are not in the file: they
follow from the records, and :func:`restore` makes them again. It writes each record together with
its unique markers, in atomic batches, and moves every autoincrement counter past the largest
value restored. Before writing anything it reads the whole file and checks it. It also checks
that no unique value is claimed twice, whether within the file or by a record already in the
model that the file does not replace. A failed check raises an error naming the record, and
nothing is written. Both directions read and write a page at a time; the check holds
the record keys and unique values of the file (to find clashes), never its lines.

Everything here blocks the caller's thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from natskv import backup as bucket_backup
from natskv.errors import BackupError, InvalidArgumentError, UniqueConstraintError
from natskv.models.store import RECORD, UNIQUE, record_key, stored_pk, unique_key

if TYPE_CHECKING:
    from natskv.models.model import Model

Progress = Callable[[int, "int | None"], None]
MAX_OPS = 1000  # writes in one atomic batch (the server's limit)


def backup(model: type[Model], path: str | os.PathLike[str], *, progress: Progress | None = None,
           timeout: float | None = None) -> int:
    """Write every record of ``model`` to ``path``; the number written. Streams like
    :func:`natskv.backup.backup`: constant memory, and a record saved or deleted while it runs
    is in the file once, with its latest value, or not at all."""
    store = model._require_store()
    about = {"name": model.__name__, "pk": model._pk,
             "fields": {name: field.type.__name__ for name, field in model._fields.items()}}
    return bucket_backup.backup(store.bucket, path, f"{RECORD}:*", progress=progress, timeout=timeout,
                                extra={"model": about})


def restore(model: type[Model], path: str | os.PathLike[str], *, clear: bool = False,
            progress: Progress | None = None, timeout: float | None = None) -> int:
    """Write the records of the model backup ``path`` into ``model``, with their unique markers,
    and move its autoincrement counters past them; the number written (see the module)."""
    model._require_store()
    header = bucket_backup.read_header(path)
    if not isinstance(header.get("model"), dict):
        raise BackupError(f"{path} is a bucket backup, not a model backup: restore it with Bucket.restore()")
    unique = [name for name, field in model._fields.items() if field.unique]
    counted = [name for name, field in model._fields.items() if field.generated == "autoincrement"]
    limit = model.__max_records__
    if limit is not None and not clear and model.count() > 0:
        raise InvalidArgumentError(
            f"{model.__name__} has __max_records__ = {limit}: restore into it with clear=True (or while it is "
            "empty), so the records restored take its slots; nothing was written"
        )
    total, highest = _check(model, path, unique, counted, clear)
    if limit is not None and total > limit:
        raise BackupError(
            f"{path} holds {total} records, more than {model.__name__}.__max_records__ = {limit}; nothing was "
            "written"
        )
    if clear:
        truncate(model, timeout=timeout)
    written = 0
    ops: list[tuple[Any, ...]] = []
    for record in bucket_backup.records(path):
        stored = record["value"]
        key = record["key"]
        options: tuple[dict[str, float], ...] = ()
        if record.get("ttl") is not None:
            options = ({"ttl": max(1.0, float(record["ttl"]))},)
        markers = [("set", unique_key(name, stored[name]), key, *options)
                   for name in unique if stored.get(name) is not None]
        if limit is not None:  # a bounded model: the records take slots 0 .. n-1 in the file's order
            stored["_slot"] = written
            markers.append(("set", unique_key("_slot", written), key, *options))
        if len(ops) + len(markers) + 1 > MAX_OPS:
            _commit(model, ops, timeout)
            ops = []
            if progress is not None:
                progress(written, total)
        ops.extend(markers)
        ops.append(("set", key, stored, *options))
        written += 1
    if ops:
        _commit(model, ops, timeout)
    for name, value in highest.items():
        _raise_counter(model, name, value, timeout)
    if progress is not None:
        progress(written, total)
    return written


def _check(model: type[Model], path: str | os.PathLike[str], unique: list[str], counted: list[str],
           clear: bool) -> tuple[int, dict[str, int]]:
    """Read the whole file: every line a record of this model; no unique value taken twice (in
    the file, or by a record of the model the file does not replace unless ``clear``). Returns
    the number of records and the largest autoincrement values."""
    store = model._require_store()
    taken: dict[tuple[str, Any], str] = {}
    highest: dict[str, int] = {}
    total = 0
    in_file: set[str] = set()
    for record in bucket_backup.records(path):
        key, stored = record["key"], record.get("value")
        if not isinstance(stored, dict) or not key.startswith(f"{RECORD}:") or stored_pk(key) is None:
            raise BackupError(f"{path}: {key!r} is not a record of {model.__name__} (a record key holding a JSON "
                              "object); nothing was written")
        if record_key(model._fields[model._pk].from_json(stored.get(model._pk))) != key:
            raise BackupError(f"{path}: the record under {key!r} has {model._pk}={stored.get(model._pk)!r}, which "
                              "belongs under another key; nothing was written")
        in_file.add(key)
        total += 1
        for name in unique:
            value = stored.get(name)
            if value is not None:
                holder = taken.setdefault((name, _value_key(value)), key)
                if holder != key:
                    raise UniqueConstraintError(model.__name__, name, value)
        for name in counted:
            value = stored.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                highest[name] = max(highest.get(name, value), value)
    if not clear and unique:
        with store.replica.lock if store.replica is not None else contextlib.nullcontext():
            held = list(store.records.items())
        for pk, current in held:  # current: a core.Record, the mapping of the stored form
            key = record_key(model._fields[model._pk].from_json(pk))
            if key in in_file:
                continue  # replaced by the restore
            for name in unique:
                value = current.get(name)
                if value is not None and (name, _value_key(value)) in taken:
                    raise UniqueConstraintError(model.__name__, name, value)
    return total, highest


def _value_key(value: Any) -> str:
    """A stored value as a hashable key (the JSON text unique markers use)."""
    return unique_key("", value)


def _commit(model: type[Model], ops: list[tuple[Any, ...]], timeout: float | None) -> None:
    store = model._require_store()
    revision = store.bucket.commit(ops, timeout=timeout)
    store.written(ops, revision)


def _raise_counter(model: type[Model], field: str, value: int, timeout: float | None) -> None:
    """Move the autoincrement counter of ``field`` to at least ``value``."""
    store = model._require_store()
    client, name = store.client, store.bucket.name
    current = client._counter_value(name, field, timeout)
    if value > current:
        client._next_counter(name, field, timeout, value - current)


def truncate(model: type[Model], *, timeout: float | None = None) -> int:
    """Remove every record of ``model``, its unique markers and its autoincrement counters; the
    number of records removed. Replicas and watches see each record deleted. A record created
    while this runs may survive it."""
    store = model._require_store()
    bucket = store.bucket
    records = bucket.keys(f"{RECORD}:*", timeout=timeout)
    markers = bucket.keys(f"{UNIQUE}:*", timeout=timeout)
    last = 0
    keys = markers + records  # markers first: a record is never left pointing nowhere
    for start in range(0, len(keys), MAX_OPS):
        last = max(last, *bucket._delete_many(keys[start : start + MAX_OPS], timeout))
    for name, field in model._fields.items():
        if field.generated == "autoincrement":
            store.client._reset_counter(bucket.name, name, timeout)
    if records and store.replica is not None:
        store.replica.wait_for(last, timeout)
    return len(records)
