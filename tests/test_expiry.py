"""Per-key TTL on buckets that keep history: an expired key is gone, and watchers are told.

nats-server places a delete marker only when the last message of a subject expires; an expiring
message with older revisions behind it is removed quietly and the older value becomes current
again. natskv's TTL writes roll the key's history up, so these tests write older revisions first.
"""

from __future__ import annotations

import time

import pytest
from helpers import wait_until

import natskv
from natskv import Change

pytestmark = pytest.mark.bucket(history=5)


def next_change(w: natskv.Watcher, timeout: float = 5.0) -> Change:
    ch = w.get(timeout=timeout)
    assert ch is not None, f"no change within {timeout} s"
    return ch


@pytest.mark.slow
def test_expired_key_with_older_revisions_is_gone(kv: natskv.Bucket) -> None:
    with kv.watch("k") as w:
        assert w.get(timeout=5).initial_done
        kv.set("k", "old")
        rev = kv.set("k", "new", ttl=1)
        assert [(c.value, c.operation) for c in (next_change(w), next_change(w))] == [("old", "PUT"), ("new", "PUT")]
        expired = next_change(w, timeout=5)
        assert expired.key == "k" and expired.deleted and expired.value is None
        assert expired.revision > rev
    assert kv.get("k", "default") == "default"
    assert kv.entry("k") is None
    assert "k" not in kv and kv.keys() == []
    kv.create("k", "again")
    assert kv.get("k") == "again"


def test_ttl_write_keeps_no_older_revisions(kv: natskv.Bucket) -> None:
    """The documented trade-off: a write with a TTL drops the key's earlier history."""
    kv.set("k", 1)
    kv.set("k", 2)
    rev = kv.set("k", 3, ttl=60)
    assert [(e.value, e.revision) for e in kv.history("k")] == [(3, rev)]
    kv.set("k", 4)  # later writes without a TTL keep history again
    assert [e.value for e in kv.history("k")] == [3, 4]


@pytest.mark.slow
def test_later_write_without_ttl_survives_the_expiry(kv: natskv.Bucket) -> None:
    kv.set("k", "old")
    kv.set("k", "short", ttl=1)
    kv.set("k", "kept")
    time.sleep(2.2)
    assert kv.get("k") == "kept"
    assert [e.value for e in kv.history("k")] == ["kept"]


@pytest.mark.slow
def test_create_update_replace_set_many_with_ttl_expire_for_good(kv: natskv.Bucket) -> None:
    kv.set("created", "x")
    kv.delete("created")
    kv.create("created", "y", ttl=1)  # over a tombstone, with history behind it
    r = kv.set("updated", "x")
    kv.update("updated", "y", r, ttl=1)
    kv.set("replaced", "x")
    assert kv.replace("replaced", "y", ttl=1)
    kv.set_many({"m1": "x", "m2": "x"})
    kv.set_many({"m1": "y", "m2": "y"}, ttl=1)
    keys = ["created", "updated", "replaced", "m1", "m2"]
    assert set(kv.get_many(keys).values()) == {"y"}
    assert wait_until(lambda: kv.get_many(keys) == {}, timeout=5.0), kv.get_many(keys)
    assert kv.keys() == []
    for key in keys:
        kv.create(key, "again")


@pytest.mark.slow
def test_replica_drops_expired_key(kv: natskv.Bucket) -> None:
    replica = kv.replica()
    try:
        kv.set("k", "old")
        rev = kv.set("k", "new", ttl=1)
        replica.wait_for(rev)
        assert replica.get("k") == "new"
        assert wait_until(lambda: "k" not in replica, timeout=5.0), replica.snapshot()
    finally:
        replica.stop()
