"""Models across a nats-server restart (file storage): records, autoincrement, unique markers,
replicas, indexes and model watches all carry on where they were."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import wait_until

import natskv
from natskv import Field, Model, UniqueConstraintError
from natskv.server import EmbeddedServer


def connect(url: str, reconnect_wait: float = 0.1) -> natskv.Client:
    return natskv.connect(url, reconnect_wait=reconnect_wait, timeout=3.0, connect_timeout=2.0)


@pytest.fixture
def db(fresh_server: EmbeddedServer) -> Iterator[natskv.Client]:
    client = connect(fresh_server.url)
    try:
        yield client
    finally:
        client.close(timeout=5)


def item_model(client: natskv.Client) -> Any:
    """A model class of its own, bound to ``client`` (a class is registered with one client)."""

    class Item(Model):
        __bucket__ = "items"
        id = Field(int, primary_key=True, generated="autoincrement")
        sku = Field(str, unique=True)
        color = Field(str, index=True)
        n = Field(int)

    return client.register(Item, timeout=10)


def restart(server: EmbeddedServer, *clients: natskv.Client) -> None:
    """Restart the server and wait until each client has reconnected."""
    before = [c.stats()["reconnects"] for c in clients]
    server.restart()
    for c, n in zip(clients, before, strict=True):
        # wait_until polls the lambda to the end within this iteration (B023 is a false positive)
        assert wait_until(lambda: c.connected and c.stats()["reconnects"] > n, 10), "client did not reconnect"  # noqa: B023


def ids(rows: list[Any]) -> list[int]:
    return sorted(r.id for r in rows)


@pytest.mark.slow
def test_records_autoincrement_and_unique_markers_survive_a_restart(
    fresh_server: EmbeddedServer, db: natskv.Client
) -> None:
    Item = item_model(db)
    made = [Item.create(sku=f"s{i}", color="red" if i % 2 else "blue", n=i) for i in range(20)]
    assert [m.id for m in made] == list(range(made[0].id, made[0].id + 20))
    made[0].delete()  # frees "s0" before the restart
    live = made[1:]
    used = {m.id for m in made}

    restart(fresh_server, db)

    # Everything written before the restart reads back from the replica, through every index.
    assert Item.count() == 19 and ids(Item.find()) == ids(live)
    assert ids(Item.find(color="red")) == [m.id for m in live if m.n % 2]
    assert ids(Item.find(color="blue")) == [m.id for m in live if not m.n % 2]
    assert Item.count(color="blue") == 9 and Item.get(made[0].id) is None
    for m in live:
        got = Item.get(m.id)
        assert got is not None and got.to_dict() == m.to_dict() and got._version == m._version
        assert Item.find_one(sku=m.sku).id == m.id
        assert Item.get(m.id, consistency="server").to_dict() == m.to_dict()

    # Creates after the restart continue the counter: the next value, never one already used.
    after = Item.create(sku="s20", color="red", n=20)
    assert after.id == max(used) + 1
    used.add(after.id)
    assert Item.get(after.id).sku == "s20" and after.id in ids(Item.find(color="red"))

    # Unique values taken before the restart are still taken (the server holds the markers) ...
    for sku in ("s1", "s19", "s20"):
        with pytest.raises(UniqueConstraintError) as info:
            Item.create(sku=sku, color="green", n=-1)
        assert info.value.field == "sku" and info.value.value == sku
    assert Item.count() == 20 and Item.find(color="green") == []
    # ... the marker of a record deleted before the restart was freed ...
    again = Item.create(sku="s0", color="green", n=0)
    assert again.id not in used and again.id > max(used)
    used.add(again.id)
    # ... and so is the marker of one deleted after it.
    Item.get(made[5].id).delete()
    with pytest.raises(UniqueConstraintError):
        Item.create(sku="s0", color="green", n=0)
    moved = Item.create(sku="s5", color="green", n=5)
    assert moved.id not in used
    assert ids(Item.find(color="green")) == sorted([again.id, moved.id])
    assert Item.find_one(sku="s5").id == moved.id and Item.get(made[5].id) is None
    assert Item.count() == 21
    # the server agrees with the replica about which records exist
    stored = db.bucket("items").keys("r:*")
    assert sorted(int(k.rsplit(":", 1)[1]) for k in stored) == ids(Item.find())


@pytest.mark.slow
def test_another_clients_writes_after_a_restart_reach_the_replica_and_indexes(fresh_server: EmbeddedServer) -> None:
    # The watching client reconnects slowly, so the writer is back (and writes) before it is.
    slow = connect(fresh_server.url, reconnect_wait=3.0)
    fast = connect(fresh_server.url)
    try:
        Mine, Theirs = item_model(slow), item_model(fast)
        pre = [Theirs.create(sku=f"pre{i}", color="red", n=i) for i in range(10)]
        Mine._store.replica.wait_for(pre[-1]._version, 5)
        assert ids(Mine.find(color="red")) == ids(pre)

        fresh_server.restart()
        assert wait_until(lambda: fast.connected, 10)
        post = [Theirs.create(sku=f"post{i}", color="blue" if i % 2 else "red", n=i) for i in range(10)]
        moved = Theirs.get(pre[0].id)
        moved.color = "green"
        moved.save()
        Theirs.get(pre[1].id).delete()
        reused = Theirs.create(sku="pre1", color="blue", n=-1)  # the deleted record's unique value
        Theirs.create(sku="ghost", color="red", n=1000).delete()  # created and gone while slow is away
        last = Theirs.create(sku="last", color="green", n=99)
        written_before_reconnect = slow.stats()["reconnects"] == 0
        assert written_before_reconnect, "the slow client reconnected before the writes were done"

        assert wait_until(lambda: slow.connected and slow.stats()["reconnects"] >= 1, 10)
        Mine._store.replica.wait_for(last._version, 10)
        expected = [m for m in pre + post + [reused, last] if m.id != pre[1].id]
        assert Mine.count() == len(expected) == 21
        everything = Mine.find()
        assert len(everything) == len({r.id for r in everything}) == 21, "duplicate records"
        assert ids(everything) == ids(expected)
        assert ids(Mine.find(color="red")) == ids(pre[2:] + [p for p in post if not p.n % 2])
        assert ids(Mine.find(color="blue")) == ids([p for p in post if p.n % 2] + [reused])
        assert ids(Mine.find(color="green")) == sorted([pre[0].id, last.id])
        assert Mine.get(pre[1].id) is None and Mine.find_one(sku="pre1").id == reused.id
        assert Mine.find_one(sku="ghost") is None and Mine.count(n=1000) == 0
        for m in [*post, reused, last]:
            got = Mine.get(m.id)
            assert got is not None and got.to_dict() == m.to_dict() and got._version == m._version
            assert Mine.find_one(sku=m.sku).id == m.id
        # both replicas agree, and the slow client writes normally once back
        assert [r.to_dict() for r in Theirs.find()] == [r.to_dict() for r in everything]
        mine = Mine.create(sku="mine", color="blue", n=7)
        assert mine.id > last.id and mine.id in ids(Mine.find(color="blue"))
        Theirs._store.replica.wait_for(mine._version, 5)
        assert Theirs.find_one(sku="mine").id == mine.id
    finally:
        fast.close(timeout=5)
        slow.close(timeout=5)


@pytest.mark.slow
def test_model_watch_keeps_reporting_after_a_restart(fresh_server: EmbeddedServer, db: natskv.Client) -> None:
    Item = item_model(db)
    events: list[tuple[str, Any, Any, Any]] = []
    cond = threading.Condition()

    def on_event(ev: Any) -> None:
        with cond:
            events.append((ev.type, ev.record.sku, ev.old and ev.old.n, ev.new and ev.new.n))
            cond.notify_all()

    def wait_events(n: int) -> list[tuple[str, Any, Any, Any]]:
        with cond:
            assert cond.wait_for(lambda: len(events) >= n, 10), events
            return list(events)

    keep = Item.create(sku="keep", color="red", n=0)  # before the watch: not reported
    w = Item.watch(on_event)
    try:
        a = Item.create(sku="a", color="red", n=1)
        b = Item.create(sku="b", color="blue", n=2)
        a.n = 11
        a.save()
        b.delete()
        pre = [
            ("inserted", "a", None, 1), ("inserted", "b", None, 2), ("updated", "a", 1, 11), ("deleted", "b", 2, None)
        ]
        assert wait_events(4) == pre

        restart(fresh_server, db)

        c = Item.create(sku="c", color="blue", n=3)
        a.n = 12
        a.save()
        keep.delete()
        c.color = "red"
        c.save()
        Item.create(sku="b", color="blue", n=4)  # the deleted record's unique value, reused
        Item.create(sku="end", color="red", n=5)  # the last event: anything replayed comes before it
        got = wait_events(10)
    finally:
        w.stop()
    post = [("inserted", "c", None, 3), ("updated", "a", 11, 12), ("deleted", "keep", 0, None),
            ("updated", "c", 3, 3), ("inserted", "b", None, 4), ("inserted", "end", None, 5)]
    assert got[:4] == pre, "events from before the restart changed"
    assert got[4:] == post, "events after the restart: missing, duplicated or replayed"
    with cond:
        assert events == pre + post
