"""Queries over a model's in-memory replica: lookups, the plan, ordering.

Django-style keyword lookups (``age__gte=18``) and ``where=`` dicts (``{"age": {"$gte": 18}}``)
compile to one ``where`` dict over the records' stored (JSON) form. The planner picks the most
selective indexed condition to produce candidate primary keys; the compiled ``_core`` filter then
checks every condition on each candidate (or on every record when no index applies).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
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
_RANGE_OPS = ("$gt", "$gte", "$lt", "$lte")


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


def compile_where(fields: Mapping[str, Field], where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> dict[str, Any]:
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
            raise InvalidArgumentError(f"{non_finite[0]} is {non_finite[1]!r}: no stored value can equal or compare to it")
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
    try:
        return core.compile_filter(where)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"invalid query: {exc}") from exc


def single_equality(where: dict[str, Any]) -> tuple[str, Any] | None:
    """``(field, value)`` when the whole query is one equality on a str or int value."""
    if len(where) != 1:
        return None
    name, cond = next(iter(where.items()))
    if name.startswith("$"):
        return None
    if isinstance(cond, dict):
        if len(cond) != 1 or "$eq" not in cond:
            return None
        cond = cond["$eq"]
    return (name, cond) if type(cond) in (str, int) else None


def candidate_pks(where: dict[str, Any], indexes: Mapping[str, Any], at_most: int | None = None) -> list[Any] | None:
    """Primary keys that may match, from the most selective indexed top-level condition.

    None means "no index applies: scan every record" (with ``at_most``, also "no index narrows
    it to ``at_most`` keys or fewer"). The caller still checks the whole filter.
    """
    # Estimate each usable condition cheaply, then build only the smallest candidate list
    # (ranges and prefixes have no cheap estimate: they are read last, capped by the best).
    ranked: list[tuple[float, str, Any]] = []
    for name, cond in _top_conditions(where):
        index = indexes.get(name)
        if index is not None:
            estimate = _estimate(index, cond)
            if estimate is not None:
                ranked.append((estimate, name, cond))
    ranked.sort(key=lambda r: r[0])
    best: list[Any] | None = None
    for estimate, name, cond in ranked:
        if best is not None and estimate >= len(best):
            break
        if at_most is not None and estimate != math.inf and estimate > at_most:
            break  # ranked: the others select as many or more
        cap = len(best) + 1 if best is not None else None if at_most is None else at_most + 1
        pks = _lookup(indexes[name], cond, cap)
        if pks is not None and (best is None or len(pks) < len(best)):
            best = pks
            if not best:
                break
    if at_most is not None and best is not None and len(best) > at_most:
        return None
    return best


def _top_conditions(where: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (field, condition) pairs every match must satisfy: top level and top-level $and."""
    conditions: list[tuple[str, Any]] = []
    for key, cond in where.items():
        if key == "$and" and isinstance(cond, list):
            for sub in cond:
                if isinstance(sub, dict):
                    conditions.extend((k, v) for k, v in sub.items() if not k.startswith("$"))
        elif not key.startswith("$"):
            conditions.append((key, cond))
    return conditions


def _is_operators(cond: Any) -> bool:
    return isinstance(cond, dict) and bool(cond) and all(isinstance(k, str) and k.startswith("$") for k in cond)


_BOUND_TYPES = (bool, int, float, str)


def _range_bounds(cond: dict[str, Any]) -> tuple[Any, bool, Any, bool] | None:
    """``(lo, lo_inclusive, hi, hi_inclusive)`` holding every value a condition's $gt/$gte/$lt/$lte
    allow (None: an open side), or None when they cannot bound an index scan."""
    def tighter(a: str, b: str, pick_max: bool) -> tuple[Any, bool] | None:
        if a not in cond and b not in cond:
            return None, True
        # Any JSON values, None too: a comparison they do not support is caught below.
        strict: Any = cond.get(a)
        loose: Any = cond.get(b)
        for value in (strict, loose):
            if value is not None and not isinstance(value, _BOUND_TYPES):
                return None
        if a not in cond:
            return loose, True
        if b not in cond:
            return strict, False
        try:  # both: the tighter one (on a tie the strict one)
            strict_wins = strict >= loose if pick_max else strict <= loose
        except TypeError:
            return None
        return (strict, False) if strict_wins else (loose, True)

    low = tighter("$gt", "$gte", True)
    high = tighter("$lt", "$lte", False)
    if low is None or high is None:
        return None
    return low[0], low[1], high[0], high[1]


def _estimate(index: Any, cond: Any) -> float | None:
    """How many keys a condition selects (inf: unknown but usable; None: the index cannot help)."""
    if not _is_operators(cond):
        return None if cond is None else index.count_eq(cond)
    if "$eq" in cond and cond["$eq"] is not None:
        return index.count_eq(cond["$eq"])
    if "$in" in cond and isinstance(cond["$in"], list) and None not in cond["$in"]:
        return sum(index.count_eq(v) for v in cond["$in"])
    if ("$startswith" in cond and isinstance(cond["$startswith"], str)) or any(op in cond for op in _RANGE_OPS):
        return math.inf
    return None


def _lookup(index: Any, cond: Any, cap: int | None) -> list[Any] | None:
    if not _is_operators(cond):
        return None if cond is None else index.eq(cond)
    if "$eq" in cond and cond["$eq"] is not None:
        return index.eq(cond["$eq"])
    if "$in" in cond and isinstance(cond["$in"], list) and None not in cond["$in"]:
        return index.in_(cond["$in"])
    if "$startswith" in cond and isinstance(cond["$startswith"], str):
        return index.prefix(cond["$startswith"], limit=cap)
    if any(op in cond for op in _RANGE_OPS):
        bounds = _range_bounds(cond)
        if bounds is None:
            return None
        lo, lo_inclusive, hi, hi_inclusive = bounds
        return index.range(lo, hi, lo_inclusive=lo_inclusive, hi_inclusive=hi_inclusive, limit=cap)
    return None


def ordered_scan(where: dict[str, Any], field: str, index: Any, reverse: bool) -> tuple[Callable[[Any, int], list[Any]], bool]:
    """A scan of ``index`` (the order field's) in order from a cursor: ``scan(after, limit)``.

    When the query bounds ``field`` (an equality, a range or a prefix that every match must
    satisfy), the scan covers only those values, and the second item is True: no record
    outside the index (null, unindexable) can match.
    """
    for name, cond in _top_conditions(where):
        if name != field:
            continue
        if not _is_operators(cond):
            cond = {"$eq": cond}
        if isinstance(cond.get("$eq"), _BOUND_TYPES):
            value = cond["$eq"]
            return (lambda after, n: index.range(value, value, reverse=reverse, limit=n, after=after)), True
        if isinstance(cond.get("$startswith"), str):
            prefix = cond["$startswith"]
            return (lambda after, n: index.prefix(prefix, limit=n, reverse=reverse, after=after)), True
        bounds = _range_bounds(cond) if any(op in cond for op in _RANGE_OPS) else None
        if bounds is not None:
            lo, lo_inc, hi, hi_inc = bounds
            return (lambda after, n: index.range(lo, hi, lo_inclusive=lo_inc, hi_inclusive=hi_inc, reverse=reverse,
                                                 limit=n, after=after)), True
    return (lambda after, n: index.ordered(reverse=reverse, after=after, limit=n)), False


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


def parse_order_by(order_by: str | list[str] | tuple[str, ...] | None, fields: Mapping[str, Any]) -> list[tuple[str, bool]]:
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


def sort_records(pairs: list[tuple[dict[str, Any], int]], order: list[tuple[str, bool]], pk: str) -> list[tuple[dict[str, Any], int]]:
    """Stable multi-key sort of (stored record, revision) pairs.

    Records without a value (null or missing) come after the others in both directions; among
    the others ``"-age"`` is exactly the reverse of ``"age"``, the order an index walks in (see
    ``Model.paginate``). Ties are broken by primary key, in the direction of the last order field.
    """
    reverse = bool(order) and order[-1][1]
    try:  # one primary key type per model: compared directly, the fast way
        pairs = sorted(pairs, key=lambda p: p[0][pk], reverse=reverse)
    except (KeyError, TypeError):  # records written by other clients: the total order instead
        pairs = sorted(pairs, key=lambda p: order_key(p[0].get(pk)), reverse=reverse)
    for name, descending in reversed(order):
        if descending:  # reversed, nulls (False) after the values (True)
            pairs.sort(key=lambda p: _valued_key(p[0].get(name)), reverse=True)
        else:  # order_key puts nulls last already
            pairs.sort(key=lambda p: order_key(p[0].get(name)))
    return pairs


def _valued_key(value: Any) -> tuple[bool, tuple[Any, ...]]:
    return value is not None, order_key(value)


def follows(record: dict[str, Any], mark: tuple[Any, Any], field: str, pk: str, descending: bool) -> bool:
    """Whether ``record`` sorts after the cursor ``mark`` (a sort value and a primary key) in
    the order :func:`sort_records` gives by ``field``."""
    at = (order_key(mark[0]), order_key(mark[1]))
    if not descending:
        return position(record, field, pk) > at
    null, mark_null = record.get(field) is None, mark[0] is None
    if null != mark_null:  # nulls come after the values, descending too
        return null
    return position(record, field, pk) < at


def position(record: dict[str, Any], field: str, pk: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Where a record sorts when ordered by ``field`` (ties by primary key): comparable tuples."""
    return order_key(record.get(field)), order_key(record.get(pk))
