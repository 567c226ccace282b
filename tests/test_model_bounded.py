"""Bounded models (``__max_records__``), against the real server: an insert at the limit evicts the
oldest record, with its unique values, and every replica and watch tells of an ``evicted`` event;
the count never passes the limit, with many writers in several processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import drop_model_bucket

import natskv
from natskv import Field, InvalidArgumentError, Model, UniqueConstraintError

REPO = Path(__file__).resolve().parent.parent


def until(predicate: Callable[[], bool], timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def bounded_model(name: str, limit: int, ttl: float | None = None) -> type[Model]:
    class Recent(Model):
        __bucket__ = name
        __max_records__ = limit
        __ttl__ = ttl
        id = Field(int, primary_key=True, generated="autoincrement")
        email = Field(str, unique=True)
        topic = Field(str, index=True)

    return Recent


@pytest.fixture
def Recent(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    model = bounded_model(name, 3)
    db.register(model)
    try:
        yield model
    finally:
        drop_model_bucket(db, name)


def test_an_insert_at_the_limit_evicts_the_oldest_and_frees_its_unique_values(
    db: natskv.Client, Recent: Any
) -> None:
    events: list[natskv.ModelEvent] = []
    named: list[str] = []
    off = db.on(f"{Recent.__bucket__}.*", lambda e: named.append(e.name))
    watcher = Recent.watch(events.append)
    try:
        made = [Recent.create(email=f"u{i}@x.io", topic="t") for i in range(3)]
        assert Recent.count() == 3
        fourth = Recent.create(email="u3@x.io", topic="t")
        assert Recent.count() == 3
        assert Recent.get(made[0].id) is None  # the oldest went
        assert sorted(r.id for r in Recent.find()) == [made[1].id, made[2].id, fourth.id]
        kv = db.bucket(Recent.__bucket__)
        assert kv.get(f"r:i:{made[0].id}") is None  # on the server too
        assert kv.get('u:email:"u0@x.io"') is None  # its unique value is free
        assert Recent.create(email="u0@x.io", topic="t").email == "u0@x.io"  # evicts made[1]
        assert Recent.get(made[1].id) is None
        assert until(lambda: [e.type for e in events] == ["inserted"] * 3 + ["evicted", "inserted"] * 2, 5)
        assert events[3].old.id == made[0].id and events[3].new is None
        assert until(lambda: f"{Recent.__bucket__}.evicted" in named, 5)
        # Slots are markers like unique values: exactly one per record.
        assert sorted(k for k in kv.keys("u:_slot:*")) == [
            f"u:_slot:{n}" for n in range(3)
        ]
        assert "_slot" not in fourth.to_dict()
    finally:
        off()
        watcher.stop()


def test_a_second_clients_replica_sees_evicted_not_deleted(nats_url: str, db: natskv.Client, name: str) -> None:
    Mine = bounded_model(name, 2)
    db.register(Mine)
    try:
        with natskv.connect(nats_url) as other:
            Theirs = bounded_model(name, 2)
            other.register(Theirs)
            kinds: list[str] = []
            watcher = Theirs.watch(lambda e: kinds.append(e.type))
            first = Mine.create(email="a@x.io", topic="t")
            Mine.create(email="b@x.io", topic="t")
            Mine.create(email="c@x.io", topic="t")
            Mine.get(Mine.find(email="b@x.io")[0].id).delete()
            assert until(lambda: kinds == ["inserted", "inserted", "evicted", "inserted", "deleted"], 5), kinds
            assert Theirs.get(first.id) is None and Theirs.count() == 1
            watcher.stop()
    finally:
        drop_model_bucket(db, name)


def test_deletes_free_slots_and_updates_keep_them(db: natskv.Client, Recent: Any) -> None:
    a, b, _ = (Recent.create(email=f"{n}@x.io", topic="t") for n in "abc")
    b.delete()
    d = Recent.create(email="d@x.io", topic="t")  # a slot is free: nobody is evicted
    assert Recent.count() == 3 and Recent.get(a.id) is not None
    a.topic = "changed"
    a.save()  # an update keeps the record's slot and its age
    Recent.create(email="e@x.io", topic="t")
    assert Recent.get(a.id) is None  # still the oldest: evicted first
    assert {r.email for r in Recent.find()} == {"c@x.io", "d@x.io", "e@x.io"}
    assert d._version > 0


def test_a_clash_with_a_live_record_fails_and_evicts_nobody(db: natskv.Client, Recent: Any) -> None:
    made = [Recent.create(email=f"k{i}@x.io", topic="t") for i in range(3)]
    before = db.bucket(Recent.__bucket__).status().last_revision
    with pytest.raises(UniqueConstraintError) as info:
        Recent.create(email="k0@x.io", topic="t")  # the oldest record's own value
    assert info.value.field == "email"
    with pytest.raises(UniqueConstraintError):
        Recent.create(email="k2@x.io", topic="t")  # the newest's: the server says no
    assert db.bucket(Recent.__bucket__).status().last_revision == before
    assert [r.id for r in Recent.find(order_by="id")] == [m.id for m in made]


def test_bulk_create_fills_and_evicts_in_order(db: natskv.Client, Recent: Any) -> None:
    made = Recent.bulk_create([{"email": f"b{i}@x.io", "topic": "bulk"} for i in range(5)])
    assert [m.email for m in made] == [f"b{i}@x.io" for i in range(5)]
    assert sorted(r.email for r in Recent.find()) == ["b2@x.io", "b3@x.io", "b4@x.io"]
    with pytest.raises(natskv.ValidationError):
        Recent.bulk_create([{"email": "ok@x.io", "topic": "t"}, {"email": 5, "topic": "t"}])
    assert Recent.count() == 3


def test_expired_records_free_their_slots(db: natskv.Client, name: str) -> None:
    Short = bounded_model(name, 2, ttl=1)
    db.register(Short)
    try:
        Short.create(email="a@x.io", topic="t")
        Short.create(email="b@x.io", topic="t")
        assert until(lambda: Short.count() == 0, 8)
        kv = db.bucket(name)
        assert until(lambda: not kv.keys("u:*"), 8)  # the slot markers expired too
        Short.create(email="c@x.io", topic="t")
        Short.create(email="d@x.io", topic="t")
        assert Short.count() == 2
    finally:
        drop_model_bucket(db, name)


def test_bad_limits_and_transactions(db: natskv.Client, name: str, Recent: Any) -> None:
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(InvalidArgumentError, match="__max_records__"):
            type("Bad", (Model,), {"__max_records__": bad, "id": Field(int, primary_key=True)})
    with db.transaction() as tx, pytest.raises(InvalidArgumentError, match="transaction"):
        tx.create(Recent, email="t@x.io", topic="t")


def test_concurrent_threads_never_pass_the_limit(db: natskv.Client, name: str) -> None:
    Busy = bounded_model(name, 5)
    db.register(Busy)
    seen: list[int] = []
    store = Busy._store

    def count_after_each_change(old: Any, new: Any, revision: int, old_rev: int, reason: str = "") -> None:
        seen.append(len(store.records))  # the loop thread, under the replica's lock

    store.listeners.append(count_after_each_change)
    errors: list[BaseException] = []

    def write(t: int) -> None:
        try:
            for i in range(15):
                Busy.create(email=f"{t}-{i}@x.io", topic="t")
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []
        assert Busy.count() == 5
        assert max(seen) <= 5 and len(seen) >= 8 * 15
        assert len(Busy.find(consistency="server")) == 5
        # The survivors are the last five created (by _created_at).
        everyone = sorted(Busy.find(), key=lambda r: r._created_at)
        assert len({r.email for r in everyone}) == 5
    finally:
        store.listeners.remove(count_after_each_change)
        drop_model_bucket(db, name)


WRITER = r"""
import sys
import natskv
from natskv import Field, Model

url, bucket, who = sys.argv[1], sys.argv[2], sys.argv[3]
db = natskv.connect(url)

class Recent(Model):
    __bucket__ = bucket
    __max_records__ = 4
    id = Field(int, primary_key=True, generated="autoincrement")
    email = Field(str, unique=True)
    topic = Field(str, index=True)

db.register(Recent)
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
for i in range(25):
    Recent.create(email=f"{who}-{i}@x.io", topic=who)
print("done")
db.close()
"""


@pytest.mark.slow
def test_three_processes_never_pass_the_limit(nats_url: str, db: natskv.Client, name: str) -> None:
    Recent = bounded_model(name, 4)
    db.register(Recent)
    counts: list[int] = []
    kinds: list[str] = []
    lock = threading.Lock()

    def on_event(event: Any) -> None:
        with lock:
            kinds.append(event.type)
            counts.append(Recent.count())

    watcher = Recent.watch(on_event)
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, nats_url, name, f"p{n}"], cwd=REPO, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert out.strip() == "done", err
        assert until(lambda: len(kinds) == 75 + 71, 10), len(kinds)
        assert kinds.count("inserted") == 75 and kinds.count("evicted") == 71
        assert max(counts) <= 4
        assert Recent.count() == 4 and len(Recent.find(consistency="server")) == 4
        slots = sorted(k for k in db.bucket(name).keys("u:_slot:*"))
        assert slots == [f"u:_slot:{n}" for n in range(4)]
    finally:
        watcher.stop()
        for p in procs:
            p.kill()
        drop_model_bucket(db, name)


def test_backup_and_restore_of_a_bounded_model_give_the_records_slots(
    db: natskv.Client, Recent: Any, tmp_path: Path
) -> None:
    for i in range(3):
        Recent.create(email=f"r{i}@x.io", topic="t")
    path = tmp_path / "recent.jsonl"
    assert Recent.backup(path) == 3
    with pytest.raises(InvalidArgumentError, match="clear=True"):
        Recent.restore(path)  # into a model holding records: their slots would clash
    assert Recent.restore(path, clear=True) == 3
    kv = db.bucket(Recent.__bucket__)
    assert sorted(kv.keys("u:_slot:*")) == [f"u:_slot:{n}" for n in range(3)]
    assert Recent.count() == 3
    newest = Recent.create(email="r3@x.io", topic="t")  # at the limit: evicts the oldest restored
    assert Recent.count() == 3 and Recent.find_one(email="r0@x.io") is None
    assert newest.email == "r3@x.io"
    Recent.truncate()
    assert kv.keys("u:*") == []
    Wide = bounded_model(Recent.__bucket__ + "_wide", 10)
    db.register(Wide)
    try:
        for i in range(5):
            Wide.create(email=f"w{i}@x.io", topic="t")
        too_many = tmp_path / "wide.jsonl"
        assert Wide.backup(too_many) == 5
        before = kv.status().last_revision
        with pytest.raises(natskv.BackupError, match="more than"):
            Recent.restore(too_many, clear=True)
        assert kv.status().last_revision == before  # nothing written, nothing truncated
    finally:
        drop_model_bucket(db, Wide.__bucket__)
