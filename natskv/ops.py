"""The operations of an atomic :meth:`natskv.Bucket.commit`: ``Set``, ``Create``, ``Update``, ``Delete``.

Each is a small frozen value checked when it is built, so a malformed operation fails where it is
written, before anything is sent. The tuple forms ``commit`` has always taken map one-to-one onto
them (``("update", key, value, revision)`` is ``Update(key, value, revision)``) and are checked with
the same errors. Pure Python: any thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from natskv.errors import InvalidArgumentError, InvalidKeyError


def check_revision(revision: Any) -> int:
    """``revision`` if it is a possible stream sequence (an int from 0 to 2**64-1)."""
    if isinstance(revision, bool) or not isinstance(revision, int) or not 0 <= revision < 2**64:
        raise InvalidArgumentError(f"revision must be an int from 0 to 2**64-1 (a stream sequence), not {revision!r}")
    return revision


def _check_key(key: Any) -> None:
    # Only the type: how a key encodes depends on the bucket's separator, checked at commit().
    if not isinstance(key, str):
        raise InvalidKeyError(f"keys are str, not {type(key).__name__} ({key!r}); convert it with str()")


@dataclass(frozen=True, slots=True)
class Set:
    """Store ``value`` under ``key`` (the tuple form ``("set", key, value)``)."""

    key: str
    value: Any

    def __post_init__(self) -> None:
        _check_key(self.key)


@dataclass(frozen=True, slots=True)
class Create:
    """Store ``value`` only if ``key`` is absent (``("create", key, value)``); a deleted, purged or
    expired key counts as absent."""

    key: str
    value: Any

    def __post_init__(self) -> None:
        _check_key(self.key)


@dataclass(frozen=True, slots=True)
class Update:
    """Store ``value`` only if ``key`` is still at ``revision`` (``("update", key, value, revision)``)."""

    key: str
    value: Any
    revision: int

    def __post_init__(self) -> None:
        _check_key(self.key)
        check_revision(self.revision)


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete ``key``; with ``revision``, only if it is still at that revision (``("delete", key)``
    or ``("delete", key, revision)``)."""

    key: str
    revision: int | None = None

    def __post_init__(self) -> None:
        _check_key(self.key)
        if self.revision is not None:
            check_revision(self.revision)


Op: TypeAlias = Set | Create | Update | Delete

_TUPLE_FORMS = {
    "set": ((3,), "('set', key, value)"),
    "create": ((3,), "('create', key, value)"),
    "update": ((4,), "('update', key, value, revision)"),
    "delete": ((2, 3), "('delete', key) or ('delete', key, revision)"),
}


def as_op(op: Any) -> Op:
    """``op`` as an operation object: one already, or a tuple (or list) of a known form."""
    if isinstance(op, (Set, Create, Update, Delete)):
        return op
    if not isinstance(op, (tuple, list)) or not op or not isinstance(op[0], str) or op[0] not in _TUPLE_FORMS:
        raise InvalidArgumentError(
            f"unknown commit operation {op!r}; use natskv.Set, Create, Update or Delete, or a tuple "
            f"{', '.join(form for _, form in _TUPLE_FORMS.values())}"
        )
    sizes, form = _TUPLE_FORMS[op[0]]
    if len(op) not in sizes:
        raise InvalidArgumentError(f"commit operation {op!r} has {len(op)} items; write it as {form}")
    kind = op[0]
    if kind == "set":
        return Set(op[1], op[2])
    if kind == "create":
        return Create(op[1], op[2])
    if kind == "update":
        return Update(op[1], op[2], op[3])
    return Delete(op[1], op[2] if len(op) > 2 else None)
