"""The bucket manager against the real server: idle buckets closed by the sweep, opened again on
use, with events; buckets with watchers or models kept open."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

import natskv
from natskv import Field, Model


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
