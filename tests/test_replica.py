"""LocalReplica: a bucket mirrored in memory by a shared watch, against a real nats-server."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import natskv
from natskv import InvalidKeyError, NatsKVTimeoutError
from natskv.wire import jsapi

# history 1, db.bucket()'s default (the kv fixture lives in conftest.py)
pytestmark = pytest.mark.bucket()


def consumer_count(db: natskv.Client, bucket: str) -> int:
    return int(jsapi.call(db._conn, f"STREAM.INFO.KV_{bucket}", None, 5)["state"]["consumer_count"])


def test_loads_current_values_and_follows_changes(kv: natskv.Bucket) -> None:
    kv.set_many({"user:1": {"n": 1}, "user:2": {"n": 2}, "other": 0})
    kv.delete("user:2")
    with kv.replica("user:*") as rep:
        assert rep.snapshot() == {"user:1": {"n": 1}}
        rev = kv.set("user:3", {"n": 3})
        rep.wait_for(rev)
        assert rep.get("user:3") == {"n": 3}
        assert rep.revision_of("user:3") == rev
        rev = kv.delete("user:1")
        rep.wait_for(rev)
        assert "user:1" not in rep and rep.get("user:1", "absent") == "absent"
        kv.set("other", 1)  # outside the pattern: never delivered, never stored
        rep.wait_for(kv.set("user:4", 4))
        assert "other" not in rep
        assert list(rep) == ["user:3", "user:4"] and len(rep) == 2


def test_read_your_writes_from_many_threads(kv: natskv.Bucket) -> None:
    rep = kv.replica()
    errors: list[str] = []

    def writer(t: int) -> None:
        for i in range(50):
            rev = kv.set(f"t{t}:{i}", i)
            rep.wait_for(rev)
            if rep.get(f"t{t}:{i}") != i:
                errors.append(f"t{t}:{i}")

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    rep.stop()
    assert errors == []
    assert len(rep) == 400


def test_apply_hook_sees_old_and_new_values(kv: natskv.Bucket) -> None:
    seen: list[tuple[str, Any, Any]] = []
    rep = natskv.LocalReplica(kv, "*", on_apply=lambda k, old, new, rev: seen.append((k, old, new))).start(5)
    try:
        rep.wait_for(kv.set("a", 1))
        rep.wait_for(kv.set("a", 2))
        rep.wait_for(kv.delete("a"))
        rep.wait_for(kv.delete("never-existed"))
    finally:
        rep.stop()
    assert seen == [("a", None, 1), ("a", 1, 2), ("a", 2, None)]


def test_apply_written_keeps_to_the_pattern(kv: natskv.Bucket) -> None:
    # A writer hands over every key of its batch; a replica of "r:*" must take only its own
    # (a model's batch writes its unique-value keys beside the record).
    seen: list[tuple[str, Any, Any]] = []
    rep = natskv.LocalReplica(kv, "r:*", on_apply=lambda k, old, new, rev: seen.append((k, old, new))).start(5)
    try:
        revision = kv.commit([("set", "u:email", "a@example.com"), ("set", "r:1", {"id": 1})])
        rep.apply_written([("u:email", True, "a@example.com"), ("r:1", True, {"id": 1})], revision)
        rep.wait_for(revision)
        assert rep.get("u:email") is None and rep.get("r:1") == {"id": 1}
        assert rep.snapshot() == {"r:1": {"id": 1}}
    finally:
        rep.stop()
    assert seen == [("r:1", None, {"id": 1})]


def test_replicas_and_watchers_share_one_consumer(db: natskv.Client, kv: natskv.Bucket) -> None:
    kv.set("k:1", 1)
    r1 = kv.replica("k:*")
    r2 = kv.replica("k:*")
    w = kv.watch("k:*")
    try:
        # A late joiner (r2, w) reads its initial values through a snapshot consumer of its own,
        # deleted before they are delivered; at rest one consumer serves them all.
        first = w.get(timeout=5)
        while first is not None and not first.initial_done:
            first = w.get(timeout=5)
        assert first is not None
        assert consumer_count(db, kv.name) == 1
        rev = kv.set("k:2", 2)
        r1.wait_for(rev)
        r2.wait_for(rev)
        assert r1.snapshot() == r2.snapshot() == {"k:1": 1, "k:2": 2}
    finally:
        r1.stop()
        r2.stop()
        w.stop()
    assert consumer_count(db, kv.name) == 0


def test_wait_for_times_out_with_a_clear_error(kv: natskv.Bucket) -> None:
    with kv.replica() as rep, pytest.raises(NatsKVTimeoutError, match="did not reach revision"):
        rep.wait_for(10**9, timeout=0.2)


def test_bad_pattern_fails_before_subscribing(kv: natskv.Bucket) -> None:
    with pytest.raises(InvalidKeyError):
        kv.replica("[oops")


@pytest.mark.slow
def test_warm_up_of_many_keys(kv: natskv.Bucket) -> None:
    """20k records load completely; the rate is reported (measured properly in benchmarks/)."""
    n = 20_000
    for start in range(0, n, 1000):
        kv.set_many({f"r:{i:06d}": {"i": i, "name": f"user {i}"} for i in range(start, start + 1000)})
    t0 = time.perf_counter()
    with kv.replica("r:*", timeout=60) as rep:
        elapsed = time.perf_counter() - t0
        assert len(rep) == n
        assert rep.get("r:012345") == {"i": 12345, "name": "user 12345"}
    print(f"replica warm-up: {n / elapsed:,.0f} records/s")


def test_wait_for_without_timeout_waits_the_clients_default(nats_url: str, name: str) -> None:
    with natskv.connect(nats_url, timeout=0.4) as short:
        kv = short.bucket(name)
        replica = kv.replica()
        try:
            t0 = time.monotonic()
            with pytest.raises(NatsKVTimeoutError, match=r"within 0\.4 s"):
                replica.wait_for(10**9)  # None: the client's timeout
            assert time.monotonic() - t0 < 3.0
        finally:
            replica.stop()


def test_initial_values_of_every_kind_load_in_runs(db: natskv.Client, kv: natskv.Bucket) -> None:
    """Plain JSON values arrive in runs of deliveries taken in one _core call; values with headers
    (bytes, TTL), deletes and values another client wrote (not JSON, keys not in natskv's
    encoding) interrupt the runs and go one at a time. All of them load, in order, and the
    changes written after the load follow."""
    expected: dict[str, Any] = {}
    for start in range(0, 3000, 500):
        batch = {f"m:{i}": {"i": i} for i in range(start, start + 500)}
        for i in range(start, start + 500, 97):
            batch[f"m:{i}"] = f"bytes {i}".encode()  # stored with natskv's raw-bytes header
        kv.set_many(batch)
        expected.update(batch)
    for i in range(5, 3000, 301):
        kv.delete(f"m:{i}")
        del expected[f"m:{i}"]
    if db._conn.api_level >= 1:  # per-key TTL
        kv.set("m:ttl", {"ttl": True}, ttl=600)
        expected["m:ttl"] = {"ttl": True}
    db.publish(f"$KV.{kv.name}.m.raw", b"not json")  # another client's value
    db.publish(f"$KV.{kv.name}.m.%other", b"[1]")  # a key not in natskv's encoding
    rev = kv.set("m:last", 1)
    expected.update({"m:raw": b"not json", "m.%other": [1], "m:last": 1})
    with kv.replica("m:*", timeout=30) as rep:  # starts the feed: its initial values come in runs
        rep.wait_for(rev)
        assert rep.snapshot() == expected
        revisions = {key: rep.revision_of(key) for key in expected}
        assert revisions["m:last"] == rev and all(r is not None and r <= rev for r in revisions.values())
        watcher = kv.watch("m:*")  # joins the running feed, then shares its runs of changes
        try:
            seen: dict[str, Any] = {}
            change = watcher.get(timeout=10)
            while change is not None and not change.initial_done:
                if change.operation == "PUT":
                    seen[change.key] = change.value
                else:
                    seen.pop(change.key, None)
                change = watcher.get(timeout=10)
            assert change is not None and seen == expected
            later = kv.set_many({f"m:{i}": {"later": i} for i in range(400)})
            rep.wait_for(max(later.values()))
            for i in range(400):
                assert rep.get(f"m:{i}") == {"later": i} and rep.revision_of(f"m:{i}") == later[f"m:{i}"]
            changes = [watcher.get(timeout=10) for _ in range(400)]
            assert [(c.key, c.value, c.revision) for c in changes if c is not None] == sorted(
                ((f"m:{i}", {"later": i}, later[f"m:{i}"]) for i in range(400)), key=lambda t: t[2])
        finally:
            watcher.stop()


def test_runs_and_single_events_apply_in_their_order(db: natskv.Client, name: str) -> None:
    """The feed hands a replica runs of entries and single events (a marker, an entry with
    headers) in one order, batched until the loop's next step; a model's replica applies each
    batch in that order, whatever the mix: a batch of runs alone, or runs around single events."""
    import asyncio

    from natskv._runner import runner
    from natskv.wire.kv import RawEntry

    user = type("RunsUser", (natskv.Model,), {"__bucket__": name, "id": natskv.Field(int, primary_key=True),
                                              "n": natskv.Field(int, index=True)})
    db.register(user)
    try:
        replica = user._require_store().replica
        assert replica is not None
        base = replica.revision + 100  # past anything the watch delivers

        def entry(pk: int, n: int, revision: int, op: str = "PUT") -> RawEntry:
            data = f'{{"id": {pk}, "n": {n}}}'.encode() if op == "PUT" else b""
            return RawEntry(f"$KV.{name}.r.i.{pk}", data, base + revision, "0", op)

        async def feed(batches: list[list[tuple[str, Any]]]) -> None:
            for batch in batches:
                for kind, what in batch:
                    if kind == "run":
                        replica._apply_many(what)
                    else:
                        replica._apply(what)
                await asyncio.sleep(0)  # the loop's next step applies the batch
                await asyncio.sleep(0)

        runner.call(feed([
            [("run", [entry(1, 1, 1), entry(2, 2, 2)]), ("run", [entry(3, 3, 3)])],  # runs alone
            [("run", [entry(1, 10, 4)]), ("one", entry(2, 0, 5, "DEL")), ("run", [entry(3, 30, 6), entry(4, 4, 7)])],
            [("one", entry(5, 5, 8)), ("run", [entry(5, 50, 9)]), ("one", entry(4, 40, 10))],
            [("run", [entry(6, 6, 11)]), ("run", [entry(6, 60, 12)])],
        ]), 10)
        assert {u.id: u.n for u in user.find()} == {1: 10, 3: 30, 4: 40, 5: 50, 6: 60}
        assert user.get(4)._version == base + 10 and replica.revision == base + 12
        assert [u.id for u in user.find(n__gte=40)] == [4, 5, 6]
    finally:
        db.delete_bucket(name)
