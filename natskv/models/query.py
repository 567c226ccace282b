"""The query language of models: lookups, ``where=`` dicts, filters and orderings.

Django-style keyword lookups (``age__gte=18``) and ``where=`` dicts (``{"age": {"$gte": 18}}``)
compile to one ``where`` dict over the records' stored (JSON) form, and that to a ``_core``
filter; ``order_by`` parses to ``[(field, descending)]`` with a total order over stored values.
Pure functions, no I/O, any thread. How a query is answered (which index, in what order) is
:mod:`natskv.models.planner`'s business.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping
from operator import itemgetter
from typing import Any

from natskv._speedups import core
from natskv.codec import non_finite_path
from natskv.errors import InvalidArgumentError
from natskv.models.fields import Field

LOOKUPS = {
    "exact": "$eq", "ne": "$ne", "gt": "$gt", "gte": "$gte", "lt": "$lt", "lte": "$lte",
    "in": "$in", "nin": "$nin", "contains": "$contains", "startswith": "$startswith",
    "endswith": "$endswith", "regex": "$regex",
}


def _json_operand(field: Field | None, op: str, value: Any) -> Any:
    """A filter operand in the stored form (datetimes as ISO strings, UUIDs as str ...)."""
    if field is None or value is None:
        return value
    if op in ("$in", "$nin"):
        return [field.to_json(field.coerce(v)) if v is not None else None for v in value]
    if op in ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte"):
        try:
            return field.to_json(field.coerce(value))
        except InvalidArgumentError:
            return value  # compared as given: a wrong type simply matches nothing
    return value


def compile_where(
    fields: Mapping[str, Field], where: Mapping[str, Any] | None, lookups: Mapping[str, Any]
) -> dict[str, Any]:
    """One ``where`` dict from a ``where=`` mapping and keyword lookups (ANDed).

    Lookups on the same field merge into one operator dict (``age__gte=1, age__lt=9`` becomes
    ``{"age": {"$gte": 1, "$lt": 9}}``), so the planner sees one range, not two half-open ones.
    """
    if where is not None and not isinstance(where, Mapping):
        raise InvalidArgumentError(
            f"where= takes a dict such as {{'age': {{'$gte': 18}}}}, not {type(where).__name__} ({where!r})"
        )
    for non_finite in (non_finite_path(dict(where or {}), "where"),
                       *(non_finite_path(value, f"{name}=") for name, value in lookups.items())):
        if non_finite is not None:
            raise InvalidArgumentError(
                f"{non_finite[0]} is {non_finite[1]!r}: no stored value can equal or compare to it"
            )
    clauses: list[dict[str, Any]] = []
    merged: dict[str, dict[str, Any]] = {}
    if where:
        clauses.append(_to_json_form(fields, dict(where)))
    for name, value in lookups.items():
        # Field names never contain "__" (check_schema refuses them), so the last "__" splits.
        field_name, sep, lookup = name.rpartition("__")
        if not sep:
            field_name, lookup = name, "exact"
        field = fields.get(field_name)
        if lookup == "isnull":
            clauses.append({field_name: {"$eq": None} if value else {"$ne": None}})
        elif lookup == "icontains":
            if not isinstance(value, str):
                raise InvalidArgumentError(f"{name}= needs a string, not {value!r}")
            clauses.append({field_name: {"$regex": "(?i)" + re.escape(value)}})
        elif lookup in LOOKUPS:
            op = LOOKUPS[lookup]
            ops = merged.setdefault(field_name, {})
            if op in ops:  # the same operator twice on one field: keep both, ANDed
                clauses.append({field_name: {op: _json_operand(field, op, value)}})
            else:
                ops[op] = _json_operand(field, op, value)
        else:
            raise InvalidArgumentError(
                f"unknown lookup {name!r}: use one of {', '.join(sorted([*LOOKUPS, 'isnull', 'icontains']))}"
            )
    if merged:
        clauses.insert(0, merged)
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _to_json_form(fields: Mapping[str, Field], where: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, cond in where.items():
        if key in ("$and", "$or"):
            out[key] = [_to_json_form(fields, c) for c in cond] if isinstance(cond, list) else cond
        elif key == "$not":
            out[key] = _to_json_form(fields, cond) if isinstance(cond, dict) else cond
        elif isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            field = fields.get(key)
            out[key] = {op: _json_operand(field, op, v) for op, v in cond.items()}
        else:
            out[key] = _json_operand(fields.get(key), "$eq", cond)
    return out


def compile_filter(where: dict[str, Any]) -> Any:
    """The ``_core`` filter of a compiled ``where`` dict (InvalidArgumentError for a bad query)."""
    try:
        return core.compile_filter(where)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"invalid query: {exc}") from exc


def order_key(value: Any) -> tuple[Any, ...]:
    """A total order over stored values for sorting: numbers, then strings, then others; null last."""
    if value is None:
        return (4,)
    if isinstance(value, bool):
        return (0, value)
    if isinstance(value, (int, float)):
        return (1, value)
    if isinstance(value, str):
        return (2, value)
    return (3, repr(value))


def parse_order_by(
    order_by: str | list[str] | tuple[str, ...] | None, fields: Mapping[str, Any]
) -> list[tuple[str, bool]]:
    """``"-age"`` or ``["role", "-age"]`` -> [(field, descending)]."""
    if order_by is None:
        return []
    items = [order_by] if isinstance(order_by, str) else list(order_by)
    out = []
    for item in items:
        if not isinstance(item, str) or not item.lstrip("-"):
            raise InvalidArgumentError(f"order_by takes field names, optionally with '-', not {item!r}")
        name = item.lstrip("-")
        if name not in fields and name not in ("_version", "_created_at", "_updated_at"):
            raise InvalidArgumentError(f"cannot order by unknown field {name!r}")
        out.append((name, item.startswith("-")))
    return out


def sort_records(pairs: list[Any], order: list[tuple[str, bool]], pk: str) -> list[Any]:
    """Stable multi-key sort of stored records (mappings of the stored form: ``_core.Record`` s).

    Records without a value (null or missing) come after the others in both directions; among
    the others ``"-age"`` is exactly the reverse of ``"age"``, the order an index walks in (see
    ``Model.paginate``). Ties are broken by primary key, in the direction of the last order field.
    """
    reverse = bool(order) and order[-1][1]
    try:  # one primary key type per model: compared directly, the fast way
        pairs = sorted(pairs, key=lambda p: p[pk], reverse=reverse)
    except (KeyError, TypeError):  # records written by other clients: the total order instead
        pairs = sorted(pairs, key=lambda p: order_key(p.get(pk)), reverse=reverse)
    for name, descending in reversed(order):
        if descending:  # reversed, nulls (False) after the values (True)
            pairs.sort(key=lambda p: _valued_key(p.get(name)), reverse=True)
        else:  # order_key puts nulls last already
            pairs.sort(key=lambda p: order_key(p.get(name)))
    return pairs


def first_records(pairs: list[Any], order: list[tuple[str, bool]], pk: str, count: int) -> list[Any]:
    """The first ``count`` pairs of ``sort_records(pairs, order, pk)``, without sorting them all
    when there is one order field: a heap keeps the best ``count`` (n log count, not n log n)."""
    if len(order) != 1 or count * 4 >= len(pairs):
        return sort_records(pairs, order, pk)[:count]
    ((name, descending),) = order
    plain = _first_plain(pairs, name, pk, count, descending)
    if plain is not None:
        return plain
    # The same order as sort_records: ties by primary key in the field's direction, nulls last.
    if not descending:
        return heapq.nsmallest(count, pairs, key=lambda p: (order_key(p.get(name)), order_key(p.get(pk))))
    return heapq.nlargest(count, pairs, key=lambda p: (_valued_key(p.get(name)), order_key(p.get(pk))))


_NUMBERS = frozenset((int, float))
_STRS = frozenset((str,))
_VALUE, _PK = itemgetter(0), itemgetter(1)


def _one_kind(kinds: set[type]) -> bool:
    """Whether values of these types are all numbers (bools apart) or all str: then they compare
    as order_key orders them, directly."""
    return kinds <= _NUMBERS or kinds <= _STRS


def _first_plain(pairs: list[Any], name: str, pk: str, count: int, descending: bool) -> list[Any] | None:
    """first_records for one order field whose values are of one kind (numbers or str, nulls
    aside) and primary keys of one kind: the heap compares plain ``(value, pk, i)`` tuples, no
    key function per record (several times less work). None when the values are mixed."""
    rows = [(record.get(name), record.get(pk), i) for i, record in enumerate(pairs)]
    kinds = set(map(type, map(_VALUE, rows)))
    nulls: list[tuple[Any, Any, int]] = []
    if type(None) in kinds:
        kinds.discard(type(None))
        nulls = [row for row in rows if row[0] is None]
        rows = [row for row in rows if row[0] is not None]
    if not _one_kind(kinds) or not _one_kind(set(map(type, map(_PK, rows))) | set(map(type, map(_PK, nulls)))):
        return None
    best = heapq.nlargest(count, rows) if descending else heapq.nsmallest(count, rows)
    if len(best) < count and nulls:  # nulls last, by primary key in the order's direction
        nulls.sort(key=_PK, reverse=descending)
        best += nulls[: count - len(best)]
    return [pairs[row[2]] for row in best]


def _valued_key(value: Any) -> tuple[bool, tuple[Any, ...]]:
    return value is not None, order_key(value)


def follows(record: Mapping[str, Any], mark: tuple[Any, Any], field: str, pk: str, descending: bool) -> bool:
    """Whether ``record`` sorts after the cursor ``mark`` (a sort value and a primary key) in
    the order :func:`sort_records` gives by ``field``."""
    at = (order_key(mark[0]), order_key(mark[1]))
    if not descending:
        return position(record, field, pk) > at
    null, mark_null = record.get(field) is None, mark[0] is None
    if null != mark_null:  # nulls come after the values, descending too
        return null
    return position(record, field, pk) < at


def position(record: Mapping[str, Any], field: str, pk: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Where a record sorts when ordered by ``field`` (ties by primary key): comparable tuples."""
    return order_key(record.get(field)), order_key(record.get(pk))
