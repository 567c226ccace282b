"""Typed commit operations (natskv.Set / Create / Update / Delete) against a real nats-server.

Each op class writes what its tuple form writes; ops and tuples mix in one commit; a malformed op
fails when it is built (or, inside commit(), before anything is sent) and nothing stored changes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

import natskv
from natskv import InvalidArgumentError, InvalidKeyError, KeyExistsError, RevisionMismatchError
from natskv.wire import jsapi


def last_seq(db: natskv.Client, bucket: str) -> int:
    return int(jsapi.call(db._conn, f"STREAM.INFO.KV_{bucket}", None, 5.0)["state"]["last_seq"])


def test_each_op_class_writes_what_its_tuple_writes(kv: natskv.Bucket) -> None:
    ra = kv.set("a", 1)
    rd = kv.set("d", "bye")
    kv.set("d2", "bye2")
    last = kv.commit([
        natskv.Set("s", {"x": 1}),
        natskv.Create("c", 2),
        natskv.Update("a", 3, ra),
        natskv.Delete("d", rd),
        natskv.Delete("d2"),
    ])
    assert kv.get_many(["s", "c", "a", "d", "d2"]) == {"s": {"x": 1}, "c": 2, "a": 3}
    assert kv.status().last_revision == last
    assert [e.operation for e in kv.history("d")] == ["PUT", "DEL"]


def test_ops_and_tuples_mix(kv: natskv.Bucket) -> None:
    ra = kv.set("a", 1)
    kv.commit([natskv.Set("x", 1), ("update", "a", 2, ra), natskv.Create("y", 3), ("delete", "x0")])
    assert kv.get_many(["x", "a", "y"]) == {"x": 1, "a": 2, "y": 3}


def test_a_failed_check_of_an_op_class_stores_nothing(db: natskv.Client, kv: natskv.Bucket) -> None:
    ra = kv.set("a", 1)
    ra2 = kv.set("a", 2)
    kv.set("b", 0)
    before = last_seq(db, kv.name)
    with pytest.raises(RevisionMismatchError) as mismatch:
        kv.commit([natskv.Set("new", 1), natskv.Update("a", 3, ra)])
    assert (mismatch.value.key, mismatch.value.current_revision) == ("a", ra2)
    with pytest.raises(KeyExistsError):
        kv.commit([natskv.Set("new", 1), natskv.Create("b", 1)])
    assert last_seq(db, kv.name) == before
    assert kv.get("new") is None


def test_ops_are_frozen_values() -> None:
    op = natskv.Update("k", {"v": 1}, 3)
    assert op == natskv.Update("k", {"v": 1}, 3)
    assert natskv.Delete("k").revision is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.revision = 4  # type: ignore[misc]
    assert not hasattr(op, "__dict__")  # slots


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: natskv.Set(5, 1), InvalidKeyError, "keys are str"),  # type: ignore[arg-type]
        (lambda: natskv.Create(b"k", 1), InvalidKeyError, "keys are str"),  # type: ignore[arg-type]
        (lambda: natskv.Update("k", 1, -1), InvalidArgumentError, "revision must be"),
        (lambda: natskv.Update("k", 1, "3"), InvalidArgumentError, "revision must be"),  # type: ignore[arg-type]
        (lambda: natskv.Update("k", 1, True), InvalidArgumentError, "revision must be"),
        (lambda: natskv.Delete("k", 2**64), InvalidArgumentError, "revision must be"),
    ],
    ids=["int-key", "bytes-key", "negative-revision", "str-revision", "bool-revision", "huge-revision"],
)
def test_bad_ops_fail_when_built(build: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    "op, message",
    [
        (natskv.Set("first", 1), "appears twice"),
        (natskv.Set("a", object()), "cannot store"),
        (natskv.Create("x" * 4000, 1), "too long"),
        (natskv.Set("a", 1), "one commit"),  # the single op object, not a list
    ],
    ids=["duplicate-key", "unencodable", "long-key", "not-a-list"],
)
def test_bad_ops_fail_before_anything_is_sent(db: natskv.Client, kv: natskv.Bucket, op: Any, message: str) -> None:
    kv.set("seed", 0)
    before = last_seq(db, kv.name)
    with pytest.raises(natskv.NatsKVError) as info:
        if message == "one commit":
            kv.commit(op)
        else:
            kv.commit([natskv.Set("first", 1), ("set", "second", 2), op])
    assert message == "one commit" or message in str(info.value)
    assert last_seq(db, kv.name) == before
    assert kv.get_many(["first", "second", "a"]) == {}


def test_ops_are_exported() -> None:
    assert {"Set", "Create", "Update", "Delete"} <= set(natskv.__all__)
    assert natskv.Set is natskv.ops.Set


def test_commit_ops_may_carry_a_ttl(kv: natskv.Bucket) -> None:
    kv.set("u", 0)
    revision = kv.entry("u").revision  # type: ignore[union-attr]
    kv.commit([natskv.Set("s", 1, ttl=1), ("create", "c", 2, {"ttl": 1}), ("update", "u", 3, revision, {"ttl": 1}),
               ("set", "keep", 4)])
    assert kv.get_many(["s", "c", "u", "keep"]) == {"s": 1, "c": 2, "u": 3, "keep": 4}
    deadline = time.monotonic() + 8
    while kv.get_many(["s", "c", "u"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kv.get_many(["s", "c", "u", "keep"]) == {"keep": 4}
    for bad in (("set", "x", 1, {"ttl": 0}), ("set", "x", 1, {"tll": 5}), ("create", "x", 1, 5),
                ("update", "x", 1, 2, {"ttl": -1})):
        with pytest.raises(natskv.InvalidArgumentError):
            kv.commit([bad])
    with pytest.raises(natskv.InvalidArgumentError, match="ttl"):
        natskv.Create("x", 1, ttl=float("inf"))
