"""Watches against a real nats-server: iterator and callback forms, filters, stop, limits."""

from __future__ import annotations

import logging
import re
import threading
import time
from datetime import datetime
from typing import Any

import pytest
from helpers import eventually

import natskv
from natskv import Change, InvalidKeyError, NatsKVError
from natskv.wire import jsapi


def consumer_count(db: natskv.Client, bucket: str) -> int:
    return int(jsapi.call(db._conn, f"STREAM.INFO.KV_{bucket}", None, 5.0)["state"]["consumer_count"])


def consumers(db: natskv.Client, bucket: str) -> list[dict[str, Any]]:
    return list(jsapi.call(db._conn, f"CONSUMER.LIST.KV_{bucket}", {}, 5.0).get("consumers") or [])


def initial(w: natskv.Watcher, timeout: float = 5.0) -> list[Change]:
    """Changes up to (not including) the initial_done marker; fails if the marker does not come."""
    out: list[Change] = []
    deadline = time.monotonic() + timeout
    while True:
        ch = w.get(timeout=max(deadline - time.monotonic(), 0.01))
        assert ch is not None, f"no initial_done marker within {timeout} s; got {out}"
        if ch.initial_done:
            return out
        out.append(ch)


def take(w: natskv.Watcher, n: int, timeout: float = 5.0) -> list[Change]:
    out: list[Change] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        ch = w.get(timeout=max(deadline - time.monotonic(), 0.01))
        assert ch is not None, f"wanted {n} changes within {timeout} s, got {out}"
        out.append(ch)
    return out


def nothing_more(w: natskv.Watcher, wait: float = 0.3) -> None:
    ch = w.get(timeout=wait)
    assert ch is None, f"unexpected change {ch!r}"


def summary(changes: list[Change]) -> list[tuple[str, Any, str]]:
    return [(c.key, c.value, c.operation) for c in changes]


# -- iterator form ------------------------------------------------------------------------------


def test_initial_values_marker_then_updates(db: natskv.Client, kv: natskv.Bucket) -> None:
    ra = kv.set("a", 1)
    rb = kv.set("b", {"x": [1, 2]})
    kv.set("a", 2)
    ra2 = kv.entry("a").revision
    with kv.watch() as w:
        init = initial(w)
        assert summary(init) == [("b", {"x": [1, 2]}, "PUT"), ("a", 2, "PUT")]
        assert [c.revision for c in init] == [rb, ra2]
        for c in init:
            assert c.bucket == kv.name
            assert not c.initial_done and not c.deleted
            assert isinstance(c.created, datetime) and c.created.tzinfo is not None
        rc = kv.set("c", "new")
        r_upd = kv.update("a", 3, ra2)
        r_del = kv.delete("b")
        r_purge = kv.purge("a")
        changes = take(w, 4)
        assert summary(changes) == [("c", "new", "PUT"), ("a", 3, "PUT"), ("b", None, "DEL"), ("a", None, "PURGE")]
        assert [c.revision for c in changes] == [rc, r_upd, r_del, r_purge]
        assert changes[2].deleted and changes[3].deleted
        nothing_more(w)
    assert ra < rb


def test_marker_on_empty_bucket_and_marker_fields(kv: natskv.Bucket) -> None:
    with kv.watch() as w:
        marker = w.get(timeout=5)
        assert marker is not None and marker.initial_done is True
        assert marker.key == "" and marker.value is None
        assert w.wait_initial(1)
        kv.set("k", b"")
        (ch,) = take(w, 1)
        assert ch.key == "k" and ch.value == b"" and ch.operation == "PUT"


def test_values_and_keys_round_trip_in_watch(kv: natskv.Bucket) -> None:
    keys = ["héllo wörld", "a.b", "a::b", "", ":", "!@#$%^&*()_+", "日本:語", "*"]
    values: list[Any] = [b"", b"\x00\xff", "", None, 0, [1], {"k": "v"}, "plain"]
    with kv.watch() as w:
        initial(w)
        for k, v in zip(keys, values, strict=True):
            kv.set(k, v)
        got = take(w, len(keys))
    assert [(c.key, c.value) for c in got] == list(zip(keys, values, strict=True))
    assert [type(c.value) for c in got] == [type(v) for v in values]


def test_include_history(db: natskv.Client, name: str) -> None:
    kv = db.bucket(name, history=5)
    try:
        kv.set("a", 1)
        kv.set("b", 1)
        kv.set("a", 2)
        kv.delete("a")
        kv.set("a", 3)
        with kv.watch(include_history=True) as w:
            init = initial(w)
            assert summary(init) == [
                ("a", 1, "PUT"), ("b", 1, "PUT"), ("a", 2, "PUT"), ("a", None, "DEL"), ("a", 3, "PUT")
            ]
            assert [c.revision for c in init] == sorted(c.revision for c in init)
            kv.set("b", 2)
            assert summary(take(w, 1)) == [("b", 2, "PUT")]
    finally:
        db.delete_bucket(name)


def test_updates_only(kv: natskv.Bucket) -> None:
    kv.set("old", 1)
    with kv.watch(updates_only=True) as w:
        assert w.wait_initial(0)  # no initial values to wait for
        nothing_more(w, 0.2)  # and no marker
        kv.set("new", 2)
        kv.set("old", 3)
        assert summary(take(w, 2)) == [("new", 2, "PUT"), ("old", 3, "PUT")]


def test_include_history_and_updates_only_conflict(kv: natskv.Bucket) -> None:
    with pytest.raises(ValueError) as info:
        kv.watch(include_history=True, updates_only=True)
    assert isinstance(info.value, NatsKVError)


def test_ignore_deletes(kv: natskv.Bucket) -> None:
    kv.set("gone", 1)
    kv.delete("gone")
    kv.set("purged", 1)
    kv.purge("purged")
    kv.set("here", 1)
    with kv.watch(ignore_deletes=True) as w:
        assert summary(initial(w)) == [("here", 1, "PUT")]
        kv.set("x", 1)
        kv.delete("x")
        kv.purge("here")
        kv.set("y", 2)
        assert summary(take(w, 2)) == [("x", 1, "PUT"), ("y", 2, "PUT")]
        nothing_more(w)


def test_deleted_keys_not_reported_as_values(kv: natskv.Bucket) -> None:
    kv.set("gone", 1)
    kv.delete("gone")
    kv.set("here", 1)
    with kv.watch() as w:
        init = initial(w)
    # a deleted key may show up as its delete marker, never as a value
    assert [(c.key, c.value) for c in init if c.operation == "PUT"] == [("here", 1)]
    assert all(c.value is None for c in init if c.operation != "PUT")


# -- patterns -----------------------------------------------------------------------------------


def test_pattern_filtering_server_and_client_side(db: natskv.Client, kv: natskv.Bucket) -> None:
    kv.set_many({"user:1": 1, "user:2": 2, "user:10": 10, "user:1:x": 11, "admin:1": 0, "userx": 5})
    with kv.watch("user:1*") as w:
        # the literal prefix is filtered by the server
        (c,) = consumers(db, kv.name)
        assert c["config"]["filter_subject"] == f"$KV.{kv.name}.user.>"
        init = initial(w)
        assert sorted(ch.key for ch in init) == ["user:1", "user:10", "user:1:x"]
        kv.set("user:2", 22)
        kv.set("user:20", 20)
        kv.set("admin:1", 1)
        kv.set("user:11", 11)
        kv.set("user:1", 111)
        got = take(w, 2)
        assert summary(got) == [("user:11", 11, "PUT"), ("user:1", 111, "PUT")]
        nothing_more(w)


@pytest.mark.parametrize(
    "pattern, expected_initial, expected_live",
    [
        ("user:?", ["user:1", "user:2"], ["user:3"]),
        ("[ab]:*", ["a:1", "b:1"], ["b:2"]),
        ("user:1", ["user:1"], []),
        (re.compile(r"^user:\d$"), ["user:1", "user:2"], ["user:3"]),
        ("*:1", ["a:1", "b:1", "c:1", "user:1"], []),
    ],
    ids=["question", "class", "exact", "regex", "suffix"],
)
def test_watch_patterns(kv: natskv.Bucket, pattern: Any, expected_initial: list[str], expected_live: list[str]) -> None:
    kv.set_many({"user:1": 1, "user:2": 2, "user:10": 10, "a:1": 1, "b:1": 1, "c:1": 1})
    with kv.watch(pattern) as w:
        assert sorted(c.key for c in initial(w)) == expected_initial
        kv.set_many({"user:3": 3, "user:33": 33, "b:2": 2, "c:2": 2})
        kv.set("user:1", 100)
        expect = expected_live + (["user:1"] if "user:1" in expected_initial else [])
        assert [c.key for c in take(w, len(expect))] == expect
        nothing_more(w, 0.2)


def test_invalid_watch_patterns(kv: natskv.Bucket) -> None:
    for bad in ("[abc", "abc\\", 123, None):
        with pytest.raises(InvalidKeyError):
            kv.watch(bad)
    assert consumer_count(kv._client, kv.name) == 0


# -- sharing ----------------------------------------------------------------------------------


def test_watchers_of_one_filter_share_a_consumer(db: natskv.Client, kv: natskv.Bucket) -> None:
    kv.set_many({"user:1": 1, "user:2": 2, "other": 0})
    w1 = kv.watch("user:1*")
    assert sorted(c.key for c in initial(w1)) == ["user:1"]
    kv.set("user:3", 3)
    w2 = kv.watch("user:2*")
    w3 = kv.watch("user:*")
    try:
        assert sorted(c.key for c in initial(w2)) == ["user:2"]
        assert summary(initial(w3)) == [("user:1", 1, "PUT"), ("user:2", 2, "PUT"), ("user:3", 3, "PUT")]
        # A late joiner reads its initial values through a snapshot consumer of its own, deleted
        # before they are delivered; the changes then come from the one shared consumer.
        assert consumer_count(db, kv.name) == 1
        kv.set("user:1", 10)
        kv.set("user:2", 20)
        assert summary(take(w1, 1)) == [("user:1", 10, "PUT")]
        assert summary(take(w2, 1)) == [("user:2", 20, "PUT")]
        assert summary(take(w3, 2)) == [("user:1", 10, "PUT"), ("user:2", 20, "PUT")]
        w1.stop()
        assert consumer_count(db, kv.name) == 1
        kv.set("user:2", 21)
        assert summary(take(w2, 1)) == [("user:2", 21, "PUT")]
        assert summary(take(w3, 1)) == [("user:2", 21, "PUT")]
        nothing_more(w3, 0.1)
    finally:
        w1.stop()
        w2.stop()
        w3.stop()
    assert consumer_count(db, kv.name) == 0


def test_late_joiner_sees_current_state_once(kv: natskv.Bucket) -> None:
    kv.set_many({"k1": 1, "k2": 2})
    with kv.watch() as first:
        initial(first)
        kv.set("k1", 10)
        kv.delete("k2")
        kv.set("k3", 3)
        take(first, 3)
        with kv.watch(ignore_deletes=True) as late:
            assert summary(initial(late)) == [("k1", 10, "PUT"), ("k3", 3, "PUT")]
            kv.set("k4", 4)
            assert summary(take(late, 1)) == [("k4", 4, "PUT")]
            assert summary(take(first, 1)) == [("k4", 4, "PUT")]
            nothing_more(late, 0.2)


@pytest.mark.slow
def test_joining_a_feed_while_it_delivers_initial_values(db: natskv.Client, kv: natskv.Bucket) -> None:
    kv.set_many({f"j:{i:04d}": i for i in range(800)})
    for trial in range(8):
        w1 = kv.watch("j:*")
        w2 = kv.watch("j:*")  # joins while w1's initial values may still be arriving
        try:
            for w in (w1, w2):
                init = initial(w)
                assert len(init) == len({c.key for c in init}) == 800 + trial
            kv.set(f"live:{trial}", trial)  # not under j:
            kv.set(f"j:live{trial}", trial)
            for w in (w1, w2):
                assert summary(take(w, 1)) == [(f"j:live{trial}", trial, "PUT")]
                nothing_more(w, 0.1)
        finally:
            w1.stop()
            w2.stop()
    assert consumer_count(db, kv.name) == 0


def test_joining_a_running_feed_under_writes_gets_every_key(db: natskv.Client, name: str) -> None:
    """history=1 (the default): older revisions vanish as keys are overwritten. A watcher that
    joins a running feed must still list every existing key before its initial_done marker."""
    kv = db.bucket(name)
    kv.set_many({f"s:{i}": i for i in range(50)})
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            kv.set(f"s:{n % 50}", 1000 + n)
            n += 1

    base = kv.watch("s:*")  # keeps the shared feed running
    t = threading.Thread(target=writer, daemon=True)
    try:
        initial(base)
        t.start()
        incomplete = []
        for _ in range(20):
            with kv.watch("s:*") as w:
                keys = {c.key for c in initial(w)}
            if len(keys) != 50:
                incomplete.append(sorted({f"s:{i}" for i in range(50)} - keys))
        assert incomplete == [], (
            f"{len(incomplete)} of 20 joiners lacked keys in their initial values: {incomplete[:3]}"
        )
    finally:
        stop.set()
        t.join(5)
        base.stop()
        db.delete_bucket(name)


def test_initial_values_list_each_key_once_under_writes(db: natskv.Client, name: str) -> None:
    """A new feed whose keys are written while it starts: its initial values are one change per
    key, every key; the writes that land meanwhile come after the marker, never before it."""
    kv = db.bucket(name)
    kv.set_many({f"w:{i}": i for i in range(20)})
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            kv.set(f"w:{n % 20}", 1000 + n)
            n += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for _ in range(15):
            with kv.watch("w:*") as w:  # no other watcher: each trial starts a new feed
                keys = [c.key for c in initial(w)]
                after = w.get(timeout=5)
            assert sorted(keys) == sorted(f"w:{i}" for i in range(20)), keys
            assert after is not None and not after.initial_done
    finally:
        stop.set()
        t.join(5)
        db.delete_bucket(name)


def test_joining_a_feed_over_a_large_bucket(db: natskv.Client, kv: natskv.Bucket) -> None:
    """More keys than one batch get may read: a joining watcher still gets every key once."""
    data = {f"big:{i:05d}": i for i in range(1500)}
    kv.set_many(data)
    with kv.watch("big:*") as w1:
        assert {c.key: c.value for c in initial(w1)} == data
        kv.set("big:00000", -1)
        assert summary(take(w1, 1)) == [("big:00000", -1, "PUT")]
        with kv.watch("big:*") as w2:
            init = initial(w2)
            assert len(init) == 1500
            assert {c.key: c.value for c in init} == dict(data, **{"big:00000": -1})
            kv.set("big:00001", -2)
            assert summary(take(w1, 1)) == summary(take(w2, 1)) == [("big:00001", -2, "PUT")]
            nothing_more(w2, 0.1)
    assert consumer_count(db, kv.name) == 0


def test_change_timestamp_matches_entry_created(kv: natskv.Bucket) -> None:
    """The same revision reports the same time through a watch and through a read."""
    with kv.watch() as w:
        initial(w)
        for i in range(30):
            kv.set(f"t{i}", i)
        changes = take(w, 30)
    for ch in changes:
        e = kv.entry(ch.key)
        assert e.revision == ch.revision
        assert ch.created == e.created, (ch.key, ch.created, e.created)


# -- callback form ------------------------------------------------------------------------------


def test_callback_runs_off_the_loop_thread_and_may_call_natskv(kv: natskv.Bucket) -> None:
    kv.set("a", 1)
    seen: list[tuple[str, str, Any, Any]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def callback(ch: Change) -> None:
        # a blocking natskv call from the callback: must not deadlock
        current = kv.get(ch.key)
        seen.append((threading.current_thread().name, ch.key, ch.value, current))
        if ch.key == "stop":
            done.set()

    w = kv.watch(callback=callback, on_error=errors.append)
    try:
        assert w.wait_initial(5)
        kv.set("b", 2)
        kv.set("stop", True)
        assert done.wait(5), seen
    finally:
        w.stop()
    assert errors == []
    threads = {t for t, *_ in seen}
    assert "natskv-loop" not in threads
    assert threading.current_thread().name not in threads
    assert [(k, v, cur) for _, k, v, cur in seen] == [("a", 1, 1), ("b", 2, 2), ("stop", True, True)]


@pytest.mark.parametrize("late", [False, True], ids=["own feed", "joins a shared feed"])
def test_callback_gets_key_changes_only_and_on_initial_done_marks_the_end(kv: natskv.Bucket, late: bool) -> None:
    """The pattern a callback is written for, ``mirror[ch.key] = ch.value``, sees real keys only."""
    kv.set_many({"a": 1, "b": 2})
    mirror: dict[str, Any] = {}
    events: list[tuple[str, str]] = []  # (what, thread)
    done = threading.Event()

    def callback(ch: Change) -> None:
        assert not ch.initial_done
        mirror[ch.key] = ch.value
        events.append((ch.key, threading.current_thread().name))
        if ch.key == "c":
            done.set()

    def on_initial_done() -> None:
        events.append(("<initial done>", threading.current_thread().name))

    keeper = kv.watch() if late else None  # a running feed the watcher below joins
    try:
        if keeper is not None:
            initial(keeper)
        w = kv.watch(callback=callback, on_initial_done=on_initial_done)
        try:
            assert w.wait_initial(5)
            assert mirror == {"a": 1, "b": 2}
            assert [e for e, _ in events] == ["a", "b", "<initial done>"]  # after the initial values
            kv.set("c", 3)
            assert done.wait(5)
        finally:
            w.stop()
    finally:
        if keeper is not None:
            keeper.stop()
    assert mirror == {"a": 1, "b": 2, "c": 3} and "" not in mirror
    assert [e for e, _ in events] == ["a", "b", "<initial done>", "c"]
    assert len({t for _, t in events}) == 1 and events[0][1].startswith("natskv-watch")


def test_callback_with_updates_only_gets_no_marker(kv: natskv.Bucket) -> None:
    kv.set("old", 1)
    seen: list[Change] = []
    arrived = threading.Event()

    def callback(ch: Change) -> None:
        seen.append(ch)
        arrived.set()

    with kv.watch(callback=callback, updates_only=True) as w:
        assert w.wait_initial(0)
        kv.set("new", 2)
        assert arrived.wait(5)
        time.sleep(0.2)
    assert summary(seen) == [("new", 2, "PUT")]


def test_on_initial_done_errors_go_to_on_error_and_the_watch_goes_on(kv: natskv.Bucket) -> None:
    errors: list[BaseException] = []
    seen: list[str] = []
    arrived = threading.Event()

    def on_initial_done() -> None:
        raise RuntimeError("initial hook failed")

    def callback(ch: Change) -> None:
        seen.append(ch.key)
        arrived.set()

    with kv.watch(callback=callback, on_initial_done=on_initial_done, on_error=errors.append) as w:
        assert w.wait_initial(5)
        kv.set("k", 1)
        assert arrived.wait(5)
    assert seen == ["k"]
    assert [str(e) for e in errors] == ["initial hook failed"]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"on_initial_done": lambda: None}, "needs callback"),
        ({"callback": print, "on_initial_done": lambda: None, "updates_only": True}, "updates_only"),
        ({"callback": print, "on_initial_done": "yes"}, "function"),
    ],
)
def test_on_initial_done_bad_combinations(
    db: natskv.Client, kv: natskv.Bucket, kwargs: dict[str, Any], words: str
) -> None:
    with pytest.raises(natskv.InvalidArgumentError, match=words):
        kv.watch(**kwargs)
    assert consumer_count(db, kv.name) == 0


def test_callback_watch_cannot_be_iterated(kv: natskv.Bucket) -> None:
    with kv.watch(callback=lambda ch: None) as w, pytest.raises(TypeError):
        iter(w).__next__()


def test_callback_exception_is_logged_and_reported(kv: natskv.Bucket, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="natskv")
    seen: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def callback(ch: Change) -> None:
        seen.append(ch.key)
        if ch.key.startswith("bad"):
            raise RuntimeError(f"boom on {ch.key}")
        if ch.key == "last":
            done.set()

    w = kv.watch(callback=callback, on_error=errors.append)
    try:
        w.wait_initial(5)
        kv.set("bad1", 1)
        kv.set("good", 1)
        kv.set("bad2", 1)
        kv.set("last", 1)
        assert done.wait(5), seen
    finally:
        w.stop()
    assert seen == ["bad1", "good", "bad2", "last"]
    assert [str(e) for e in errors] == ["boom on bad1", "boom on bad2"]
    assert all(isinstance(e, RuntimeError) for e in errors)
    logged = [r for r in caplog.records if r.name == "natskv" and r.exc_info]
    assert len(logged) >= 2
    assert any("boom on bad1" in str(r.exc_info[1]) for r in logged)


def test_failing_on_error_hook_does_not_stop_the_watch(kv: natskv.Bucket) -> None:
    seen: list[str] = []
    done = threading.Event()

    def callback(ch: Change) -> None:
        seen.append(ch.key)
        if ch.key == "last":
            done.set()
        else:
            raise ValueError("callback failed")

    def on_error(exc: BaseException) -> None:
        raise RuntimeError("the hook failed too")

    with kv.watch(callback=callback, on_error=on_error) as w:
        w.wait_initial(5)
        kv.set("x", 1)
        kv.set("last", 1)
        assert done.wait(5), seen
    assert seen == ["x", "last"]


def test_stop_from_inside_the_callback(db: natskv.Client, kv: natskv.Bucket) -> None:
    stopped = threading.Event()
    seen: list[str] = []
    holder: list[natskv.Watcher] = []

    def callback(ch: Change) -> None:
        seen.append(ch.key)
        if ch.key == "stop":
            holder[0].stop()
            stopped.set()

    holder.append(kv.watch(callback=callback))
    holder[0].wait_initial(5)
    kv.set("a", 1)
    kv.set("stop", 1)
    assert stopped.wait(5)
    kv.set("after", 1)
    time.sleep(0.2)
    assert seen == ["a", "stop"]
    assert holder[0].stopped
    assert eventually(lambda: consumer_count(db, kv.name) == 0, 5.0)


# -- stopping and consumers ------------------------------------------------------------------------


def test_stop_deletes_the_server_consumer(db: natskv.Client, kv: natskv.Bucket) -> None:
    kv.set("a", 1)
    assert consumer_count(db, kv.name) == 0
    w = kv.watch()
    assert consumer_count(db, kv.name) == 1
    initial(w)
    w.stop()
    assert consumer_count(db, kv.name) == 0
    assert w.stopped
    assert w.get(timeout=0.1) is None
    w.stop()  # twice is fine
    # the context manager stops too
    with kv.watch("a") as w2:
        assert consumer_count(db, kv.name) == 1
    assert w2.stopped
    assert consumer_count(db, kv.name) == 0
    # a callback watch as well
    cw = kv.watch(callback=lambda ch: None)
    assert consumer_count(db, kv.name) == 1
    cw.stop()
    assert consumer_count(db, kv.name) == 0


def test_iteration_ends_when_stopped_from_another_thread(kv: natskv.Bucket) -> None:
    kv.set("a", 1)
    w = kv.watch()
    got: list[Change] = []
    finished = threading.Event()

    def consume() -> None:
        # One at a time, not got.extend(w): the test thread reads got while the watch runs.
        for ch in w:
            got.append(ch)  # noqa: PERF402
        finished.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert eventually(lambda: any(c.initial_done for c in got), 5)
    w.stop()
    assert finished.wait(5)
    t.join(5)
    assert summary([c for c in got if not c.initial_done]) == [("a", 1, "PUT")]


def test_client_close_stops_watches(nats_url: str, name: str) -> None:
    c = natskv.connect(nats_url)
    kv = c.bucket(name)
    w1 = kv.watch()
    w2 = kv.watch("x:*", callback=lambda ch: None)
    initial(w1)
    c.close()
    assert w1.stopped and w2.stopped
    assert w1.get(timeout=1) is None
    with natskv.connect(nats_url) as other:
        assert eventually(lambda: consumer_count(other, name) == 0, 5)
        other.delete_bucket(name)


@pytest.mark.slow
def test_many_watchers_in_sequence_do_not_exhaust_consumers(db: natskv.Client, kv: natskv.Bucket) -> None:
    kv.set("k", 0)
    for i in range(1100):
        w = kv.watch("k", updates_only=(i % 2 == 1))
        w.stop()
    assert consumer_count(db, kv.name) == 0
    # the bucket still works for watches, keys() and writes
    with kv.watch("k") as w:
        assert summary(initial(w)) == [("k", 0, "PUT")]
    assert kv.keys() == ["k"]


def test_many_distinct_filters_at_once(db: natskv.Client, kv: natskv.Bucket) -> None:
    watchers = [kv.watch(f"group{i}:*") for i in range(60)]
    try:
        assert consumer_count(db, kv.name) == 60
        for w in watchers:
            initial(w)
        kv.set_many({f"group{i}:k": i for i in range(60)})
        for i, w in enumerate(watchers):
            assert summary(take(w, 1)) == [(f"group{i}:k", i, "PUT")]
    finally:
        for w in watchers:
            w.stop()
    assert consumer_count(db, kv.name) == 0


@pytest.mark.slow
def test_watch_sees_ttl_expiry(db: natskv.Client, name: str) -> None:
    ttl_kv = db.bucket(name + "_ttl")  # history 1
    try:
        with ttl_kv.watch() as w:
            initial(w)
            ttl_kv.set("short", 1, ttl=1)
            ttl_kv.set("keep", 2)
            assert summary(take(w, 2)) == [("short", 1, "PUT"), ("keep", 2, "PUT")]
            (expired,) = take(w, 1, timeout=5)
            assert expired.key == "short"
            assert expired.deleted and expired.value is None
            assert ttl_kv.get("short") is None
    finally:
        db.delete_bucket(name + "_ttl")


# -- one name for an entry's time, one timeout rule ---------------------------------------------


def test_change_created_matches_entry_and_timestamp_is_a_deprecated_alias(kv: natskv.Bucket) -> None:
    kv.set("k", 1)
    with kv.watch("k") as w:
        (change,) = initial(w)
        assert change.created == kv.entry("k").created
        with pytest.warns(DeprecationWarning, match="Change.created"):
            assert change.timestamp == change.created


def test_get_without_timeout_waits_the_clients_default(nats_url: str, name: str) -> None:
    with natskv.connect(nats_url, timeout=0.4) as short:
        kv = short.bucket(name)
        with kv.watch("nothing:*") as w:
            assert w.get(timeout=5).initial_done
            t0 = time.monotonic()
            assert w.get() is None  # None: the client's timeout, not forever
            assert 0.3 < time.monotonic() - t0 < 3.0
            assert w.get(timeout=0) is None  # only looks


def test_get_with_math_inf_waits_without_limit(nats_url: str, name: str) -> None:
    import math

    with natskv.connect(nats_url, timeout=0.2) as short:
        kv = short.bucket(name)
        with kv.watch("k") as w:
            assert w.get(timeout=5).initial_done
            threading.Timer(0.6, lambda: kv.set("k", 1)).start()
            change = w.get(timeout=math.inf)  # outlasts the client's 0.2 s default
            assert change is not None and change.value == 1
            with pytest.raises(natskv.InvalidArgumentError, match="timeout"):
                w.get(timeout=-1)


def test_a_joiner_whose_initial_values_cannot_be_read_fails_alone(db: natskv.Client, name: str) -> None:
    """A watcher joining a running feed reads its initial values through a consumer of its own;
    when the server refuses that consumer, the joiner raises, and the feed's others go on."""
    from natskv.wire import jsapi

    kv = db.bucket(name)
    kv.set("k:1", 1)
    stream = f"KV_{name}"
    try:
        with kv.watch("k:*") as first:
            assert summary(initial(first)) == [("k:1", 1, "PUT")]
            config = jsapi.call(db._conn, f"STREAM.INFO.{stream}", None, 5)["config"]
            jsapi.call(db._conn, f"STREAM.UPDATE.{stream}", dict(config, max_consumers=1), 5)
            with kv.watch("k:*") as joiner, pytest.raises(natskv.NatsKVError, match=r"(?i)consumer"):
                joiner.get(timeout=5)
            kv.set("k:2", 2)
            assert summary(take(first, 1)) == [("k:2", 2, "PUT")]
    finally:
        db.delete_bucket(name)
