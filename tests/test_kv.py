"""The blocking Bucket and Client API against a real nats-server: every call and its errors.

Each test uses a bucket of its own (named after the test), on one client shared by the module.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import eventually

import natskv
from natskv import (
    BucketNotFoundError,
    ConfigurationError,
    InvalidBucketNameError,
    InvalidKeyError,
    KeyExistsError,
    KeyNotFoundError,
    NatsKVError,
    NotConnectedError,
    PayloadTooLargeError,
    RevisionMismatchError,
    SerializationError,
)
from natskv.wire import jsapi


def stream_state(db: natskv.Client, bucket: str) -> dict[str, Any]:
    return jsapi.call(db._conn, f"STREAM.INFO.KV_{bucket}", None, 5.0)["state"]


def last_seq(db: natskv.Client, bucket: str) -> int:
    return int(stream_state(db, bucket)["last_seq"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- reads -------------------------------------------------------------------------------------


def test_get_returns_value_or_default(kv: natskv.Bucket) -> None:
    assert kv.get("missing") is None
    assert kv.get("missing", "dflt") == "dflt"
    assert kv.get("missing", default=0) == 0
    kv.set("k", {"a": [1, 2, {"b": None}]})
    assert kv.get("k") == {"a": [1, 2, {"b": None}]}
    assert kv.get("k", "dflt") == {"a": [1, 2, {"b": None}]}


def test_entry_fields(kv: natskv.Bucket) -> None:
    before = datetime.now(timezone.utc)
    rev = kv.set("user:1", {"name": "Ann"})
    e = kv.entry("user:1")
    assert e is not None
    assert e.key == "user:1"
    assert e.value == {"name": "Ann"}
    assert e.revision == rev
    assert e.operation == "PUT"
    assert isinstance(e.created, datetime)
    assert e.created.tzinfo is not None
    assert before - timedelta(seconds=5) <= e.created <= datetime.now(timezone.utc) + timedelta(seconds=5)
    assert kv.entry("nope") is None
    rev2 = kv.set("user:1", {"name": "Bob"})
    assert rev2 > rev
    assert kv.entry("user:1").revision == rev2
    # An older revision is still reachable while history keeps it.
    old = kv.entry("user:1", revision=rev)
    assert old is not None and old.value == {"name": "Ann"} and old.revision == rev
    # A revision of another key is not this key's.
    other = kv.set("user:2", 1)
    assert kv.entry("user:1", revision=other) is None


def test_set_and_put_are_the_same_call(kv: natskv.Bucket) -> None:
    r1 = kv.set("a", 1)
    r2 = kv.put("a", 2)
    r3 = kv.put("b", 3)
    assert r1 < r2 < r3
    assert kv.get("a") == 2
    assert kv.get("b") == 3
    assert kv.entry("a").revision == r2


# -- create / update / replace ----------------------------------------------------------------


def test_create_raises_key_exists(kv: natskv.Bucket) -> None:
    rev = kv.create("lock", 1)
    with pytest.raises(KeyExistsError) as info:
        kv.create("lock", 2)
    err = info.value
    assert isinstance(err, NatsKVError) and isinstance(err, ValueError)
    assert err.key == "lock"
    assert err.current_revision == rev
    assert kv.get("lock") == 1
    assert [e.value for e in kv.history("lock")] == [1]


def test_create_over_deleted_and_purged_key(kv: natskv.Bucket) -> None:
    kv.set("d", 1)
    kv.delete("d")
    assert kv.get("d") is None
    rev = kv.create("d", 2)
    assert kv.entry("d").revision == rev and kv.get("d") == 2
    with pytest.raises(KeyExistsError):
        kv.create("d", 3)

    kv.set("p", 1)
    kv.purge("p")
    assert kv.get("p") is None
    kv.create("p", 2)
    assert kv.get("p") == 2
    with pytest.raises(KeyExistsError):
        kv.create("p", 3)


def test_update_compare_and_set(kv: natskv.Bucket) -> None:
    r1 = kv.set("k", 1)
    r2 = kv.update("k", 2, r1)
    assert r2 > r1 and kv.get("k") == 2
    kv.set("other", 0)  # move the stream sequence on: revisions are per-stream
    with pytest.raises(RevisionMismatchError) as info:
        kv.update("k", 3, r1)
    err = info.value
    assert isinstance(err, NatsKVError) and isinstance(err, ValueError)
    assert err.key == "k"
    assert err.expected == r1
    assert err.current_revision == r2
    assert kv.get("k") == 2
    # keyword form too
    r3 = kv.update("k", 4, revision=r2)
    assert kv.entry("k").revision == r3 and kv.get("k") == 4


def test_update_of_deleted_key_reports_delete_revision(kv: natskv.Bucket) -> None:
    r1 = kv.set("k", 1)
    rdel = kv.delete("k")
    with pytest.raises(RevisionMismatchError) as info:
        kv.update("k", 2, r1)
    assert info.value.current_revision == rdel
    assert kv.get("k") is None


def test_replace_only_existing(kv: natskv.Bucket) -> None:
    assert kv.replace("k", 1) is False
    assert kv.get("k") is None
    assert "k" not in kv
    kv.set("k", 1)
    assert kv.replace("k", 2) is True
    assert kv.get("k") == 2
    kv.delete("k")
    assert kv.replace("k", 3) is False
    assert kv.get("k") is None


# -- delete / purge -----------------------------------------------------------------------------


def test_delete_without_revision(kv: natskv.Bucket) -> None:
    kv.set("k", 1)
    rdel = kv.delete("k")
    assert isinstance(rdel, int)
    assert kv.get("k") is None
    assert kv.entry("k") is None
    assert "k" not in kv
    assert kv.keys() == []
    hist = kv.history("k")
    assert [e.operation for e in hist] == ["PUT", "DEL"]
    assert hist[-1].revision == rdel
    # deleting an absent key is not an error
    kv.delete("never-there")
    assert kv.get("never-there") is None


def test_delete_with_revision_and_cas_failure(kv: natskv.Bucket) -> None:
    r1 = kv.set("k", 1)
    r2 = kv.set("k", 2)
    with pytest.raises(RevisionMismatchError) as info:
        kv.delete("k", revision=r1)
    assert info.value.current_revision == r2
    assert info.value.key == "k"
    assert kv.get("k") == 2
    kv.delete("k", revision=r2)
    assert kv.get("k") is None


def test_purge_drops_history(kv: natskv.Bucket) -> None:
    for i in range(4):
        kv.set("k", i)
    kv.set("other", "x")
    rp = kv.purge("k")
    assert kv.get("k") is None
    hist = kv.history("k")
    assert [e.operation for e in hist] == ["PURGE"]
    assert hist[0].revision == rp
    assert kv.get("other") == "x"
    assert kv.keys() == ["other"]


def test_purge_with_stale_revision_fails(kv: natskv.Bucket) -> None:
    r1 = kv.set("k", 1)
    r2 = kv.set("k", 2)
    with pytest.raises(RevisionMismatchError) as info:
        kv.purge("k", revision=r1)
    assert info.value.current_revision == r2
    assert kv.get("k") == 2


# -- keys, items, patterns ------------------------------------------------------------------------

PATTERN_KEYS = ["user:1", "user:2", "user:10", "user:1:profile", "admin:1", "a1", "b1", "c1", "d1", "usr"]


@pytest.fixture
def patterned(kv: natskv.Bucket) -> natskv.Bucket:
    kv.set_many({k: i for i, k in enumerate(PATTERN_KEYS)})
    kv.set("gone:1", 0)
    kv.delete("gone:1")
    return kv


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("*", sorted(PATTERN_KEYS)),
        ("user:*", sorted(["user:1", "user:1:profile", "user:10", "user:2"])),
        ("user:?", ["user:1", "user:2"]),
        ("user:1*", sorted(["user:1", "user:1:profile", "user:10"])),
        ("user:1", ["user:1"]),
        ("[abc]1", ["a1", "b1", "c1"]),
        ("[!abc]1", ["d1"]),
        ("*:1", ["admin:1", "user:1"]),
        ("u*r", ["usr"]),
        ("nomatch*", []),
        ("gone:*", []),
    ],
)
def test_keys_glob_patterns(patterned: natskv.Bucket, pattern: str, expected: list[str]) -> None:
    assert patterned.keys(pattern) == expected


def test_keys_compiled_regex_and_items(patterned: natskv.Bucket) -> None:
    assert patterned.keys(re.compile(r"^user:\d+$")) == ["user:1", "user:10", "user:2"]
    assert patterned.keys(re.compile(r"profile")) == ["user:1:profile"]
    values = dict(zip(PATTERN_KEYS, range(len(PATTERN_KEYS)), strict=True))
    assert patterned.items("user:?") == [("user:1", values["user:1"]), ("user:2", values["user:2"])]
    assert patterned.items() == sorted(values.items())
    assert list(patterned) == sorted(PATTERN_KEYS)


WEIRD_KEYS = [
    "héllo wörld",
    "日本語:キー",
    "emoji 🎉",
    "a.b",
    "a b",
    "!@#$%^&*()_+",
    "a::b",
    ":lead",
    "trail:",
    ":",
    "",
    "=x",
    "a=2Eb",
    ">",
    "*",
    "?",
    "[x]",
    "tab\tkey",
    "new\nline",
    "back\\slash",
    "/slash/",
    "-dash_",
    "user:1",
    "user.1",
    "UPPER:lower",
]


def test_unusual_keys_round_trip_exactly(kv: natskv.Bucket) -> None:
    revs = kv.set_many({k: {"i": i} for i, k in enumerate(WEIRD_KEYS)})
    assert set(revs) == set(WEIRD_KEYS)
    for i, k in enumerate(WEIRD_KEYS):
        assert kv.get(k) == {"i": i}, k
        assert kv.entry(k).key == k
        assert k in kv
    assert kv.keys() == sorted(WEIRD_KEYS)
    assert dict(kv.items()) == {k: {"i": i} for i, k in enumerate(WEIRD_KEYS)}
    assert kv.get_many(WEIRD_KEYS) == {k: {"i": i} for i, k in enumerate(WEIRD_KEYS)}
    # glob metacharacters in keys can be matched literally with a backslash
    assert kv.keys("\\*") == ["*"]
    assert kv.keys("\\[x\\]") == ["[x]"]
    # "user:1" and "user.1" are distinct keys
    assert kv.keys("user?1") == ["user.1", "user:1"]
    assert kv.keys("user:*") == ["user:1"]


def test_long_keys_round_trip(kv: natskv.Bucket) -> None:
    keys = ["k" * 2999, "é" * 450, "a:" * 1000 + "z"]
    for k in keys:
        kv.set(k, len(k))
    assert kv.keys() == sorted(keys)
    assert kv.get_many(keys) == {k: len(k) for k in keys}
    for k in keys:
        assert kv.history(k)[-1].key == k
        with kv.watch(k) as w:
            ch = w.get(timeout=5)
            assert ch is not None and ch.key == k and ch.value == len(k)


def test_key_set_with_separator_round_trips_in_history(kv: natskv.Bucket) -> None:
    for k in ("a:b", "a.b", ""):
        kv.set(k, 1)
        kv.delete(k)
        assert [(e.key, e.operation) for e in kv.history(k)] == [(k, "PUT"), (k, "DEL")]


@pytest.mark.parametrize("sep", ["", "/"], ids=["no-separator", "slash"])
def test_other_separators(db: natskv.Client, name: str, sep: str) -> None:
    kv = db.bucket(name, sep=sep)
    try:
        keys = ["user:1", "user:2", "user/1", "user/2/x", "a.b", "x"]
        kv.set_many({k: k for k in keys})
        assert kv.keys() == sorted(keys)
        assert kv.keys("user:*") == ["user:1", "user:2"]
        assert kv.keys("user/*") == ["user/1", "user/2/x"]
        assert kv.get_many(keys) == {k: k for k in keys}
        with kv.watch("user/*") as w:
            got = []
            while True:
                ch = w.get(timeout=5)
                assert ch is not None
                if ch.initial_done:
                    break
                got.append(ch.key)
            assert sorted(got) == ["user/1", "user/2/x"]
    finally:
        db.delete_bucket(name)


# -- history --------------------------------------------------------------------------------


def test_history_oldest_first_with_deletes(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name, history=5)
    try:
        assert kv.history("k") == []
        revs = [kv.set("k", "v1"), kv.set("k", "v2")]
        kv.set("other", 1)
        revs.append(kv.delete("k"))
        revs.append(kv.set("k", "v3"))
        hist = kv.history("k")
        assert [e.revision for e in hist] == revs
        assert [e.operation for e in hist] == ["PUT", "PUT", "DEL", "PUT"]
        assert [e.value for e in hist] == ["v1", "v2", None, "v3"]
        assert all(e.key == "k" for e in hist)
        assert all(isinstance(e.created, datetime) for e in hist)
        # only `history` revisions are kept
        for i in range(4, 10):
            kv.set("k", f"v{i}")
        hist = kv.history("k")
        assert [e.value for e in hist] == ["v5", "v6", "v7", "v8", "v9"]
        assert [e.revision for e in hist] == sorted(e.revision for e in hist)
    finally:
        db.delete_bucket(name)


# -- batches ----------------------------------------------------------------------------------


def test_get_many_omits_missing(kv: natskv.Bucket) -> None:
    kv.set_many({"a": 1, "b": b"raw", "c": ""})
    kv.set("d", 4)
    kv.delete("d")
    assert kv.get_many([]) == {}
    assert kv.get_many(["a", "b", "c", "d", "zzz"]) == {"a": 1, "b": b"raw", "c": ""}


def test_get_many_over_several_requests_in_flight(db: natskv.Client, kv: natskv.Bucket) -> None:
    # More keys than one pipelined request carries (PIPELINED_BATCH_GET): several requests go
    # out in one write and are read in order, each as soon as it is complete.
    from natskv.wire.kv import PIPELINED_BATCH_GET

    n = PIPELINED_BATCH_GET * 3 + 7
    data: dict[str, Any] = {f"k:{i:04d}": {"i": i} for i in range(n)}
    data["k:0003"] = b"raw bytes"
    data["k:0004"] = ""
    kv.set_many(data)
    purged = f"k:{PIPELINED_BATCH_GET + 1:04d}"  # in the second request
    kv.delete("k:0005")
    kv.purge(purged)
    expected = {k: v for k, v in data.items() if k not in ("k:0005", purged)}
    wanted = ["absent:1", *reversed(list(data)), "absent:2", "k:0000"]
    mux = db._conn.mux
    before = set(mux._routes)
    got = kv.get_many(wanted)
    assert got == expected
    assert list(got) == [k for k in dict.fromkeys(wanted) if k in expected]  # in the order asked for
    assert set(mux._routes) == before  # no route left behind
    assert not [w for w in mux._waiting if type(w).__name__ == "StreamWaiter"]


def test_requests_in_flight_left_early_leave_no_route(db: natskv.Client, kv: natskv.Bucket) -> None:
    kv.set_many({f"k{i}": i for i in range(10)})
    mux = db._conn.mux
    before = set(mux._routes)
    bodies = [orjson.dumps({"multi_last": [kv._proto.subject_prefix + f"k{i}"]}) for i in range(3)]
    answers = mux.request_streams(kv._proto.direct_batch, bodies, 5)
    first = next(answers)
    assert len(first) == 2 and first[0][0] == b"0"  # the message, then the end-of-batch status
    answers.close()
    assert set(mux._routes) == before and not [w for w in mux._waiting if type(w).__name__ == "StreamWaiter"]


@pytest.mark.slow
def test_set_many_and_get_many_over_1024_keys(db: natskv.Client, kv: natskv.Bucket) -> None:
    n = 6000  # > 1024 subjects per batch get, and > 1 MiB written in one go
    data = {f"item:{i:05d}": {"n": i, "pad": "p" * 200} for i in range(n)}
    revs = kv.set_many(data)
    assert set(revs) == set(data)
    assert len(set(revs.values())) == n
    for k in ("item:00000", "item:00777", "item:05999"):
        assert kv.entry(k).revision == revs[k]
    wanted = list(data) + [f"missing:{i}" for i in range(30)]
    got = kv.get_many(wanted)
    assert got == data
    # more keys than one batch direct get may answer: keys() must still see every one
    assert kv.keys() == sorted(data)
    assert len(kv.keys("item:*")) == n
    # ... and must not leave a consumer behind
    assert stream_state(db, kv.name)["consumer_count"] == 0


def test_get_many_duplicates_and_empty_bucket(kv: natskv.Bucket) -> None:
    assert kv.keys() == [] and kv.items() == [] and list(kv) == []
    assert kv.get_many(["a", "a", "b"]) == {}
    kv.set("a", 1)
    assert kv.get_many(["a", "a", "b"]) == {"a": 1}
    assert kv.get_many(iter(["a"])) == {"a": 1}


def test_set_many_returns_revisions(kv: natskv.Bucket) -> None:
    revs = kv.set_many({"x": 1, "y": [1, 2], "z": b"\x00"})
    assert sorted(revs) == ["x", "y", "z"]
    for k, r in revs.items():
        assert kv.entry(k).revision == r
    assert kv.get_many(["x", "y", "z"]) == {"x": 1, "y": [1, 2], "z": b"\x00"}


def test_empty_batches_return_at_once(kv: natskv.Bucket) -> None:
    t0 = time.monotonic()
    assert kv.set_many({}) == {}
    assert kv.get_many([]) == {}
    took = time.monotonic() - t0
    assert took < 0.5, f"empty set_many/get_many took {took:.2f} s"


def test_commit_applies_all(kv: natskv.Bucket) -> None:
    ra = kv.set("a", 1)
    kv.set("d", "bye")
    rd2 = kv.set("d2", "bye2")
    last = kv.commit(
        [
            ("set", "s", {"x": 1}),
            ("create", "c", 2),
            ("update", "a", 3, ra),
            ("delete", "d"),
            ("delete", "d2", rd2),
        ]
    )
    assert kv.get("s") == {"x": 1}
    assert kv.get("c") == 2
    assert kv.get("a") == 3
    assert kv.get("d") is None and kv.get("d2") is None
    assert kv.status().last_revision == last
    revisions = [kv.entry(k).revision for k in ("s", "c", "a")]
    assert sorted(revisions) == revisions and revisions[-1] < last


def test_commit_stale_update_stores_nothing(db: natskv.Client, kv: natskv.Bucket) -> None:
    ra = kv.set("a", 1)
    ra2 = kv.set("a", 2)
    kv.set("b", "b0")
    before = last_seq(db, kv.name)
    with pytest.raises(RevisionMismatchError) as info:
        kv.commit([("set", "new1", 1), ("set", "b", "b1"), ("update", "a", 3, ra), ("set", "new2", 2)])
    err = info.value
    assert err.key == "a"
    assert err.expected == ra
    assert err.current_revision == ra2
    assert last_seq(db, kv.name) == before
    assert kv.get_many(["new1", "new2", "a", "b"]) == {"a": 2, "b": "b0"}


def test_commit_create_of_existing_key_stores_nothing(db: natskv.Client, kv: natskv.Bucket) -> None:
    rb = kv.set("b", "exists")
    before = last_seq(db, kv.name)
    with pytest.raises(KeyExistsError) as info:
        kv.commit([("set", "x", 1), ("create", "b", "again"), ("create", "fresh", 1)])
    assert info.value.key == "b"
    assert info.value.current_revision == rb
    assert last_seq(db, kv.name) == before
    assert kv.get_many(["x", "b", "fresh"]) == {"b": "exists"}


def test_commit_stale_delete_stores_nothing(db: natskv.Client, kv: natskv.Bucket) -> None:
    r1 = kv.set("k", 1)
    r2 = kv.set("k", 2)
    before = last_seq(db, kv.name)
    with pytest.raises(RevisionMismatchError) as info:
        kv.commit([("set", "other", 1), ("delete", "k", r1)])
    assert info.value.key == "k" and info.value.current_revision == r2
    assert last_seq(db, kv.name) == before
    assert kv.get("k") == 2 and kv.get("other") is None


def test_commit_many_operations(db: natskv.Client, kv: natskv.Bucket) -> None:
    ops = [("set", f"bulk:{i:04d}", i) for i in range(500)]
    last = kv.commit(ops)
    assert kv.get_many([k for _, k, _ in ops]) == {k: v for _, k, v in ops}
    assert last == last_seq(db, kv.name)
    before = last
    with pytest.raises(NatsKVError):  # over the server's 1000-message batch limit
        kv.commit([("set", f"over:{i}", i) for i in range(1001)])
    assert last_seq(db, kv.name) == before
    assert kv.keys("over:*") == []


@pytest.mark.parametrize(
    "ops",
    [
        [("frobnicate", "a", 1)],
        [("set", "a", 1), ("set", "a", 2)],
        [("update", "a", 1)],
        [("update", "a", 1, -3)],
        [("set", 5, 1)],
        [("set", "a", object())],
        [],
    ],
    ids=[
        "unknown-op", "duplicate-key", "update-without-revision", "negative-revision", "int-key", "unencodable", "empty"
    ],
)
def test_commit_bad_input_fails_before_sending(db: natskv.Client, kv: natskv.Bucket, ops: list[Any]) -> None:
    kv.set("seed", 0)
    before = last_seq(db, kv.name)
    with pytest.raises(NatsKVError) as info:
        kv.commit([("set", "first", 1), *ops] if ops else ops)
    assert isinstance(info.value, ValueError)
    assert last_seq(db, kv.name) == before
    assert kv.get("first") is None


# -- find -------------------------------------------------------------------------------------

PEOPLE = {
    "user:1": {"name": "Ann", "age": 31, "role": "admin", "tags": ["a", "b"], "addr": {"city": "Oslo"}},
    "user:2": {"name": "Bob", "age": 17, "role": "user", "tags": ["b"], "addr": {"city": "Rome"}},
    "user:3": {"name": "Cid", "age": 45, "role": "user", "tags": [], "email": "cid@example.com"},
    "user:4": {"name": "Ada", "age": 18, "role": "user", "tags": ["c"], "addr": {"city": "Oslo"}},
    "team:1": {"name": "Ops", "age": 99, "role": "admin"},
    "note": "not a dict",
    "blob": b"\x00\x01",
}


@pytest.fixture
def people(kv: natskv.Bucket) -> natskv.Bucket:
    kv.set_many(PEOPLE)
    return kv


def _keys(pairs: list[tuple[str, Any]]) -> list[str]:
    return [k for k, _ in pairs]


@pytest.mark.parametrize(
    "where, pattern, expected",
    [
        ({"age": {"$gte": 18}}, "user:*", ["user:1", "user:3", "user:4"]),
        ({"age": {"$gte": 18}}, "*", ["team:1", "user:1", "user:3", "user:4"]),
        ({"age": {"$gt": 18, "$lt": 45}}, "*", ["user:1"]),
        ({"age": {"$lte": 18}}, "*", ["user:2", "user:4"]),
        ({"role": "admin"}, "*", ["team:1", "user:1"]),
        ({"role": {"$ne": "admin"}}, "user:*", ["user:2", "user:3", "user:4"]),
        ({"name": {"$in": ["Ann", "Bob", "Zed"]}}, "*", ["user:1", "user:2"]),
        ({"name": {"$nin": ["Ann", "Bob"]}}, "user:*", ["user:3", "user:4"]),
        ({"tags": {"$contains": "b"}}, "*", ["user:1", "user:2"]),
        ({"name": {"$startswith": "A"}}, "*", ["user:1", "user:4"]),
        ({"name": {"$endswith": "b"}}, "*", ["user:2"]),
        ({"email": {"$regex": r"@example\.com$"}}, "*", ["user:3"]),
        ({"email": {"$exists": True}}, "*", ["user:3"]),
        ({"addr.city": "Oslo"}, "*", ["user:1", "user:4"]),
        ({"$or": [{"role": "admin"}, {"age": {"$lt": 18}}]}, "user:*", ["user:1", "user:2"]),
        ({"$and": [{"role": "user"}, {"age": {"$gte": 18}}]}, "*", ["user:3", "user:4"]),
        ({"age": {"$not": {"$gte": 18}}}, "user:*", ["user:2"]),
        ({}, "user:?", ["user:1", "user:2", "user:3", "user:4"]),
    ],
)
def test_find_operators(people: natskv.Bucket, where: dict[str, Any], pattern: str, expected: list[str]) -> None:
    hits = people.find(where=where, pattern=pattern)
    assert _keys(hits) == expected
    for k, v in hits:
        assert v == PEOPLE[k]


def test_find_limit_and_positional_where(people: natskv.Bucket) -> None:
    assert _keys(people.find({"role": "user"}, "user:*", limit=2)) == ["user:2", "user:3"]
    assert people.find({"age": {"$gt": 1000}}) == []


@pytest.mark.parametrize(
    "where",
    [{"$bogus": 1}, {"age": {"$gt": [1]}}, {"age": {"$in": 5}}, {"email": {"$regex": "("}}, {"$or": []}],
    ids=["unknown-op", "gt-list", "in-not-list", "bad-regex", "empty-or"],
)
def test_find_invalid_filter(people: natskv.Bucket, where: dict[str, Any]) -> None:
    with pytest.raises(NatsKVError) as info:
        people.find(where=where)
    assert isinstance(info.value, ValueError)


# -- status -----------------------------------------------------------------------------------


def test_status(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name, history=3, max_value_size=1000, storage="memory")
    try:
        st = kv.status()
        assert st.bucket == name
        assert st.values == 0
        assert st.history == 3
        assert st.ttl is None
        assert st.max_value_size == 1000
        assert st.replicas == 1
        assert st.storage == "memory"
        assert st.supports_ttl is True
        assert st.supports_atomic is True
        kv.set("a", 1)
        r = kv.set("b", 2)
        st = kv.status()
        assert st.values == 2
        assert st.last_revision == r
        assert st.bytes > 0
    finally:
        db.delete_bucket(name)


@pytest.mark.parametrize("hook", [True, False], ids=["frame reader", "nats-py parser"])
def test_stats_count_natskv_own_traffic(nats_url: str, name: str, hook: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """get/set/get_many/set_many/commit go past nats-py's publish and (with natskv's frame reader)
    past its parser: db.stats() counts them all the same, once each, whichever path reads."""
    if not hook:
        monkeypatch.setenv("NATSKV_NO_PARSER_HOOK", "1")
    with natskv.connect(nats_url, timeout=5) as client:
        assert hook or client.stats()["parser_hook"] is False
        kv = client.bucket(name, history=5)
        try:
            value = "x" * 100
            payload = len(kv._encode(value)[0])
            before = client.stats()
            for i in range(10):
                kv.set(f"k{i}", value)
                assert kv.get(f"k{i}") == value
            kv.set_many({"a": value, "b": value})
            assert kv.get_many(["a", "b"]) == {"a": value, "b": value}
            kv.commit([("set", "c", value), ("set", "d", value), ("set", "e", value)])
            after = client.stats()
        finally:
            client.delete_bucket(name)
    sent, received = after["out_msgs"] - before["out_msgs"], after["in_msgs"] - before["in_msgs"]
    # 10 sets + 10 gets + 2 pipelined sets + 1 batch get + a 3-message atomic batch
    assert sent == 10 + 10 + 2 + 1 + 3, sent
    # a reply to each set, get and pipelined set; 2 values and the end of the batch get; the
    # empty answer to the batch's first message and the commit's ack
    assert received == 10 + 10 + 2 + 3 + 2, received
    assert after["out_bytes"] - before["out_bytes"] >= 15 * payload
    assert after["in_bytes"] - before["in_bytes"] >= 12 * payload


def test_status_with_bucket_ttl(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name, ttl=90)
    try:
        st = kv.status()
        assert st.ttl == pytest.approx(90)
        assert st.storage == "file"
        assert st.history == 1
    finally:
        db.delete_bucket(name)


# -- mapping protocol --------------------------------------------------------------------------


def test_mapping_protocol(kv: natskv.Bucket) -> None:
    kv["k"] = {"v": 1}
    assert kv["k"] == {"v": 1}
    assert "k" in kv
    assert "nope" not in kv
    assert 1 not in kv  # type: ignore[operator]
    with pytest.raises(KeyNotFoundError) as info:
        kv["nope"]
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, NatsKVError)
    assert info.value.key == "nope"
    with pytest.raises(KeyError):
        kv["nope"]
    del kv["k"]
    assert "k" not in kv
    with pytest.raises(KeyNotFoundError):
        kv["k"]
    with pytest.raises(KeyError):
        del kv["k"]
    with pytest.raises(KeyNotFoundError):
        del kv["never"]
    assert kv.get("k") is None
    kv["n"] = None  # a stored JSON null is present
    assert "n" in kv
    assert kv["n"] is None


# -- values and codecs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00\xff\x01",
        b'{"a": 1}',
        b"123",
        "",
        "plain text",
        "ünï©ødé ✓",
        0,
        -12345678901234,
        3.25,
        True,
        False,
        None,
        [],
        {},
        [1, "two", None, {"three": [3.0]}],
        {"nested": {"deep": {"list": [1, 2, 3]}}, "x": ""},
    ],
    ids=repr,
)
def test_values_round_trip(kv: natskv.Bucket, value: Any) -> None:
    kv.set("k", value)
    got = kv.get("k", "<absent>")
    assert got == value
    assert type(got) is type(value)
    assert kv.entry("k").value == value
    assert kv.get_many(["k"]) == {"k": value}
    assert kv.items() == [("k", value)]
    assert kv.history("k")[-1].value == value
    assert "k" in kv


def test_empty_bytes_stays_empty_bytes(kv: natskv.Bucket) -> None:
    kv.set("e", b"")
    assert kv.get("e") == b"" and kv.get("e") is not None
    assert kv["e"] == b""
    e = kv.entry("e")
    assert e is not None and e.value == b"" and e.operation == "PUT"
    assert kv.keys() == ["e"]


def test_large_value_under_the_limit(kv: natskv.Bucket) -> None:
    big = bytes(range(256)) * 3500  # ~896 KB
    kv.set("big", big)
    assert kv.get("big") == big


def test_bytes_codec(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name, codec="bytes")
    try:
        kv.set("a", b"\x00abc")
        kv.set("e", b"")
        kv.set("ba", bytearray(b"xy"))
        kv.set("j", b'{"a":1}')
        assert kv.get("a") == b"\x00abc"
        assert kv.get("e") == b""
        assert kv.get("ba") == b"xy"
        assert kv.get("j") == b'{"a":1}'
        assert kv.get_many(["a", "e"]) == {"a": b"\x00abc", "e": b""}
        before = last_seq(db, name)
        for bad in ("text", {"a": 1}, 5, None):
            with pytest.raises(SerializationError):
                kv.set("bad", bad)
        assert last_seq(db, name) == before
        assert kv.get("bad") is None
    finally:
        db.delete_bucket(name)


def test_str_codec(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name, codec="str")
    try:
        kv.set("a", "héllo ✓")
        kv.set("e", "")
        kv.set("j", '{"a": 1}')
        assert kv.get("a") == "héllo ✓"
        assert kv.get("e") == ""
        assert kv.get("j") == '{"a": 1}'
        assert kv.items() == [("a", "héllo ✓"), ("e", ""), ("j", '{"a": 1}')]
        before = last_seq(db, name)
        for bad in (b"bytes", 5, ["x"]):
            with pytest.raises(SerializationError):
                kv.set("bad", bad)
        assert last_seq(db, name) == before
    finally:
        db.delete_bucket(name)


def test_same_bucket_different_codecs(db: natskv.Client, name: str) -> None:
    as_json = db.bucket(name)
    try:
        as_json.set("k", "text")
        as_str = db.bucket(name, codec="str")
        assert as_str.get("k") == '"text"'
        as_bytes = db.bucket(name, codec="bytes")
        assert as_bytes.get("k") == b'"text"'
        assert db.bucket(name).get("k") == "text"
    finally:
        db.delete_bucket(name)


# -- TTL ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_per_key_ttl_on_set_create_update_expires(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name)  # default history=1
    try:
        kv.set("by-set", 1, ttl=1)
        kv.create("by-create", 2, ttl=1)
        r = kv.set("by-update", 3)
        kv.update("by-update", 4, r, ttl=1)
        kv.set("keeper", 5)
        kv.set("long", 6, ttl=60)
        expiring = ["by-set", "by-create", "by-update"]
        assert kv.get_many(expiring) == {"by-set": 1, "by-create": 2, "by-update": 4}
        assert eventually(lambda: kv.get_many(expiring) == {}, timeout=5.0), kv.get_many(expiring)
        for k in expiring:
            assert kv.get(k) is None
            assert kv.entry(k) is None
            assert k not in kv
        assert kv.keys() == ["keeper", "long"]
        assert kv.get("keeper") == 5 and kv.get("long") == 6
        # an expired key counts as absent for create()
        kv.create("by-set", "again")
        assert kv.get("by-set") == "again"
        kv.create("by-update", "again")
        assert kv.get("by-update") == "again"
    finally:
        db.delete_bucket(name)


@pytest.mark.slow
def test_per_key_ttl_expires_in_bucket_with_history(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name, history=5)
    try:
        kv.set("old", 0)
        kv.set("k", 1, ttl=1)
        assert kv.get("k") == 1
        assert eventually(lambda: kv.get("k") is None, timeout=4.0), kv.entry("k")
        assert kv.keys() == ["old"]
        kv.create("k", 2)
        assert kv.get("k") == 2
    finally:
        db.delete_bucket(name)


@pytest.mark.slow
def test_bucket_ttl_expires_values(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name, ttl=1)
    try:
        assert kv.status().ttl == pytest.approx(1)
        kv.set("a", 1)
        kv.set("b", 2)
        assert eventually(lambda: kv.keys() == [], timeout=6.0)
        assert kv.get("a") is None
        assert kv.get_many(["a", "b"]) == {}
        kv.create("a", 3)
        assert kv.get("a") == 3
    finally:
        db.delete_bucket(name)


def test_fractional_ttl_rounds_up(kv: natskv.Bucket) -> None:
    kv.set("k", 1, ttl=0.2)  # rounds up to the server's whole-second minimum; accepted
    assert kv.get("k") == 1


# -- bad input fails before anything is sent ---------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*", "a>", "über", "a/b", "KV_x\n", 123, None, b"abc"])
def test_invalid_bucket_names(db: natskv.Client, bad: Any) -> None:
    before = db.buckets()
    for call in (lambda: db.bucket(bad), lambda: db.bucket(bad, create=False), lambda: db.delete_bucket(bad)):
        with pytest.raises(InvalidBucketNameError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, NatsKVError)
    assert db.buckets() == before


@pytest.mark.parametrize(
    "options",
    [
        {"history": 0},
        {"history": 65},
        {"history": "3"},
        {"storage": "disk"},
        {"replicas": 0},
        {"ttl": -5},
        {"max_value_size": -10},
        {"codec": "xml"},
        {"sep": "::"},
    ],
    ids=repr,
)
def test_bucket_bad_options_fail_before_creating(db: natskv.Client, name: str, options: dict[str, Any]) -> None:
    with pytest.raises(NatsKVError) as info:
        db.bucket(name, **options)
    assert isinstance(info.value, ValueError), type(info.value).__mro__
    assert name not in db.buckets()


BAD_KEYS = [1, 1.5, None, b"key", ("a",), ["a"]]


class _PairMapping(Mapping):  # a Mapping whose keys need not be hashable
    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self._pairs = pairs

    def __getitem__(self, key: Any) -> Any:
        for k, v in self._pairs:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        return (k for k, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_non_str_keys_rejected(db: natskv.Client, kv: natskv.Bucket, bad: Any) -> None:
    kv.set("seed", 0)
    before = last_seq(db, kv.name)
    calls = [
        lambda: kv.get(bad),
        lambda: kv.entry(bad),
        lambda: kv.set(bad, 1),
        lambda: kv.put(bad, 1),
        lambda: kv.create(bad, 1),
        lambda: kv.update(bad, 1, 1),
        lambda: kv.replace(bad, 1),
        lambda: kv.delete(bad),
        lambda: kv.purge(bad),
        lambda: kv.history(bad),
        lambda: kv.get_many(["seed", bad]),
        lambda: kv[bad],
    ]
    try:
        hash(bad)
        calls.append(lambda: kv.set_many({"ok": 1, bad: 2}))
    except TypeError:
        calls.append(lambda: kv.set_many(_PairMapping([("ok", 1), (bad, 2)])))
    for call in calls:
        with pytest.raises(InvalidKeyError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, NatsKVError)
    with pytest.raises(InvalidKeyError):
        kv[bad] = 1
    with pytest.raises(InvalidKeyError):
        del kv[bad]
    assert bad not in kv
    assert last_seq(db, kv.name) == before
    assert kv.keys() == ["seed"]


@pytest.mark.parametrize("bad", ["k" * 5000, "a\ud800b"], ids=["too-long", "lone-surrogate"])
def test_unstorable_str_keys_rejected(db: natskv.Client, kv: natskv.Bucket, bad: str) -> None:
    kv.set("seed", 0)
    before = last_seq(db, kv.name)
    for call in (lambda: kv.set(bad, 1), lambda: kv.get(bad), lambda: kv.create(bad, 1), lambda: kv.delete(bad)):
        with pytest.raises(InvalidKeyError):
            call()
    assert last_seq(db, kv.name) == before


@pytest.mark.parametrize("bad", ["[abc", "[]", "abc\\", 123, None, b"user:*", re.compile(b"x")], ids=repr)
def test_invalid_patterns(kv: natskv.Bucket, bad: Any) -> None:
    kv.set("abc", 1)
    for call in (lambda: kv.keys(bad), lambda: kv.items(bad), lambda: kv.find({}, bad), lambda: kv.watch(bad)):
        with pytest.raises(InvalidKeyError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, NatsKVError)


class _Opaque:
    pass


@pytest.mark.parametrize("bad", [object(), _Opaque(), {1, 2}, {"a": object()}, [lambda: 0]], ids=repr)
def test_unencodable_values(db: natskv.Client, kv: natskv.Bucket, bad: Any) -> None:
    r = kv.set("k", "original")
    before = last_seq(db, kv.name)
    calls = [
        lambda: kv.set("k", bad),
        lambda: kv.set("new", bad),
        lambda: kv.create("new", bad),
        lambda: kv.update("k", bad, r),
        lambda: kv.replace("k", bad),
        lambda: kv.set_many({"ok": 1, "new": bad}),
        lambda: kv.commit([("set", "ok", 1), ("set", "new", bad)]),
    ]
    for call in calls:
        with pytest.raises(SerializationError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, NatsKVError)
    with pytest.raises(SerializationError):
        kv["k"] = bad
    assert last_seq(db, kv.name) == before
    assert kv.get("k") == "original"
    assert kv.get_many(["new", "ok"]) == {}


def test_payload_too_large(db: natskv.Client, kv: natskv.Bucket) -> None:
    max_payload = db._conn.max_payload
    huge = b"x" * (max_payload + 10)
    huge_json = "y" * (max_payload + 10)
    r = kv.set("k", "original")
    before = last_seq(db, kv.name)
    calls = [
        lambda: kv.set("k", huge),
        lambda: kv.set("new", huge_json),
        lambda: kv.create("new", huge),
        lambda: kv.update("k", huge, r),
        lambda: kv.replace("k", huge),
        lambda: kv.set_many({"ok": 1, "new": huge}),
        lambda: kv.commit([("set", "ok", 1), ("set", "new", huge)]),
    ]
    for call in calls:
        with pytest.raises(PayloadTooLargeError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, NatsKVError)
    assert last_seq(db, kv.name) == before
    assert kv.get("k") == "original"
    assert kv.get_many(["new", "ok"]) == {}


def test_bucket_max_value_size(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name, max_value_size=100)
    try:
        kv.set("ok", b"x" * 100)
        before = last_seq(db, name)
        with pytest.raises(PayloadTooLargeError):
            kv.set("big", b"x" * 101)
        with pytest.raises(PayloadTooLargeError):
            kv.set("big", "y" * 200)
        assert last_seq(db, name) == before
        assert kv.get("big") is None
        assert kv.get("ok") == b"x" * 100
    finally:
        db.delete_bucket(name)


@pytest.mark.parametrize("bad", [-1, "3", 1.5, True, None, float("nan")], ids=repr)
def test_bad_revision_values(db: natskv.Client, kv: natskv.Bucket, bad: Any) -> None:
    kv.set("k", 1)
    before = last_seq(db, kv.name)
    calls = [
        lambda: kv.update("k", 2, bad),
        lambda: kv.delete("k", revision=bad) if bad is not None else kv.update("k", 2, revision=bad),
        lambda: kv.purge("k", revision=bad) if bad is not None else kv.update("k", 2, revision=bad),
        lambda: kv.commit([("set", "x", 1), ("update", "k", 2, bad)]),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, NatsKVError), f"{type(info.value).__name__}: {info.value}"
    assert last_seq(db, kv.name) == before
    assert kv.get("k") == 1


@pytest.mark.parametrize("bad", [0, -1, "10", True, float("nan"), float("inf"), [1]], ids=repr)
def test_bad_ttl_values(db: natskv.Client, kv: natskv.Bucket, bad: Any) -> None:
    r = kv.set("k", 1)
    before = last_seq(db, kv.name)
    calls = [
        lambda: kv.set("k", 2, ttl=bad),
        lambda: kv.create("new", 2, ttl=bad),
        lambda: kv.update("k", 2, r, ttl=bad),
        lambda: kv.replace("k", 2, ttl=bad),
        lambda: kv.set_many({"a": 1}, ttl=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, NatsKVError), f"{type(info.value).__name__}: {info.value}"
    assert last_seq(db, kv.name) == before


@pytest.mark.parametrize("bad", ["1", -1, float("nan")], ids=repr)
def test_bad_timeout_values(db: natskv.Client, kv: natskv.Bucket, bad: Any) -> None:
    kv.set("k", 1)
    before = last_seq(db, kv.name)
    calls = [
        lambda: kv.get("k", timeout=bad),
        lambda: kv.set("k", 2, timeout=bad),
        lambda: kv.create("new", 2, timeout=bad),
        lambda: kv.keys(timeout=bad),
        lambda: kv.get_many(["k"], timeout=bad),
        lambda: kv.watch(timeout=bad),
    ]
    for call in calls:
        with pytest.raises(NatsKVError) as info:
            call()
        assert isinstance(info.value, ValueError), f"{type(info.value).__name__}: {info.value}"
    assert last_seq(db, kv.name) == before
    assert stream_state(db, kv.name)["consumer_count"] == 0


def test_infinite_timeout_works_or_is_rejected_cleanly(db: natskv.Client, kv: natskv.Bucket) -> None:
    """timeout=inf either means "no limit" or is refused as bad input; never a stray OverflowError."""
    kv.set("k", 1)
    before = last_seq(db, kv.name)
    try:
        kv.set("k", 2, timeout=float("inf"))
    except NatsKVError as exc:
        assert isinstance(exc, ValueError), repr(exc)
        assert last_seq(db, kv.name) == before
        for call in (lambda: kv.get("k", timeout=float("inf")), lambda: kv.keys(timeout=float("inf"))):
            with pytest.raises(NatsKVError):
                call()
    else:
        assert kv.get("k", timeout=float("inf")) == 2
        assert kv.keys(timeout=float("inf")) == ["k"]
    assert kv.get("k", timeout=None) in (1, 2)


def test_validation_happens_before_the_connection_is_used(nats_url: str, name: str) -> None:
    """On a closed client a valid call fails with NotConnectedError; bad input fails with its own error."""
    c = natskv.connect(nats_url)
    kv = c.bucket(name)
    kv.set("k", 1)
    c.close()
    try:
        with pytest.raises(NotConnectedError):
            kv.get("k")
        with pytest.raises(InvalidKeyError):
            kv.get(1)  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            kv.set("k", object())
        with pytest.raises(PayloadTooLargeError):
            kv.set("k", b"x" * (2 << 20))
        with pytest.raises(InvalidKeyError):
            kv.keys("[oops")
        with pytest.raises(InvalidBucketNameError):
            c.bucket("bad name")
        with pytest.raises(ValueError):
            kv.update("k", 1, -1)
    finally:
        with natskv.connect(nats_url) as other:
            other.delete_bucket(name)


def test_interoperates_with_nats_py_key_value(db: natskv.Client, nats_url: str, name: str) -> None:
    """Buckets and values written by nats-py's own KeyValue read back through natskv, and back."""
    import asyncio

    import nats

    async def write() -> None:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            other = await js.create_key_value(bucket=name, history=3)  # no direct get
            await other.put("user.1", b'{"a": 1}')
            await other.put("plain", b"not json")
            await other.put("gone", b"1")
            await other.delete("gone")
            await js.add_stream(name=f"NOTKV_{name}", subjects=[f"orders_{name}.>"])
        finally:
            await nc.close()

    asyncio.run(write())
    try:
        kv = db.bucket(name, create=False)
        assert kv.get("user:1") == {"a": 1}
        assert kv.get("plain") == b"not json"
        assert kv.get("gone") is None
        assert kv.keys() == ["plain", "user:1"]
        assert kv.status().history == 3
        assert name in db.buckets() and f"NOTKV_{name}" not in db.buckets()
        kv.set("from:natskv", {"b": 2})
        kv.set("raw", b"\x00\x01")

        async def read() -> tuple[bytes, bytes, list[str]]:
            nc = await nats.connect(nats_url)
            try:
                js = nc.jetstream()
                other = await js.key_value(name)
                a = (await other.get("from.natskv")).value
                b = (await other.get("raw")).value
                return a, b, sorted(await other.keys())
            finally:
                await nc.close()

        a, b, keys = asyncio.run(read())
        assert natskv.JSONCodec().decode(a) == {"b": 2}
        assert b == b"\x00\x01"
        assert keys == ["from.natskv", "plain", "raw", "user.1"]
    finally:
        db.delete_bucket(name)
        jsapi.call(db._conn, f"STREAM.DELETE.NOTKV_{name}", None, 5)


# -- client ---------------------------------------------------------------------------------


def test_bucket_is_cached(db: natskv.Client, name: str) -> None:
    try:
        a = db.bucket(name)
        assert db.bucket(name) is a
        assert db.bucket(name, create=False) is a
        assert a.name == name
    finally:
        db.delete_bucket(name)


def test_bucket_create_false_missing(db: natskv.Client, name: str) -> None:
    with pytest.raises(BucketNotFoundError) as info:
        db.bucket(name, create=False)
    assert isinstance(info.value, LookupError) and isinstance(info.value, NatsKVError)
    assert name not in db.buckets()


def test_existing_bucket_settings_are_kept(db: natskv.Client, nats_url: str, name: str) -> None:
    db.bucket(name, history=5).set("k", 1)
    try:
        with natskv.connect(nats_url) as other:
            kv = other.bucket(name, create=False)
            assert kv.get("k") == 1
            assert other.bucket(name, history=1).status().history == 5
    finally:
        db.delete_bucket(name)


def test_buckets_and_delete_bucket(db: natskv.Client, name: str) -> None:
    names = [f"{name}_{i}" for i in range(3)]
    for n in names:
        db.bucket(n).set("k", n)
    listed = db.buckets()
    assert set(names) <= set(listed)
    assert listed == sorted(listed)
    assert db.delete_bucket(names[0]) is True
    assert db.delete_bucket(names[0]) is False
    assert names[0] not in db.buckets()
    with pytest.raises(BucketNotFoundError):
        db.bucket(names[0], create=False)
    # re-created empty
    assert db.bucket(names[0]).get("k") is None
    for n in names:
        db.delete_bucket(n)
    assert not set(names) & set(db.buckets())


def test_client_context_manager_and_use_after_close(nats_url: str, name: str) -> None:
    with natskv.connect(nats_url) as c:
        assert c.connected
        assert c.server_version
        kv = c.bucket(name)
        kv.set("k", 1)
    assert not c.connected
    calls: list[Callable[[], Any]] = [
        lambda: kv.get("k"),
        lambda: kv.set("k", 2),
        kv.keys,
        lambda: kv.history("k"),
        lambda: kv.get_many(["k"]),
        kv.status,
        kv.watch,
        lambda: c.bucket(name),
        c.buckets,
        lambda: c.delete_bucket(name),
    ]
    for call in calls:
        t0 = time.monotonic()
        with pytest.raises(NotConnectedError) as info:
            call()
        assert isinstance(info.value, ConnectionError) and isinstance(info.value, NatsKVError)
        assert time.monotonic() - t0 < 1.0
    c.close()  # twice is fine
    with natskv.connect(nats_url) as other:
        assert other.bucket(name, create=False).get("k") == 1
        other.delete_bucket(name)


@pytest.mark.parametrize(
    "options",
    [
        {"bogus_option": 1},
        {"connect_timeout": 0},
        {"connect_timeout": -1},
        {"timeout": "fast"},
        {"max_reconnect": "x"},
        {"user": "u"},
        {"token": "t", "user": "u", "password": "p"},
        {"creds": "/nonexistent/file.creds"},
        {"tls_cert": "/nonexistent/c.pem"},
    ],
    ids=repr,
)
def test_connect_bad_options_fail_before_connecting(options: dict[str, Any]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens: only validation can answer fast
    t0 = time.monotonic()
    with pytest.raises(ConfigurationError) as info:
        natskv.connect(url, **options)
    assert isinstance(info.value, ValueError) and isinstance(info.value, NatsKVError)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("url", ["http://127.0.0.1:4222", "nats://127.0.0.1:notaport", "nats://"], ids=repr)
def test_connect_bad_url(url: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigurationError):
        natskv.connect(url)
    assert time.monotonic() - t0 < 1.0


def test_connect_nothing_listening_raises_not_connected() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(NotConnectedError) as info:
        natskv.connect(url, connect_timeout=0.5)
    elapsed = time.monotonic() - t0
    assert isinstance(info.value, ConnectionError)
    assert str(url.rsplit(":", 1)[1]) in str(info.value)
    assert elapsed < 5.0, f"took {elapsed:.1f} s"


def test_bucket_deleted_by_another_client_says_so(nats_url: str, name: str) -> None:
    """Calls on a bucket deleted elsewhere fail at once with BucketNotFoundError, not a timeout."""
    with natskv.connect(nats_url) as a, natskv.connect(nats_url) as b:
        kv = a.bucket(name)
        kv.set("k", 1)
        assert b.delete_bucket(name)
        t0 = time.monotonic()
        with pytest.raises(natskv.BucketNotFoundError):
            kv.set("k", 2)
        with pytest.raises(natskv.BucketNotFoundError):
            kv.get("k")
        assert time.monotonic() - t0 < 2.0


def test_permission_denied_is_reported_at_once(tmp_path: Path) -> None:
    """A user the server forbids to write a bucket gets PermissionDeniedError, not a timeout."""
    conf = tmp_path / "auth.conf"
    conf.write_text(
        'authorization { users = [ { user: app, password: pw, permissions: {'
        ' publish: { allow: [">"], deny: ["$KV.locked.>"] }, subscribe: { allow: [">"] } } } ] }\n'
    )
    with (
        natskv.EmbeddedServer(data_dir=tmp_path / "data", extra_args=["-c", str(conf)]) as server,
        natskv.connect(server.url, user="app", password="pw", timeout=5.0) as db,
    ):
        kv = db.bucket("locked")
        assert kv.get("k") is None  # reads are allowed
        t0 = time.monotonic()
        with pytest.raises(natskv.PermissionDeniedError) as info:
            kv.set("k", 1)
        assert time.monotonic() - t0 < 2.0
        assert isinstance(info.value, PermissionError)
        assert "locked" in str(info.value)
        assert db.bucket("open").set("k", 1) >= 1


def test_commit_create_over_deleted_purged_and_expired_keys(kv: natskv.Bucket) -> None:
    """As with create(), a commit's create succeeds over a tombstone and fails over a live value."""
    kv.set("gone", 1)
    kv.delete("gone")
    kv.set("purged", 1)
    kv.purge("purged")
    kv.set("live", 1)
    kv.commit([("create", "gone", 2), ("create", "purged", 3), ("create", "fresh", 4)])
    assert kv.get_many(["gone", "purged", "fresh"]) == {"gone": 2, "purged": 3, "fresh": 4}
    with pytest.raises(KeyExistsError) as info:
        kv.commit([("create", "other", 1), ("create", "live", 2)])
    assert info.value.key == "live"
    assert kv.get("other") is None and kv.get("live") == 1
