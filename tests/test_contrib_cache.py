"""natskv.contrib.cache: the near cache's bounds, its guard against entering a stale value, and its
life across a fork, against the real server (the framework backends have their own tests)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator

import pytest

import natskv
from natskv.contrib.cache import CacheCodec, KVCache, NearCache, codec_named


@pytest.fixture
def near(db: natskv.Client, name: str) -> Iterator[KVCache]:
    bucket = db.bucket(name, codec=CacheCodec())
    cache = KVCache(bucket, near_cache=True, near_cache_size=5, near_cache_bytes=4000)
    yield cache
    cache.close()
    db.delete_bucket(name)


def test_codec_keeps_ints_as_digits_and_pickles_the_rest() -> None:
    codec = CacheCodec()
    assert codec.encode(42) == b"42" and codec.decode(b"-7") == -7
    for value in (True, 1.5, "x", b"\x80", [1], None, 2**80):
        data = codec.encode(value)
        assert codec.decode(data) == value and type(codec.decode(data)) is type(value)
    with pytest.raises(natskv.SerializationError):
        codec.encode(lambda: 1)
    with pytest.raises(natskv.InvalidArgumentError):
        CacheCodec(protocol=1)
    with pytest.raises(natskv.InvalidArgumentError):
        codec_named("yaml")


def test_the_near_cache_keeps_at_most_its_entries_and_bytes(near: KVCache) -> None:
    cache = near.near
    assert cache is not None
    for i in range(8):
        near.set(f"k{i}", i, None)
    assert len(cache) == 5  # the least recently used went first
    assert [cache.lookup(f"k{i}") for i in range(3)] == [None, None, None]
    near.set("big", "x" * 600, None)  # over an eighth of 4,000 bytes: not kept
    assert cache.lookup("big") is None and near.get("big") == "x" * 600 and cache.lookup("big") is None
    wide = KVCache(near.bucket, near_cache=True, near_cache_size=100, near_cache_bytes=1000)
    try:
        assert wide.near is not None
        for i in range(10):
            wide.set(f"m{i}", "y" * 100, None)  # about 118 bytes pickled: 10 do not fit in 1,000
        assert 0 < wide.near._bytes <= 1000 and len(wide.near) == wide.near._bytes // len(wide.near._entries["m9"][0])
        assert wide.near.lookup("m0") is None and wide.near.lookup("m9") is not None
        assert wide.near._bytes == sum(len(entry[0]) for entry in wide.near._entries.values())
        wide.delete("m9")
        assert wide.near._bytes == sum(len(entry[0]) for entry in wide.near._entries.values())
    finally:
        wide.close()


def test_a_value_read_before_a_newer_change_is_not_entered(near: KVCache) -> None:
    cache = near.near
    assert cache is not None
    rev = near.bucket.set("k", "old")
    assert cache.begin("k")
    # A newer change arrives through the watch while the read of revision `rev` is in flight.
    newer = near.bucket.set("k", "new")
    deadline = time.monotonic() + 5
    while cache._pending["k"][1] < newer and time.monotonic() < deadline:
        time.sleep(0.01)
    cache.end("k", CacheCodec().encode("old"), rev, float("inf"))
    assert cache.lookup("k") is None
    assert near.get("k") == "new" and cache.lookup("k") is not None


def _child(cache: KVCache, queue: multiprocessing.Queue[object]) -> None:
    near = cache.near
    assert near is not None
    queue.put((len(near), cache.get("k"), near._feed is not None and near._pid == os.getpid()))
    cache.bucket._client.bucket(cache.bucket.name, codec=cache.codec).set("k", "from the child")


@pytest.mark.slow
def test_a_forked_child_starts_empty_with_its_own_watch(near: KVCache) -> None:
    near.set("k", "from the parent", None)
    assert near.near is not None and near.near.lookup("k") is not None
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[object] = ctx.Queue()
    child = ctx.Process(target=_child, args=(near, queue))
    child.start()
    entries, value, watching = queue.get(timeout=30)
    child.join(30)
    assert child.exitcode == 0
    assert entries == 0 and value == "from the parent" and watching
    # The parent's own watch saw the child's write.
    deadline = time.monotonic() + 5
    while near.get("k") != "from the child" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert near.get("k") == "from the child"


def test_near_cache_arguments_are_checked(db: natskv.Client, name: str) -> None:
    bucket = db.bucket(name)
    try:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(natskv.InvalidArgumentError, match="near_cache_size"):
                NearCache(bucket, bad)  # type: ignore[arg-type]
            with pytest.raises(natskv.InvalidArgumentError, match="near_cache_bytes"):
                NearCache(bucket, 10, bad)  # type: ignore[arg-type]
    finally:
        db.delete_bucket(name)


def test_get_many_enters_what_it_reads_into_the_near_cache(near: KVCache) -> None:
    cache = near.near
    assert cache is not None
    other = near.bucket._client.bucket(near.bucket.name, codec=near.codec)
    other.set_many({"a": 1, "b": [2], "c": "3"})
    assert near.get_many(["a", "b", "c", "zz"]) == {"a": 1, "b": [2], "c": "3"}
    assert all(cache.lookup(k) is not None for k in "abc") and cache.lookup("zz") is None
    other.set("a", 10)  # coherent afterwards like any entry
    deadline = time.monotonic() + 5
    while near.get("a") != 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert near.get_many(["a", "b"]) == {"a": 10, "b": [2]}
