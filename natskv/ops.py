"""The operations of an atomic :meth:`natskv.Bucket.commit`: ``Set``, ``Create``, ``Update``, ``Delete``.

Each is a small frozen value checked when it is built, so a malformed operation fails where it is
written, before anything is sent. The tuple forms ``commit`` has always taken map one-to-one onto
them (``("update", key, value, revision)`` is ``Update(key, value, revision)``) and are checked with
the same errors. Pure Python: any thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeAlias

from natskv.errors import InvalidArgumentError, InvalidKeyError

_REASON = re.compile(r"[a-z][a-z_]{0,31}")  # a delete's reason: one header-safe word


def check_revision(revision: Any) -> int:
    """``revision`` if it is a possible stream sequence (an int from 0 to 2**64-1)."""
    if isinstance(revision, bool) or not isinstance(revision, int) or not 0 <= revision < 2**64:
        raise InvalidArgumentError(f"revision must be an int from 0 to 2**64-1 (a stream sequence), not {revision!r}")
    return revision


def _check_key(key: Any) -> None:
    # Only the type: how a key encodes depends on the bucket's separator, checked at commit().
    if not isinstance(key, str):
        raise InvalidKeyError(f"keys are str, not {type(key).__name__} ({key!r}); convert it with str()")


def check_ttl(ttl: Any) -> None:
    """Raise InvalidArgumentError for a ``ttl=`` natskv cannot store (None passes): the same
    checks and message as every other ``ttl=``."""
    if ttl is not None:
        from natskv.wire.headers import ttl_header

        ttl_header(ttl)


@dataclass(frozen=True, slots=True)
class Set:
    """Store ``value`` under ``key`` (the tuple form ``("set", key, value)``); with ``ttl``
    (seconds), the key expires (tuple form ``("set", key, value, {"ttl": seconds})``)."""

    key: str
    value: Any
    ttl: float | None = None

    def __post_init__(self) -> None:
        _check_key(self.key)
        check_ttl(self.ttl)


@dataclass(frozen=True, slots=True)
class Create:
    """Store ``value`` only if ``key`` is absent (``("create", key, value)``); a deleted, purged or
    expired key counts as absent. ``ttl`` as for :class:`Set`."""

    key: str
    value: Any
    ttl: float | None = None

    def __post_init__(self) -> None:
        _check_key(self.key)
        check_ttl(self.ttl)


@dataclass(frozen=True, slots=True)
class Update:
    """Store ``value`` only if ``key`` is still at ``revision`` (``("update", key, value, revision)``).
    ``ttl`` as for :class:`Set`."""

    key: str
    value: Any
    revision: int
    ttl: float | None = None

    def __post_init__(self) -> None:
        _check_key(self.key)
        check_revision(self.revision)
        check_ttl(self.ttl)


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete ``key``; with ``revision``, only if it is still at that revision (``("delete", key)``
    or ``("delete", key, revision)``). ``reason`` (a short lower-case word) is stored in the delete
    marker and reaches watchers: natskv's models mark the records a bounded model evicts
    ``"evicted"`` (tuple form ``("delete", key, revision, {"reason": "evicted"})``, revision may
    be None)."""

    key: str
    revision: int | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        _check_key(self.key)
        if self.revision is not None:
            check_revision(self.revision)
        if self.reason is not None and (not isinstance(self.reason, str) or not _REASON.fullmatch(self.reason)):
            raise InvalidArgumentError(
                f"a delete's reason is a short lower-case word such as 'evicted', not {self.reason!r}"
            )


Op: TypeAlias = Set | Create | Update | Delete

# A trailing dict of options ({"ttl": seconds}) may follow the forms of set, create and update.
_TUPLE_FORMS = {
    "set": ((3, 4), "('set', key, value)"),
    "create": ((3, 4), "('create', key, value)"),
    "update": ((4, 5), "('update', key, value, revision)"),
    "delete": ((2, 3, 4), "('delete', key) or ('delete', key, revision)"),
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
    if kind == "delete":
        reason = _options(op, 3, form, "reason") if len(op) > 3 else None
        return Delete(op[1], op[2] if len(op) > 2 else None, reason)
    base = 4 if kind == "update" else 3
    ttl = _options(op, base, form)
    if kind == "set":
        return Set(op[1], op[2], ttl)
    if kind == "create":
        return Create(op[1], op[2], ttl)
    return Update(op[1], op[2], op[3], ttl)


def _options(op: Any, base: int, form: str, name: str = "ttl") -> Any:
    """Option ``name`` (``ttl``; ``reason`` for a delete) of an op tuple's trailing options dict
    (None when it has none)."""
    if len(op) == base:
        return None
    options = op[base]
    if not isinstance(options, dict) or set(options) - {name}:
        example = "{'reason': 'evicted'}" if name == "reason" else "{'ttl': 30}"
        raise InvalidArgumentError(
            f"commit operation {op!r}: after {form} only an options dict such as {example} may follow"
        )
    return options.get(name)
