"""Tests of the core's indexes (index_key, SortedIndex, UniqueIndex), run against both cores.

``core`` is parametrized over the compiled ``natskv._core`` and the pure ``natskv._core_py``,
imported directly so that a missing extension is an error, never a silent second run of the pure
code. The Hypothesis tests drive both implementations and a naive reference (a dict of entries
sorted on demand) with the same random operations and demand identical answers, or the same
exception with the same message.
"""

from __future__ import annotations

import copy
import enum
import json
import math
import pickle
import random
import uuid
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def outcome(func: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """The result of a call, or its exception type and message, for parity comparisons."""
    try:
        return "ok", func(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


class Color(enum.IntEnum):
    RED = 1


class Fruit(str, enum.Enum):
    APPLE = "apple"


class Ratio(float):
    pass


# ---------------------------------------------------------------------------------------------
# index_key
# ---------------------------------------------------------------------------------------------


def test_index_key_order_is_bool_then_numbers_then_strings(core: ModuleType) -> None:
    ordered = [False, True, -math.inf, -3, -2.5, 0, 1, 1.5, 10**30, math.inf, "", "A", "a", "ab"]
    keys = [core.index_key(value) for value in ordered]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("value", [None, math.nan, {}, {"a": 1}, [], [1], (1,), b"x", object()])
def test_index_key_of_unindexed_values(core: ModuleType, value: Any) -> None:
    assert core.index_key(value) is None


def test_index_key_equality(core: ModuleType) -> None:
    key = core.index_key
    assert key(1) == key(1.0) == key(Color.RED)
    assert hash(key(1)) == hash(key(1.0))
    assert key(True) != key(1)
    assert key(False) != key(0)
    assert key(0.0) == key(-0.0)
    assert key("1") != key(1)


def test_index_key_normalizes_subclasses(core: ModuleType) -> None:
    assert type(core.index_key(Color.RED)[-1]) is int
    assert core.index_key(Fruit.APPLE) == core.index_key("apple")
    assert type(core.index_key(Fruit.APPLE)[-1]) is str
    assert type(core.index_key(Ratio(0.5))[-1]) is float
    assert core.index_key(Ratio("nan")) is None


# ---------------------------------------------------------------------------------------------
# SortedIndex
# ---------------------------------------------------------------------------------------------


def make(core: ModuleType, pairs: list[tuple[Any, Any]]) -> Any:
    index = core.SortedIndex()
    for value, pk in pairs:
        index.add(value, pk)
    return index


def test_add_remove_len_and_idempotence(core: ModuleType) -> None:
    index = core.SortedIndex()
    assert index.add(5, 1) is True
    assert index.add(5, 1) is False
    assert index.add(5.0, 1) is False
    assert index.add(5, 2) is True
    assert len(index) == 2
    assert index.remove(5, 3) is False
    assert index.remove(6, 1) is False
    assert index.remove(None, 1) is False
    assert index.remove(5.0, 1) is True
    assert index.remove(5, 1) is False
    assert len(index) == 1 and index.distinct() == 1
    assert index.remove(5, 2) is True
    assert len(index) == 0 and index.distinct() == 0
    assert index.ordered() == [] and index.min_value() is None and index.max_value() is None
    assert repr(index) == "SortedIndex(entries=0, distinct=0)"


@pytest.mark.parametrize("value", [None, math.nan, {"a": 1}, [1, 2]])
def test_unindexed_values_are_skipped(core: ModuleType, value: Any) -> None:
    index = core.SortedIndex()
    assert index.add(value, 1) is False
    assert len(index) == 0
    assert index.eq(value) == [] and index.count_eq(value) == 0
    assert index.remove(value, 1) is False


def test_bool_never_equals_one(core: ModuleType) -> None:
    index = make(core, [(True, "t"), (1, "one"), (1.0, "one-float"), (False, "f"), (0, "zero")])
    assert index.eq(True) == ["t"]
    assert index.eq(1) == ["one", "one-float"]
    assert index.eq(1.0) == ["one", "one-float"]
    assert index.eq(False) == ["f"]
    assert index.eq(0) == ["zero"]
    assert index.ordered() == ["f", "t", "zero", "one", "one-float"]
    assert index.distinct() == 4


def test_every_kind_of_value_keeps_its_place_in_unique_indexes(core: ModuleType) -> None:
    # The compiled indexes hold numbers and strings as bare keys and bools as rank tuples: the
    # kinds must still never meet, in lookups, bounds, prefixes, cursors and bulk rebuilds.
    values: list[Any] = ["b", 2, True, 1.5, "a", False, -3, "", Fruit.APPLE, Color.RED, 10**30]
    for unique in (core.UniqueIndex(), core.UniqueIndex(pk_order=True)):
        for pk, value in enumerate(values):
            assert unique.add(value, value if unique.pk_order else pk) is True
        ordered = unique.ordered()
        expected = [False, True, -3, Color.RED, 1.5, 2, 10**30, "", "a", Fruit.APPLE, "b"]
        if unique.pk_order:
            assert ordered == expected
            assert unique.get(1) is Color.RED and unique.get(True) is True and unique.get(2.0) == 2
        else:
            assert [values[pk] for pk in ordered] == expected
            assert unique.get(1) == 9 and unique.get(True) == 2 and unique.get(2.0) == 1
        pks = list(ordered)
        assert unique.range(lo=False) == pks[:2]
        assert unique.range(hi=True, hi_inclusive=False) == pks[:1]
        assert unique.range(lo=-3, lo_inclusive=False) == pks[3:7]
        assert unique.range(hi=2) == pks[2:6]
        assert unique.range(lo="", reverse=True) == pks[7:][::-1]
        assert unique.range(lo=0, hi="z") == []
        assert unique.prefix("") == pks[7:] and unique.prefix("a") == pks[8:10]
        assert unique.ordered(after=unique.position(1.5, pks[4]), limit=2) == pks[5:7]
        assert unique.ordered(reverse=True, after=unique.position("", pks[7]), limit=3) == pks[4:7][::-1]
        assert unique.min_value() is False and unique.max_value() == "b"
        if unique.pk_order:
            assert type(unique.position(Color.RED, 3)[0]) is Color
        else:
            assert type(unique.position(Color.RED, 3)[0]) is int
        records: dict[Any, Any] = {}
        pk_index = core.UniqueIndex(pk_order=True)
        field_index = core.UniqueIndex()
        index_set = core.IndexSet("id", {"id": pk_index, "v": field_index}, {}, records, ["id", "v"])
        index_set.defer()
        for pk, value in enumerate(values):
            index_set.apply(None, {"id": pk, "v": value}, pk + 1)
        index_set.rebuild()
        assert [values[pk] for pk in field_index.ordered()] == expected
        assert pk_index.ordered() == list(range(len(values)))


def test_mixed_pk_types_are_ordered_and_distinct(core: ModuleType) -> None:
    u1, u2 = uuid.UUID(int=1), uuid.UUID(int=2)
    pks: list[Any] = ["1", 1, u2, (2, "a"), b"b", u1, 0.5, (1, "z"), "a", False, Color.RED]
    index = make(core, [("v", pk) for pk in pks])
    assert index.eq("v") == [False, 0.5, 1, "1", "a", b"b", u1, u2, (1, "z"), (2, "a")]
    assert len(index) == 10  # Color.RED == 1: the same pk
    assert index.remove("v", "1") is True
    assert index.eq("v") == [False, 0.5, 1, "a", b"b", u1, u2, (1, "z"), (2, "a")]


def test_pks_of_other_types_are_grouped_by_type(core: ModuleType) -> None:
    from decimal import Decimal
    from fractions import Fraction

    index = make(core, [("v", Fraction(1, 2)), ("v", Decimal(3)), ("v", Decimal(1)), ("v", 7)])
    assert index.eq("v") == [7, Decimal(1), Decimal(3), Fraction(1, 2)]


@pytest.mark.parametrize(
    ("pk", "error", "message"),
    [
        (None, ValueError, "a primary key cannot be None"),
        (math.nan, ValueError, "a primary key cannot be NaN"),
        ((1, None), ValueError, "a primary key cannot be None"),
        ([1], TypeError, "unhashable type: 'list'"),
        ((1, {}), TypeError, "unhashable type: 'dict'"),
    ],
)
def test_invalid_pks(core: ModuleType, pk: Any, error: type[Exception], message: str) -> None:
    index = core.SortedIndex()
    for call in (index.add, index.remove):
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            call("v", pk)
    with pytest.raises(error):
        index.position("v", pk)
    assert len(index) == 0


def test_deeply_nested_tuple_pk_is_refused(core: ModuleType) -> None:
    pk: Any = 1
    for _ in range(70):
        pk = (pk,)
    with pytest.raises(ValueError, match="more than 64 levels deep"):
        core.SortedIndex().add("v", pk)


def test_eq_in_and_count(core: ModuleType) -> None:
    index = make(core, [(v % 3, v) for v in range(9, 0, -1)] + [("a", "x"), (True, "t")])
    assert index.eq(0) == [3, 6, 9]
    assert index.eq(7) == [] and index.eq("zz") == []
    assert index.count_eq(1) == 3 and index.count_eq(7) == 0
    assert index.in_([2, 0, "a", None, [1], 2.0, math.nan]) == [3, 6, 9, 2, 5, 8, "x"]
    assert index.in_(iter([True])) == ["t"]
    assert index.in_([]) == []
    with pytest.raises(TypeError, match="in_ needs an iterable of values, not str"):
        index.in_("a")


def test_range(core: ModuleType) -> None:
    pairs = [(v, v) for v in range(10)] + [(False, "f"), (True, "t"), ("5", "s5"), ("a", "sa")]
    index = make(core, [*pairs, (2.5, "2.5")])
    assert index.range(2, 5) == [2, "2.5", 3, 4, 5]
    assert index.range(2, 5, lo_inclusive=False, hi_inclusive=False) == ["2.5", 3, 4]
    assert index.range(2.5, 4) == ["2.5", 3, 4]
    assert index.range(7) == [7, 8, 9]  # numbers only: never the strings above
    assert index.range(hi=1) == [0, 1]  # nor the bools below
    assert index.range(hi=1, hi_inclusive=False) == [0]
    assert index.range(7, reverse=True) == [9, 8, 7]
    assert index.range(2, 5, reverse=True, limit=2) == [5, 4]
    assert index.range(0, 9, limit=3) == [0, 1, 2]
    assert index.range(0, 9, limit=0) == []
    assert index.range(5, 2) == []
    assert index.range(3, 3) == [3] and index.range(3, 3, lo_inclusive=False) == []
    assert index.range("0") == ["s5", "sa"]
    assert index.range(hi="5") == ["s5"]
    assert index.range(False, True) == ["f", "t"]
    assert index.range(True) == ["t"]
    assert index.range(1, "z") == []  # bounds of two kinds
    assert index.range(True, 3) == []
    assert index.range(math.nan) == [] and index.range(1, math.nan) == []
    assert index.range(Color.RED, 2) == [1, 2]
    assert index.range() == index.ordered()
    assert index.range(reverse=True) == index.ordered(reverse=True)


@pytest.mark.parametrize("bound", [[1], {"a": 1}, b"x", object()])
def test_range_bound_types(core: ModuleType, bound: Any) -> None:
    index = make(core, [(1, 1)])
    message = f"range bounds must be bool, int, float or str, not {type(bound).__name__}"
    with pytest.raises(TypeError, match=message):
        index.range(bound)
    with pytest.raises(TypeError, match=message):
        index.range(hi=bound)


@pytest.mark.parametrize(
    ("limit", "error", "message"),
    [
        (-1, ValueError, "limit must be >= 0, not -1"),
        (1.0, TypeError, "limit must be an int or None, not float"),
        (True, TypeError, "limit must be an int or None, not bool"),
        ("3", TypeError, "limit must be an int or None, not str"),
    ],
)
def test_limit_validation(
    core: ModuleType, limit: Any, error: type[Exception], message: str
) -> None:
    index = make(core, [(1, 1)])
    for call in (
        lambda: index.range(limit=limit),
        lambda: index.prefix("", limit=limit),
        lambda: index.ordered(limit=limit),
    ):
        with pytest.raises(error, match=message):
            call()
    assert index.ordered(limit=10**30) == [1]


def test_prefix(core: ModuleType) -> None:
    words = ["app", "apple", "apply", "apq", "ap", "b", "", "a\U0010ffff", "a\U0010ffff\U0010ffff"]
    index = make(core, [(w, i) for i, w in enumerate(words)] + [(1, "n"), (True, "t")])
    assert index.prefix("app") == [0, 1, 2]
    assert index.prefix("app", reverse=True) == [2, 1, 0]
    assert index.prefix("app", limit=2) == [0, 1]
    assert index.prefix("ap") == [4, 0, 1, 2, 3]
    assert index.prefix("") == [6, 4, 0, 1, 2, 3, 7, 8, 5]
    assert index.prefix("a\U0010ffff") == [7, 8]
    assert index.prefix("a\U0010ffff\U0010ffff", reverse=True) == [8]
    assert index.prefix("zz") == []
    assert index.prefix(Fruit.APPLE) == [1]
    with pytest.raises(TypeError, match="prefix must be str, not int"):
        index.prefix(1)


def test_min_max_distinct(core: ModuleType) -> None:
    index = make(core, [(3, "a"), (1.0, "b"), (1, "c"), ("x", "d"), (False, "e")])
    assert index.min_value() is False
    assert index.max_value() == "x"
    assert index.distinct() == 4
    index.remove(False, "e")
    index.remove("x", "d")
    assert index.min_value() == 1 and index.max_value() == 3


def test_replace(core: ModuleType) -> None:
    index = make(core, [(1, "a"), (1, "b")])
    index.replace(1, 2, "a")
    assert index.eq(1) == ["b"] and index.eq(2) == ["a"]
    index.replace(2, 2.0, "a")
    assert index.eq(2) == ["a"] and len(index) == 2
    index.replace(2, None, "a")
    assert index.eq(2) == [] and len(index) == 1
    index.replace(None, "z", "a")
    assert index.eq("z") == ["a"]
    index.replace(7, 8, "new")  # the old entry was never there
    assert index.eq(8) == ["new"] and len(index) == 3
    with pytest.raises(ValueError, match="cannot be None"):
        index.replace(1, 2, None)


def test_clear(core: ModuleType) -> None:
    index = make(core, [(v, v) for v in range(50)])
    index.clear()
    assert len(index) == 0 and index.ordered() == [] and index.eq(1) == []
    assert index.add(1, 1) is True and index.ordered() == [1]


def test_pickle_and_deepcopy(core: ModuleType) -> None:
    import copy
    import pickle

    index = make(core, [(i % 3, i) for i in range(1500)] + [("s", "x"), (True, (1, "t"))])
    unique = core.UniqueIndex(pk_order=True)
    for pk in [uuid.UUID(int=1), 5, "five"]:
        unique.add(pk, pk)
    for original in (index, unique):
        for clone in (pickle.loads(pickle.dumps(original)), copy.deepcopy(original)):
            assert type(clone) is type(original)
            assert len(clone) == len(original) and clone.ordered() == original.ordered()
            assert clone.distinct() == original.distinct()
            clone.clear()
            assert len(original) > 0
    assert pickle.loads(pickle.dumps(unique)).pk_order is True


def test_position(core: ModuleType) -> None:
    index = core.SortedIndex()
    assert index.position(Color.RED, "a") == (1, "a")
    assert type(index.position(Color.RED, "a")[0]) is int
    assert index.position("x", 5) == ("x", 5)
    with pytest.raises(ValueError, match="cursor value None is not indexed"):
        index.position(None, 1)
    with pytest.raises(ValueError, match="cursor value nan is not indexed"):
        index.position(math.nan, 1)


@pytest.mark.parametrize("cursor", [5, (1,), (1, 2, 3), "ab", None])
def test_malformed_cursors(core: ModuleType, cursor: Any) -> None:
    index = make(core, [(1, 1)])
    if cursor is None:
        assert index.ordered(after=cursor) == [1]
        return
    with pytest.raises(ValueError, match=r"after must be a \(value, pk\) cursor"):
        index.ordered(after=cursor)
    with pytest.raises(ValueError, match=r"after must be a \(value, pk\) cursor"):
        index.range(0, 5, after=cursor)


def test_cursor_from_a_json_round_trip_is_a_list(core: ModuleType) -> None:
    index = make(core, [(v, v) for v in range(5)])
    assert index.ordered(after=[2, 2]) == [3, 4]
    with pytest.raises(ValueError, match="cursor value None is not indexed"):
        index.ordered(after=[None, 2])


def test_cursors_within_and_across_values(core: ModuleType) -> None:
    index = make(core, [(v // 3, v) for v in range(9)] + [("s", "s")])
    assert index.ordered(after=(1, 4)) == [5, 6, 7, 8, "s"]
    assert index.ordered(after=(1, 4), reverse=True) == [3, 2, 1, 0]
    assert index.ordered(after=(1, 4.5)) == [5, 6, 7, 8, "s"]  # the entry need not exist
    assert index.ordered(after=(1, "x")) == [6, 7, 8, "s"]  # str pks sort after int pks
    assert index.ordered(after=(1.5, 0)) == [6, 7, 8, "s"]
    assert index.ordered(after=(True, 0)) == [*range(9), "s"]
    assert index.ordered(after=(True, 0), reverse=True) == []
    assert index.ordered(after=("s", "s")) == []
    assert index.ordered(after=("a", 1), limit=2) == ["s"]
    assert index.range(0, 2, after=(1, 4)) == [5, 6, 7, 8]
    assert index.range(0, 2, after=(1, 4), reverse=True) == [3, 2, 1, 0]
    assert index.range(2, 5, after=(0, 1)) == [6, 7, 8]  # a cursor before the range
    assert index.range(0, 1, after=(2, 0)) == []  # a cursor past the range
    assert index.range(0, 1, after=(2, 0), reverse=True) == [0, 1, 2, 3, 4, 5][::-1]
    assert index.range(1, 2, lo_inclusive=False, after=(1, 3)) == [6, 7, 8]
    assert index.range(0, 2, after=("s", "s")) == []
    assert index.prefix("", after=("a", 0)) == ["s"]
    assert index.prefix("", after=("s", "s"), reverse=True) == []


def test_pagination_is_stable_under_inserts_before_the_cursor(core: ModuleType) -> None:
    index = make(core, [(100 + i, f"r{i}") for i in range(10)])
    pages: list[list[Any]] = []
    after = None
    extra = 0
    while True:
        page = index.ordered(after=after, limit=3)
        if not page:
            break
        pages.append(page)
        last = page[-1]
        after = index.position(100 + int(last[1:]), last)
        # Concurrent inserts landing before the cursor: below every value, and in the same
        # value as the cursor with a smaller pk.
        index.add(extra, f"new{extra}")
        index.add(100 + int(last[1:]), "a-sorts-first")
        extra += 1
    assert [len(page) for page in pages] == [3, 3, 3, 1]
    flat = [pk for page in pages for pk in page]
    assert flat == [f"r{i}" for i in range(10)]


def test_pagination_sees_inserts_after_the_cursor_once(core: ModuleType) -> None:
    index = make(core, [(i, i) for i in range(0, 20, 2)])
    seen: list[Any] = []
    after = None
    while True:
        page = index.ordered(after=after, limit=3)
        if not page:
            break
        seen.extend(page)
        after = index.position(page[-1], page[-1])
        if page[-1] < 10:
            index.add(page[-1] + 1, page[-1] + 1)  # just after the cursor: must show up once
        index.remove(page[-1], page[-1])  # the cursor's own entry going away changes nothing
    assert seen == sorted(set(seen))
    assert set(range(0, 20, 2)) <= set(seen)


def test_reverse_pagination(core: ModuleType) -> None:
    index = make(core, [(i % 4, i) for i in range(10)])
    pages = []
    after = None
    while page := index.ordered(reverse=True, after=after, limit=3):
        pages.append(page)
        after = index.position(page[-1] % 4, page[-1])
        index.add(99, "late")  # after everything: never reached going down
    assert [len(page) for page in pages] == [3, 3, 3, 1]
    assert [pk for page in pages for pk in page] == [7, 3, 6, 2, 9, 5, 1, 8, 4, 0]


def test_large_groups_and_many_values(core: ModuleType) -> None:
    rng = random.Random(3)
    pks = list(range(3000))
    rng.shuffle(pks)
    index = core.SortedIndex()
    for pk in pks:
        index.add(pk % 2, pk)  # two groups of 1500: past the plain-list size
        index.add(pk, pk)  # 3000 distinct values: several chunks
    assert len(index) == 5998 and index.distinct() == 3000  # (0, 0) and (1, 1) were added twice
    assert index.count_eq(0) == 1500 and index.count_eq(1) == 1500
    assert index.eq(0) == list(range(0, 3000, 2))
    assert index.ordered(limit=5) == [0, 2, 4, 6, 8]
    assert index.ordered(after=(0, 1000), limit=3) == [1002, 1004, 1006]
    assert index.ordered(after=(0, 1000), reverse=True, limit=3) == [998, 996, 994]
    assert index.ordered(after=(1, 2001), limit=4) == [2003, 2005, 2007, 2009]
    assert index.ordered(after=(1, 2999), limit=4) == [2, 3, 4, 5]
    assert index.range(2, 2999, limit=3, reverse=True) == [2999, 2998, 2997]
    assert index.range(1500, 1510) == list(range(1500, 1511))
    assert index.add(0, 10) is False
    for pk in pks:
        assert index.remove(pk % 2, pk) is True
        assert index.remove(pk, pk) is (pk > 1)
    assert len(index) == 0 and index.distinct() == 0 and index.ordered() == []
    assert index.add(0, 0) is True and index.eq(0) == [0]


# ---------------------------------------------------------------------------------------------
# UniqueIndex
# ---------------------------------------------------------------------------------------------


def test_unique_add_get_remove(core: ModuleType) -> None:
    index = core.UniqueIndex()
    assert index.pk_order is False
    assert index.add("ann@example.com", 1) is True
    assert index.add("ann@example.com", 1) is False
    assert index.add("ann@example.com", 1.0) is False
    with pytest.raises(ValueError, match=r"value 'ann@example\.com' is already held by pk 1, not 2"):
        index.add("ann@example.com", 2)
    with pytest.raises(ValueError, match="already held by pk 1, not '1'"):
        index.add("ann@example.com", "1")
    assert index.get("ann@example.com") == 1
    assert index.get("bob@example.com") is None
    assert index.get([1]) is None and index.get(None) is None
    assert index.add(None, 2) is False and index.add(None, 3) is False  # many nulls
    assert index.add({"a": 1}, 4) is False
    assert len(index) == 1
    assert index.remove("bob@example.com") is None
    assert index.remove(None) is None
    assert index.remove("ann@example.com") == 1
    assert index.remove("ann@example.com") is None
    assert len(index) == 0 and index.get("ann@example.com") is None
    assert repr(index) == "UniqueIndex(entries=0, pk_order=False)"


def test_unique_values_follow_index_key(core: ModuleType) -> None:
    index = core.UniqueIndex()
    index.add(1, "one")
    index.add(True, "true")
    assert index.get(1.0) == "one" and index.get(True) == "true"
    with pytest.raises(ValueError, match=r"value 1\.0 is already held by pk 'one', not 'x'"):
        index.add(1.0, "x")
    assert index.eq(1) == ["one"] and index.eq(2) == [] and index.count_eq(1) == 1
    assert index.in_([True, 1, 5]) == ["true", "one"]


def test_unique_scans_and_cursors(core: ModuleType) -> None:
    index = core.UniqueIndex()
    for i, name in enumerate(["dan", "ann", "cid", "bob", "eve"]):
        index.add(name, i)
    index.add(7, "n7")
    assert index.ordered() == ["n7", 1, 3, 2, 0, 4]
    assert index.range("b", "d") == [3, 2]
    assert index.range("b", "dan", reverse=True) == [0, 2, 3]
    assert index.range(0) == ["n7"]
    assert index.prefix("", limit=2) == [1, 3]
    assert index.ordered(after=index.position("bob", 3), limit=2) == [2, 0]
    assert index.ordered(after=("bob", 3), reverse=True) == [1, "n7"]
    assert index.ordered(after=("bob", 2)) == [3, 2, 0, 4]  # same value, smaller pk: bob follows
    assert index.ordered(after=("bob", 4)) == [2, 0, 4]
    assert index.min_value() == 7 and index.max_value() == "eve" and index.distinct() == 6


def test_unique_pagination_under_inserts(core: ModuleType) -> None:
    index = core.UniqueIndex()
    for i in range(10):
        index.add(f"m{i}", i)
    pages = []
    after = None
    while page := index.ordered(after=after, limit=3):
        pages.append(page)
        after = index.position(f"m{page[-1]}", page[-1])
        index.add(f"a{len(pages)}", 100 + len(pages))  # sorts before every "m..."
    assert [len(page) for page in pages] == [3, 3, 3, 1]
    assert [pk for page in pages for pk in page] == list(range(10))


def test_unique_replace(core: ModuleType) -> None:
    index = core.UniqueIndex()
    index.add("a@x", 1)
    index.add("b@x", 2)
    with pytest.raises(ValueError, match="value 'b@x' is already held by pk 2, not 1"):
        index.replace("a@x", "b@x", 1)
    assert index.get("a@x") == 1 and index.get("b@x") == 2  # nothing changed
    index.replace("a@x", "c@x", 1)
    assert index.get("a@x") is None and index.get("c@x") == 1
    index.replace("b@x", "b@x", 2)
    assert index.get("b@x") == 2
    index.replace("b@x", None, 1)  # "b@x" is not held by 1: left alone
    assert index.get("b@x") == 2
    index.replace("b@x", None, 2)
    assert index.get("b@x") is None and len(index) == 1
    index.replace(None, "d@x", 2)
    assert index.ordered() == [1, 2]
    index.clear()
    assert len(index) == 0 and index.ordered() == []


def test_unique_pk_order(core: ModuleType) -> None:
    index = core.UniqueIndex(pk_order=True)
    assert index.pk_order is True
    u = uuid.UUID(int=9)
    pks: list[Any] = [3, "3", u, (1, "a"), b"z", 1.5, False]
    for pk in pks:
        assert index.add(pk, pk) is True
    assert index.add(None, 1) is False
    assert index.ordered() == [False, 1.5, 3, "3", b"z", u, (1, "a")]
    assert index.get(u) == u and index.get(3.0) == 3 and index.get("3") == "3"
    assert index.get([1]) is None and index.get(math.nan) is None
    assert index.range(1, 3) == [1.5, 3]
    assert index.prefix("") == ["3"]
    assert index.ordered(after=index.position(b"z", b"z")) == [u, (1, "a")]
    assert index.ordered(after=(u, u), reverse=True, limit=2) == [b"z", "3"]
    assert index.remove(u) == u and index.get(u) is None
    with pytest.raises(TypeError, match="unhashable type: 'list'"):
        index.add([1], 1)
    with pytest.raises(ValueError, match="a primary key cannot be NaN"):
        index.add(math.nan, 1)
    assert repr(index) == "UniqueIndex(entries=6, pk_order=True)"


def test_unique_many_values(core: ModuleType) -> None:
    index = core.UniqueIndex()
    keys = list(range(5000))
    random.Random(5).shuffle(keys)
    for k in keys:
        index.add(f"k{k:05d}", k)
    assert index.ordered(limit=3) == [0, 1, 2]
    assert index.ordered(after=("k02500", 2500), limit=2) == [2501, 2502]
    assert index.ordered(after=("k02500", 2500), reverse=True, limit=2) == [2499, 2498]
    assert index.prefix("k0499") == list(range(4990, 5000))
    for k in keys[:4990]:
        assert index.remove(f"k{k:05d}") == k
    assert index.ordered() == sorted(keys[4990:])


# ---------------------------------------------------------------------------------------------
# Parity: both cores and a naive reference, driven by the same random operations
# ---------------------------------------------------------------------------------------------


def ref_key(value: Any) -> tuple[Any, ...] | None:
    """The documented value order, written independently of the cores."""
    if isinstance(value, bool):
        return (0, value)
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return (1, value)
    if isinstance(value, str):
        return (2, value)
    return None


def ref_pk(pk: Any) -> tuple[Any, ...]:
    return (1, pk) if isinstance(pk, int) else (2, pk)


class Reference:
    """A SortedIndex as a dict of entries, sorted on every query."""

    def __init__(self) -> None:
        self.entries: dict[tuple[Any, Any], Any] = {}

    def add(self, value: Any, pk: Any) -> bool:
        key = ref_key(value)
        if key is None or (key, ref_pk(pk)) in self.entries:
            return False
        self.entries[(key, ref_pk(pk))] = pk
        return True

    def remove(self, value: Any, pk: Any) -> bool:
        key = ref_key(value)
        return key is not None and self.entries.pop((key, ref_pk(pk)), None) is not None

    def replace(self, old: Any, new: Any, pk: Any) -> None:
        self.remove(old, pk)
        self.add(new, pk)

    def scan(
        self,
        keep: Any = lambda key: True,
        reverse: bool = False,
        after: tuple[Any, Any] | None = None,
        limit: int | None = None,
    ) -> list[Any]:
        items = sorted(self.entries.items(), key=lambda item: item[0], reverse=reverse)
        out = []
        for (key, pk_key), pk in items:
            if not keep(key):
                continue
            if after is not None:
                place = (ref_key(after[0]), ref_pk(after[1]))
                if ((key, pk_key) <= place) if not reverse else ((key, pk_key) >= place):
                    continue
            out.append(pk)
        return out if limit is None else out[:limit]

    def eq(self, value: Any) -> list[Any]:
        key = ref_key(value)
        return self.scan(lambda k: k == key)

    def in_(self, values: list[Any]) -> list[Any]:
        keys = [ref_key(v) for v in values]
        return self.scan(lambda k: k in keys)

    def range(self, lo: Any, hi: Any, lo_inc: bool, hi_inc: bool, **kw: Any) -> list[Any]:
        low, high = ref_key(lo), ref_key(hi)
        if (lo is not None and low is None) or (hi is not None and high is None):
            return []
        if low is not None and high is not None and low[0] != high[0]:
            return []
        rank = (low or high or (None,))[0]

        def keep(key: tuple[Any, ...]) -> bool:
            if rank is not None and key[0] != rank:
                return False
            if low is not None and (key < low or (key == low and not lo_inc)):
                return False
            return high is None or not (key > high or (key == high and not hi_inc))

        return self.scan(keep, **kw)

    def prefix(self, p: str, **kw: Any) -> list[Any]:
        return self.scan(lambda key: key[0] == 2 and key[1].startswith(p), **kw)


VALUES = st.one_of(
    st.integers(-3, 6),
    st.sampled_from([0.5, 1.0, 2.0, -0.0, math.inf, -math.inf, math.nan, 10**20]),
    st.booleans(),
    st.text(alphabet="ab\U0010ffff", max_size=3),
    st.sampled_from([None, [1], {"a": 1}]),
)
BOUNDS = st.one_of(st.none(), st.integers(-4, 7), st.sampled_from([1.5, math.nan, True, False]),
                   st.text(alphabet="ab", max_size=2))  # fmt: skip
PKS = st.one_of(st.integers(0, 8), st.sampled_from(["0", "1", "a", "b"]))
LIMITS = st.one_of(st.none(), st.integers(0, 5))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), VALUES, PKS),
        st.tuples(st.just("remove"), VALUES, PKS),
        st.tuples(st.just("replace"), VALUES, VALUES, PKS),
    ),
    max_size=40,
)
QUERIES = st.lists(
    st.one_of(
        st.tuples(st.just("eq"), VALUES),
        st.tuples(st.just("in_"), st.lists(VALUES, max_size=4)),
        st.tuples(
            st.just("range"), BOUNDS, BOUNDS, st.booleans(), st.booleans(), st.booleans(), LIMITS
        ),
        st.tuples(
            st.just("prefix"), st.text(alphabet="ab\U0010ffff", max_size=2), st.booleans(), LIMITS
        ),
        st.tuples(st.just("ordered"), st.booleans(), LIMITS),
        st.tuples(st.just("cursor"), VALUES, PKS, st.booleans(), LIMITS),
    ),
    max_size=12,
)


def run_query(index: Any, query: tuple[Any, ...]) -> tuple[str, Any]:
    kind = query[0]
    if kind == "eq":
        return outcome(index.eq, query[1])
    if kind == "in_":
        return outcome(index.in_, query[1])
    if kind == "range":
        _, lo, hi, lo_inc, hi_inc, reverse, limit = query
        return outcome(index.range, lo, hi, lo_inc, hi_inc, reverse, limit)
    if kind == "prefix":
        return outcome(index.prefix, query[1], reverse=query[2], limit=query[3])
    if kind == "ordered":
        return outcome(index.ordered, reverse=query[1], limit=query[2])
    _, value, pk, reverse, limit = query
    return outcome(index.ordered, reverse=reverse, after=(value, pk), limit=limit)


def reference_answer(ref: Reference, query: tuple[Any, ...]) -> Any:
    kind = query[0]
    if kind == "eq":
        return ref.eq(query[1])
    if kind == "in_":
        return ref.in_(query[1])
    if kind == "range":
        _, lo, hi, lo_inc, hi_inc, reverse, limit = query
        return ref.range(lo, hi, lo_inc, hi_inc, reverse=reverse, limit=limit)
    if kind == "prefix":
        return ref.prefix(query[1], reverse=query[2], limit=query[3])
    if kind == "ordered":
        return ref.scan(reverse=query[1], limit=query[2])
    _, value, pk, reverse, limit = query
    return ref.scan(reverse=reverse, after=(value, pk), limit=limit)


def check_pagination(index: Any, ref: Reference, size: int, reverse: bool) -> None:
    """Page through the whole index with cursors of the last entry of each page."""
    items = sorted(ref.entries.items(), key=lambda item: item[0], reverse=reverse)
    seen: list[Any] = []
    after = None
    while True:
        page = index.ordered(reverse, after, size)
        seen.extend(page)
        if len(page) < size:
            break
        assert len(seen) <= len(items)
        (key, _), pk = items[len(seen) - 1]
        after = index.position(key[1], pk)
    assert seen == [pk for _, pk in items]


@settings(max_examples=250, deadline=None)
@given(ops=OPS, queries=QUERIES, page_size=st.integers(1, 4), reverse=st.booleans())
@pytest.mark.slow
def test_sorted_index_parity(
    c_core: ModuleType,
    py_core: ModuleType,
    ops: list[tuple[Any, ...]],
    queries: list[tuple[Any, ...]],
    page_size: int,
    reverse: bool,
) -> None:
    c_index, py_index, ref = c_core.SortedIndex(), py_core.SortedIndex(), Reference()
    for op in ops:
        results = [outcome(getattr(index, op[0]), *op[1:]) for index in (c_index, py_index)]
        expected = getattr(ref, op[0])(*op[1:])
        assert results[0] == results[1] == ("ok", expected)
        assert len(c_index) == len(py_index) == len(ref.entries)
    for query in queries:
        c_answer, py_answer = run_query(c_index, query), run_query(py_index, query)
        assert c_answer == py_answer, query
        if c_answer[0] == "ok":
            assert c_answer[1] == reference_answer(ref, query), query
        else:
            # Only a cursor on an unindexed value may be refused here.
            assert query[0] == "cursor" and ref_key(query[1]) is None, query
    check_pagination(c_index, ref, page_size, reverse)
    check_pagination(py_index, ref, page_size, reverse)
    assert c_index.distinct() == py_index.distinct() == len({k for k, _ in ref.entries})
    assert c_index.min_value() == py_index.min_value()
    assert c_index.max_value() == py_index.max_value()


class UniqueReference:
    """A UniqueIndex (values ordered like index_key) as a plain dict."""

    def __init__(self) -> None:
        self.held: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def add(self, value: Any, pk: Any) -> bool:
        key = ref_key(value)
        if key is None:
            return False
        if key in self.held:
            if ref_pk(self.held[key][1]) == ref_pk(pk):
                return False
            raise ValueError("duplicate")
        self.held[key] = (value, pk)
        return True

    def remove(self, value: Any) -> Any:
        key = ref_key(value)
        return None if key is None else self.held.pop(key, (None, None))[1]

    def replace(self, old: Any, new: Any, pk: Any) -> None:
        new_key, old_key = ref_key(new), ref_key(old)
        if new_key in self.held and ref_pk(self.held[new_key][1]) != ref_pk(pk):
            raise ValueError("duplicate")
        held = self.held.get(old_key) if old_key != new_key else None
        if held is not None and ref_pk(held[1]) == ref_pk(pk):
            del self.held[old_key]
        self.add(new, pk)

    def get(self, value: Any) -> Any:
        return self.held.get(ref_key(value), (None, None))[1]

    def as_sorted(self) -> Reference:
        ref = Reference()
        for value, pk in self.held.values():
            ref.add(value, pk)
        return ref


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), VALUES, PKS),
            st.tuples(st.just("remove"), VALUES),
            st.tuples(st.just("replace"), VALUES, VALUES, PKS),
            st.tuples(st.just("get"), VALUES),
        ),
        max_size=40,
    ),
    queries=QUERIES,
    pk_order=st.booleans(),
)
@pytest.mark.slow
def test_unique_index_parity(
    c_core: ModuleType,
    py_core: ModuleType,
    ops: list[tuple[Any, ...]],
    queries: list[tuple[Any, ...]],
    pk_order: bool,
) -> None:
    c_index, py_index = c_core.UniqueIndex(pk_order), py_core.UniqueIndex(pk_order)
    ref = UniqueReference()
    for op in ops:
        c_result = outcome(getattr(c_index, op[0]), *op[1:])
        assert c_result == outcome(getattr(py_index, op[0]), *op[1:]), op
        assert len(c_index) == len(py_index)
        if not pk_order:
            try:
                expected = ("ok", getattr(ref, op[0])(*op[1:]))
            except ValueError:
                expected = ("ValueError", c_result[1])
            assert c_result == expected, op
    for query in queries:
        answer = run_query(c_index, query)
        assert answer == run_query(py_index, query), query
        if not pk_order and answer[0] == "ok":
            # A unique index answers like a sorted index holding the same entries.
            assert answer[1] == reference_answer(ref.as_sorted(), query), query
    assert c_index.min_value() == py_index.min_value()
    assert c_index.max_value() == py_index.max_value()


@settings(max_examples=60, deadline=None)
@given(
    value=st.one_of(VALUES, st.floats(), st.integers(), st.text(max_size=4)),
    pk=st.one_of(PKS, st.floats(), st.none(), st.tuples(st.integers(), st.text(max_size=2))),
)
def test_position_and_key_parity(
    c_core: ModuleType, py_core: ModuleType, value: Any, pk: Any
) -> None:
    assert c_core.index_key(value) == py_core.index_key(value)
    c_index, py_index = c_core.SortedIndex(), py_core.SortedIndex()
    assert outcome(c_index.position, value, pk) == outcome(py_index.position, value, pk)
    assert outcome(c_index.add, value, pk) == outcome(py_index.add, value, pk)


@pytest.mark.slow
def test_large_random_parity(c_core: ModuleType, py_core: ModuleType) -> None:
    """Thousands of operations on few values: big groups, chunk splits, deletes down to empty."""
    rng = random.Random(11)
    c_index, py_index, ref = c_core.SortedIndex(), py_core.SortedIndex(), Reference()
    for step in range(12000):
        value = rng.choice([0, 1, "x"]) if step % 3 else rng.randrange(2500)
        pk = rng.randrange(3000)
        op = "add" if step < 8000 or rng.random() < 0.3 else "remove"
        assert getattr(c_index, op)(value, pk) == getattr(py_index, op)(value, pk)
        getattr(ref, op)(value, pk)
        if step % 1000 == 999:
            assert len(c_index) == len(py_index) == len(ref.entries)
            for reverse in (False, True):
                after = (rng.choice([0, 1, 5, "x"]), rng.randrange(3000))
                expected = ref.scan(reverse=reverse, after=after, limit=50)
                assert c_index.ordered(reverse, after, 50) == expected
                assert py_index.ordered(reverse, after, 50) == expected
            assert c_index.eq(1) == py_index.eq(1) == ref.eq(1)
            expected = ref.range(3, 700, True, True, reverse=True)
            assert c_index.range(3, 700, reverse=True) == py_index.range(3, 700, reverse=True)
            assert c_index.range(3, 700, reverse=True) == expected
    assert c_index.ordered() == py_index.ordered() == ref.scan()


# ---------------------------------------------------------------------------------------------
# RecordBuilder
# ---------------------------------------------------------------------------------------------


class Plain:
    def __init__(self) -> None:  # never called by the builder
        raise AssertionError("RecordBuilder must not call __init__")


def test_record_builder_fills_fields_extra_version_and_stored(core: ModuleType) -> None:
    builder = core.RecordBuilder(Plain, ["id", "name", "score"], skip=["_created_at"])
    stored = {"id": 7, "name": "ann", "color": "red", "_created_at": "2026-01-01"}
    (obj,) = builder.build([(stored, 42)])
    assert type(obj) is Plain
    assert vars(obj) == {
        "id": 7, "name": "ann", "score": None,  # a field the record lacks is None
        "_extra": {"color": "red"},  # other keys kept aside; skipped keys dropped
        "_version": 42,
        "_stored": stored,
    }
    assert obj._stored is stored and stored == {"id": 7, "name": "ann", "color": "red", "_created_at": "2026-01-01"}


def test_record_builder_converters_and_floats(core: ModuleType) -> None:
    builder = core.RecordBuilder(Plain, ["id", "tag", "score"], converters=[("tag", str.upper)], floats=["score"])
    built = builder.build([
        ({"id": 1, "tag": "a", "score": 3}, 1),
        ({"id": 2, "tag": None, "score": 2.5}, 2),
        ({"id": 3, "score": True}, 3),  # a bool is not a number stored for a float: left alone
        ({"id": 4, "score": "x"}, 4),
        ({"id": 5, "score": 10**20}, 5),
    ])
    assert [(o.tag, o.score) for o in built] == [("A", 3.0), (None, 2.5), (None, True), (None, "x"), (None, 1e20)]
    assert type(built[0].score) is float


def test_record_builder_keeps_order_and_accepts_any_iterable(core: ModuleType) -> None:
    builder = core.RecordBuilder(Plain, ["id"])
    built = builder.build(({"id": i}, i * 10) for i in range(50))
    assert [(o.id, o._version) for o in built] == [(i, i * 10) for i in range(50)]
    assert builder.build([]) == []


def test_record_builder_refuses_bad_input(core: ModuleType) -> None:
    with pytest.raises(TypeError, match="must be a class"):
        core.RecordBuilder("Plain", ["id"])
    with pytest.raises(ValueError, match="converter needs a field name"):
        core.RecordBuilder(Plain, ["id"], converters=[("other", str)])
    with pytest.raises(ValueError, match="converter needs a field name"):
        core.RecordBuilder(Plain, ["id"], converters=[("id", 3)])
    with pytest.raises(ValueError, match="floats names fields"):
        core.RecordBuilder(Plain, ["id"], floats=["score"])
    builder = core.RecordBuilder(Plain, ["id"])
    with pytest.raises(TypeError, match="a stored record is a dict, not list"):
        builder.build([([1], 1)])


@given(st.lists(st.tuples(
    st.dictionaries(
        st.sampled_from(["id", "a", "b", "x", "_skip"]),
        st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=3), st.booleans()),
    ),
    st.integers(min_value=0, max_value=2**63),
), max_size=20))
@settings(max_examples=200, deadline=None)
@pytest.mark.slow
def test_record_builder_cores_agree(
    c_core: ModuleType, py_core: ModuleType, pairs: list[tuple[dict[str, Any], int]]
) -> None:
    args = (Plain, ["id", "a", "b"], ["_skip"], [("a", repr)], ["b"])
    built_c = c_core.RecordBuilder(*args).build(pairs)
    built_py = py_core.RecordBuilder(*args).build(pairs)
    assert [vars(o) for o in built_c] == [vars(o) for o in built_py]


# ---------------------------------------------------------------------------------------------
# IndexSet
# ---------------------------------------------------------------------------------------------


FIELDS = ("id", "email", "age", "role", "note")


def held(records: dict[Any, Any]) -> dict[Any, tuple[dict[str, Any], int]]:
    """What an IndexSet holds, as (stored dict, revision) by primary key."""
    return {pk: (record.as_dict(), record.revision) for pk, record in records.items()}


def make_index_set(core: ModuleType) -> tuple[Any, dict[str, Any], dict[str, Any], dict[Any, Any]]:
    unique = {"id": core.UniqueIndex(pk_order=True), "email": core.UniqueIndex()}
    ordered = {"age": core.SortedIndex()}
    records: dict[Any, Any] = {}
    return core.IndexSet("id", unique, ordered, records, FIELDS), unique, ordered, records


def test_index_set_insert_update_delete(core: ModuleType) -> None:
    index_set, unique, ordered, records = make_index_set(core)
    ann = {"id": 1, "email": "ann@x", "age": 30}
    bob = {"id": 2, "email": "bob@x", "age": 30}
    assert index_set.apply(None, ann, 5) == 0
    assert index_set.apply(None, bob, 6) == 0
    assert held(records) == {1: (ann, 5), 2: (bob, 6)}
    assert ordered["age"].eq(30) == [1, 2] and unique["email"].get("bob@x") == 2
    ann2 = {"id": 1, "email": "ann@y", "age": 31}
    assert index_set.apply(ann, ann2, 7) == 5  # an update returns the old revision
    assert unique["email"].get("ann@x") is None and unique["email"].get("ann@y") == 1
    assert ordered["age"].eq(30) == [2] and ordered["age"].eq(31) == [1]
    assert index_set.apply(bob, None, 8) == 6  # a delete
    assert held(records) == {1: (ann2, 7)} and len(unique["id"]) == 1 and ordered["age"].eq(30) == []
    assert index_set.apply(bob, None, 9) == 0  # deleting what is not held changes nothing


def test_index_set_skips_what_it_cannot_hold(core: ModuleType) -> None:
    index_set, unique, ordered, records = make_index_set(core)
    index_set.apply(None, {"id": None, "email": "a@x"}, 1)  # no valid primary key
    index_set.apply(None, {"id": [1], "email": "b@x"}, 2)  # unhashable
    index_set.apply(None, {"email": "c@x"}, 3)  # missing
    index_set.apply(None, "not a record", 4)
    assert records == {} and len(unique["email"]) == 0
    index_set.apply(None, {"id": 1, "email": {"not": "indexable"}, "age": [1]}, 5)
    assert list(records) == [1] and len(unique["email"]) == 0 and len(ordered["age"]) == 0


def test_index_set_newest_claim_of_a_unique_value_wins(core: ModuleType) -> None:
    index_set, unique, _, _ = make_index_set(core)
    old = {"id": 1, "email": "x@x"}
    index_set.apply(None, old, 1)
    index_set.apply(None, {"id": 2, "email": "x@x"}, 2)  # the change freeing it from 1 is late
    assert unique["email"].get("x@x") == 2
    index_set.apply(old, {"id": 1, "email": "y@x"}, 3)  # ...and does not take it back from 2
    assert unique["email"].get("x@x") == 2 and unique["email"].get("y@x") == 1


def test_index_set_refuses_wrong_containers(core: ModuleType) -> None:
    with pytest.raises(TypeError, match="must be dicts"):
        core.IndexSet("id", [], {}, {}, FIELDS)
    with pytest.raises(TypeError, match="must be a UniqueIndex"):
        core.IndexSet("id", {"id": core.SortedIndex()}, {}, {}, FIELDS)
    with pytest.raises(TypeError, match="must be a SortedIndex"):
        core.IndexSet("id", {}, {"age": core.UniqueIndex()}, {}, FIELDS)
    with pytest.raises(ValueError, match="'age' is not one of the fields"):
        core.IndexSet("id", {}, {"age": core.SortedIndex()}, {}, ["id"])
    with pytest.raises(ValueError, match="'id' is not one of the fields"):
        core.IndexSet("id", {}, {}, {}, ["email"])
    with pytest.raises(ValueError, match="repeat"):
        core.IndexSet("id", {}, {}, {}, ["id", "id"])
    with pytest.raises(TypeError, match="field names are str"):
        core.IndexSet("id", {}, {}, {}, ["id", 3])


@given(st.lists(st.tuples(
    st.integers(min_value=0, max_value=6),  # which record
    st.one_of(st.none(), st.fixed_dictionaries({
        "email": st.one_of(st.none(), st.sampled_from(["a", "b", "c", 1, 2.5])),
        "age": st.one_of(
            st.none(),
            st.integers(-2, 2),
            st.floats(allow_nan=False, width=16),
            st.text(max_size=1),
            st.lists(st.integers(), max_size=1),
        ),
    })),
), max_size=40))
@settings(max_examples=200, deadline=None)
@pytest.mark.slow
def test_index_set_cores_agree(c_core: ModuleType, py_core: ModuleType, changes: list[tuple[int, Any]]) -> None:
    sets = [make_index_set(c_core), make_index_set(py_core)]
    current: dict[int, Any] = {}
    for revision, (pk, fields) in enumerate(changes, 1):
        new = None if fields is None else {"id": pk, **fields}
        answers = [s[0].apply(current.get(pk), new, revision) for s in sets]
        assert answers[0] == answers[1]
        current[pk] = new
    (_, u1, o1, r1), (_, u2, o2, r2) = sets
    assert held(r1) == held(r2)
    for name in u1:
        assert u1[name].ordered() == u2[name].ordered()
    assert o1["age"].ordered() == o2["age"].ordered()
    assert [o1["age"].count_eq(v) for v in range(-2, 3)] == [o2["age"].count_eq(v) for v in range(-2, 3)]


def index_contents(unique: dict[str, Any], ordered: dict[str, Any]) -> dict[str, Any]:
    """Everything the indexes answer: entries in order (both directions), counts, distinct values."""
    out: dict[str, Any] = {}
    for name, index in {**unique, **ordered}.items():
        out[name] = (index.ordered(), index.ordered(reverse=True), len(index), index.distinct(),
                     index.min_value(), index.max_value())
    return out


def test_index_set_deferred_then_rebuilt_equals_applied_one_by_one(core: ModuleType) -> None:
    # 3,000 records: the age 7 group passes the size where a group becomes chunks, and the
    # pk and email indexes span several chunks.
    rows = [{"id": i, "email": f"u{i * 7919 % 3001}@x", "age": 7 if i % 2 else i % 50} for i in range(1, 3001)]
    direct, u1, o1, r1 = make_index_set(core)
    deferred, u2, o2, r2 = make_index_set(core)
    assert deferred.deferred is False
    deferred.defer()
    assert deferred.deferred is True
    for revision, row in enumerate(rows, 1):
        assert direct.apply(None, row, revision) == deferred.apply(None, row, revision) == 0
    assert len(u2["id"]) == len(u2["email"]) == len(o2["age"]) == 0  # left alone while deferred
    assert held(r1) == held(r2)
    # an update and a delete while deferred: the records follow, and so will the indexes
    for s in (direct, deferred):
        assert s.apply(rows[0], {"id": 1, "email": "new@x", "age": 99}, 3001) == 1
        assert s.apply(rows[1], None, 3002) == 2
    deferred.rebuild()
    assert deferred.deferred is False
    assert index_contents(u1, o1) == index_contents(u2, o2)
    assert o2["age"].count_eq(7) == 1499 and o2["age"].eq(7)[:3] == [3, 5, 7]
    assert u2["email"].get("new@x") == 1 and o2["age"].range(40, 60, limit=3) == o1["age"].range(40, 60, limit=3)
    # kept in step one change at a time again
    for s in (direct, deferred):
        s.apply({"id": 1, "email": "new@x", "age": 99}, None, 3003)
    assert index_contents(u1, o1) == index_contents(u2, o2)


def test_index_set_rebuild_gives_a_unique_value_to_the_last_record_applied(core: ModuleType) -> None:
    index_set, unique, ordered, _ = make_index_set(core)
    index_set.defer()
    index_set.apply(None, {"id": 1, "email": "x@x", "age": 1}, 1)
    index_set.apply(None, {"id": 2, "email": "x@x", "age": 1}, 2)
    index_set.apply(None, {"id": 3, "email": {"not": "indexable"}, "age": [1]}, 3)
    index_set.rebuild()
    assert unique["email"].get("x@x") == 2 and len(unique["email"]) == 1
    assert ordered["age"].eq(1) == [1, 2] and len(unique["id"]) == 3


def test_index_set_rebuild_orders_mixed_primary_keys(core: ModuleType) -> None:
    pks = [3, "b", 1.5, True, "a", uuid.UUID(int=5), (1, "x"), -2]
    direct, u1, o1, _ = make_index_set(core)
    deferred, u2, o2, _ = make_index_set(core)
    deferred.defer()
    for revision, pk in enumerate(pks, 1):
        row = {"id": pk, "email": f"e{revision}", "age": 1}
        direct.apply(None, row, revision)
        deferred.apply(None, row, revision)
    deferred.rebuild()
    assert index_contents(u1, o1) == index_contents(u2, o2)
    assert o2["age"].eq(1) == u2["id"].ordered()


@pytest.mark.parametrize("pks", [
    list(range(1, 2000)), list(range(2000, 0, -1)), [5, 3, 9, 1], [1, 2**70, 2**71], [2**71, 1, -(2**70)],
    [1, 2, 2.5, 3], [1, 2, "3"], [-5, 0, True],
])
def test_index_set_rebuild_of_primary_keys_in_any_order(core: ModuleType, pks: list[Any]) -> None:
    # A replica loads its records in pk order most often: the pk index is then filled as it
    # is; any other order (or kind of pk) is sorted, and both answer alike.
    direct, u1, o1, _ = make_index_set(core)
    deferred, u2, o2, _ = make_index_set(core)
    deferred.defer()
    for revision, pk in enumerate(pks, 1):
        row = {"id": pk, "email": f"e{revision}", "age": revision % 3}
        direct.apply(None, row, revision)
        deferred.apply(None, row, revision)
    deferred.rebuild()
    assert index_contents(u1, o1) == index_contents(u2, o2)
    if all(type(pk) is int for pk in pks):
        assert u2["id"].ordered() == sorted(pks)
    assert all(u2["id"].get(pk) == pk for pk in pks)


def test_index_set_shares_repeated_strings(core: ModuleType) -> None:
    index_set, _, _, records = make_index_set(core)
    index_set.share(["role", "note"], limit=2)
    rows = [{"id": i, "role": "".join(["ad", "min"]) if i % 2 else "".join(["vie", "wer"]),
             "note": "".join(["n", str(i)]), "age": 1.5} for i in range(1, 7)]
    for revision, row in enumerate(rows, 1):
        index_set.apply(None, row, revision)
    roles = [records[i]["role"] for i in range(1, 7)]
    assert roles == ["admin", "viewer"] * 3
    assert all(r is roles[0] for r in roles[::2]) and all(r is roles[1] for r in roles[1::2])
    # past the limit a field is no longer tracked: its values stay as they came
    notes = [records[i]["note"] for i in range(1, 7)]
    assert notes == [f"n{i}" for i in range(1, 7)]
    again = {"id": 9, "role": "".join(["ad", "min"]), "note": "".join(["n", "1"])}
    index_set.apply(None, again, 7)
    assert records[9]["role"] is roles[0] and records[9]["note"] is not notes[0]
    with pytest.raises(ValueError, match="limit"):
        index_set.share(["role"], limit=-1)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def test_record_reads_as_the_mapping_of_its_stored_form(core: ModuleType) -> None:
    index_set, _, _, records = make_index_set(core)
    stored = {"role": "admin", "id": 1, "email": None, "other": [1, {"x": 2}], "age": 3.5}
    index_set.apply(None, dict(stored), 9)
    record = records[1]
    assert isinstance(record, core.Record) and isinstance(record, index_set.record_type)
    assert record.revision == 9 and record == stored and stored == record and record != {"id": 1}
    assert record.as_dict() == stored and dict(record) == stored and len(record) == len(stored)
    assert record["role"] == "admin" and record.get("email", 5) is None and record.get("note", 5) == 5
    assert record["other"] == [1, {"x": 2}] and "other" in record and "note" not in record
    with pytest.raises(KeyError):
        record["note"]  # in the layout, absent from this record
    with pytest.raises(KeyError):
        record["nowhere"]  # outside the layout
    with pytest.raises(TypeError):
        record.get([1])  # unhashable, as with a dict
    assert sorted(record) == sorted(stored) and sorted(record.keys()) == sorted(stored)
    assert sorted(record.items(), key=repr) == sorted(stored.items(), key=repr)
    assert record == index_set.record(stored, 1)  # the revision is not part of the mapping
    assert pickle.loads(pickle.dumps(record)) == stored and copy.deepcopy(record) == stored
    assert "Record(" in repr(record) and "revision=9" in repr(record)
    with pytest.raises(TypeError):
        hash(record)
    with pytest.raises(TypeError, match="a stored record is a dict"):
        index_set.record([1], 1)


def test_record_type_checks_its_layout(core: ModuleType) -> None:
    kind = core.record_type(["a", "b"])
    assert issubclass(kind, core.Record) and kind._names == ("a", "b")
    with pytest.raises(ValueError, match="repeat"):
        core.record_type(["a", "a"])
    with pytest.raises(TypeError, match="field names are str"):
        core.record_type([b"a"])


def test_record_cores_agree(c_core: ModuleType, py_core: ModuleType) -> None:
    stored = {"id": 7, "email": "a@x", "zeta": {"deep": [1]}, "age": None}
    made = [make_index_set(m)[0].record(dict(stored), 3) for m in (c_core, py_core)]
    for record in made:
        assert record == stored and record.revision == 3
        assert list(record) == list(made[0]) and repr(record) == repr(made[0])
        assert tuple.__len__(record) == tuple.__len__(made[0])  # a trailing dict of the key outside the layout


def test_filters_and_builders_read_records(core: ModuleType) -> None:
    index_set, _, _, records = make_index_set(core)
    rows = [{"id": 1, "role": "admin", "age": 30, "x": {"y": 1}}, {"id": 2, "role": "user"}, {"id": 3, "age": None}]
    for revision, row in enumerate(rows, 1):
        index_set.apply(None, row, revision)
    held_records = [records[pk] for pk in (1, 2, 3)]
    wheres: list[dict[str, Any]] = [
        {"role": "admin"}, {"age": {"$exists": False}}, {"age": None}, {"x.y": 1}, {"nowhere": {"$exists": True}},
        {"$or": [{"role": "user"}, {"age": {"$gte": 30}}]}, {"$not": {"role": "admin"}}, {},
    ]
    for where in wheres:
        flt = core.compile_filter(where)
        assert flt.filter(held_records) == flt.filter(rows), where
        assert [flt.match(r) for r in held_records] == [flt.match(r) for r in rows], where

    class Plain:
        pass

    builder = core.RecordBuilder(Plain, ["id", "role", "age", "missing"], skip=["email"], floats=["age"])
    from_records = builder.build(held_records)
    from_pairs = builder.build([(row, revision) for revision, row in enumerate(rows, 1)])
    from_held_pairs = builder.build([(r, r.revision) for r in held_records])
    for a, b, c in zip(from_records, from_pairs, from_held_pairs, strict=True):
        assert {k: v for k, v in vars(a).items() if k != "_stored"} == {
            k: v for k, v in vars(b).items() if k != "_stored"
        }
        assert vars(c) == vars(a)
    assert from_records[0].age == 30.0 and type(from_records[0].age) is float
    assert from_records[0]._extra == {"x": {"y": 1}}
    assert from_records[0]._stored is held_records[0] and from_records[2]._version == 3
    assert from_records[1].missing is None and from_records[1].age is None


@pytest.mark.parametrize("key, pk", [
    ("r:i:12", 12), ("r:i:-3", -3), ("r:i:0", 0), ("r:s:a:b c", "a:b c"), ("r:s:", ""),
    ("r:u:00000000-0000-0000-0000-000000abcdef", "00000000-0000-0000-0000-000000abcdef"),
    ("r:i:012", None), ("r:i:+1", None), ("r:i: 1", None), ("r:i:1_0", None), ("r:i:x", None), ("r:i:-0", None),
    ("r:i:-", None), ("r:i:", None), ("r:i:\u0661", None), ("r:u:not-a-uuid", None),
    ("r:u:00000000-0000-0000-0000-000000ABCDEF", None), ("u:email:x", None), ("r:x:1", None), ("r:", None), ("", None),
])
def test_record_pk(core: ModuleType, key: str, pk: Any) -> None:
    got = core.record_pk(key)
    assert got == pk and type(got) is type(pk)


def test_record_pk_refuses_what_is_not_a_str(core: ModuleType) -> None:
    with pytest.raises(TypeError, match="a key is a str"):
        core.record_pk(b"r:i:1")


class Entry:
    """A raw entry as the watch delivers it (the fields of natskv's RawEntry that count here)."""

    def __init__(self, key: str, data: bytes, revision: int, operation: str = "PUT", raw_bytes: bool = False) -> None:
        self.subject = "$KV.b." + key.replace(":", ".")
        self.data = data
        self.revision = revision
        self.operation = operation
        self.raw_bytes = raw_bytes


def entries_case() -> list[Entry]:
    return [
        Entry("r:i:1", b'{"id": 1, "email": "a@x", "age": 5}', 1),
        Entry("r:i:2", b'{"id": 2, "email": "b@x", "age": 5, "role": "admin"}', 2),
        Entry("r:i:3", b'{"id": 4, "email": "c@x"}', 3),  # a pk that is not its key's: no record
        Entry("r:i:5", b'[1, 2]', 4),  # not an object: no record
        Entry("r:i:6", b'not json', 5),
        Entry("r:i:7", b'{"id": 7}', 6, raw_bytes=True),  # stored as bytes: no record
        Entry("u:email:x", b'"r:i:1"', 7),  # not a record key
        Entry("r:i:1", b'{"id": 1, "email": "a2@x", "age": 6}', 8),  # an update
        Entry("r:i:2", b"", 9, "DEL"),  # a delete
        Entry("r:i:9", b"", 10, "PURGE"),  # deleting what is not held
        Entry("r:i:1", b'{"id": 1, "email": "old@x"}', 8),  # applied already
        Entry("r:i:8", b'{"id": 8, "email": "d@x"}', 11),
        Entry("r:i:8", b'{"id": 8, "email": "e@x"}', 12),  # deleted ahead of the watch at 12
        Entry("r:s:k", b'{"id": "k", "age": 1}', 13),
        Entry("r:i:10", b'{"id": "10"}', 14),  # a str pk under an int key: no record
    ]


def test_apply_entries_applies_as_one_change_at_a_time(core: ModuleType) -> None:
    bulk, u1, o1, r1 = make_index_set(core)
    single, u2, o2, r2 = make_index_set(core)
    import orjson

    deleted = {"r:i:8": 12}
    assert bulk.apply_entries(entries_case(), len("$KV.b."), ":", orjson.loads, core.record_pk, deleted) == 14
    for entry in entries_case():  # what a replica does one change at a time
        key = entry.subject[len("$KV.b."):].replace(".", ":")
        pk = core.record_pk(key)
        held_record = r2.get(pk) if pk is not None else None
        if pk is None or (held_record is not None and entry.revision <= held_record.revision):
            continue
        if entry.revision <= deleted.get(key, 0):
            continue
        new = None
        if entry.operation == "PUT" and not entry.raw_bytes:
            try:
                value = orjson.loads(entry.data)
            except ValueError:
                value = None
            if type(value) is dict and type(value.get("id")) is type(pk) and value.get("id") == pk:
                new = value
        single.apply(held_record, new, entry.revision)
    assert held(r1) == held(r2) == {
        1: ({"id": 1, "email": "a2@x", "age": 6}, 8),
        "k": ({"id": "k", "age": 1}, 13),
    }
    assert index_contents(u1, o1) == index_contents(u2, o2)
    assert bulk.apply_entries([], 6, ":", orjson.loads, core.record_pk, {}) == 0


def test_apply_entries_with_a_pk_function_of_its_own(core: ModuleType) -> None:
    index_set, _, _, records = make_index_set(core)
    import orjson

    entries = [Entry("a", b'{"id": "a"}', 1), Entry("b", b'{"id": "b"}', 2)]
    only_a = lambda key: key if key == "a" else None  # noqa: E731
    top = index_set.apply_entries(entries, len("$KV.b."), ":", orjson.loads, only_a, {})
    assert top == 2 and held(records) == {"a": ({"id": "a"}, 1)}


def test_apply_entries_consumes_a_list_and_leaves_it_alone_when_declined(core: ModuleType) -> None:
    index_set, _, _, records = make_index_set(core)
    import orjson

    entries: list[Any] = entries_case()
    index_set.apply_entries(entries, len("$KV.b."), ":", orjson.loads, core.record_pk, {})
    assert entries == [None] * len(entries_case())  # each let go once read
    again, _, _, records_again = make_index_set(core)
    again.apply_entries(tuple(entries_case()), len("$KV.b."), ":", orjson.loads, core.record_pk, {})
    assert held(records_again) == held(records)  # any iterable: only a list is consumed


# Payloads for the JSON read straight into Records (IndexSet.apply_entries with orjson's loads):
# the flat objects it reads itself, and everything it leaves to orjson.
_JSON_CASES = [
    b'{"id": 1, "email": "a@x", "age": 5, "role": "admin", "note": "n"}',
    b' \t\r\n{ "id" : 1 , "note" : null , "age" : -0 , "role" : true }\n',
    b'{"note": 1.5e3, "id": 1, "age": -12.25E-2, "email": false}',
    b'{"id": 1, "extra": 1, "role": "r", "x\\u00e9": 2}',  # keys outside the layout (one escaped)
    b'{"id": 1, "x\xc3\xa9": "\xe2\x82\xac", "note": "caf\xc3\xa9"}',  # UTF-8 in keys and values
    b'{"id": 1, "id": 1, "age": 1, "age": 2}',  # repeated keys: the last one counts
    b'{"id": 1, "note": "a\\"b", "age": "\\u00e9"}',  # escapes
    b'{"id": 1, "note": [1, {"a": 2}], "age": {}}',  # nested values
    b'{"id": 1, "age": 123456789012345678}', b'{"id": 1, "age": 1234567890123456789}',
    b'{"id": 1, "age": 123456789012345678901234}', b'{"id": 1, "age": -0.0}', b'{"id": 1, "age": 1e400}',
    b'{"id": 1, "age": 1e-400}', b'{"id": 1, "age": 0.1}', b'{"id": 1, "age": 2.2250738585072011e-308}',
    b'{"id": 1, "age": 0.3, "note": -0.0}', b'{"id": 1, "age": 123456789012.345, "note": 99999999999999.9}',
    b'{"id": 1, "age": 1.000000000000001, "note": 9007199254740.993}', b'{"id": 1, "age": 0.000000000000001}',
    b'{"id": 1, "age": 395.95, "note": -1234.5678}', b'{"id": 1, "age": 1.5E3}',
    b'{"id": 1, "age": 01}', b'{"id": 1, "age": 1.}', b'{"id": 1, "age": .5}', b'{"id": 1, "age": +1}',
    b'{"id": 1, "age": 1e}', b'{"id": 1, "age": NaN}', b'{"id": 1, "age": tru}', b'{"id": 1, "age": nul}',
    b'{"id": 1,}', b'{"id": 1', b'{"id" 1}', b'{"id": 1} x', b'{"id": 1}{}', b'{}', b'[]', b'"id"', b'1', b'',
    b'{"id": 1, "note": "\x01"}', b'{"id": 1, "note": "\xff"}', b'{"id": 1, "note": "\xed\xa0\x80"}',
    b'{"id": 1, "\xff": 1}', b'{"id": "1"}', b'{"id": true}', b'{"id": 1.0}', b'{"id": 2}', b'{"email": "a"}',
]


def _loads_via_dict(payload: bytes) -> Any:
    """orjson's loads, but not that function itself: apply_entries then goes through the dict."""
    import orjson

    return orjson.loads(payload)


@pytest.mark.parametrize("payload", _JSON_CASES)
def test_apply_entries_reads_json_as_orjson_does(core: ModuleType, payload: bytes) -> None:
    import orjson

    direct, u1, o1, r1 = make_index_set(core)
    parsed, u2, o2, r2 = make_index_set(core)
    for index_set in (direct, parsed):
        index_set.share(["role", "note"], 2)
    entries = [Entry("r:i:1", b'{"id": 1, "role": "r", "note": "n"}', 1), Entry("r:i:1", payload, 2)]
    assert direct.apply_entries(entries, len("$KV.b."), ":", orjson.loads, core.record_pk, {}) == 2
    entries = [Entry("r:i:1", b'{"id": 1, "role": "r", "note": "n"}', 1), Entry("r:i:1", payload, 2)]
    assert parsed.apply_entries(entries, len("$KV.b."), ":", _loads_via_dict, core.record_pk, {}) == 2
    assert held(r1) == held(r2)
    for pk, record in r1.items():
        raw = [tuple.__getitem__(record, i) for i in range(tuple.__len__(record))]
        other = r2[pk]
        assert raw == [tuple.__getitem__(other, i) for i in range(tuple.__len__(other))]
        assert [type(v) for v in raw] == [type(tuple.__getitem__(other, i)) for i in range(tuple.__len__(other))]
    assert index_contents(u1, o1) == index_contents(u2, o2)


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6), st.sampled_from(["admin", "user", "a\"b"]),
)


@settings(max_examples=300, deadline=None)
@given(decimals=st.lists(st.decimals(allow_nan=False, allow_infinity=False, places=6), max_size=4),
       rows=st.lists(
    st.dictionaries(st.sampled_from(["id", "email", "age", "role", "note", "other", "é"]),
                    st.one_of(_SCALARS, st.lists(_SCALARS, max_size=2)), max_size=6),
    max_size=6))
def test_apply_entries_reads_json_as_orjson_does_generated(
    core: ModuleType, decimals: list[Any], rows: list[dict[str, Any]]
) -> None:
    import orjson

    def entries() -> list[Entry]:
        # decimal numbers written as people write them (json.dumps writes floats' shortest repr)
        out = [Entry(f"r:i:{10 + i}", f'{{"id": {10 + i}, "age": {d}}}'.encode(), 100 + i)
               for i, d in enumerate(decimals)]
        for revision, row in enumerate(rows, 1):
            stored = {**row, "id": revision % 3} if revision % 4 else row  # mostly valid records
            # json, not orjson: ints beyond 64 bits too, and non-ASCII text written as UTF-8 or escaped
            payload = json.dumps(stored, ensure_ascii=revision % 2 == 0).encode()
            out.append(Entry(f"r:i:{revision % 3}", payload, revision))
        return out

    direct, u1, o1, r1 = make_index_set(core)
    parsed, u2, o2, r2 = make_index_set(core)
    for index_set in (direct, parsed):
        index_set.share(["role", "note"], 3)
    direct.apply_entries(entries(), len("$KV.b."), ":", orjson.loads, core.record_pk, {})
    parsed.apply_entries(entries(), len("$KV.b."), ":", _loads_via_dict, core.record_pk, {})
    assert held(r1) == held(r2)
    for pk, record in r1.items():
        assert [type(v) for v in record.values()] == [type(v) for v in r2[pk].values()]
    assert index_contents(u1, o1) == index_contents(u2, o2)


def test_apply_entries_shares_repeated_values_read_from_json(core: ModuleType) -> None:
    import orjson

    index_set, _, _, records = make_index_set(core)
    index_set.share(["role"], 2)
    rows = [b'{"id": %d, "role": "%s"}' % (pk, role) for pk, role in
            ((1, b"admin"), (2, b"admin"), (3, b"user"), (4, b"user"), (5, b"xyz"), (6, b"xyz"), (7, b"admin"))]
    entries = [Entry(f"r:i:{pk}", row, pk) for pk, row in enumerate(rows, 1)]
    index_set.apply_entries(entries, len("$KV.b."), ":", orjson.loads, core.record_pk, {})
    roles = [records[pk]["role"] for pk in range(1, 8)]
    assert roles == ["admin", "admin", "user", "user", "xyz", "xyz", "admin"]
    assert roles[0] is roles[1] and roles[2] is roles[3]  # held once each
    # Past the limit of 2 distinct values the field is no longer shared, "admin" neither.
    assert roles[4] is not roles[5] and roles[6] is not roles[0]


def test_apply_entries_reads_record_keys_in_any_form(core: ModuleType) -> None:
    import orjson

    index_set, _, _, records = make_index_set(core)
    entries = [Entry("r:i:0", b'{"id": 0}', 1), Entry("r:i:-3", b'{"id": -3}', 2), Entry("r:i:012", b'{"id": 12}', 3),
               Entry("r:i:123456789012345678901", b'{"id": 123456789012345678901}', 4),
               Entry("r:s:7", b'{"id": "7"}', 5), Entry("r:i:99", b'{"id": 99}', 6)]
    entries.append(Entry("r:i:x", b"", 7))
    entries[-1].subject = "$KV.b.r.i.9\u00e9"  # not in natskv's encoding: left as it is
    index_set.apply_entries(entries, len("$KV.b."), ":", orjson.loads, core.record_pk, {})
    # orjson reads an int beyond 64 bits as a float: not the int of its key, so no record.
    assert held(records) == {0: ({"id": 0}, 1), -3: ({"id": -3}, 2), "7": ({"id": "7"}, 5), 99: ({"id": 99}, 6)}
    assert all(record["id"] is pk for pk, record in records.items())  # one object for both: less memory
    index_set.apply_entries([Entry("r:i:99", b'{"id": 99, "age": 1}', 8)], len("$KV.b."), ":", orjson.loads,
                            core.record_pk, {"r:i:99": 8})  # deleted ahead of the watch at 8: skipped
    assert records[99].revision == 6


def test_apply_entries_reads_slotted_entries_and_others_alike(core: ModuleType) -> None:
    import orjson

    from natskv.wire.kv import RawEntry

    index_set, _, _, records = make_index_set(core)
    entries: list[Any] = [RawEntry("$KV.b.r.i.1", b'{"id": 1}', 1, "", "PUT"), Entry("r:i:2", b'{"id": 2}', 2),
                          RawEntry("$KV.b.r.i.3", b'{"id": 3}', 3, "", "PUT", raw_bytes=True),
                          RawEntry("$KV.b.r.i.1", b"", 4, "", "DEL"), Entry("r:i:5", b'{"id": 5}', 5)]
    assert index_set.apply_entries(entries, len("$KV.b."), ":", orjson.loads, core.record_pk, {}) == 5
    assert held(records) == {2: ({"id": 2}, 2), 5: ({"id": 5}, 5)}


def test_records_cut_short_after_their_last_value(core: ModuleType) -> None:
    index_set, unique, ordered, records = make_index_set(core)  # layout: id email age role note
    index_set.apply(None, {"id": 1, "email": "a@x"}, 1)
    index_set.apply(None, {"id": 2, "note": "n"}, 2)
    index_set.apply(None, {"id": 3, "age": 4, "other": 1}, 3)
    short, full, extra = records[1], records[2], records[3]
    assert tuple.__len__(short) == 3 and tuple.__len__(full) == 6 and tuple.__len__(extra) == 7
    assert short == {"id": 1, "email": "a@x"} and short.get("note", 0) == 0 and "role" not in short
    assert full == {"id": 2, "note": "n"} and extra == {"id": 3, "age": 4, "other": 1}
    flt = core.compile_filter({"note": {"$exists": False}})
    assert flt.filter([short, full, extra]) == [0, 2]

    class Plain:
        pass

    built = core.RecordBuilder(Plain, ["id", "note", "age"]).build([short, extra])
    assert built[0].note is None and built[0]._extra == {"email": "a@x"} and built[1]._extra == {"other": 1}
    index_set.apply(short, {"id": 1, "role": "r", "age": 2}, 4)
    assert unique["email"].get("a@x") is None and ordered["age"].eq(2) == [1]
    index_set.defer()
    index_set.rebuild()
    assert ordered["age"].ordered() == [1, 3] and unique["email"].get("a@x") is None
