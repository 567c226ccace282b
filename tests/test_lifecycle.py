"""A client never dies quietly: over-long names are refused before they reach the server, a
connection closed for good says so on every call, timeouts say what timed out and why, and a
client dropped without close() gives its socket back. All against real nats-servers."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import traceback
import weakref
from pathlib import Path

import pytest
from helpers import wait_until

import natskv
from natskv._runner import runner
from natskv.server import EmbeddedServer

MAX_CONTROL_LINE = 4096  # nats-server's default max_control_line
MAX_BUCKET_NAME = 255 - len("KVC_")  # nats-server's stream name limit, less the counter stream's prefix


def healthy(db: natskv.Client, kv: natskv.Bucket) -> None:
    """The connection survived: a write and a read go through and nothing was reconnected."""
    rev = kv.set("health", "ok", timeout=5)
    assert kv.entry("health", timeout=5).revision == rev
    assert db.connected
    assert db.stats()["reconnects"] == 0


# -- 1. over-long names are refused before sending ------------------------------------------


def test_overlong_bucket_names_are_refused_and_the_limit_is_the_servers(db: natskv.Client, kv: natskv.Bucket) -> None:
    for length in (4100, MAX_BUCKET_NAME + 1):
        with pytest.raises(natskv.InvalidBucketNameError, match=f"at most {MAX_BUCKET_NAME}"):
            db.bucket("x" * length)
        with pytest.raises(natskv.InvalidBucketNameError, match="too long"):
            db.delete_bucket("x" * length)
    healthy(db, kv)
    # The longest name the server takes works, keys of the longest encoded length included:
    # every subject natskv builds from them fits the protocol line.
    name = "b" * MAX_BUCKET_NAME
    longest = db.bucket(name, history=2)
    try:
        key = "k" * 3000
        rev = longest.set(key, 1)
        assert longest.get(key) == 1
        assert longest.update(key, 2, revision=rev) > rev
        assert [e.value for e in longest.history(key)] == [1, 2]
        assert longest.keys("k*") == [key]
        with longest.watch(key, timeout=5) as watcher:
            change = watcher.get(timeout=5)
            assert change is not None and change.key == key and change.value == 2
        assert longest.delete(key)
        assert longest.get(key) is None
        # The autoincrement counter stream beside it (KVC_<bucket>) fits the limit too.
        Thing = db.define("LongBucketThing", {"id": {"type": "INTEGER", "primaryKey": True, "autoIncrement": True}},
                          bucket=name)
        assert [Thing.create().id for _ in range(2)] == [1, 2]
    finally:
        db.delete_bucket(name)
    healthy(db, kv)


def test_overlong_subjects_are_refused_before_sending(db: natskv.Client, kv: natskv.Bucket) -> None:
    with pytest.raises(natskv.InvalidArgumentError, match=f"beyond {MAX_CONTROL_LINE}"):
        db.publish("p" * 5000, b"")
    with pytest.raises(natskv.InvalidArgumentError, match="max_control_line"):
        db.request("q" * 5000, b"", timeout=1)
    # "PUB <subject> 1": one byte over the limit is refused, a line at the limit goes through.
    with pytest.raises(natskv.InvalidArgumentError, match=f"would be {MAX_CONTROL_LINE + 1} bytes"):
        db.publish("p" * (MAX_CONTROL_LINE - 1), b"x")
    db.publish("p" * (MAX_CONTROL_LINE - 2), b"x")
    # Multi-byte characters count as the bytes they take on the wire.
    with pytest.raises(natskv.InvalidArgumentError, match="too long"):
        db.publish("é" * 2100, b"x")
    healthy(db, kv)


def test_oversized_messages_are_refused_before_sending(db: natskv.Client, kv: natskv.Bucket) -> None:
    limit = 1024 * 1024  # nats-server's default max_payload
    with pytest.raises(natskv.PayloadTooLargeError, match=f"max payload of {limit} bytes"):
        db.publish("big", b"x" * (limit + 1))
    with pytest.raises(natskv.PayloadTooLargeError, match="headers included"):
        db.request("big", b"x" * (limit - 10), headers={"Name": "value"}, timeout=1)
    db.publish("big", b"x" * limit)  # exactly the limit goes through
    healthy(db, kv)


def test_overlong_keys_are_refused_before_sending(db: natskv.Client, kv: natskv.Bucket) -> None:
    for key in ("k" * 5000, "é" * 1000):  # the second is short, but its encoded subject is not
        with pytest.raises(natskv.InvalidKeyError, match="too long"):
            kv.set(key, 1)
        with pytest.raises(natskv.InvalidKeyError, match="too long"):
            kv.get(key)
        with pytest.raises(natskv.InvalidKeyError, match="too long"):
            kv.set_many({"fine": 1, key: 2})
    assert kv.get("fine") is None  # set_many refused the whole call
    healthy(db, kv)


# -- 2. a connection closed for good says so -------------------------------------------------


def _fails_at_once(call: object, reason: str) -> None:
    start = time.monotonic()
    with pytest.raises(natskv.NotConnectedError, match=reason) as info:
        call()  # type: ignore[operator]
    assert time.monotonic() - start < 0.5, "a closed connection must fail the call at once"
    assert "natskv.connect()" in str(info.value)


def test_a_connection_the_server_closed_fails_every_call_with_the_reason(nats_url: str) -> None:
    db = natskv.connect(nats_url, timeout=5)
    try:
        kv = db.bucket("lifecycle_closed")
        kv.set("k", 1)
        # A protocol error: the server answers -ERR and hangs up; nats-py never reconnects.
        runner.call_soon(lambda: db._conn.nc._transport.write(b"BOGUS\r\n"))
        assert wait_until(lambda: not db.connected, 5)
        reason = "closed.*unknown protocol operation"
        _fails_at_once(lambda: kv.get("k", timeout=5), reason)
        _fails_at_once(lambda: kv.set("k", 2, timeout=5), reason)
        _fails_at_once(lambda: db.bucket("lifecycle_other", timeout=5), reason)
        _fails_at_once(lambda: kv.watch("*", timeout=5), reason)
        _fails_at_once(lambda: db.publish("a.b", b""), reason)
        # Each call gets an error of its own: the traceback does not grow from call to call.
        lengths = []
        for _ in range(3):
            with pytest.raises(natskv.NotConnectedError) as info:
                kv.get("k")
            lengths.append(len(traceback.extract_tb(info.value.__traceback__)))
        assert lengths[0] == lengths[1] == lengths[2]
        assert "closed" in repr(db)
    finally:
        db.close()
    with natskv.connect(nats_url) as other:  # the server itself is fine
        other.delete_bucket("lifecycle_closed")


def test_watches_and_replicas_hear_that_the_connection_closed_for_good(nats_url: str) -> None:
    """A watch cannot resume without a connection: an iterator raises why, a callback watcher
    hands it to on_error, and a replica (and the models on it) refuses reads instead of serving
    values frozen at the close."""
    db = natskv.connect(nats_url, timeout=5)
    try:
        kv = db.bucket("lifecycle_watch_closed")
        kv.set("k", 1)
        iterated = kv.watch("*", timeout=5)
        assert iterated.get(timeout=5).key == "k" and iterated.get(timeout=5).initial_done
        errors: list[BaseException] = []
        reported = threading.Event()
        called = kv.watch(
            "*", lambda change: None, on_error=lambda exc: (errors.append(exc), reported.set()), timeout=5
        )
        replica = kv.replica("*").start(timeout=5)
        assert replica.get("k") == 1
        Thing = db.define("ClosedThing", {"id": {"type": "INTEGER", "primaryKey": True}}, bucket="lifecycle_models")
        Thing.create(id=1)

        runner.call_soon(lambda: db._conn.nc._transport.write(b"BOGUS\r\n"))
        reason = "closed.*unknown protocol operation"
        with pytest.raises(natskv.NotConnectedError, match=reason):
            iterated.get(timeout=5)  # at once, not after the 5 s
        with pytest.raises(natskv.NotConnectedError, match=reason):
            next(iter(iterated))  # and again: the iterator does not hang afterwards
        assert iterated.stopped
        assert reported.wait(5) and isinstance(errors[0], natskv.NotConnectedError)
        assert wait_until(lambda: called.stopped, 5)
        _fails_at_once(lambda: replica.get("k"), reason)
        _fails_at_once(lambda: Thing.get(1), reason)
        _fails_at_once(Thing.find, reason)
        iterated.stop()  # stopping an ended watch is harmless
        called.stop()
    finally:
        db.close()
    with natskv.connect(nats_url) as other:
        other.delete_bucket("lifecycle_watch_closed")
        other.delete_bucket("lifecycle_models")


@pytest.mark.parametrize(
    ("max_reconnect", "reason"),
    [(0, "max_reconnect=0 allows no reconnect"), (2, "no server could be reached in max_reconnect=2 attempts")],
)
def test_a_connection_that_gave_up_reconnecting_fails_every_call_with_the_reason(
    fresh_server: EmbeddedServer, max_reconnect: int, reason: str
) -> None:
    db = natskv.connect(fresh_server.url, max_reconnect=max_reconnect, reconnect_wait=0.05, timeout=5)
    try:
        kv = db.bucket("gave_up")
        kv.set("k", 1)
        fresh_server.stop()
        assert wait_until(lambda: "closed" in repr(db), 10)
        _fails_at_once(lambda: kv.get("k", timeout=5), reason)
        _fails_at_once(lambda: kv.set("k", 2, timeout=5), reason)
        _fails_at_once(lambda: kv.watch("*", timeout=5), reason)
    finally:
        db.close()


@pytest.mark.slow
def test_a_reconnect_the_server_refuses_ends_with_the_servers_reason(tmp_path: Path) -> None:
    """The password changed while the client was away: after max_reconnect refused attempts,
    calls fail at once and the reason names the authorization failure, not only "gave up"."""
    conf = tmp_path / "auth.conf"
    conf.write_text("authorization { users = [ { user: app, password: old } ] }\n")
    server = EmbeddedServer(data_dir=tmp_path / "data", extra_args=["-c", str(conf)])
    server.start()
    try:
        db = natskv.connect(server.url, user="app", password="old", max_reconnect=10, reconnect_wait=0.1, timeout=5)
        try:
            kv = db.bucket("refused")
            kv.set("k", 1)
            server.stop()
            conf.write_text("authorization { users = [ { user: app, password: new } ] }\n")
            server = EmbeddedServer(data_dir=tmp_path / "data", port=server.port, extra_args=["-c", str(conf)])
            server.start()
            assert wait_until(lambda: "closed" in repr(db), 10)
            _fails_at_once(lambda: kv.get("k", timeout=5), "max_reconnect=10 attempts.*Authorization Violation")
        finally:
            db.close()
    finally:
        server.stop()


# -- 3. timeouts name the operation, the timeout and the cause -------------------------------


def test_an_inner_timeout_comes_through_with_its_own_cause() -> None:
    start = time.monotonic()
    with pytest.raises(natskv.NatsKVTimeoutError, match=r"sleeping \(timeout=5.0 s\)") as info:
        runner.call(asyncio.wait_for(asyncio.sleep(10), 0.05), 5.0, what="sleeping")
    assert time.monotonic() - start < 2.0
    assert isinstance(info.value.__cause__, TimeoutError)


def test_an_outer_timeout_names_the_operation_and_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(natskv.NatsKVTimeoutError, match=r"sleeping did not complete within timeout=0.2 s"):
        runner.call(asyncio.sleep(10), 0.2, what="sleeping")
    assert 0.2 <= time.monotonic() - start < 2.0


@pytest.mark.slow
def test_timeouts_against_a_server_that_went_away_say_what_and_why(fresh_server: EmbeddedServer) -> None:
    db = natskv.connect(fresh_server.url, timeout=0.5)
    try:
        kv = db.bucket("went_away")
        fresh_server.stop()
        assert wait_until(lambda: not db.connected, 5)
        # The JetStream request inside the watch times out first (request timeout 0.5 s): its
        # error, with its subject and timeout, is what the caller gets, not the outer 10 s.
        start = time.monotonic()
        with pytest.raises(natskv.NatsKVTimeoutError, match=r"CONSUMER\.CREATE.*timeout=0.5 s") as info:
            kv.watch("*", timeout=10)
        assert time.monotonic() - start < 5.0
        assert "did not complete" not in str(info.value)
        with pytest.raises(natskv.NatsKVTimeoutError, match=r"DIRECT\.GET.*timeout=0.3 s.*down and reconnecting"):
            kv.get("k", timeout=0.3)
        with pytest.raises(natskv.NatsKVTimeoutError, match=r"did not complete within timeout=0.3 s"):
            kv.watch("*", timeout=0.3)
    finally:
        db.close()


# -- 4. a dropped client is closed when collected ----------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_dropped_clients_give_their_connections_back(nats_url: str, db: natskv.Client, kv: natskv.Bucket) -> None:
    db.bucket(kv.name)  # the loop and the shared fixtures are up before counting
    gc.collect()
    start = _open_fds()
    refs = []
    for i in range(200):
        client = natskv.connect(nats_url, timeout=5)
        bucket = client.bucket(kv.name)  # a bucket refers back to its client: a cycle
        bucket.set(f"k{i % 5}", i)
        refs.append(weakref.ref(client))
        del client, bucket
    gc.collect()
    assert not [r for r in refs if r() is not None], "nothing may keep a dropped client alive"
    assert wait_until(lambda: _open_fds() <= start + 5, 10), f"{_open_fds() - start} fds still open"
    healthy(db, kv)  # closing the dropped ones left the live client alone


def test_a_dropped_client_ends_its_threads(nats_url: str) -> None:
    before = threading.active_count()
    refs = []
    for _ in range(5):
        client = natskv.connect(nats_url)
        client.on("*.inserted", lambda event: None)  # starts the client's event dispatcher
        refs.append(weakref.ref(client))
        del client
    gc.collect()
    assert not [r for r in refs if r() is not None]
    assert wait_until(lambda: threading.active_count() <= before, 5), threading.enumerate()


def test_a_closed_client_is_not_closed_again_when_collected(nats_url: str) -> None:
    client = natskv.connect(nats_url)
    finalizer = client._finalizer
    client.close()
    assert not finalizer.alive
    del client
    gc.collect()
