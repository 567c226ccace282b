"""The query planner: every query of a model's records is planned and run here.

:class:`Planner` (one per registered model, ``store.planner``) answers the read calls of
:class:`~natskv.models.model.Model` with stored records (``_core.Record`` s), which the model turns
into instances. Its entry points, one per kind of read:

- :meth:`Planner.find` -- matches in order, ``offset`` / ``limit`` applied (``find``, ``first``,
  ``last``, live queries, transactions);
- :meth:`Planner.find_one`, :meth:`Planner.count`, :meth:`Planner.select` (unordered: ``exists``,
  aggregates), :meth:`Planner.page` (``paginate``: a page and its next cursor),
  :meth:`Planner.for_update` (``update`` / ``destroy``: the matches and the filter to re-check one).

Each entry point takes the read options (``consistency``, ``timeout``) out of the lookups once,
with :func:`split_read_options`; ``Model.get`` parses its own with :func:`read_options`.

How a query is answered, first rule that applies:

1. ``consistency="server"``: every record is read from the server (one batch read) and filtered
   here; no index.
2. Equalities on indexed str/int fields only (``find_one(email=...)``, the commonest query): probe
   the index (a unique one at once, else the rarest value), compare the other fields directly.
   No filter is compiled. A compiled query that is one such equality goes this way too.
3. One indexed order field with a limit (``find(order_by=, limit=)``, every ``paginate``): walk
   that index in order from the cursor, filtering on the way, unless another index narrows the
   selection to so few records that sorting them is cheaper (:func:`_sort_threshold`: about
   ``sqrt(limit * records)``).
4. A limit and no order (``find(limit=)``, ``find_one``, ``exists``): walk the index of the most
   selective indexed condition over the values it allows (none: the primary key index), filtering
   on the way, and stop at the limit. The matches come in that index's order, which the caller
   did not ask for: as in SQL without ORDER BY, which matches a limit returns is the planner's
   choice. The work follows the limit, not the number of matches.
5. Otherwise the most selective indexed top-level condition gives candidate primary keys (with
   none, every record), the compiled ``_core`` filter checks them, and the result is sorted.

Queries compile (``query.compile_where`` / ``compile_filter``) once per distinct text into a
:class:`Plan`, which also holds what the rules above ask of the query's shape (its indexed
equality, the conditions an index can walk); the plan cache holds the last 512. When a query is
one condition whose index walk yields exactly its matches (an equality to a str or a number, a
str prefix, a range with bounds of one kind), rules 3 to 5 take the walked records as they are,
without the filter. Runs on the caller's thread; indexes and records are read under the
replica's lock, which the loop thread takes to apply changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import orjson

from natskv._runner import check_timeout
from natskv._speedups import core
from natskv.errors import InvalidArgumentError
from natskv.models import query

if TYPE_CHECKING:
    from natskv.models.store import ModelStore

Pair = Any
"""A stored record: a ``_core.Record``, which reads as a mapping of the stored form and carries
its revision (``record.revision``)."""

_CACHE_MAX = 512
_RANGE_OPS = frozenset(("$gt", "$gte", "$lt", "$lte"))


# -- read options --------------------------------------------------------------------------------


class SecondaryIndex(Protocol):
    """What the planner asks of a ``_core`` index (``SortedIndex`` / ``UniqueIndex``): primary
    keys by value, and how many there are."""

    def count_eq(self, value: Any) -> int: ...
    def eq(self, value: Any) -> list[Any]: ...
    def in_(self, values: Iterable[Any]) -> list[Any]: ...
    def prefix(self, p: str, limit: int | None = None) -> list[Any]: ...
    def range(self, lo: Any, hi: Any, *, lo_inclusive: bool = True, hi_inclusive: bool = True,
              limit: int | None = None) -> list[Any]: ...


class ReadOptions(NamedTuple):
    """How to read: from this client's replica, or from the server within ``timeout``."""

    server: bool
    timeout: float | None


REPLICA = ReadOptions(False, None)


def read_options(consistency: Any = "replica", timeout: Any = None) -> ReadOptions:
    """Parse the read options of a read call: ``consistency`` is ``"replica"`` (this client's
    in-memory replica, the default) or ``"server"``; ``timeout`` is None (the client's default)
    or positive seconds and applies to a server read. InvalidArgumentError otherwise."""
    if timeout is None and consistency == "replica":  # the default, first: Model.get's hot path
        return REPLICA
    check_timeout(timeout)
    if consistency not in ("replica", "server"):
        raise InvalidArgumentError(f"consistency is 'replica' or 'server', not {consistency!r}")
    return ReadOptions(consistency == "server", timeout)


def split_read_options(lookups: Mapping[str, Any]) -> tuple[ReadOptions, Mapping[str, Any]]:
    """The read options among a read call's keyword lookups (``consistency``, ``timeout``: how to
    read, not what to match) and the lookups without them."""
    if "consistency" not in lookups and "timeout" not in lookups:
        return REPLICA, lookups
    options = read_options(lookups.get("consistency", "replica"), lookups.get("timeout"))
    return options, {k: v for k, v in lookups.items() if k != "consistency" and k != "timeout"}


# -- plans ---------------------------------------------------------------------------------------


class Plan:
    """A query compiled, with what the planner learns of it once (cached by the query's text,
    :meth:`Planner.plan`): the ``where`` dict and its ``_core`` filter, the equality rule 2
    answers by index, the index walks of rule 4, and the field whose index walk needs no filter.
    Made and read on callers' threads; never changed once made."""

    __slots__ = ("equality", "exact_field", "filter", "walks", "where")

    def __init__(self, where: dict[str, Any], flt: Any, store: ModelStore) -> None:
        self.where = where
        self.filter = flt
        equality = _single_equality(where)
        indexed = equality is not None and (equality[0] in store.unique or equality[0] in store.sorted)
        # ``(field, value)`` when the query is one equality an index answers (rule 2), else None.
        self.equality = equality if indexed else None
        # Which top-level conditions an index can walk: fixed by the query's text (the model's
        # indexes are made with its store; only their entries change).
        self.walks = _index_walks(where, store.indexes)
        # A field whose index, walked over the values the query bounds it to, holds exactly the
        # matches: the query is that one condition (see _exact). The walk then skips the filter.
        self.exact_field: str | None = None
        if len(self.walks) == 1 and len(where) == 1 and self.walks[0][2] is not None:
            name, cond, _ = self.walks[0]
            if name in where and _exact(cond):
                self.exact_field = name


_SCALARS = frozenset((str, int, float, bool, type(None)))


def _text_key(where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> Any:
    """The plan cache's key of a query: equal only for queries that compile alike.

    Keyword lookups of plain values (the common case) key by their names, values and the
    values' types, which keeps 1, 1.0 and True apart; anything else keys by its text.
    """
    if where is None:
        values = tuple(lookups.values())
        types = tuple(map(type, values))
        if _SCALARS.issuperset(types):
            return tuple(lookups), types, values
    return repr((where, sorted(lookups.items())))


def _exact(cond: Any) -> bool:
    """Whether the index walk over the values ``cond`` bounds its field to (see
    :func:`_bounded_scan`) yields exactly the records ``cond`` matches, so no filter need check
    them: an equality to a str or number, a str prefix, or a range whose bounds are all numbers
    or all str. An index holds str and numbers (bools apart) as the filter compares them:
    within one kind, 1 equal to 1.0; records whose value it cannot hold (null, lists, dicts)
    match none of these conditions."""
    if not _is_operators(cond):
        cond = {"$eq": cond}
    if len(cond) == 1 and "$startswith" in cond:
        return type(cond["$startswith"]) is str
    if len(cond) == 1 and "$eq" in cond:
        return type(cond["$eq"]) in (str, int, float)
    kinds = {_EXACT_KINDS.get(type(operand)) if op in _RANGE_OPS else None for op, operand in cond.items()}
    return len(kinds) == 1 and None not in kinds


_EXACT_KINDS = {int: "number", float: "number", str: "str"}


# -- the planner -----------------------------------------------------------------------------------


class Planner:
    """Plans and runs the queries of one registered model (see the module docstring)."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._plans: dict[Any, Plan] = {}
        # Lookup names -> ((field, type), ...) for rule 2; () when they are not all equalities on
        # indexed str/int fields.
        self._equality_shapes: dict[tuple[str, ...], tuple[tuple[str, type], ...]] = {}

    # -- entry points ----------------------------------------------------------------------------

    def find(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any], order_by: Any = None,
             limit: int | None = None, offset: int = 0) -> list[Pair]:
        """Matching pairs in ``order_by`` order (default: primary key), ``offset`` skipped, at most
        ``limit``."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidArgumentError(f"limit must be None or an int >= 0, not {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgumentError(f"offset must be an int >= 0, not {offset!r}")
        order = query.parse_order_by(order_by, self.store.model._fields)
        options, lookups = split_read_options(lookups)
        return self._find(where, lookups, options, order, limit, offset)

    def find_one(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> Pair | None:
        """A match (the first one the planner finds, see rule 4), or None."""
        if where is None and len(lookups) == 1:
            # The commonest queries, ``find_one(email=...)`` on a unique field or one equality on
            # another indexed field: one probe of its index, as Model.get probes the records
            # (from the second query of that shape on, once _indexed_equalities has seen it).
            ((key, value),) = lookups.items()
            fields = self._equality_shapes.get((key,))
            if fields and type(value) is fields[0][1]:
                name = fields[0][0]
                store = self.store
                with store.replica.lock:  # type: ignore[union-attr]
                    if name in store.unique:
                        pk = store.unique[name].get(value)
                    else:  # the first in primary key order, as _select_equal gives it
                        first = store.sorted[name].range(value, value, limit=1)
                        pk = first[0] if first else None
                    return store.records.get(pk) if pk is not None else None
        if where is None and lookups:
            equal = self._indexed_equalities(lookups)  # None when read options are among them
            if equal is not None:
                hits = self._select_equal(equal, 1)
                return hits[0] if hits else None
        found = self.find(where, lookups, limit=1)
        return found[0] if found else None

    def select(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any],
               first: int | None = None) -> list[Pair]:
        """Matching pairs, in no particular order. With ``first``, at most that many: the first
        ones the planner finds (``exists`` asks for one)."""
        options, lookups = split_read_options(lookups)
        if first is not None and not options.server:
            return self._any_matches(where, lookups, first)
        pairs = self._select(where, lookups, options)
        return pairs if first is None else pairs[:first]

    def count(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> int:
        """The number of matches."""
        if where is None and not lookups:
            store = self.store
            with store.replica.lock:  # type: ignore[union-attr]
                return len(store.records)
        return len(self.select(where, lookups))

    def page(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any], order_by: Any, after: str | None,
             limit: int) -> tuple[list[Pair], str | None]:
        """One page of ``paginate``: up to ``limit`` matches after the cursor ``after`` in the
        order of ``order_by`` (one field, ``-`` for descending; ties by primary key in the same
        direction), and the cursor of the next page (None on the last one)."""
        store = self.store
        pk = store.pk
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgumentError(f"limit must be a positive int, not {limit!r}")
        if order_by is not None and not isinstance(order_by, str):
            raise InvalidArgumentError(f"paginate orders by one field name (optionally '-name'), not {order_by!r}")
        ((field, descending),) = query.parse_order_by(order_by or pk, store.model._fields)
        mark = None
        if after is not None:
            try:
                mark = tuple(orjson.loads(after))
                if len(mark) != 2:
                    raise ValueError
            except (orjson.JSONDecodeError, ValueError, TypeError):
                raise InvalidArgumentError(
                    f"invalid pagination cursor {after!r}: pass a next_cursor unchanged"
                ) from None
        options, lookups = split_read_options(lookups)
        pairs: list[Pair] | None = None
        if not options.server:
            index = store.indexes.get(field)
            if index is not None:
                pairs = self._walk_index(index, field, descending, mark, limit + 1, where, lookups)
        if pairs is None:
            following = _after(self._select(where, lookups, options), mark, field, pk, descending)
            pairs = query.first_records(following, [(field, descending)], pk, limit + 1)
        if len(pairs) <= limit:
            return pairs, None
        pairs = pairs[:limit]
        last = pairs[-1]
        return pairs, orjson.dumps([last.get(field), last.get(pk)]).decode()

    def for_update(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> tuple[list[Pair], Any]:
        """What ``update`` / ``destroy`` act on: the matches in primary-key order, and the filter
        that tells whether a record re-read after a conflict still matches."""
        options, lookups = split_read_options(lookups)
        _, flt = self.compiled(where, lookups)
        return self._find(where, lookups, options, [], None, 0), flt

    # -- compiling -------------------------------------------------------------------------------

    def compiled(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """The compiled ``where`` dict and filter of a query, cached by its text (queries repeat)."""
        plan = self.plan(where, lookups)
        return plan.where, plan.filter

    def plan(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> Plan:
        """The :class:`Plan` of a query: compiled once per distinct text, then taken from the cache."""
        cache_key = _text_key(where, lookups)
        hit = self._plans.get(cache_key)
        if hit is None:
            compiled_where = query.compile_where(self.store.model._fields, where, lookups)
            hit = Plan(compiled_where, query.compile_filter(compiled_where), self.store)
            if len(self._plans) >= _CACHE_MAX:
                self._plans.clear()
            self._plans[cache_key] = hit
        return hit

    # -- the rules (lookups here are without read options) ----------------------------------------

    def _find(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any], options: ReadOptions,
              order: list[tuple[str, bool]], limit: int | None, offset: int) -> list[Pair]:
        store = self.store
        if limit is not None and len(order) == 1 and not options.server:  # rule 3
            field, descending = order[0]
            index = store.indexes.get(field)
            if index is not None:
                walked = self._walk_index(index, field, descending, None, limit + offset, where, lookups)
                if walked is not None:
                    return walked[offset : offset + limit]
        if limit is not None and not order and not options.server:  # rule 4
            return self._any_matches(where, lookups, limit + offset)[offset : offset + limit]
        pairs = self._select(where, lookups, options)
        if limit is not None and order:
            return query.first_records(pairs, order, store.pk, limit + offset)[offset:]
        if len(pairs) > 1:
            pairs = query.sort_records(pairs, order, store.pk)
        if offset:
            pairs = pairs[offset:]
        if limit is not None:
            pairs = pairs[:limit]
        return pairs

    def _select(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any], options: ReadOptions) -> list[Pair]:
        """Every match, in no particular order."""
        store = self.store
        if not options.server and where is None and lookups:  # rule 2
            equalities = self._indexed_equalities(lookups)
            if equalities is not None:
                return self._select_equal(equalities, None)
        plan = self.plan(where, lookups)
        compiled_where = plan.where
        if options.server:  # rule 1
            pairs = store.server_records(options.timeout)
        else:
            assert store.replica is not None
            if plan.equality is not None:
                return self._select_equal(dict((plan.equality,)), None)
            with store.replica.lock:  # rule 5
                pks = _candidate_pks(compiled_where, store.indexes)
                records = store.records
                if pks is None:
                    pairs = list(records.values())
                else:
                    pairs = [records[pk] for pk in pks if pk in records]
                    if plan.exact_field is not None:  # the one condition's index found exactly the matches
                        return pairs
        if not compiled_where:
            return pairs
        return _matches(plan.filter, pairs)

    def _any_matches(self, where: Mapping[str, Any] | None, lookups: Mapping[str, Any], want: int) -> list[Pair]:
        """Rule 4: up to ``want`` matches from the replica, in the order of the index that finds
        them soonest; the work follows ``want``, not the number of matches."""
        store = self.store
        if want <= 0:
            return []
        if where is None and lookups:  # rule 2
            equalities = self._indexed_equalities(lookups)
            if equalities is not None:
                return self._select_equal(equalities, want)
        plan = self.plan(where, lookups)
        if plan.equality is not None:
            return self._select_equal(dict((plan.equality,)), want)
        compiled_where = plan.where
        assert store.replica is not None
        with store.replica.lock:
            records = store.records
            source = _unordered_source(plan.walks, compiled_where, store.indexes, store.pk, want, len(records))
            if not isinstance(source, tuple):  # few candidates (None: every record): check them all
                pairs = list(records.values()) if source is None else [records[pk] for pk in source if pk in records]
                if not compiled_where:
                    return pairs[:want]
                return _matches(plan.filter, pairs)[:want]
            field, scan = source
            exact = not compiled_where or field == plan.exact_field
            return _scan_matches(scan, records, field, None if exact else plan.filter, want, None)

    def _indexed_equalities(self, lookups: Mapping[str, Any]) -> dict[str, Any] | None:
        """``{field: value}`` when every lookup is an equality on an indexed str/int field."""
        shape = tuple(lookups)
        fields = self._equality_shapes.get(shape)
        if fields is None:  # first query of this shape: which fields, of which types (or none)
            model_fields, indexes = self.store.model._fields, self.store.indexes
            found: list[tuple[str, type]] = []
            for key in shape:
                field = model_fields.get(key.removesuffix("__exact"))
                if field is None or field.type not in (str, int) or field.name not in indexes:
                    found = []
                    break
                found.append((field.name, field.type))
            fields = tuple(found)
            if len(self._equality_shapes) >= _CACHE_MAX:
                self._equality_shapes.clear()
            self._equality_shapes[shape] = fields
        if not fields:
            return None
        out = {}
        # Equal lengths by construction (``fields`` comes from these lookups' keys); zip's strict=
        # would cost about 0.3 µs here, a tenth of the commonest query.
        for (name, kind), value in zip(fields, lookups.values()):  # noqa: B905
            if type(value) is not kind:
                return None
            out[name] = value
        return out

    def _select_equal(self, equal: dict[str, Any], first: int | None) -> list[Pair]:
        """Records whose indexed fields equal the given str/int values (all of them)."""
        store = self.store
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
                    stored = hit
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
                if hit is not None and all(hit.get(n) == v for n, v in equal.items()):
                    out.append(hit)
                    if len(out) == first:
                        break
            return out

    def _walk_index(self, index: Any, field: str, descending: bool, mark: tuple[Any, Any] | None, want: int,
                    where: Mapping[str, Any] | None, lookups: Mapping[str, Any]) -> list[Pair] | None:
        """Rule 3: up to ``want`` matches after ``mark``, walking ``index`` (the order field's) in
        order; None when the filter selects so few records through another index that sorting
        them is cheaper."""
        store = self.store
        plan = self.plan(where, lookups)
        compiled_where, flt = plan.where, plan.filter
        pk_name = store.pk
        records = store.records
        out: list[Pair] = []
        if want <= 0:
            return out

        def keep(pairs: list[Pair]) -> None:
            out.extend(pairs if not compiled_where else _matches(flt, pairs))

        assert store.replica is not None
        with store.replica.lock:
            if compiled_where and _candidate_pks(
                compiled_where, store.indexes, at_most=_sort_threshold(want, len(records))
            ) is not None:
                return None
            # The walk covers only the order field's values the query allows, if it bounds them.
            scan, bounded = _ordered_scan(compiled_where, field, index, descending)
            # Records whose value the index cannot hold are sorted here: "others" (dicts, lists)
            # sort after every indexed value (descending: before), nulls last in both directions.
            has_tail = not bounded and len(records) > len(index)
            tails: dict[str, list[Pair]] = {}
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
                            [p for p in records.values() if core.index_key(p.get(field)) is None],
                            [(field, descending)], pk_name,
                        ):
                            tails.setdefault("nulls" if p.get(field) is None else "others", []).append(p)
                    keep(_after(tails.get(segment, []), mark if segment == at else None, field, pk_name, descending))
                    continue
                # A bounded walk over the one condition's values finds only matches: no filter.
                check = compiled_where and not (bounded and field == plan.exact_field)
                try:
                    _scan_matches(scan, records, field, flt if check else None, want, mark if at == "index" else None,
                                  out)
                except (ValueError, TypeError):  # a cursor no page of this order gives
                    raise InvalidArgumentError(
                        f"invalid pagination cursor {list(mark or ())!r} for order {field!r}"
                    ) from None
        return out[:want]


def _scan_matches(scan: Callable[[Any, int], list[Any]], records: Mapping[Any, Pair], field: str, flt: Any,
                  want: int, cursor: tuple[Any, Any] | None, out: list[Pair] | None = None) -> list[Pair]:
    """Walk an index with ``scan(after, n)`` from ``cursor`` in growing chunks, adding to ``out``
    the records that ``flt`` passes (every one when it is None) until it holds ``want``.

    The walk stops as soon as it has enough: its cost follows ``want`` and how many of the
    walked records the filter passes, never the size of the index. ``field`` is the index's.
    """
    out = [] if out is None else out
    chunk = max(want - len(out), 1)
    while len(out) < want:
        pks = scan(cursor, chunk)
        try:  # the indexes hold only the records' primary keys (both change under one lock)
            pairs = list(map(records.__getitem__, pks))
        except KeyError:
            pairs = [records[pk] for pk in pks if pk in records]
        out.extend(pairs if flt is None else _matches(flt, pairs))
        if len(pks) < chunk or len(out) >= want:
            break
        last = pks[-1]
        cursor = (records[last].get(field), last)
        chunk = min(chunk * 2, 4096)
    del out[want:]
    return out


def _matches(flt: Any, records: list[Pair]) -> list[Pair]:
    """The records (``core.Record`` s) that ``flt`` passes, in order."""
    return [records[i] for i in flt.filter(records)]


def _sort_threshold(want: int, total: int) -> int:
    """The most candidates worth checking (and sorting) all, rather than walking an index until
    ``want`` of ``total`` records match: checking ``m`` candidates costs about ``m``, and when
    they are spread evenly the walk passes about ``want * total / m`` entries; the two costs meet
    at ``sqrt(want * total)``."""
    return max(want, math.isqrt(want * total))


IndexWalk = tuple[str, Any, Callable[[Any, int], list[Any]] | None]
"""An indexed condition every match satisfies: ``(field, condition, scan)``, where ``scan(after,
n)`` walks the index over the values the condition allows (None: it cannot, e.g. ``$in``)."""


def _index_walks(where: dict[str, Any], indexes: Mapping[str, Any]) -> list[IndexWalk]:
    """The top-level conditions of ``where`` that an index can answer (see :data:`IndexWalk`)."""
    walks: list[IndexWalk] = []
    for name, cond in _top_conditions(where):
        index = indexes.get(name)
        if index is not None and _estimate(index, cond) is not None:
            walks.append((name, cond, _bounded_scan(cond if _is_operators(cond) else {"$eq": cond}, index, False)))
    return walks


def _unordered_source(walks: list[IndexWalk], where: dict[str, Any], indexes: Mapping[str, Any], pk: str,
                      want: int, total: int) -> list[Any] | tuple[str, Callable[[Any, int], list[Any]]] | None:
    """Where rule 4 finds ``want`` matches of ``where`` soonest: a list of candidate primary keys
    (None: every record) to check whole, or ``(field, scan)``, an index to walk in its order.

    No indexed condition: walk the primary key index (matches come in primary key order). One:
    walk the values it allows. Several: their candidates when one narrows them to a few
    (:func:`_sort_threshold`), else walk the most selective.
    """
    if not walks:
        index = indexes[pk]
        if len(index) < total:  # records whose primary key the index cannot hold
            return None
        return pk, lambda after, n: index.ordered(after=after, limit=n)
    if len(walks) == 1:
        name, cond, scan = walks[0]
        return (name, scan) if scan is not None else _lookup(indexes[name], cond, None)
    pks = _candidate_pks(where, indexes, at_most=_sort_threshold(want, total))
    if pks is not None:
        return pks
    ranked = sorted(walks, key=lambda walk: _estimate(indexes[walk[0]], walk[1]) or 0.0)
    for name, _, scan in ranked:
        if scan is not None:
            return name, scan
    return _candidate_pks(where, indexes)


# -- index selection (pure functions over a compiled where dict) -----------------------------------


def _after(pairs: list[Pair], mark: tuple[Any, Any] | None, field: str, pk: str, descending: bool) -> list[Pair]:
    """The pairs strictly after the cursor ``mark`` in the order by ``field`` (ties by primary key),
    in the order they come."""
    if mark is None:
        return pairs
    return [p for p in pairs if query.follows(p, mark, field, pk, descending)]


def _single_equality(where: dict[str, Any]) -> tuple[str, Any] | None:
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


def _candidate_pks(where: dict[str, Any], indexes: Mapping[str, Any], at_most: int | None = None) -> list[Any] | None:
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


def _estimate(index: SecondaryIndex, cond: Any) -> float | None:
    """How many keys a condition selects (inf: unknown but usable; None: the index cannot help).

    An equality to a value no index holds (null, a list, a dict) is answered by the filter: the
    records holding such values are not in the index."""
    if not _is_operators(cond):
        return None if core.index_key(cond) is None else index.count_eq(cond)
    if "$eq" in cond and core.index_key(cond["$eq"]) is not None:
        return index.count_eq(cond["$eq"])
    if "$in" in cond and _indexable_list(cond["$in"]):
        return sum(index.count_eq(v) for v in cond["$in"])
    if ("$startswith" in cond and isinstance(cond["$startswith"], str)) or not _RANGE_OPS.isdisjoint(cond):
        return math.inf
    return None


def _indexable_list(values: Any) -> bool:
    """Whether ``values`` (an ``$in`` operand) is a list of values an index holds, every one."""
    return isinstance(values, list) and all(core.index_key(v) is not None for v in values)


def _lookup(index: SecondaryIndex, cond: Any, cap: int | None) -> list[Any] | None:
    if not _is_operators(cond):
        return None if core.index_key(cond) is None else index.eq(cond)
    if "$eq" in cond and core.index_key(cond["$eq"]) is not None:
        return index.eq(cond["$eq"])
    if "$in" in cond and _indexable_list(cond["$in"]):
        return index.in_(cond["$in"])
    if "$startswith" in cond and isinstance(cond["$startswith"], str):
        return index.prefix(cond["$startswith"], limit=cap)
    if not _RANGE_OPS.isdisjoint(cond):
        bounds = _range_bounds(cond)
        if bounds is None:
            return None
        lo, lo_inclusive, hi, hi_inclusive = bounds
        return index.range(lo, hi, lo_inclusive=lo_inclusive, hi_inclusive=hi_inclusive, limit=cap)
    return None


def _ordered_scan(
    where: dict[str, Any], field: str, index: Any, reverse: bool
) -> tuple[Callable[[Any, int], list[Any]], bool]:
    """A scan of ``index`` (the order field's) in order from a cursor: ``scan(after, limit)``.

    When the query bounds ``field`` (an equality, a range or a prefix that every match must
    satisfy), the scan covers only those values, and the second item is True: no record
    outside the index (null, unindexable) can match.
    """
    for name, cond in _top_conditions(where):
        if name == field:
            scan = _bounded_scan(cond if _is_operators(cond) else {"$eq": cond}, index, reverse)
            if scan is not None:
                return scan, True
    return (lambda after, n: index.ordered(reverse=reverse, after=after, limit=n)), False


def _bounded_scan(cond: dict[str, Any], index: Any, reverse: bool) -> Callable[[Any, int], list[Any]] | None:
    """The scan of ``index`` over the values that ``cond`` (one field's operators) bounds it to;
    None when ``cond`` sets no such bound (``$ne``, ``$in``, ...)."""
    if isinstance(cond.get("$eq"), _BOUND_TYPES):
        value = cond["$eq"]
        return lambda after, n: index.range(value, value, reverse=reverse, limit=n, after=after)
    if isinstance(cond.get("$startswith"), str):
        prefix = cond["$startswith"]
        return lambda after, n: index.prefix(prefix, limit=n, reverse=reverse, after=after)
    bounds = _range_bounds(cond) if not _RANGE_OPS.isdisjoint(cond) else None
    if bounds is None:
        return None
    lo, lo_inc, hi, hi_inc = bounds
    return lambda after, n: index.range(lo, hi, lo_inclusive=lo_inc, hi_inclusive=hi_inc, reverse=reverse,
                                        limit=n, after=after)


__all__ = ["REPLICA", "Pair", "Planner", "ReadOptions", "read_options", "split_read_options"]
