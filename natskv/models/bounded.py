"""Bounded models: ``__max_records__`` keeps a model at most that many records, evicting the oldest.

How the bound holds with many writers in many processes: a bounded model has ``limit`` slots,
numbered ``0 .. limit-1``, and every record holds one. A record's slot is stored in it (the meta
field ``_slot``) and marked taken by the key ``u:_slot:<n>`` (holding the record's key), exactly as
a unique field's value is (see :mod:`natskv.models.store`), so the count can never pass the limit
on the server: each record needs a marker of its own, and there are only ``limit`` of them.

An insert, in one atomic batch:

- while the replica holds fewer than ``limit`` records, it takes a free slot: the marker is
  *created*, so two writers that pick the same slot cannot both win;
- at the limit, it evicts the oldest record (by ``_created_at``) and takes over its slot: the
  record is deleted with compare-and-set on its revision (so nobody else evicted, updated or
  deleted it meanwhile), its unique markers are freed, and its slot marker now names the new
  record. The delete marker says ``Natskv-Reason: evicted``, so every replica and watch reports
  an ``evicted`` event rather than ``deleted``.

The delete comes before the new record in the batch, so no replica ever holds more than
``limit`` records. A batch that loses a race (the slot was taken, the oldest record changed) is
not stored; the writer waits until its replica has seen the change that beat it and picks again.

A record's slot never changes while it lives; updates keep it, deletes and TTL expiry free it
(the marker expires with the record). Records stored before the model had a limit (or under a
larger one) hold no slot the bound counts: they are evicted first by age too, one per insert,
until the model is within its limit. Every call here runs on the caller's thread.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from natskv.errors import (
    InvalidArgumentError,
    KeyExistsError,
    NatsKVTimeoutError,
    RevisionMismatchError,
)
from natskv.models.group_commit import group_commit
from natskv.models.store import resolve_timeout, slot_of, unique_key

if TYPE_CHECKING:
    from natskv.models.model import Model
    from natskv.models.store import ModelStore

SLOT = "_slot"  # the meta field holding a record's slot, and the marker's name (u:_slot:<n>)
EVICTED = "evicted"  # the reason on an evicted record's delete marker
_PAUSE_MAX = 0.05  # seconds between tries at most (a lost race usually clears in a round trip)


def check_limit(model_name: str, limit: Any) -> int | None:
    """``__max_records__`` checked: a positive int, or None (no limit)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgumentError(
            f"{model_name}.__max_records__ is a positive int (the most records the model keeps) or "
            f"None, not {limit!r}"
        )
    return limit


def slot_ops(stored: Any, key: str, limit: int, options: tuple[dict[str, float], ...],
             renew: bool) -> list[tuple[Any, ...]]:
    """The writes an update of a stored record makes to its slot marker: with ``renew`` (a new
    TTL) the marker takes the record's new TTL, so it does not expire before the record."""
    slot = slot_of(stored, limit)
    if slot is None or not renew:
        return []
    return [("set", unique_key(SLOT, slot), key, *options)]


def insert(model: type[Model], stored: dict[str, Any], ops: list[tuple[Any, ...]],
           options: tuple[dict[str, float], ...], timeout: float | None) -> int:
    """Store a new record of a bounded model: ``ops`` are its writes (unique markers, then the
    record, whose value is ``stored``), ``options`` its TTL option. Takes a slot for it, evicting
    the oldest record at the limit (see the module docstring); returns the record's revision.
    Raises UniqueConstraintError as an unbounded insert would, and NatsKVTimeoutError when other
    writers kept winning the race for ``timeout`` seconds."""
    store = model._require_store()
    limit = model.__max_records__
    assert limit is not None and store.replica is not None
    seconds = resolve_timeout(store.client, timeout)
    deadline = None if seconds is None else time.monotonic() + seconds
    key = ops[-1][1]
    pause = 0.001
    while True:
        slot, victims = store.choose_slot(limit)
        stored[SLOT] = slot  # the record's value in ops[-1] is this dict
        batch, victim_keys = _evictions(model, victims, slot, limit, ops)
        marker = unique_key(SLOT, slot)
        taken_over = any(slot_of(v, limit) == slot for v in victims)
        batch.append(("set" if taken_over else "create", marker, key, *options))
        batch.extend(ops)
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise NatsKVTimeoutError(
                f"{model.__name__}.create: other writers kept taking the slots of this bounded model "
                f"for {seconds} s; retry the create"
            )
        try:
            revision = group_commit(store, store.bucket).commit(batch, left)
        except KeyExistsError as exc:
            if exc.key != marker:
                raise model._unique_error(exc.key) from exc
            beaten_at = exc.current_revision  # the slot was taken (its record comes after it)
        except RevisionMismatchError as exc:
            if exc.key not in victim_keys:
                raise
            beaten_at = exc.current_revision  # the oldest record changed: evicted, updated, deleted
        else:
            store.written(batch, revision)
            return revision
        _catch_up(store, beaten_at, deadline)
        time.sleep(pause * (0.5 + random.random()))  # noqa: S311  # jitter, not secrets
        pause = min(pause * 2, _PAUSE_MAX)


def _evictions(model: type[Model], victims: list[Any], slot: int, limit: int,
               ops: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], set[str]]:
    """The writes that evict ``victims`` (records, oldest first) for a new record taking ``slot``
    (a record's delete, marked ``evicted``; the slot it held is set to the new record, not
    deleted), and the victims' record keys. UniqueConstraintError when the new record's writes
    (``ops``) meet a victim's, as they would meet any stored record's."""
    out: list[tuple[Any, ...]] = []
    keys = set()
    for victim in victims:
        evict = model._delete_ops(victim, victim.revision, EVICTED)
        if slot_of(victim, limit) == slot:
            evict.remove(("delete", unique_key(SLOT, slot)))
        keys.add(evict[-1][1])
        out.extend(evict)
    evicted = {op[1] for op in out}
    for op in ops:
        if op[1] in evicted:  # the new record has a unique value (or the key) of a live record
            raise model._unique_error(op[1])
    return out, keys


def _catch_up(store: ModelStore, revision: int | None, deadline: float | None) -> None:
    """Wait (a second at most) until the replica has seen the change at ``revision`` that beat
    this writer, so the next pick sees it."""
    assert store.replica is not None
    if not revision:
        return
    left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
    if left > 0:
        try:
            store.replica.wait_for(revision, left)
        except NatsKVTimeoutError:
            pass  # the pick will lose again and wait again, until the deadline


def not_in_transaction(model: type[Model]) -> None:
    """A transaction cannot create records of a bounded model (see Transaction.save)."""
    raise InvalidArgumentError(
        f"{model.__name__} has __max_records__: its records are created with Model.create or save(), "
        "which take a slot and evict the oldest record; a transaction cannot create them"
    )


__all__ = ["EVICTED", "SLOT", "check_limit", "insert", "not_in_transaction", "slot_ops"]
