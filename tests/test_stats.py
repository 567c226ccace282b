"""natskv.stats: the histogram's percentiles, the per-operation summary and the event publisher
(here in isolation; the client's wiring is tested against the real server further down)."""

from __future__ import annotations

import random
import threading
import time

import orjson
import pytest

from natskv.stats import Histogram, Publisher, Stats, _slot, _slot_floor


def test_slots_cover_every_duration_in_order() -> None:
    previous = -1
    for nanos in sorted({*range(0, 300), *(int(1.07**i) for i in range(20, 600))}):
        slot = _slot(nanos)
        assert slot >= previous  # monotonic
        assert _slot_floor(slot) <= nanos < _slot_floor(slot + 1)
        previous = slot


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_percentiles_are_within_a_slot_of_the_truth(fraction: float) -> None:
    rng = random.Random(7)
    durations = sorted(int(rng.lognormvariate(11, 1.2)) for _ in range(20_000))  # around 60 µs
    histogram = Histogram()
    for d in durations:
        histogram.add(d)
    exact = durations[round(fraction * len(durations)) - 1] / 1000
    assert abs(histogram.percentile(fraction) - exact) / exact < 0.2
    assert Histogram().percentile(0.5) == 0.0


def test_stats_summarise_counts_errors_and_results() -> None:
    stats = Stats()
    t0 = time.perf_counter()
    stats.record("get", "b", "k", t0)
    stats.record("get", "b", "k", t0, result_count=0)
    stats.record("set", "b", "k", t0, error=TimeoutError())
    summary = stats.summary()
    assert list(summary) == ["get", "set"]
    assert summary["get"]["count"] == 2 and summary["get"]["results"] == 1
    assert summary["set"]["errors"] == {"TimeoutError": 1} and summary["get"]["errors"] == {}
    assert 0 < summary["get"]["p50_us"] <= summary["get"]["p99_us"]
    assert summary["get"]["bytes_sent"] == 0 and summary["get"]["bytes_received"] == 0
    stats.record("get", "b", "k", t0, received=100)
    stats.record("set", "b", "k", t0, sent=40)
    stats.record_elapsed("watch", "b", "k", 0.001, received=7)
    summary = stats.summary()
    assert (summary["get"]["bytes_received"], summary["set"]["bytes_sent"]) == (100, 40)
    assert summary["watch"] == {**summary["watch"], "count": 1, "bytes_sent": 0, "bytes_received": 7}
    stats.reset()
    assert stats.summary() == {}


def test_the_publisher_batches_never_blocks_and_swallows_its_errors() -> None:
    sent: list[dict[str, object]] = []
    fail = threading.Event()

    def send(payload: bytes) -> None:
        if fail.is_set():
            raise ConnectionError("down")
        sent.append(orjson.loads(payload))

    publisher = Publisher(send, client_name="test", every=0.05, max_batch=100, max_queued=1000)
    stats = Stats()
    stats.publish_to(publisher)
    t0 = time.perf_counter()
    for i in range(250):
        stats.record("get", "b", f"k{i}", t0)
    deadline = time.monotonic() + 5
    while publisher.published < 250 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert publisher.published == 250
    assert all(len(batch["events"]) <= 100 for batch in sent)  # type: ignore[arg-type]
    events = [e for batch in sent for e in batch["events"]]  # type: ignore[union-attr]
    assert [e["key"] for e in events] == [f"k{i}" for i in range(250)]
    assert set(events[0]) == {"operation", "bucket", "key", "duration_us", "timestamp", "result_count", "error",
                              "bytes_sent", "bytes_received"}
    fail.set()
    stats.record("set", "b", "x", t0)  # the publish fails on the publisher's thread, not here
    while publisher.failed < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert publisher.failed == 1
    for _ in range(2000):  # beyond max_queued: dropped and counted, never waiting
        publisher.offer("get", "b", "k", 0.0, 1, None)
    assert publisher.dropped >= 1000
    stats.publish_to(None)


# -- the client's wiring, on the real server ---------------------------------------------------------

import natskv  # noqa: E402


def test_client_stats_count_operations_errors_and_watch_events(nats_url: str, name: str) -> None:
    with natskv.connect(nats_url) as db:
        kv = db.bucket(name)
        try:
            with kv.watch(updates_only=True) as watcher:
                kv.set("a", 1)
                kv.set("b", 2)
                kv.get("a")
                kv.get("missing")
                kv.keys()
                with pytest.raises(natskv.KeyExistsError):
                    kv.create("a", 3)
                assert watcher.get(5) is not None and watcher.get(5) is not None
            ops = db.stats()["operations"]
            assert ops["set"]["count"] == 2 and ops["get"]["count"] >= 2
            assert ops["keys"]["count"] == 1 and ops["keys"]["results"] == 2
            assert ops["create"]["errors"] == {"KeyExistsError": 1}
            assert ops["watch"]["count"] == 2
            assert 0 < ops["get"]["p50_us"] <= ops["get"]["p99_us"]
            assert db.stats()["stats_events"] is None  # not published
        finally:
            db.delete_bucket(name)


def test_publish_stats_sends_batches_that_the_cli_summarises(nats_url: str, name: str) -> None:
    subject = f"natskv.stats.{name}"
    with natskv.connect(nats_url) as db, natskv.connect(nats_url, name="app-1") as app:
        batches = db.subscribe(subject)
        app.publish_stats(subject, every=0.05)
        kv = app.bucket(name)
        try:
            for i in range(20):
                kv.set(f"k{i}", i)
            kv.get("k1")
            events: list[dict[str, object]] = []
            deadline = time.monotonic() + 5
            while len(events) < 21 and time.monotonic() < deadline:
                message = batches.get(1)
                if message is not None:
                    batch = orjson.loads(message.data)
                    assert batch["client"] == "app-1"
                    events.extend(batch["events"])
            assert [e["operation"] for e in events[:21]] == ["set"] * 20 + ["get"]
            assert events[20]["key"] == "k1" and events[20]["bucket"] == name
            # The value bytes: str(i) in JSON is len(str(i)) bytes out; the get reads "1" back.
            assert [e["bytes_sent"] for e in events[:20]] == [len(str(i)) for i in range(20)]
            assert (events[20]["bytes_sent"], events[20]["bytes_received"]) == (0, 1)
            # The publisher counts a batch once its publish returned, which may be after the
            # subscriber got it (a publish from a thread alone is written by that thread).
            deadline = time.monotonic() + 5
            while (app.stats()["stats_events"] or {}).get("published", 0) < 21 and time.monotonic() < deadline:
                time.sleep(0.01)
            counts = app.stats()["stats_events"]
            assert counts is not None and counts["published"] >= 21 and counts["failed"] == 0
            with pytest.raises(natskv.InvalidArgumentError):
                app.publish_stats("natskv.stats.*")
            with pytest.raises(natskv.InvalidArgumentError):
                app.publish_stats(subject, every=0)
            app.publish_stats(None)
            assert app.stats()["stats_events"] is None
        finally:
            batches.unsubscribe()
            db.delete_bucket(name)


def test_bytes_per_operation_are_the_value_payloads(nats_url: str, name: str) -> None:
    # JSON values as orjson writes them: {"x":1} is 7 bytes, "hello" 7, 1 one, [1,2] five;
    # bytes under the JSON codec are stored as they are.
    with natskv.connect(nats_url) as db:
        kv = db.bucket(name)
        try:
            with kv.watch(updates_only=True) as watcher:
                kv.set("a", {"x": 1})
                kv.create("b", "hello")
                kv.set("raw", b"\x00" * 10)
                kv.set_many({"c": 1, "d": [1, 2]})
                kv.commit([("set", "e", "xy")])  # '"xy"': 4
                kv.delete("e")  # a delete marker carries no value
                assert watcher.get(5) is not None
            ops = db.stats()["operations"]
            assert ops["set"]["bytes_sent"] == 7 + 10 and ops["create"]["bytes_sent"] == 7
            assert ops["set_many"]["bytes_sent"] == 6 and ops["commit"]["bytes_sent"] == 4
            assert ops["delete"]["bytes_sent"] == 0 and ops["set"]["bytes_received"] == 0
            assert ops["watch"]["count"] >= 1 and ops["watch"]["bytes_received"] == 7  # the first event: "a"
            db._stats.reset()

            assert kv.get("a") == {"x": 1} and kv.get("missing") is None
            assert kv.get_many(["a", "b", "missing"]) == {"a": {"x": 1}, "b": "hello"}
            assert kv.entry("raw") is not None
            ops = db.stats()["operations"]
            assert ops["get"]["bytes_received"] == 7 + 10 and ops["get_many"]["bytes_received"] == 14
            assert ops["get"]["bytes_sent"] == 0
            db._stats.reset()

            assert len(kv.items()) == 5  # a 7 + b 7 + c 1 + d 5 + raw 10
            ops = db.stats()["operations"]
            assert ops["keys"]["bytes_received"] == 30
            kv.find({"x": 1})  # reads through items(): counted in both
            ops = db.stats()["operations"]
            assert ops["find"]["bytes_received"] == 30 and ops["keys"]["bytes_received"] == 60
            db._stats.reset()

            assert kv.replace("a", {"x": 22})  # reads a (7), writes {"x":22} (8) once
            ops = db.stats()["operations"]
            assert (ops["replace"]["bytes_sent"], ops["replace"]["bytes_received"]) == (8, 7)
            assert ops["update"]["bytes_sent"] == 8
            with pytest.raises(natskv.KeyExistsError):
                kv.create("a", "x" * 50)  # failed calls count what they sent
            assert db.stats()["operations"]["create"]["bytes_sent"] == 52
        finally:
            db.delete_bucket(name)


def test_the_cli_sizes() -> None:
    from natskv.cli import _size

    assert [_size(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 3 * 2**30, 2**42)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "4096.0 GiB"]
