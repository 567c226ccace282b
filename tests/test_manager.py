"""The bucket manager against the real server: idle buckets, replicas and near caches' watches
closed by the sweep, opened again on use, with events; what has watchers, listeners, models or
readers kept open."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import child_exit_code

import natskv
from natskv import Field, LocalReplica, Model
from natskv.contrib.cache import CacheCodec, KVCache
from natskv.manager import EVENTS, BucketManager


@pytest.fixture
def client(nats_url: str) -> Iterator[natskv.Client]:
    with natskv.connect(nats_url) as db:
        yield db


def wait_until(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(predicate())  # type: ignore[operator]


def test_idle_buckets_close_and_open_again_on_use(client: natskv.Client, name: str) -> None:
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def record(kind: str) -> Callable[[str], None]:
        def handler(bucket: str) -> None:
            with lock:
                events.append((kind, bucket))
        return handler

    manager = client.bucket_manager(keep_alive=0.4, sweep_every=0.1)
    manager.on("opened", record("opened"))
    manager.on("closed", record("closed"))
    idle, busy = client.bucket(f"{name}_idle"), client.bucket(f"{name}_busy")
    try:
        idle.set("k", 1)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            busy.get("x")  # in use all along
            time.sleep(0.05)
        open_now = manager.open_buckets()
        assert f"{name}_idle" not in open_now and f"{name}_busy" in open_now
        assert ("closed", f"{name}_idle") in events and ("closed", f"{name}_busy") not in events
        assert idle.get("k") == 1  # the held object still works: the bucket opens again
        assert f"{name}_idle" in manager.open_buckets()
        assert client.bucket(f"{name}_idle") is idle
        assert wait_until(lambda: events.count(("opened", f"{name}_idle")) == 2)  # created, then reopened
        assert manager.sweep() == []  # both just used
    finally:
        manager.stop()
        client.delete_bucket(f"{name}_idle")
        client.delete_bucket(f"{name}_busy")


def test_watched_and_model_buckets_stay_open(client: natskv.Client, name: str) -> None:
    class Note(Model):
        __bucket__ = f"{name}_model"
        id = Field(int, primary_key=True)

    client.register(Note)
    watched = client.bucket(f"{name}_watched")
    closed: list[str] = []
    manager = client.bucket_manager(keep_alive=0.2, sweep_every=0.05)
    manager.on("closed", closed.append)
    plain = client.bucket(f"{name}_plain")
    try:
        with watched.watch(updates_only=True):
            time.sleep(0.6)
            assert set(manager.open_buckets()) >= {f"{name}_watched", f"{name}_model"}
            assert wait_until(lambda: f"{name}_plain" in closed)
            assert f"{name}_watched" not in closed and f"{name}_model" not in closed
        assert wait_until(lambda: f"{name}_watched" in closed)  # its watcher stopped: idle now
        assert client.bucket(f"{name}_plain") is not plain  # a new object, opened afresh
    finally:
        manager.stop()
        for suffix in ("model", "watched", "plain"):
            client.delete_bucket(f"{name}_{suffix}")


def test_bad_settings(client: natskv.Client) -> None:
    for bad in ({"keep_alive": 0}, {"sweep_every": -1}, {"keep_alive": float("inf")}, {"keep_alive": True}):
        with pytest.raises(natskv.InvalidArgumentError):
            client.bucket_manager(**bad)  # type: ignore[arg-type]
    manager = client.bucket_manager()
    with pytest.raises(natskv.InvalidArgumentError):
        manager.on("deleted", print)
    manager.stop()


# -- replicas, near caches' watches, client options ---------------------------------------------

KEEP_ALIVE, SWEEP_EVERY = 0.3, 0.1


def consumers(kv: natskv.Bucket) -> int:
    return int(kv._proto.info(5.0)["state"]["consumer_count"])


class Events:
    """What a manager's observers heard: ``(event, bucket)``, and the threads they ran on."""

    def __init__(self, manager: BucketManager) -> None:
        self.heard: list[tuple[str, str]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()
        for event in EVENTS:
            manager.on(event, self._handler(event))

    def _handler(self, event: str) -> Callable[[str], None]:
        def handler(bucket: str) -> None:
            with self._lock:
                self.heard.append((event, bucket))
                self.threads.add(threading.current_thread().name)
        return handler

    def count(self, event: str, bucket: str) -> int:
        with self._lock:
            return self.heard.count((event, bucket))


def test_idle_replica_closes_and_reloads_on_read(client: natskv.Client, name: str) -> None:
    kv = client.bucket(name)
    kv.set_many({"a": 1, "b": 2})
    manager = client.bucket_manager(keep_alive=KEEP_ALIVE, sweep_every=SWEEP_EVERY)
    events = Events(manager)
    try:
        replica = kv.replica()
        assert replica.get("a") == 1 and consumers(kv) == 1
        assert wait_until(lambda: replica.dormant)
        assert consumers(kv) == 0  # its watch's consumer was deleted on the server
        assert not replica._values and not replica._revisions  # the memory is freed
        with natskv.connect(client._servers) as other:  # written elsewhere while it was closed
            other_kv = other.bucket(name)
            other_kv.set("c", 3)
            other_kv.delete("a")
        assert replica.get("c") == 3  # this read reloads it, and sees those writes
        assert "a" not in replica and len(replica) == 2 and replica.snapshot() == {"b": 2, "c": 3}
        assert list(replica) == ["b", "c"]
        assert not replica.dormant and consumers(kv) == 1
        assert wait_until(lambda: events.count("replica_opened", name) == 2)  # started, then reloaded
        assert events.count("replica_closed", name) >= 1
        assert events.threads == {"natskv-buckets"}  # the manager's thread, never the loop thread
    finally:
        manager.stop()
        client.delete_bucket(name)


def test_replica_read_since_the_sweep_looked_is_not_closed(client: natskv.Client, name: str) -> None:
    kv = client.bucket(name)
    kv.set("k", 1)
    replica = kv.replica()
    try:
        uses = replica._uses
        assert replica.get("k") == 1  # a read the sweep has not seen
        assert replica._close_idle(uses) is False and not replica.dormant
        assert replica._close_idle(replica._uses) is True and replica.dormant
        assert replica._close_idle(replica._uses) is False  # closed already
        assert replica.revision_of("k") is not None and replica.get("k") == 1
    finally:
        replica.stop()
        client.delete_bucket(name)


def test_replicas_with_listeners_or_readers_stay_open(client: natskv.Client, name: str) -> None:
    kv = client.bucket(name)
    kv.set("k", 0)
    seen: list[str] = []
    followed = LocalReplica(kv, on_apply=lambda key, old, new, rev: seen.append(key)).start()
    read = kv.replica()
    idle = kv.replica("other:*")
    manager = client.bucket_manager(keep_alive=KEEP_ALIVE, sweep_every=SWEEP_EVERY)
    try:
        deadline = time.monotonic() + 4 * KEEP_ALIVE
        while time.monotonic() < deadline:
            assert read.get("k") == 0  # read all along
            time.sleep(0.05)
        assert wait_until(lambda: idle.dormant)
        assert not followed.dormant and not read.dormant
        assert name in manager.open_buckets()  # its open replicas keep the bucket open
        kv.set("k", 1)
        assert wait_until(lambda: seen.count("k") == 2)  # the listener still hears changes
        followed.stop()
        read.stop()
        assert wait_until(lambda: name not in manager.open_buckets())  # nothing open on it now
    finally:
        manager.stop()
        client.delete_bucket(name)


def test_wait_for_reloads_and_keeps_the_replica_open(client: natskv.Client, name: str) -> None:
    kv = client.bucket(name)
    replica = kv.replica()
    manager = client.bucket_manager(keep_alive=KEEP_ALIVE, sweep_every=SWEEP_EVERY)
    try:
        assert wait_until(lambda: replica.dormant)
        revision = kv.set("x", 5)
        replica.wait_for(revision, timeout=5)  # read-after-write through a reload
        assert replica.get("x") == 5 and not replica.dormant
        with pytest.raises(natskv.NatsKVTimeoutError):  # waiting counts as use all along
            replica.wait_for(revision + 1000, timeout=4 * KEEP_ALIVE)
        assert not replica.dormant
        assert wait_until(lambda: replica.dormant)
        revision = kv.set("x", 6)
        with pytest.raises(natskv.NatsKVTimeoutError):  # a dormant replica only looks after loading
            replica.wait_for(revision + 1, timeout=0)
        assert replica.get("x") == 6
    finally:
        manager.stop()
        client.delete_bucket(name)


def test_stopping_a_closed_replica_keeps_it_stopped(client: natskv.Client, name: str) -> None:
    kv = client.bucket(name)
    kv.set("k", 1)
    replica = kv.replica()
    try:
        assert replica._close_idle(replica._uses)
        replica.stop()
        assert not replica.dormant and replica.get("k") is None and len(replica) == 0
        assert consumers(kv) == 0
    finally:
        client.delete_bucket(name)


def test_forked_child_reloads_a_closed_replica(client: natskv.Client, name: str) -> None:
    kv = client.bucket(name)
    kv.set("before", 1)
    replica = kv.replica()
    manager = client.bucket_manager(keep_alive=KEEP_ALIVE, sweep_every=SWEEP_EVERY)
    try:
        assert wait_until(lambda: replica.dormant)
        kv.set("after", 2)
        pid = os.fork()
        if pid == 0:  # child: only os._exit, never return into pytest
            code = 1
            try:
                code = 2
                assert replica.get("after") == 2 and replica.get("before") == 1
                code = 3
                revision = kv.set("from-child", 3, timeout=5)
                replica.wait_for(revision, timeout=5)
                code = 0
            finally:
                os._exit(code)
        code = child_exit_code(pid, 30, "the forked child hung reloading a closed replica")
        assert code == 0, {2: "the child's reload failed", 3: "the child's wait_for failed"}.get(code, code)
        assert replica.snapshot() == {"before": 1, "after": 2, "from-child": 3}  # the parent reloads too
    finally:
        manager.stop()
        client.delete_bucket(name)


def test_idle_near_cache_stops_its_watch_and_starts_it_again(client: natskv.Client, name: str) -> None:
    codec = CacheCodec()
    cache = KVCache(client.bucket(name, codec=codec), near_cache=True)
    near = cache.near
    assert near is not None
    manager = client.bucket_manager(keep_alive=KEEP_ALIVE, sweep_every=SWEEP_EVERY)
    events = Events(manager)
    try:
        cache.set("a", 1, None)
        assert cache.get("a") == 1 and len(near) == 1 and consumers(cache.bucket) == 1
        assert wait_until(lambda: events.count("feed_closed", name) == 1)
        assert len(near) == 0 and consumers(cache.bucket) == 0  # entries dropped with the watch
        with natskv.connect(client._servers) as other:
            other_kv = other.bucket(name, codec=codec)
            other_kv.set("a", 2)  # unseen while closed
            assert cache.get("a") == 2  # read from the server; the watch runs again
            assert consumers(cache.bucket) == 1 and len(near) == 1
            assert wait_until(lambda: events.count("feed_opened", name) == 2)
            other_kv.set("a", 3)
            assert wait_until(lambda: cache.get("a") == 3)  # coherent again
        assert events.threads == {"natskv-buckets"}
    finally:
        manager.stop()
        cache.close()
        client.delete_bucket(name)


def test_near_cache_read_in_flight_is_not_closed(client: natskv.Client, name: str) -> None:
    cache = KVCache(client.bucket(name, codec=CacheCodec()), near_cache=True)
    near = cache.near
    assert near is not None
    try:
        assert cache.get("a") is None  # starts the watch
        uses = near._uses
        assert near.begin("a")  # a read in flight
        assert near._close_idle(near._uses) is False
        near.end("a", b"1", 1, float("inf"))
        assert near._close_idle(uses) is False  # used since the sweep looked
        assert near._close_idle(near._uses) is True and len(near) == 0
        near.end("a", b"1", 1, float("inf"))  # a read begun before the close: not entered
        assert len(near) == 0
    finally:
        cache.close()
        client.delete_bucket(name)


def test_connect_options_start_the_manager(nats_url: str) -> None:
    with natskv.connect(nats_url, bucket_keep_alive=KEEP_ALIVE, bucket_sweep_every=SWEEP_EVERY) as db:
        manager = db._manager
        assert manager is not None
        assert (manager.keep_alive, manager.sweep_every) == (KEEP_ALIVE, SWEEP_EVERY)
    with natskv.connect(nats_url) as db:
        assert db._manager is None  # off unless asked for
    for bad in ({"bucket_keep_alive": 0}, {"bucket_keep_alive": "1"}, {"bucket_keep_alive": True},
                {"bucket_sweep_every": 0}, {"bucket_sweep_every": float("inf")}):
        with pytest.raises(natskv.ConfigurationError):
            natskv.connect(nats_url, **bad)  # type: ignore[arg-type]
