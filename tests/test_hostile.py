"""Hostile input thrown at the public API of a real server (Hypothesis).

Whatever arrives (keys, values, revisions, ttls, bucket names, patterns, filters, commit ops,
subjects), a call either works or raises a :class:`natskv.NatsKVError`; a rejected call leaves the
stream's last sequence where it was; and the client keeps working afterwards. Example counts are
bounded so the module runs in well under a minute.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import natskv
from natskv.client import _outgoing
from natskv.wire.headers import ttl_header
from natskv.wire.replies import encode_command

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def kv(db: natskv.Client) -> Iterator[natskv.Bucket]:
    bucket = db.bucket("hostile_input", history=5)
    try:
        yield bucket
    finally:
        db.delete_bucket("hostile_input")


def survives(kv: natskv.Bucket, call: Callable[[], Any]) -> None:
    """``call`` works or raises a NatsKVError that stored nothing; the client works afterwards."""
    before = kv.status().last_revision
    try:
        call()
    except natskv.NatsKVError:
        assert kv.status().last_revision == before, "a rejected call stored something"
    # Anything else propagates and fails the test: only natskv errors may escape.
    rev = kv.set("probe", "alive")
    assert kv.get("probe") == "alive" and kv.status().last_revision == rev


def _compiled(regex: str) -> Any:
    try:
        return re.compile(regex)
    except re.error:
        return regex  # Python's re refuses it: pass the string (a glob) instead


NOT_STR = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=5), st.lists(st.integers(), max_size=2))
KEYS = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=".:*>?[]\\ \t\r\n=$", max_size=12),
    st.sampled_from(["", ".", "..", "a..b", "*", ">", "x" * 5000, "é" * 1500, "\x00", "\ud800"]),
    NOT_STR,
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 2**63, 2**64, -(2**63) - 1]),
)
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20), st.binary(max_size=10),
              st.sampled_from([set(), object(), {1, 2}, b"\xff", "\ud800"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(), st.floats()), inner, max_size=3),
        st.tuples(inner, inner),
    ),
    max_leaves=8,
)
REVISIONS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=5), st.booleans(), st.none()
)
TTLS = st.one_of(
    NUMBERS, st.text(max_size=5), st.booleans(), st.none(), st.sampled_from([0, -1, 1e12, 3153600001, 7.5e9])
)
GLOBS = st.one_of(
    st.text(alphabet="ab:*?[]^!-\\", max_size=12),
    st.sampled_from(["*a" * 30 + "*b", "[", "\\", "[]", "[z-a]*"]),
)
REGEXES = st.sampled_from([r"(a+)+$", r"(a)\1", r"(?<=a)b", r"^user", r"[", r"(a|aa)*c", r"\d+", "(?x) a"])
PATTERNS = st.one_of(GLOBS, REGEXES.map(_compiled), NOT_STR)
OPERATORS = st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$contains", "$startswith",
                             "$endswith", "$regex", "$exists", "$not", "$and", "$or", "$nope", "$"])
FILTERS = st.recursive(
    st.one_of(VALUES, REGEXES),
    lambda inner: st.one_of(
        st.dictionaries(st.one_of(OPERATORS, st.text(max_size=6), st.integers()), inner, max_size=3),
        st.lists(inner, max_size=3),
    ),
    max_leaves=8,
)
BUCKET_NAMES = st.one_of(
    st.text(max_size=60),
    st.text(alphabet="aZ0_-", min_size=1, max_size=200),
    st.sampled_from(["", "a.b", "a b", "*", ">", "KV_x", "a\x00", "x" * 251, "x" * 252, "x" * 5000]),
    NOT_STR,
)


@SETTINGS
@given(key=KEYS, value=VALUES, ttl=TTLS)
@pytest.mark.slow
def test_writes(kv: natskv.Bucket, key: Any, value: Any, ttl: Any) -> None:
    ttl = _not_expiring_here(ttl)
    survives(kv, lambda: kv.set(key, value, ttl=ttl))
    survives(kv, lambda: kv.create(key, value, ttl=ttl))
    survives(kv, lambda: kv.replace(key, value, ttl=ttl))
    mapping = {key: value, "plain": 1} if isinstance(key, Hashable) else [(key, value)]
    survives(kv, lambda: kv.set_many(mapping, ttl=ttl))


@SETTINGS
@given(key=KEYS, value=VALUES, revision=REVISIONS)
@pytest.mark.slow
def test_revisions(kv: natskv.Bucket, key: Any, value: Any, revision: Any) -> None:
    survives(kv, lambda: kv.update(key, value, revision))
    survives(kv, lambda: kv.delete(key, revision=revision))
    survives(kv, lambda: kv.purge(key, revision=revision))
    survives(kv, lambda: kv.entry(key, revision=revision))
    survives(kv, lambda: kv.history(key))


@SETTINGS
@given(
    ops=st.one_of(
        st.lists(
            st.one_of(
                st.tuples(st.sampled_from(["set", "create", "update", "delete", "bogus", ""]), KEYS, VALUES, REVISIONS),
                st.tuples(st.sampled_from(["set", "create", "update", "delete"]), KEYS),
                st.tuples(st.sampled_from(["set", "create", "delete"]), KEYS, VALUES),
                st.tuples(),
                NOT_STR,
            ),
            max_size=4,
        ),
        NOT_STR,
        st.text(max_size=4),
    )
)
@pytest.mark.slow
def test_commits(kv: natskv.Bucket, ops: Any) -> None:
    survives(kv, lambda: kv.commit(ops))


@SETTINGS
@given(
    pattern=PATTERNS, where=FILTERS, limit=st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=2), st.floats())
)
@pytest.mark.slow
def test_reads(kv: natskv.Bucket, pattern: Any, where: Any, limit: Any) -> None:
    kv.set_many({"a" * 200 + "!": {"s": "a" * 3000 + "!"}, "user:1": {"s": "x", "n": 1}})
    survives(kv, lambda: kv.keys(pattern))
    survives(kv, lambda: kv.items(pattern))
    survives(kv, lambda: kv.find(where=where, pattern=pattern, limit=limit))
    survives(kv, lambda: kv.find(where={"s": where}))
    survives(kv, lambda: kv.get_many(pattern))


@SETTINGS
@given(name=BUCKET_NAMES, ttl=TTLS, history=st.one_of(st.integers(-2, 100), st.text(max_size=2), st.none()))
@pytest.mark.slow
def test_bucket_names_and_options(db: natskv.Client, kv: natskv.Bucket, name: Any, ttl: Any, history: Any) -> None:
    survives(kv, lambda: db.bucket(name, create=False))
    # Options are checked before the name is looked up: an invalid set creates nothing.
    survives(
        kv, lambda: db.bucket("hostile_never_created", ttl=ttl, history=history) if _invalid(ttl, history) else None
    )
    assert "hostile_never_created" not in db.buckets()


def _not_expiring_here(ttl: Any) -> Any:
    """A valid ttl made long enough that no key expires while the module runs: an expiry writes
    a delete marker, which would move the stream's last sequence under a rejected call."""
    try:
        valid = ttl_header(ttl) is not None
    except natskv.NatsKVError:
        return ttl
    return max(ttl, 3600) if valid else ttl


def _sendable(subject: Any, data: Any) -> bool:
    try:
        _outgoing(subject, data)
        encode_command(subject, "", b"", None)
    except natskv.NatsKVError:
        return False
    return True


def _invalid(ttl: Any, history: Any) -> bool:
    try:
        ttl_header(ttl)
    except natskv.NatsKVError:
        return True
    return not (type(history) is int and 1 <= history <= 64)


@SETTINGS
@given(
    subject=st.one_of(st.text(max_size=20), st.text(alphabet="a.*> \t", max_size=8), NOT_STR),
    data=st.one_of(st.binary(max_size=10), st.text(max_size=5), NOT_STR),
)
@pytest.mark.slow
def test_publish_and_request(db: natskv.Client, kv: natskv.Bucket, subject: Any, data: Any) -> None:
    inside = f"$KV.{kv.name}.{subject}" if isinstance(subject, str) else subject
    for target in (subject, inside):
        if target is inside and _sendable(target, data):
            continue  # a valid message into the bucket: publishing there stores it, by design
        survives(kv, functools.partial(db.publish, target, data))
        survives(kv, functools.partial(db.request, target, data, timeout=0.5))


@SETTINGS
@given(pattern=PATTERNS)
@pytest.mark.slow
def test_watch_and_replica_patterns(kv: natskv.Bucket, pattern: Any) -> None:
    def watch() -> None:
        kv.watch(pattern, updates_only=True).stop()

    def replica() -> None:
        kv.replica(pattern).stop()

    survives(kv, watch)
    survives(kv, replica)
