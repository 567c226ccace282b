"""A server restarted mid-run (file storage): acknowledged writes survive, the client and its
watches recover, and calls made while the server is down never hang past their timeout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until

import natskv
from natskv import Change, NatsKVTimeoutError
from natskv.server import EmbeddedServer
from natskv.wire import jsapi


@pytest.fixture
def db(fresh_server: EmbeddedServer) -> Iterator[natskv.Client]:
    client = natskv.connect(fresh_server.url, reconnect_wait=0.1, timeout=3.0, connect_timeout=2.0)
    try:
        yield client
    finally:
        client.close(timeout=5)


class Collector:
    """Drains an iterator watch on a thread of its own."""

    def __init__(self, w: natskv.Watcher) -> None:
        self.w = w
        self.changes: list[Change] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for ch in self.w:
            with self.lock:
                self.changes.append(ch)

    def revisions(self) -> list[int]:
        with self.lock:
            return [c.revision for c in self.changes if not c.initial_done]

    def keys(self) -> list[str]:
        with self.lock:
            return [c.key for c in self.changes if not c.initial_done]


class Writer:
    """Threads writing w:<thread>:<n> = n in loops, remembering which writes were acknowledged."""

    def __init__(self, kv: natskv.Bucket, timeout: float, threads: int = 4) -> None:
        self.kv = kv
        self.timeout = timeout
        self.lock = threading.Lock()
        self.acked: dict[str, tuple[int, int, float]] = {}  # key -> (value, revision, acked at)
        self.failed: list[tuple[str, BaseException, float]] = []
        self.attempts = 0
        self.slowest = 0.0
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> Writer:
        for t in self.threads:
            t.start()
        return self

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop_flag.is_set():
            key = f"w:{i}:{n:06d}"
            t0 = time.monotonic()
            try:
                rev = self.kv.set(key, n, timeout=self.timeout)
                with self.lock:
                    self.acked[key] = (n, rev, time.monotonic())
            except Exception as exc:  # recorded and checked by the test
                with self.lock:
                    self.failed.append((key, exc, time.monotonic() - t0))
            with self.lock:
                self.slowest = max(self.slowest, time.monotonic() - t0)
                self.attempts += 1
            n += 1

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(self.timeout + 5)
            assert not t.is_alive(), "a write hung past its timeout"


@pytest.mark.slow
def test_restart_mid_run_keeps_acknowledged_writes_and_resumes_watch(
    fresh_server: EmbeddedServer, db: natskv.Client
) -> None:
    kv = db.bucket("resilience", storage="file", history=1)
    kv.set("seed", "x")
    for c in range(10):  # some data to store and recover
        kv.set_many({f"fill:{c}:{i}": "x" * 100 for i in range(1000)})
    w = kv.watch("w:*")
    col = Collector(w)
    assert wait_until(lambda: any(c.initial_done for c in col.changes), 5)
    writer = Writer(kv, timeout=2.0).start()
    try:
        assert wait_until(lambda: len(writer.acked) >= 100, 10)
        fresh_server.restart()
        restarted_at = time.monotonic()
        acked_before = len(writer.acked)
        assert wait_until(lambda: len(writer.acked) > acked_before + 200, 20), (
            f"writes did not resume after the restart: {writer.attempts} attempted, {len(writer.acked)} acked, "
            f"failures: {writer.failed[-3:]}"
        )
    finally:
        writer.stop()

    # Calls made around the restart failed only with a timeout, never beyond it.
    for key, exc, took in writer.failed:
        assert isinstance(exc, NatsKVTimeoutError), f"{key}: {type(exc).__name__}: {exc}"
        assert took < writer.timeout + 1.0, f"{key} failed after {took:.2f} s"
    assert writer.slowest < writer.timeout + 1.0

    # Every acknowledged write is stored, with the revision its acknowledgement named.
    stored = kv.get_many(list(writer.acked))
    assert stored == {k: v for k, (v, _, _) in writer.acked.items()}
    for key in list(writer.acked)[:: max(len(writer.acked) // 50, 1)]:
        assert kv.entry(key).revision == writer.acked[key][1]
    assert kv.get("seed") == "x"

    # The client really lost its connection and reconnected, and works.
    assert db.stats()["reconnects"] >= 1
    r = kv.set("after", 1)
    assert kv.entry("after").revision == r
    assert db.connected

    # The watch resumed: every stored write reached it exactly once, in order.
    final = {k: kv.entry(k).revision for k in kv.keys("w:*")}
    expected = sorted(final.values())
    assert wait_until(lambda: set(col.revisions()) >= set(expected), 20), (
        f"watch missed {len(set(expected) - set(col.revisions()))} of {len(expected)} writes"
    )
    w.stop()
    col.thread.join(5)
    revs = col.revisions()
    assert len(revs) == len(set(revs)), "the watch delivered duplicates"
    assert revs == sorted(revs), "the watch delivered out of order"
    assert set(revs) == set(expected)
    # writes made after the restart were delivered too
    after_restart = [rev for _, rev, at in writer.acked.values() if at > restarted_at]
    assert after_restart and set(after_restart) <= set(revs)
    state = jsapi.call(db._conn, "STREAM.INFO.KV_resilience", None, 5)["state"]
    assert state["consumer_count"] == 0


@pytest.mark.slow
def test_server_down_write_times_out_or_succeeds_after_reconnect(
    fresh_server: EmbeddedServer, db: natskv.Client
) -> None:
    kv = db.bucket("down", storage="file")
    kv.set("before", 1)
    w = kv.watch()
    col = Collector(w)
    assert wait_until(lambda: any(c.initial_done for c in col.changes), 5)

    fresh_server.stop()
    assert wait_until(lambda: not db.connected, 5)

    # A short timeout while the server is down: a timeout error, on time.
    t0 = time.monotonic()
    with pytest.raises(NatsKVTimeoutError) as info:
        kv.set("short", 1, timeout=0.5)
    took = time.monotonic() - t0
    assert isinstance(info.value, TimeoutError)
    assert took < 1.5, f"set(timeout=0.5) took {took:.2f} s"
    t0 = time.monotonic()
    with pytest.raises(NatsKVTimeoutError):
        kv.get("before", timeout=0.5)
    assert time.monotonic() - t0 < 1.5

    # A longer timeout that spans the restart: it succeeds once the client has reconnected.
    outcome: dict[str, Any] = {}

    def slow_write() -> None:
        t = time.monotonic()
        try:
            outcome["rev"] = kv.set("spanning", 2, timeout=10)
        except Exception as exc:  # checked below
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - t

    t = threading.Thread(target=slow_write, daemon=True)
    t.start()
    time.sleep(0.5)
    fresh_server.start()
    t.join(15)
    assert not t.is_alive(), "a write with timeout=10 hung"
    assert "error" not in outcome, f"{type(outcome['error']).__name__}: {outcome['error']}"
    assert outcome["took"] < 10.5
    assert kv.entry("spanning").revision == outcome["rev"]
    assert kv.get("spanning") == 2

    # Data from before the outage is there; the client and the watch work.
    assert db.stats()["reconnects"] >= 1
    assert kv.get("before") == 1
    r = kv.set("after", 3)
    assert wait_until(lambda: r in col.revisions(), 10), col.keys()
    w.stop()
    col.thread.join(5)
    revs = col.revisions()
    assert len(revs) == len(set(revs))
    assert revs == sorted(revs)
    # whatever the "short" write did (timed out, maybe applied later), the watch agrees with the store
    stored = {k: kv.entry(k).revision for k in kv.keys()}  # noqa: SIM118 - Bucket.keys() asks the server; a Bucket is no dict
    assert set(revs) == set(stored.values()) | ({e.revision for e in kv.history("short")} & set(revs))
    assert set(stored.values()) <= set(revs)


def test_watch_resumes_after_restart_without_duplicates(fresh_server: EmbeddedServer, db: natskv.Client) -> None:
    kv = db.bucket("watchres", storage="file", history=5)
    for i in range(20):
        kv.set(f"k:{i}", i)
    seen: list[Change] = []
    initial_done: list[int] = []
    lock = threading.Lock()

    def callback(ch: Change) -> None:
        with lock:
            seen.append(ch)

    w = kv.watch("k:*", callback=callback, on_initial_done=lambda: initial_done.append(len(seen)))
    try:
        assert w.wait_initial(5)
        assert initial_done == [20]
        assert wait_until(lambda: len(seen) >= 20, 5)
        for i in range(20, 30):
            kv.set(f"k:{i}", i)
        assert wait_until(lambda: len(seen) >= 30, 5)
        fresh_server.restart()
        assert wait_until(lambda: db.connected and db.stats()["reconnects"] >= 1, 10)
        revs_after = [kv.set(f"k:{i}", i) for i in range(30, 40)]
        revs_after += [kv.set("k:0", "changed"), kv.delete("k:1")]
        assert wait_until(lambda: {c.revision for c in seen} >= set(revs_after), 15), [c.revision for c in seen][-5:]
        time.sleep(0.3)
    finally:
        w.stop()
    changes = seen
    revs = [c.revision for c in changes]
    assert len(revs) == len(set(revs)), "duplicates after the restart"
    assert revs == sorted(revs)
    assert [c.key for c in changes[-2:]] == ["k:0", "k:1"]
    assert changes[-1].operation == "DEL"
    assert initial_done == [20]  # once, not again after the restart
    assert sorted(c.key for c in changes) == sorted([f"k:{i}" for i in range(40)] + ["k:0", "k:1"])


@pytest.mark.parametrize("updates_only", [True, False], ids=["updates_only", "initial_values"])
@pytest.mark.slow
def test_watch_with_nothing_delivered_yet_misses_nothing_across_restart(
    fresh_server: EmbeddedServer, updates_only: bool
) -> None:
    """A watch that has not delivered anything yet must still resume from where it started:
    writes another client makes after the restart, before this client is back, all arrive."""
    slow = natskv.connect(fresh_server.url, reconnect_wait=2.0, timeout=5.0)
    try:
        kv = slow.bucket("quiet", storage="file", history=5)
        w = kv.watch("k:*", updates_only=updates_only)
        if not updates_only:
            first = w.get(timeout=5)
            assert first is not None and first.initial_done
        fresh_server.restart()
        with natskv.connect(fresh_server.url, timeout=5.0) as fast:
            other = fast.bucket("quiet", create=False)
            revs = [other.set("k:1", 1), other.set("k:1", 2), other.set("k:2", 3)]
            assert slow.stats()["reconnects"] == 0  # written before the watching client is back
        got: list[Change] = []
        deadline = time.monotonic() + 6
        while len(got) < 3 and time.monotonic() < deadline:
            ch = w.get(timeout=0.5)
            if ch is not None:
                got.append(ch)
        assert [(c.key, c.value, c.revision) for c in got] == [
            ("k:1", 1, revs[0]), ("k:1", 2, revs[1]), ("k:2", 3, revs[2])
        ]
        assert w.get(timeout=0.3) is None
        w.stop()
    finally:
        slow.close(timeout=5)
