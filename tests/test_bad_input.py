"""Bad input fails with a clear natskv error before anything is sent, and nothing stored changes.

Every case runs against the session's real nats-server. "Nothing stored changes" is read from the
stream itself: its last sequence (``kv.status().last_revision``) is the same after the rejected
call as before it.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import wait_until

import natskv
from natskv import Field, InvalidArgumentError, InvalidKeyError, Model, SerializationError
from natskv.wire.headers import MAX_TTL

NAN, INF = float("nan"), float("inf")


def rejected(kv: natskv.Bucket, call: Callable[[], Any], error: type[Exception], message: str) -> str:
    """Run ``call``; it must raise ``error`` (a NatsKVError) matching ``message`` and store nothing."""
    before = kv.status().last_revision
    with pytest.raises(error, match=message) as info:
        call()
    assert isinstance(info.value, natskv.NatsKVError)
    assert kv.status().last_revision == before
    return str(info.value)


# -- values the codec cannot store ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize(
    "shape",
    [
        lambda x: x,
        lambda x: [1, 2, x],
        lambda x: {"a": {"b": [0, {"c": x}]}},
        lambda x: (1.5, x),
        lambda x: {x: 1},  # a float key (orjson writes it as "null" or "NaN" text)
    ],
    ids=["bare", "list", "nested", "tuple", "key"],
)
def test_non_finite_numbers_are_refused_by_every_write(
    kv: natskv.Bucket, bad: float, shape: Callable[[float], Any]
) -> None:
    value = shape(bad)
    rev = kv.set("there", 1)
    message = rejected(kv, lambda: kv.set("k", value), SerializationError, r"cannot store (nan|inf|-inf) at value")
    assert "finite number" in message
    rejected(kv, lambda: kv.create("k", value), SerializationError, "cannot store")
    rejected(kv, lambda: kv.update("there", value, rev), SerializationError, "cannot store")
    rejected(kv, lambda: kv.replace("there", value), SerializationError, "cannot store")
    rejected(kv, lambda: kv.set_many({"a": 1, "b": value}), SerializationError, "cannot store")
    rejected(kv, lambda: kv.commit([("set", "a", 1), ("set", "b", value)]), SerializationError, "cannot store")
    assert kv.get("k") is None and kv.get("there") == 1


def test_non_finite_message_names_where(kv: natskv.Bucket) -> None:
    message = rejected(kv, lambda: kv.set("k", {"a": [1, {"b": NAN}]}), SerializationError, "cannot store")
    assert "value['a'][1]['b']" in message


def test_null_and_finite_floats_still_store(kv: natskv.Bucket) -> None:
    value = {"a": None, "b": [1.5, -0.0, 1e308], "c": "null", "d": None}
    kv.set("k", value)
    assert kv.get("k") == value


def test_non_finite_in_a_filter_is_refused(kv: natskv.Bucket) -> None:
    with pytest.raises(InvalidArgumentError, match=r"where\['x'\]\['\$gt'\] is nan"):
        kv.find(where={"x": {"$gt": NAN}})
    with pytest.raises(InvalidArgumentError, match=r"is inf"):
        kv.find(where={"x": INF})


@pytest.fixture
def Item(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    class Item(Model):
        __bucket__ = name
        id = Field(int, primary_key=True)
        tags = Field(list)
        meta = Field(dict)
        score = Field(float, index=True)

    db.register(Item)
    try:
        yield Item
    finally:
        db.delete_bucket(name)


def test_model_writes_refuse_non_finite_numbers(db: natskv.Client, Item: Any) -> None:
    kv = db.bucket(Item.__bucket__)
    rejected(kv, lambda: Item.create(id=1, tags=[1.0, NAN]), SerializationError, r"cannot store nan")
    rejected(kv, lambda: Item.create(id=1, meta={"x": {"y": -INF}}), SerializationError, r"cannot store -inf")
    rejected(kv, lambda: Item.create(id=1, score=INF), natskv.ValidationError, "finite")
    item = Item.create(id=1, tags=[1.0])
    item.meta = {"bad": NAN}
    rejected(kv, item.save, SerializationError, "cannot store nan")
    with pytest.raises(InvalidArgumentError, match="is nan"):
        Item.find(score__gt=NAN)
    with pytest.raises(InvalidArgumentError, match="is inf"):
        Item.find(where={"score": {"$lt": INF}})
    assert Item.get(1).meta is None


# -- revisions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("revision", [-5, 0, "x", True, 1.0, 2**64])
def test_entry_revision_is_checked_before_asking(kv: natskv.Bucket, revision: Any) -> None:
    kv.set("k", 1)
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="revision must be"):
        kv.entry("k", revision=revision, timeout=5)
    assert time.monotonic() - started < 1  # refused at once, not a server timeout


def test_entry_revision_still_reads(kv: natskv.Bucket) -> None:
    first = kv.set("k", "a")
    kv.set("k", "b")
    entry = kv.entry("k", revision=first)
    assert entry is not None and entry.value == "a"


@pytest.mark.parametrize("revision", [-1, "3", 2**64, False])
def test_write_revisions_are_checked(kv: natskv.Bucket, revision: Any) -> None:
    kv.set("k", 1)
    rejected(kv, lambda: kv.update("k", 2, revision), InvalidArgumentError, "revision must be")
    rejected(kv, lambda: kv.delete("k", revision=revision), InvalidArgumentError, "revision must be")
    rejected(kv, lambda: kv.commit([("update", "k", 2, revision)]), InvalidArgumentError, "revision must be")


# -- ttl -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [1e12, MAX_TTL + 1, 7.5e9, 2**63])
def test_ttl_over_the_limit_is_refused_by_every_write(kv: natskv.Bucket, ttl: float) -> None:
    rev = kv.set("there", 1)
    message = rejected(kv, lambda: kv.set("k", 1, ttl=ttl), InvalidArgumentError, "longer than natskv's limit")
    assert "ttl=None" in message
    rejected(kv, lambda: kv.create("k", 1, ttl=ttl), InvalidArgumentError, "longer than")
    rejected(kv, lambda: kv.update("there", 2, rev, ttl=ttl), InvalidArgumentError, "longer than")
    rejected(kv, lambda: kv.replace("there", 2, ttl=ttl), InvalidArgumentError, "longer than")
    rejected(kv, lambda: kv.set_many({"a": 1}, ttl=ttl), InvalidArgumentError, "longer than")


@pytest.mark.parametrize("ttl", [0, -1, NAN, INF, "60", True])
def test_ttl_that_is_not_a_positive_number_is_refused(kv: natskv.Bucket, ttl: Any) -> None:
    rejected(kv, lambda: kv.set("k", 1, ttl=ttl), InvalidArgumentError, "ttl must be a positive number")


@pytest.mark.slow
def test_ttl_at_the_limit_keeps_the_key(kv: natskv.Bucket) -> None:
    """Past ~7.5e9 s the server's expiry time overflows and it drops the key at once: the limit
    must stay well inside. The server sweeps expired keys about every second."""
    kv.set("k", 1, ttl=MAX_TTL)
    time.sleep(1.5)
    assert kv.get("k") == 1


@pytest.mark.parametrize("ttl", [1e12, MAX_TTL + 1, -3])
def test_bucket_ttl_over_the_limit_creates_nothing(db: natskv.Client, name: str, ttl: float) -> None:
    with pytest.raises(InvalidArgumentError, match="ttl"):
        db.bucket(name, ttl=ttl)
    assert name not in db.buckets()


# -- find ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [-1, "2", True, 1.5])
def test_find_limit_is_checked(db: natskv.Client, Item: Any, limit: Any) -> None:
    kv = db.bucket(Item.__bucket__)
    with pytest.raises(InvalidArgumentError, match="limit must be"):
        kv.find(limit=limit)
    with pytest.raises(InvalidArgumentError, match="limit must be"):
        Item.find(limit=limit)


@pytest.mark.parametrize("where", [5, [1], "age", [("a", 1)]])
def test_find_where_must_be_a_dict(db: natskv.Client, Item: Any, where: Any) -> None:
    kv = db.bucket(Item.__bucket__)
    with pytest.raises(InvalidArgumentError, match="where= takes a dict"):
        kv.find(where=where)
    with pytest.raises(InvalidArgumentError, match="where= takes a dict"):
        Item.find(where=where)


def test_find_limit_zero_and_none(kv: natskv.Bucket) -> None:
    kv.set_many({"a": {"x": 1}, "b": {"x": 2}})
    assert kv.find(limit=0) == []
    assert [k for k, _ in kv.find(where={"x": {"$gte": 1}}, limit=None)] == ["a", "b"]


# -- commit ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (("set",), r"has 1 items; write it as \('set', key, value\)"),
        (("set", "k"), "has 2 items"),
        (("set", "k", 1, 2), r"only an options dict such as \{'ttl': 30\} may follow"),
        (("set", "k", 1, {}, 5), "has 5 items"),
        (("create", "k"), r"\('create', key, value\)"),
        (("update", "k", 1), r"\('update', key, value, revision\)"),
        (("delete",), r"\('delete', key\) or \('delete', key, revision\)"),
        (("delete", "k", 1, 2), r"only an options dict such as \{'reason': 'evicted'\} may follow"),
        (("delete", "k", 1, {"ttl": 5}), r"\{'reason': 'evicted'\}"),
        (("delete", "k", None, {"reason": "Evicted!"}), "a short lower-case word"),
        (("delete", "k", 1, {}, 5), "has 5 items"),
        (("upsert", "k", 1), "unknown commit operation"),
        ((), "unknown commit operation"),
        ("set", "unknown commit operation"),
        (None, "unknown commit operation"),
        ((5, "k", 1), "unknown commit operation"),
    ],
)
def test_commit_ops_are_checked(kv: natskv.Bucket, op: Any, message: str) -> None:
    rejected(kv, lambda: kv.commit([("set", "ok", 1), op]), InvalidArgumentError, message)
    assert kv.get("ok") is None


@pytest.mark.parametrize("ops", ["abc", {"set": 1}, 5, b"x"])
def test_commit_needs_a_list(kv: natskv.Bucket, ops: Any) -> None:
    rejected(kv, lambda: kv.commit(ops), InvalidArgumentError, "commit takes a list of operation tuples")


# -- type confusions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", ["abc", b"abc", 5, None])
def test_get_many_needs_a_list_of_keys(kv: natskv.Bucket, keys: Any) -> None:
    kv.set("a", 1)
    with pytest.raises(InvalidArgumentError, match="get_many takes a list of keys"):
        kv.get_many(keys)
    assert kv.get_many(["a", "b"]) == {"a": 1}
    assert kv.get_many(k for k in ["a"]) == {"a": 1}


def test_get_many_key_types(kv: natskv.Bucket) -> None:
    with pytest.raises(InvalidKeyError, match="keys are str"):
        kv.get_many(["a", 5])


@pytest.mark.parametrize("mapping", [[("a", 1)], "ab", 5, None])
def test_set_many_needs_a_mapping(kv: natskv.Bucket, mapping: Any) -> None:
    rejected(kv, lambda: kv.set_many(mapping), InvalidArgumentError, "set_many takes a mapping")


def test_set_many_key_types(kv: natskv.Bucket) -> None:
    rejected(kv, lambda: kv.set_many({"a": 1, 5: 2}), InvalidKeyError, "keys are str")


@pytest.mark.parametrize("pattern", [5, None, b"a*", ["a"]])
def test_key_patterns_must_be_str_or_regex(kv: natskv.Bucket, pattern: Any) -> None:
    for call in (kv.keys, kv.items, kv.find):
        with pytest.raises(InvalidKeyError, match="invalid key pattern"):
            call(pattern=pattern)


# -- plain publish / request -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ("", "non-empty str"),
        ("a b", "whitespace"),
        ("a\tb", "whitespace"),
        ("a\r\nPUB x 1", "whitespace"),
        (5, "non-empty str"),
        (None, "non-empty str"),
        ("a..b", "empty token"),
        (".a", "empty token"),
        ("a.", "empty token"),
        ("a.*", "wildcard"),
        ("a.>", "wildcard"),
        (">", "wildcard"),
    ],
)
def test_publish_and_request_check_the_subject(
    db: natskv.Client, kv: natskv.Bucket, subject: Any, message: str
) -> None:
    # A subject inside the bucket would store a value if it got through: the stream proves it did not.
    inside = f"$KV.{kv.name}.{subject}" if isinstance(subject, str) and subject else subject
    for target in (subject, inside):
        rejected(kv, functools.partial(db.publish, target, b"x"), InvalidArgumentError, message)
        rejected(kv, functools.partial(db.request, target, b"x", timeout=2), InvalidArgumentError, message)
    assert db.connected


@pytest.mark.parametrize("data", ["text", 5, None, ["a"]])
def test_publish_and_request_need_bytes(db: natskv.Client, kv: natskv.Bucket, data: Any) -> None:
    subject = f"$KV.{kv.name}.k"
    message = rejected(kv, lambda: db.publish(subject, data), InvalidArgumentError, "data must be bytes")
    if isinstance(data, str):
        assert ".encode()" in message
    rejected(kv, lambda: db.request(subject, data, timeout=2), InvalidArgumentError, "data must be bytes")


@pytest.mark.parametrize("headers", [{"a b": "x"}, {"": "x"}, {"a:": "x"}, {"a": "x\r\nB: y"}, {"a": 5}, [("a", "b")]])
def test_publish_headers_are_checked(db: natskv.Client, kv: natskv.Bucket, headers: Any) -> None:
    rejected(kv, lambda: db.publish(f"$KV.{kv.name}.k", b"x", headers=headers), InvalidArgumentError, "header")


def test_publish_bytes_like_and_literal_tokens_still_work(db: natskv.Client, kv: natskv.Bucket) -> None:
    db.publish(f"$KV.{kv.name}.k", bytearray(b'"v"'))
    db.publish(f"$KV.{kv.name}.k2", memoryview(b'"w"'), headers={"X-A": "1"})
    db.publish(f"$KV.{kv.name}.a*b", b'"lit"')  # '*' inside a token is a literal character
    # A publish is not acknowledged: wait for the stream to hold all three.
    assert wait_until(lambda: sorted(kv.keys()) == ["a*b", "k", "k2"], 5)
    assert kv.get("k") == "v" and kv.get("k2") == "w"


def test_request_without_responders_raises(db: natskv.Client) -> None:
    started = time.monotonic()
    with pytest.raises(natskv.NoRespondersError, match=r"no subscriber answers requests on 'nobody\.listens'") as info:
        db.request("nobody.listens", b"ping", timeout=5)
    assert time.monotonic() - started < 1  # the server says so at once: no timeout
    assert isinstance(info.value, natskv.NatsKVError)
    assert db.request("$JS.API.INFO", b"", timeout=5).startswith(b"{")  # a real responder still answers


# -- regexes cannot stall the process --------------------------------------------------------------------


HOSTILE = r"(a+)+$"
HOSTILE_TEXT = "a" * 2000 + "!"  # Python's re would need about 2**2000 steps to fail this


def _gets_meanwhile(kv: natskv.Bucket, work: Callable[[], Any]) -> tuple[Any, int, float]:
    """Run ``work`` (timed) while another thread reads in a loop; return its result, the other
    thread's completed reads and the time ``work`` took."""
    kv.set("other", "o")
    stop = threading.Event()
    done = [0]

    def reader() -> None:
        while not stop.is_set():
            assert kv.get("other") == "o"
            done[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        time.sleep(0.05)
        before = done[0]
        started = time.monotonic()
        result = work()
        elapsed = time.monotonic() - started
        time.sleep(0.05)
        return result, done[0] - before, elapsed
    finally:
        stop.set()
        thread.join(10)


def test_hostile_regex_in_find_is_linear(kv: natskv.Bucket) -> None:
    kv.set_many({"bad": {"s": HOSTILE_TEXT}, "good": {"s": "xyz-a"}})

    def work() -> Any:
        return [kv.find(where={"s": {"$regex": HOSTILE}}) for _ in range(20)]

    results, reads, elapsed = _gets_meanwhile(kv, work)
    assert all(r == [("good", {"s": "xyz-a"})] for r in results)
    assert elapsed < 5 and reads > 0


def test_hostile_regex_in_model_find_is_linear(db: natskv.Client, Item: Any) -> None:
    Item.create(id=1, meta={"s": HOSTILE_TEXT})
    Item.create(id=2, meta={"s": "ba"})
    kv = db.bucket(Item.__bucket__)

    def work() -> Any:
        return [[i.id for i in Item.find(where={"meta.s": {"$regex": HOSTILE}})] for _ in range(200)]

    results, reads, elapsed = _gets_meanwhile(kv, work)
    assert all(r == [2] for r in results)
    assert elapsed < 5 and reads > 0


def test_hostile_regex_key_pattern_is_linear(kv: natskv.Bucket) -> None:
    kv.set_many({HOSTILE_TEXT: 1, "xa": 2, "b": 3})

    def work() -> Any:
        return [kv.keys(re.compile(HOSTILE)) for _ in range(20)]

    results, reads, elapsed = _gets_meanwhile(kv, work)
    assert all(r == ["xa"] for r in results)
    assert elapsed < 5 and reads > 0


def test_hostile_glob_is_linear(kv: natskv.Bucket) -> None:
    key = "a" * 2000
    kv.set(key, 1)
    started = time.monotonic()
    assert kv.keys("*a" * 30 + "*b") == []
    assert kv.keys("*a" * 30) == [key]
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("regex", "message"),
    [
        (r"(a)\1", "invalid escape sequence"),
        (r"(?<=a)b", "invalid perl operator"),
        (r"a(?=b)", "invalid perl operator"),
    ],
)
def test_regexes_re2_cannot_run_are_refused(db: natskv.Client, Item: Any, regex: str, message: str) -> None:
    kv = db.bucket(Item.__bucket__)
    with pytest.raises(InvalidArgumentError, match=r"bad regular expression .*no backreferences or lookaround"):
        kv.find(where={"s": {"$regex": regex}})
    with pytest.raises(InvalidArgumentError, match=message):
        Item.find(where={"meta.s": {"$regex": regex}})
    with pytest.raises(InvalidKeyError, match=message):
        kv.keys(re.compile(regex))


def test_malformed_regex_is_refused(kv: natskv.Bucket) -> None:
    with pytest.raises(InvalidArgumentError, match=r"bad regular expression '\(': missing \)"):
        kv.find(where={"s": {"$regex": "("}})


def test_regex_flags_carry_over_and_verbose_is_refused(kv: natskv.Bucket) -> None:
    kv.set_many({"User:1": 1, "user:2": 2, "line\nuser": 3})
    assert kv.keys(re.compile(r"^user", re.IGNORECASE)) == ["User:1", "user:2"]
    assert kv.keys(re.compile(r"^user", re.MULTILINE)) == ["line\nuser", "user:2"]
    assert kv.items(re.compile("e.u", re.DOTALL)) == [("line\nuser", 3)]
    with pytest.raises(InvalidKeyError, match="RE2 cannot honour"):
        kv.keys(re.compile(r"user  # comment", re.VERBOSE))
