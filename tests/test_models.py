"""Models against a real nats-server: schema, server-enforced uniqueness, replica reads, queries."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually

import natskv
from natskv import Field, InvalidArgumentError, Model, UniqueConstraintError, ValidationError
from natskv.wire import jsapi

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def User(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    class User(Model):
        __bucket__ = name
        id = Field(int, primary_key=True, generated="autoincrement")
        nick = Field(str, required=True, max_length=200)
        email = Field(str, unique=True, format="email")
        age = Field(int, index=True, min=0)
        role = Field(str, choices=["admin", "user"], default="user", index=True)
        city = Field(str)

    db.register(User)
    try:
        yield User
    finally:
        db.delete_bucket(name)
        try:
            jsapi.call(db._conn, f"STREAM.DELETE.KVC_{name}", None, 5)
        except natskv.NatsKVError:
            pass


def test_create_get_and_read_back(User: Any) -> None:
    u = User.create(nick="Ann", email="ann@example.com", age=30)
    assert isinstance(u.id, int) and u.role == "user"
    assert u._version > 0 and u._created_at is not None and u._updated_at == u._created_at
    got = User.get(u.id)
    assert got is not None and got.to_dict() == u.to_dict() and got._version == u._version
    assert User.get(12345) is None and User.get("1") is None


def test_validation_reports_every_issue_and_writes_nothing(db: natskv.Client, User: Any) -> None:
    before = db.bucket(User.__bucket__).status().last_revision
    with pytest.raises(ValidationError) as info:
        User.create(email="not-an-email", age=-1, role="root")
    codes = {(f, c) for f, _, c in info.value.issues}
    assert codes == {("nick", "required"), ("email", "format"), ("age", "min"), ("role", "choices")}
    assert db.bucket(User.__bucket__).status().last_revision == before
    first = User.create(nick="A", age=1)
    assert User.create(nick="B", age=2).id == first.id + 1  # no autoincrement value was spent


def test_timeout_keyword_of_create_is_the_write_timeout_not_a_field(db: natskv.Client, User: Any) -> None:
    u = User.create(nick="Ann", timeout=2)
    assert "timeout" not in u.to_dict() and "timeout" not in db.bucket(User.__bucket__).get(f"r:i:{u.id}")
    assert User.create({"nick": "Bob", "age": 3}, timeout=2).age == 3
    before = db.bucket(User.__bucket__).status().last_revision
    for bad in (-1, "2"):
        with pytest.raises(InvalidArgumentError, match="timeout"):
            User.create(nick="Cid", timeout=bad)
    with pytest.raises(InvalidArgumentError, match="mapping"):
        User.create([("nick", "Dee")])
    assert db.bucket(User.__bucket__).status().last_revision == before


def test_a_model_with_fields_named_like_write_options(db: natskv.Client, name: str) -> None:
    """Fields called timeout, values, model or defaults: set through a values mapping, queried
    with where=, as read options are."""

    class Job(Model):
        __bucket__ = name
        id = Field(int, primary_key=True)
        timeout = Field(int, index=True)
        values = Field(int)
        model = Field(str)

    db.register(Job)
    try:
        a = Job.create({"id": 1, "timeout": 30, "values": 1, "model": "m"}, timeout=5)
        assert (a.timeout, a.values, a.model) == (30, 1, "m")
        before = db.bucket(name).status().last_revision
        with pytest.raises(InvalidArgumentError, match="field named 'timeout'"):
            Job.create(id=2, timeout=30)  # ambiguous: refused, nothing written
        assert db.bucket(name).status().last_revision == before
        Job(id=2, timeout=40).save(timeout=5)
        assert [j.id for j in Job.find(where={"timeout": {"$gte": 30}}, order_by="-timeout", timeout=5)] == [2, 1]
        assert Job.update({"timeout": 50, "values": 2}, where={"id": 1}, timeout=5) == 1
        assert (Job.get(1).timeout, Job.get(1).values) == (50, 2)
        got, created = Job.get_or_create(defaults={"timeout": 60}, id=3, timeout=5)
        assert created and got.timeout == 60
        with db.transaction() as tx:
            tx.create(Job, {"timeout": 70}, id=4, model="tx")
        assert (Job.get(4).timeout, Job.get(4).model) == (70, "tx")
        assert Job.bulk_create([{"id": 5, "timeout": 80}], timeout=5)[0].timeout == 80
        assert Job.destroy(where={"timeout": 80}, timeout=5) == 1
        assert sorted(j.id for j in Job.find()) == [1, 2, 3, 4]
    finally:
        db.delete_bucket(name)


def test_unique_values_are_enforced_moved_and_freed(User: Any) -> None:
    a = User.create(nick="A", email="a@example.com", age=1)
    with pytest.raises(UniqueConstraintError) as info:
        User.create(nick="B", email="a@example.com", age=2)
    assert info.value.field == "email" and info.value.value == "a@example.com"
    assert User.count() == 1
    a.email = "a2@example.com"
    a.save()
    b = User.create(nick="B", email="a@example.com", age=2)  # the old value was freed
    with pytest.raises(UniqueConstraintError):
        b.email = "a2@example.com"
        b.save()
    a.delete()
    b.refresh()
    b.email = "a2@example.com"
    b.save()  # freed by the delete
    assert User.find_one(email="a2@example.com").id == b.id
    # asked again (the planner's one-probe path for one unique field, from the second query on)
    assert User.find_one(email="a2@example.com").id == b.id and User.find_one(email="a@example.com") is None
    assert User.find_one(email=7) is None  # not a str: no probe, the general path
    # null is not indexed: many records may leave a unique field empty
    User.create(nick="C", age=3)
    User.create(nick="D", age=4)
    assert User.count(email__isnull=True) == 2


def test_queries_with_lookups_where_and_indexes(User: Any) -> None:
    people = [("Ann", 30, "admin", "Oslo"), ("Bob", 15, "user", "Rome"), ("Cid", 45, "user", "Oslo"),
              ("Dee", 30, "user", "Rome"), ("Eve", 22, "admin", None)]
    for n, age, role, city in people:
        User.create(nick=n, email=f"{n.lower()}@example.com", age=age, role=role, city=city)
    names = lambda rows: [r.nick for r in rows]  # noqa: E731
    assert names(User.find(age=30)) == ["Ann", "Dee"]  # a non-unique indexed field returns every match
    assert User.find_one(age=30).nick == "Ann" and names(User.find(age=30, limit=1, offset=1)) == ["Dee"]
    assert User.find_one(email="dee@example.com").nick == "Dee" and User.find_one(email="zed@example.com") is None
    assert names(User.find(role="user", age=30)) == ["Dee"] and names(User.find(role="admin", age=45)) == []
    assert User.find_one(email="dee@example.com", role="admin") is None
    assert User.find_one(email="dee@example.com", role="user", age=30).nick == "Dee"
    assert User.find_one(role="admin", age=22).nick == "Eve" and User.find_one(role="admin", age=15) is None
    assert User.find_one(role="user").nick == "Bob" and User.find_one(age=99) is None
    # asked again, one probe of the index (the first in primary key order), which follows changes
    assert User.find_one(age=30).nick == "Ann" and User.find_one(role="user").nick == "Bob"
    ann = User.find_one(nick="Ann")
    ann.age = 31
    ann.save()
    assert User.find_one(age=30).nick == "Dee" == User.find_one(age=30.0).nick  # a float: the general path
    ann.age = 30
    ann.save()
    assert names(User.find(role="user", age=30, city="Rome")) == ["Dee"]  # a non-indexed field too
    assert names(User.find(city="Oslo")) == ["Ann", "Cid"]  # equality on a field with no index
    assert names(User.find(role="user", age__gte=30)) == ["Cid", "Dee"]  # ANDed
    assert names(User.find(age__in=[15, 22], order_by="-age")) == ["Eve", "Bob"]
    assert names(User.find(nick__startswith="D", nick__endswith="e")) == ["Dee"]
    admins_or_c = {"$or": [{"role": "admin"}, {"nick": {"$startswith": "C"}}]}
    assert names(User.find(where=admins_or_c, order_by="nick")) == ["Ann", "Cid", "Eve"]
    page = User.find(email__endswith="@example.com", order_by=["role", "-age"], limit=2, offset=1)
    assert names(page) == ["Eve", "Cid"]
    assert names(User.find(city__isnull=True)) == ["Eve"]
    assert names(User.find(email__regex="^(bob|eve)@")) == ["Bob", "Eve"]
    assert names(User.find(nick__icontains="E", order_by="nick")) == ["Dee", "Eve"]
    assert User.count(role="admin") == 2 and User.exists(age__gt=40) and not User.exists(age__gt=45)
    assert names(User.first(2)) == ["Ann", "Bob"] and names(User.last(1)) == ["Eve"]
    with pytest.raises(InvalidArgumentError):
        User.find(age__between=3)
    with pytest.raises(InvalidArgumentError):
        User.find(order_by="height")


def test_aggregates_over_0_to_90(User: Any) -> None:
    for age in range(0, 100, 10):
        User.create(nick=f"n{age}", age=age)
    assert (User.sum("age"), User.avg("age"), User.min("age"), User.max("age")) == (450, 45, 0, 90)
    assert (User.sum("age", age__gt=1000), User.avg("age", age__gt=1000)) == (0, 0)
    assert (User.min("age", age__gt=1000), User.max("age", age__gt=1000)) == (None, None)


def test_update_and_destroy_by_any_field_keep_indexes_right(User: Any) -> None:
    for i in range(6):
        User.create(nick=f"u{i}", age=i, role="admin" if i % 2 else "user")
    assert User.update({"role": "admin"}, where={"age": {"$lt": 2}}) == 2
    assert User.count(role="admin") == 4
    assert User.update({"age": 99}, nick="nobody") == 0
    assert User.destroy(role="admin") == 4
    assert [u.nick for u in User.find()] == ["u2", "u4"]
    assert User.count(role="admin") == 0 and User.find(age=1) == []
    with pytest.raises(ValidationError):
        User.update({"age": -5}, role="user")


def test_pagination_is_stable_under_inserts(User: Any) -> None:
    for i in range(10):
        User.create(nick=f"p{i}", age=i)
    seen: list[int] = []
    sizes = []
    cursor = None
    while True:
        page = User.paginate(limit=3, after=cursor, order_by="age")
        sizes.append(len(page))
        seen.extend(u.age for u in page)
        User.create(nick="early", age=0)  # lands before the cursor: never shown
        if not page.has_more:
            break
        cursor = page.next_cursor
    assert sizes == [3, 3, 3, 1]
    assert seen == list(range(10))  # no duplicates, nothing skipped, inserts behind the cursor unseen


@pytest.mark.slow
def test_concurrent_creates_updates_destroys_leave_exact_counts(User: Any) -> None:
    n_threads, per_thread = 8, 125  # 1000 records
    errors: list[BaseException] = []

    def run(fn: Any) -> None:
        threads = [threading.Thread(target=fn, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)

    def create(t: int) -> None:
        try:
            for i in range(per_thread):
                User.create(nick=f"t{t}-{i}", email=f"t{t}-{i}@example.com", age=0)
        except BaseException as exc:
            errors.append(exc)

    def bump(t: int) -> None:
        try:
            for u in User.find(nick__startswith=f"t{t}-"):
                User.update({"age": u.age + 1}, id=u.id)
        except BaseException as exc:
            errors.append(exc)

    run(create)
    assert errors == [] and User.count() == n_threads * per_thread
    assert len({u.id for u in User.find()}) == n_threads * per_thread
    run(bump)
    assert errors == [] and User.count(age=1) == n_threads * per_thread
    run(lambda t: User.destroy(where={"nick": {"$startswith": f"t{t}-"}}))
    assert User.count() == 0 and User.find(age=1) == []


RACE = r"""
import sys
import natskv
from natskv import Field, Model

url, bucket = sys.argv[1], sys.argv[2]
db = natskv.connect(url)

class Racer(Model):
    __bucket__ = bucket
    id = Field(str, primary_key=True, generated="uuid")
    email = Field(str, unique=True)

db.register(Racer)
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()
try:
    Racer.create(email="same@example.com")
    print("won")
except natskv.UniqueConstraintError:
    print("lost")
db.close()
"""


@pytest.mark.slow
def test_two_processes_racing_for_a_unique_value(nats_url: str, db: natskv.Client, name: str) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, nats_url, name], cwd=REPO, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert results == ["lost", "won"]
    finally:
        for p in procs:
            p.kill()
        db.delete_bucket(name)


def test_a_second_client_sees_the_first_clients_writes(nats_url: str, User: Any) -> None:
    with natskv.connect(nats_url) as other:
        class Mirror(Model):
            __bucket__ = User.__bucket__
            id = Field(int, primary_key=True)
            nick = Field(str)
            email = Field(str, unique=True)
            age = Field(int, index=True)
            role = Field(str, index=True)
            city = Field(str)

        other.register(Mirror)
        u = User.create(nick="seen", age=7)
        replica = Mirror._store.replica
        replica.wait_for(u._version, 5)
        assert Mirror.get(u.id).nick == "seen" and Mirror.find(age=7)[0].id == u.id


def test_define_dynamic_models(db: natskv.Client, name: str) -> None:
    Thing = db.define(f"Thing_{name}"[:60].replace("-", "_"), {
        "code": {"type": "STRING", "primaryKey": True},
        "qty": {"type": "INTEGER", "validate": {"min": 0}, "index": True},
    }, bucket=name)
    try:
        Thing.create(code="a", qty=1)
        Thing.create(code="b", qty=5)
        assert [t.code for t in Thing.find(qty__gte=2)] == ["b"]
        assert db.get_model(Thing.__name__) is Thing
        with pytest.raises(ValidationError):
            Thing.create(code="c", qty=-1)
    finally:
        db.delete_bucket(name)


def test_unregistered_model_says_what_to_do() -> None:
    class Loose(Model):
        id = Field(int, primary_key=True)

    with pytest.raises(InvalidArgumentError, match="register"):
        Loose.create(id=1)


def test_watch_reports_inserts_updates_deletes_off_the_loop_thread(User: Any) -> None:
    events: list[Any] = []
    threads: set[str] = set()

    def cb(ev: Any) -> None:
        threads.add(threading.current_thread().name)
        events.append((ev.type, ev.old and ev.old.nick, ev.new and ev.new.nick))
        User.count()  # callbacks may call natskv

    w = User.watch(cb, role="admin")
    try:
        a = User.create(nick="a", age=1, role="admin")
        User.create(nick="b", age=2, role="user")  # does not match
        a.nick = "a2"
        a.save()
        a.delete()
        assert eventually(lambda: len(events) == 3)
    finally:
        w.stop()
    assert events == [("inserted", None, "a"), ("updated", "a", "a2"), ("deleted", "a2", None)]
    assert "natskv-loop" not in threads


def test_watch_with_columns_fires_only_for_those_columns(User: Any) -> None:
    seen: list[tuple[Any, Any]] = []
    u = User.create(nick="c", age=1, city="Oslo")
    w = User.watch(lambda ev: seen.append((ev.type, ev.new.age if ev.new else None)), columns=["age"])
    try:
        u.city = "Rome"
        u.save()  # not a watched column
        u.age = 2
        u.save()
        marker = User.create(nick="m", age=9)  # an insert always counts
        assert eventually(lambda: len(seen) == 2)
    finally:
        w.stop()
    assert seen == [("updated", 2), ("inserted", 9)] and marker.age == 9


def test_a_failing_callback_is_reported_and_the_watch_goes_on(User: Any) -> None:
    errors: list[BaseException] = []
    calls: list[str] = []

    def cb(ev: Any) -> None:
        calls.append(ev.new.nick)
        if ev.new.nick == "boom":
            raise RuntimeError("boom")

    w = User.watch(cb, on_error=errors.append)
    try:
        User.create(nick="boom", age=1)
        User.create(nick="after", age=2)
        assert eventually(lambda: calls == ["boom", "after"])
    finally:
        w.stop()
    assert [str(e) for e in errors] == ["boom"]


def test_live_query_fires_only_on_real_result_changes(User: Any) -> None:
    User.create(nick="x", age=50, role="admin")
    results: list[list[str]] = []
    with User.live(role="admin", order_by="nick") as live:
        live.subscribe(lambda rows: results.append([r.nick for r in rows]))
        assert [r.nick for r in live.result] == ["x"]
        User.create(nick="y", age=5, role="user")  # not in the result: no call
        User.create(nick="a", age=7, role="admin")
        assert eventually(lambda: results == [["a", "x"]])
        before = len(results)
        User.update({"city": "Oslo"}, nick="y")  # still not in the result
        import time

        time.sleep(0.3)
        assert len(results) == before
        User.destroy(nick="x")
        assert eventually(lambda: results[-1] == ["a"])
        assert [r.nick for r in live.result] == ["a"]


def test_db_on_model_events_with_wildcards(db: natskv.Client, User: Any) -> None:
    bucket = User.__bucket__
    deleted: list[Any] = []
    everything: list[str] = []
    off1 = db.on("*.deleted", lambda ev: deleted.append((ev.name, ev.old.nick, ev.new)))
    off2 = db.on(f"{bucket}.*", lambda ev: everything.append(ev.type))
    try:
        u = User.create(nick="e", age=1, email="e@example.com")  # a unique value: its key is written too
        u.age = 2
        u.save()
        u.delete()
        # A last insert marks the end: events come in order, so anything extra shows up before it.
        User.create(nick="end", age=1)
        assert eventually(lambda: everything[-1:] == ["inserted"] and len(everything) >= 4)
    finally:
        off1()
        off2()
    assert everything == ["inserted", "updated", "deleted", "inserted"]
    assert deleted == [(f"{bucket}.deleted", "e", None)]


def test_bulk_create_writes_atomic_batches(db: natskv.Client, User: Any) -> None:
    rows = [{"nick": f"b{i}", "email": f"b{i}@example.com", "age": i % 90} for i in range(1200)]
    created = User.bulk_create(rows)
    assert User.count() == 1200 and len({u.id for u in created}) == 1200
    assert all(u._version > 0 for u in created) and User.get(created[-1].id).nick == "b1199"
    # a clash inside one batch rejects that whole batch: nothing of it is stored
    with pytest.raises(UniqueConstraintError):
        User.bulk_create([{"nick": "new1", "email": "n1@example.com", "age": 1},
                          {"nick": "dup", "email": "b5@example.com", "age": 1}])
    assert User.count(nick="new1") == 0
    with pytest.raises(ValidationError) as info:
        User.bulk_create([{"nick": "ok", "age": 1}, {"age": -1}])
    assert {f for f, _, _ in info.value.issues} == {"[1].nick", "[1].age"}


def test_consistency_server_reads_the_server(db: natskv.Client, User: Any) -> None:
    u = User.create(nick="s", age=3)
    # written behind the replica's back, straight into the bucket: only the server has it yet
    kv = db.bucket(User.__bucket__)
    stored = dict(kv.get(f"r:i:{u.id}"), age=4)
    kv.set(f"r:i:{u.id}", stored)
    assert User.get(u.id, consistency="server").age == 4
    assert [x.age for x in User.find(nick="s", consistency="server")] == [4]
    with pytest.raises(InvalidArgumentError):
        User.get(u.id, consistency="eventual")


@pytest.fixture
def Paged(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    """250 records with nulls, ties and a unique nullable field, for pagination."""

    class Paged(Model):
        __bucket__ = name
        id = Field(int, primary_key=True)
        age = Field(int, index=True)
        nick = Field(str, unique=True)
        score = Field(float)

    db.register(Paged)
    Paged.bulk_create([
        {"id": i, "age": None if i % 11 == 0 else i % 7, "nick": None if i % 13 == 0 else f"n{(i * 37) % 1000:03d}",
         "score": float(i % 5)}
        for i in range(1, 251)
    ])
    try:
        yield Paged
    finally:
        db.delete_bucket(name)


def collect_pages(model: Any, limit: int, **query: Any) -> list[Any]:
    got: list[Any] = []
    cursor = None
    while True:
        page = model.paginate(limit=limit, after=cursor, **query)
        got.extend(u.id for u in page)
        if not page.has_more:
            assert page.next_cursor is None and len(page) <= limit
            return got
        assert len(page) == limit and page.next_cursor
        cursor = page.next_cursor


@pytest.mark.parametrize("walk", ["when it pays", "always"])
@pytest.mark.parametrize("order_by", [None, "-id", "age", "-age", "nick", "-nick", "score", "-score"])
def test_pages_concatenate_to_the_sorted_find(
    Paged: Any, order_by: Any, walk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Index walks (id, age, nick), sorts (score), nulls after values in both directions, ties
    by primary key in the order's direction: pages of any size add up to find()."""
    if walk == "always":  # walk the order's index even when a filter selects few records
        monkeypatch.setattr("natskv.models.planner._sort_threshold", lambda want, total: -1)
    queries: list[dict[str, Any]] = [
        {}, {"score__lt": 3}, {"age": 3}, {"where": {"$or": [{"age": None}, {"score": 4.0}]}},
        # bounds on the order field itself: the walk starts and ends at them
        {"age__gte": 2}, {"age__gt": 1, "age__lt": 4}, {"nick__startswith": "n0"}, {"id__lte": 40},
        {"where": {"age": {"$gte": 3, "$gt": 1}}}, {"where": {"age": {"$gt": 3, "$gte": 1}, "score": {"$ne": 0.0}}},
        {"where": {"$and": [{"age": {"$lte": 5}}, {"nick": {"$startswith": "n1"}}]}},
    ]
    for query in queries:
        # The reference reads every record from the server and filters it: no index involved.
        expected = [u.id for u in Paged.find(order_by=order_by or "id", consistency="server", **query)]
        assert expected, query
        for limit in (4, 60, 1000):
            assert collect_pages(Paged, limit, order_by=order_by, **query) == expected, (query, limit)
            # find() with one order field and a limit walks the same index
            limited = Paged.find(order_by=order_by or "id", limit=limit, offset=3, **query)
            assert [u.id for u in limited] == expected[3 : 3 + limit], (query, limit)
    ids = sorted(range(1, 251))
    assert [u.id for u in Paged.first(3)] == ids[:3] and [u.id for u in Paged.last(2)] == ids[-2:]
    assert Paged.find(order_by="age", limit=0) == []


@pytest.mark.parametrize("field", ["age", "nick", "score"], ids=["sorted index", "unique index", "no index"])
def test_records_without_a_value_come_last_in_both_directions(Paged: Any, field: str) -> None:
    Paged.create(id=900)  # no value for any field
    for pk in (3, 6, 9):  # score has no nulls yet
        obj = Paged.get(pk)
        obj.score = None
        obj.save()
    nulls = sorted(u.id for u in Paged.find(where={field: None}))
    assert 900 in nulls and len(nulls) >= 4
    for order_by in (field, "-" + field):
        descending = order_by.startswith("-")
        every = Paged.find(order_by=order_by)
        ids = [u.id for u in every]
        head, tail = ids[: len(ids) - len(nulls)], ids[len(ids) - len(nulls) :]
        assert tail == sorted(nulls, reverse=descending), order_by  # ties by primary key, same direction
        values = [getattr(u, field) for u in every[: len(head)]]
        assert None not in values and values == sorted(values, reverse=descending), order_by
        assert [u.id for u in Paged.find(order_by=order_by, limit=len(ids))] == ids  # the index walk
        middle = Paged.find(order_by=order_by, limit=5, offset=len(head) - 2)
        assert [u.id for u in middle] == ids[len(head) - 2 : len(head) + 3]
        assert collect_pages(Paged, 7, order_by=order_by) == ids  # cursors cross into the nulls
        assert [u.id for u in Paged.first(3, order_by=order_by)] == ids[:3]
        assert [u.id for u in Paged.last(3, order_by=order_by)] == ids[-3:]
    assert [u.id for u in Paged.find(order_by=[field, "-id"])][-len(nulls):] == sorted(nulls, reverse=True)


def test_descending_pages_stay_stable_while_records_come_and_go(Paged: Any) -> None:
    seen: list[int] = []
    cursor = None
    while True:
        page = Paged.paginate(limit=40, after=cursor, order_by="-age")
        seen.extend(u.id for u in page)
        if page.records:
            Paged.destroy(id=page.records[0].id)  # already seen: its deletion moves nothing
            Paged.create(id=1000 + len(seen), age=6)  # sorts before the cursor: never shown
        if not page.has_more:
            break
        cursor = page.next_cursor
    assert len(seen) == len(set(seen)) == 250


def test_paginate_refuses_bad_arguments(Paged: Any) -> None:
    for bad in ("garbage", "[1]", '{"a": 1}'):
        with pytest.raises(InvalidArgumentError, match="invalid pagination cursor"):
            Paged.paginate(after=bad, order_by="age")
    with pytest.raises(InvalidArgumentError, match="invalid pagination cursor"):
        Paged.paginate(after="[3, null]", order_by="age")  # a cursor with no primary key
    with pytest.raises(InvalidArgumentError, match="one field"):
        Paged.paginate(order_by=["age", "id"])
    with pytest.raises(InvalidArgumentError, match="positive int"):
        Paged.paginate(limit=0)
    with pytest.raises(InvalidArgumentError, match="unknown field"):
        Paged.paginate(order_by="height")
    for bad in ({"limit": -1}, {"limit": 1.5}, {"offset": -2}, {"offset": None}):
        with pytest.raises(InvalidArgumentError, match=r"limit|offset"):
            Paged.find(order_by="age", **bad)


MODEL_FORK_SCRIPT = r"""
import os, signal, sys, threading, time
import natskv
from natskv import Field, Model

url, bucket = sys.argv[1], sys.argv[2]
db = natskv.connect(url, timeout=5)

class Item(Model):
    __bucket__ = bucket
    id = Field(int, primary_key=True)
    sku = Field(str, unique=True)
    n = Field(int, index=True)

db.register(Item)
Item.bulk_create([{"id": i, "sku": f"s{i}", "n": i % 3} for i in range(1, 51)])
events = []
db.on(f"{bucket}.*", lambda ev: events.append((ev.type, ev.record.id)))  # before the fork, as at import time
watched = []
Item.watch(lambda ev: watched.append(ev.record.id))  # stays with the parent

def wait(predicate, what):
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)

busy = threading.Event()
def reader():  # the parent keeps reading while it forks
    while not busy.is_set():
        assert Item.get(7).sku == "s7"
threading.Thread(target=reader, daemon=True).start()
time.sleep(0.1)

r, w = os.pipe()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        os.close(w)
        Item.ensure_loaded(timeout=10)  # what a post_fork hook would call
        assert Item._require_store().replica._stale is False
        assert Item.get(7).sku == "s7" and Item.count() == 50  # reloaded through the child's connection
        made = Item.create(id=100, sku="child", n=1)
        assert Item.get(100)._version == made._version  # read-your-writes in the child
        assert os.read(r, 1) == b"x"  # the parent has written id 200
        wait(lambda: Item.get(200) is not None, "the parent's write never reached the child")
        assert [i.id for i in Item.find(n=2, order_by="id", limit=2)] == [2, 5]
        try:
            Item.create(id=101, sku="s1", n=0)
            raise AssertionError("a duplicate sku was accepted")
        except natskv.UniqueConstraintError:
            pass
        wait(lambda: ("inserted", 200) in events and ("inserted", 100) in events, f"db.on in the child: {events}")
        assert watched == [], "a model watch followed the fork"
        print("child ok", flush=True)
        code = 0
    except BaseException:
        import traceback; traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)

os.close(r)
try:
    wait(lambda: Item.get(100) is not None, "the child's write never reached the parent")
    Item.create(id=200, sku="parent", n=0)
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
except BaseException:
    os.kill(pid, signal.SIGKILL)
    raise
busy.set()
assert os.waitstatus_to_exitcode(status) == 0, status
wait(lambda: sorted(watched) == [100, 200], f"parent watch: {watched}")
assert Item.count() == 52
db.delete_bucket(bucket)
db.close()
print("parent ok")
"""


FORK_EVENTS_SCRIPT = r"""
import os, sys, time
import natskv
from natskv import Field, Model

url, bucket = sys.argv[1], sys.argv[2]
db = natskv.connect(url, timeout=5)

class Rec(Model):
    __bucket__ = bucket
    id = Field(int, primary_key=True)
    v = Field(int)

db.register(Rec)
Rec.bulk_create([{"id": i, "v": 0} for i in range(1, 21)])
events = []
db.on(f"{bucket}.*", lambda ev: events.append((ev.type, ev.record.id)))

r, w = os.pipe()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        os.close(w)
        assert os.read(r, 1) == b"x"  # the parent changed records 1 and 2 and added 21
        Rec.ensure_loaded(timeout=10)  # the child reloads what it inherited
        assert Rec.count() == 20 and Rec.get(1).v == 1 and Rec.get(2) is None
        Rec.create(id=22, v=0)
        deadline = time.monotonic() + 10
        while ("inserted", 22) not in events and time.monotonic() < deadline:
            time.sleep(0.02)
        print(sorted(events), flush=True)
        code = 0
    except BaseException:
        import traceback; traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)

os.close(r)
try:
    obj = Rec.get(1); obj.v = 1; obj.save()
    Rec.get(2).delete()
    Rec.create(id=21, v=0)
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
finally:
    db.delete_bucket(bucket)
    db.close()
assert os.waitstatus_to_exitcode(status) == 0, status
"""


@pytest.mark.slow
def test_forked_child_reload_reports_only_what_changed_since_the_fork(nats_url: str, name: str) -> None:
    """db.on() handlers follow a client into a forked child; its replica's reload must not report
    the 20 records that were already there as inserted, only what changed after the fork."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", FORK_EVENTS_SCRIPT, nats_url, name], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.stdout.strip() == str([("deleted", 2), ("inserted", 21), ("inserted", 22), ("updated", 1)])


@pytest.mark.slow
def test_models_keep_working_in_a_forked_child(nats_url: str, name: str) -> None:
    """A pre-fork server (gunicorn) registers models at import, then forks workers: each worker's
    replica reloads through its own connection; db.on handlers follow, model watches do not."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", MODEL_FORK_SCRIPT, nats_url, name], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.stdout.split() == ["child", "ok", "parent", "ok"], proc.stdout


def test_get_or_create_count_and_exists(User: Any) -> None:
    ann, created = User.get_or_create(email="ann@example.com", defaults={"nick": "Ann", "age": 30})
    assert created and ann.nick == "Ann" and User.count() == 1
    again, created = User.get_or_create(email="ann@example.com", defaults={"nick": "Other"})
    assert not created and again.id == ann.id and again.nick == "Ann"
    with pytest.raises(InvalidArgumentError, match="equality lookups"):
        User.get_or_create(age__gte=3)
    with pytest.raises(ValidationError):  # defaults are validated like create()
        User.get_or_create(email="bo@example.com", defaults={"age": -1})
    assert User.count() == 1 and User.exists(nick="Ann") and not User.exists(nick="Zed")


def test_get_or_create_races_have_one_winner(User: Any) -> None:
    results: list[tuple[int, bool]] = []
    barrier = threading.Barrier(8)

    def racer() -> None:
        barrier.wait(10)
        obj, created = User.get_or_create(email="race@example.com", defaults={"nick": "r"})
        results.append((obj.id, created))

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and len({pk for pk, _ in results}) == 1
    assert sum(created for _, created in results) == 1 and User.count() == 1


def test_server_reads_take_a_timeout(User: Any) -> None:
    for i in range(5):
        User.create(nick=f"n{i}", age=i)
    on_replica = [u.to_dict() for u in User.find(order_by="age")]
    assert [u.to_dict() for u in User.find(order_by="age", consistency="server", timeout=5)] == on_replica
    assert User.count(age__gte=2, consistency="server", timeout=5) == 3
    assert User.sum("age", consistency="server", timeout=5) == 10
    assert len(User.paginate(limit=2, order_by="nick", consistency="server", timeout=5)) == 2
    assert User.find(age=1, timeout=5)[0].nick == "n1"  # a read option on the replica too, not a field
    for bad in (-1, 0, "5", True):
        with pytest.raises(InvalidArgumentError, match="timeout"):
            User.find(consistency="server", timeout=bad)
        with pytest.raises(InvalidArgumentError, match="timeout"):
            User.find(order_by="age", limit=2, timeout=bad)  # the index-walk path checks it too


class CountingRecords(dict):  # type: ignore[type-arg]
    """The store's records, counting how many the planner reads one by one."""

    reads = 0

    def __getitem__(self, key: Any) -> Any:
        CountingRecords.reads += 1
        return super().__getitem__(key)


LIMITED_QUERIES: list[dict[str, Any]] = [
    {"age__gte": 2}, {"age__gt": 1, "age__lt": 5}, {"age": 3}, {"nick__startswith": "n1"},
    {"score__lt": 3}, {"age__gte": 1, "score": 2.0}, {"age__in": [1, 4]}, {"age__gte": 0, "nick__gte": "n5"},
    {"where": {"$or": [{"age": None}, {"score": 4.0}]}}, {"where": {"age": {"$gte": 3, "$ne": 5}}},
]


@pytest.mark.parametrize("query", LIMITED_QUERIES, ids=[repr(q) for q in LIMITED_QUERIES])
def test_a_limit_without_order_returns_matches_and_pages_add_up(Paged: Any, query: dict[str, Any]) -> None:
    """find(limit=) with no order_by (rule 4): every record it returns matches, none twice, and
    offsets page through exactly the matches; without a limit the order is the primary key's."""
    expected = sorted(u.id for u in Paged.find(consistency="server", **query))
    assert expected, query
    assert [u.id for u in Paged.find(**query)] == expected  # no limit: primary key order
    for limit in (1, 7, 1000):
        got: list[int] = []
        while True:
            page = [u.id for u in Paged.find(limit=limit, offset=len(got), **query)]
            got.extend(page)
            if len(page) < limit:
                break
        assert sorted(got) == expected and len(got) == len(set(got)), (query, limit)
    found = Paged.find_one(**query)
    assert found is not None and found.id in expected
    assert Paged.exists(**query)
    assert not Paged.exists(age__gte=1, age__lt=1)


def test_a_limited_query_reads_about_limit_records_not_every_match(
    Paged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The work of find(limit=n) with no order follows n: a range matching 200 records, or no
    condition at all, reads a few times n records, never all of them."""
    store = Paged._require_store()
    monkeypatch.setattr(store, "records", CountingRecords(store.records))
    for query in ({"age__gte": 1}, {}, {"score__lt": 4}, {"age__gte": 1, "nick__startswith": "n"}):
        matches = len(Paged.find(**query))
        assert matches > 150, query
        CountingRecords.reads = 0
        assert len(Paged.find(limit=10, **query)) == 10
        assert CountingRecords.reads <= 40, (query, CountingRecords.reads)
        CountingRecords.reads = 0
        assert Paged.exists(**query) and Paged.find_one(**query) is not None
        assert CountingRecords.reads <= 10, (query, CountingRecords.reads)


def test_the_replica_keeps_no_copy_of_the_records_and_reads_through_them(db: natskv.Client, User: Any) -> None:
    a = User.create(nick="a", age=1)
    b = User.create(nick="b", age=2, role="admin")
    replica = User._store.replica
    key_a, key_b = f"r:i:{a.id}", f"r:i:{b.id}"
    assert replica._values == {} and replica._revisions == {}  # the store's records are the storage
    assert len(replica) == 2 and key_a in replica and "r:i:999" not in replica and 5 not in replica
    assert replica.get(key_a)["nick"] == "a" and replica.get("r:i:999", "none") == "none"
    assert replica.revision_of(key_b) == b._version and replica.revision_of("r:i:999") is None
    assert set(replica.snapshot()) == {key_a, key_b}
    b.delete()
    assert key_b not in replica and len(replica) == 1 and User.count(role="admin") == 0


def test_a_record_under_another_records_key_is_not_a_record(db: natskv.Client, User: Any) -> None:
    """Written behind the model's back: r:i:<n> holding a record whose id is not n, or no id."""
    a = User.create(nick="a", age=1)
    kv = db.bucket(User.__bucket__)
    stored = kv.get(f"r:i:{a.id}")
    rev = kv.set("r:i:777", dict(stored, nick="copy"))  # its id says a.id
    kv.set("r:i:0778", dict(stored, id=778, nick="padded"))  # not the key of 778
    last = kv.set("r:s:x", dict(stored, id="x", nick="str"))  # another pk type, but under its own key
    User._store.replica.wait_for(last)
    assert User.get(a.id).nick == "a" and User.get(777) is None and User.get(778) is None
    assert rev < last and sorted(u.nick for u in User.find()) == ["a", "str"]
    kv.set("r:i:777", "not a record")
    kv.delete("r:s:x")
    User._store.replica.wait_for(kv.set("r:i:779", dict(stored, id=779, nick="fine")))
    assert sorted(u.nick for u in User.find()) == ["a", "fine"]


def test_a_replica_with_a_storage_needs_its_hook(db: natskv.Client, name: str) -> None:
    from natskv.replica import LocalReplica

    with pytest.raises(InvalidArgumentError, match="on_apply"):
        LocalReplica(db.bucket(name), storage=object())  # type: ignore[arg-type]
    db.delete_bucket(name)


def test_stored_pk_inverts_record_key_exactly() -> None:
    import uuid

    from natskv.models.store import record_key, stored_pk

    u = uuid.UUID(int=0xABCDEF)
    assert stored_pk(record_key(12)) == 12 and stored_pk(record_key(-3)) == -3
    assert stored_pk(record_key("a:b c")) == "a:b c" and stored_pk(record_key(u)) == str(u)
    for key in ("r:i:012", "r:i:+1", "r:i: 1", "r:i:1_0", "r:i:x", "r:u:not-a-uuid", "r:u:" + str(u).upper(),
                "u:email:x", "r:x:1", "r:"):
        assert stored_pk(key) is None, key


@pytest.fixture
def Odd(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    """Records another client wrote with values of every kind in indexed fields: bools beside
    numbers (1 and 1.0 alike), str beside numbers, nulls, lists, dicts, missing values."""

    class Odd(Model):
        __bucket__ = name
        id = Field(int, primary_key=True)
        val = Field(int, index=True)
        tag = Field(str, unique=True)
        note = Field(str)

    kv = db.bucket(name)
    values: list[Any] = [True, False, 1, 1.0, 2, 2.5, -0.0, 0, "2", "abc", "ab", None, [1], {"a": 1}, 2**62, 1e300,
                         "", "é", 3, -7, "b", 1, 2.0, "abd"]
    rows = {}
    for i, value in enumerate(values, 1):
        rows[f"r:i:{i}"] = {"id": i, "val": value, "tag": f"t{i:02d}" if i % 5 else i, "note": f"n{i % 3}"}
    rows["r:i:99"] = {"id": 99, "note": "n0"}  # no val, no tag
    kv.set_many(rows)
    db.register(Odd)
    try:
        yield Odd
    finally:
        db.delete_bucket(name)


ODD_QUERIES: list[dict[str, Any]] = [
    # one condition an index walks over exactly its matches (the filter is skipped)
    {"val": 1}, {"val": 1.0}, {"val": 2}, {"val": "2"}, {"val": "ab"}, {"val": 0}, {"val": -0.0},
    {"val__gte": 1}, {"val__gt": 1}, {"val__lt": 2.5}, {"val__lte": 2}, {"val__gte": -7, "val__lt": 2},
    {"val__gte": "ab"}, {"val__gt": "a", "val__lte": "abc"}, {"val__lt": "b"}, {"val__startswith": "ab"},
    {"val__startswith": ""}, {"where": {"val": {"$gte": 0, "$gt": 1}}}, {"where": {"val": {"$lt": 3, "$lte": 1}}},
    {"where": {"val": 2.0}}, {"where": {"$and": [{"val": {"$gte": 1}}]}},
    {"id__gte": 3, "id__lt": 12}, {"id__gt": 20}, {"id": 7}, {"tag__startswith": "t1"}, {"tag__gte": "t2"},
    {"tag": "t03"}, {"tag__lt": 20},
    # what the walk alone cannot answer: the filter checks it
    {"val": True}, {"val": False}, {"val__gte": 1, "val__lt": "z"}, {"val__in": [1, 3]},
    {"val__ne": 1}, {"val__isnull": True}, {"val__gte": 1, "note": "n1"}, {"val__startswith": "a", "val__ne": "ab"},
    {"val": 1, "val__gte": 0}, {"where": {"val": {"$gte": 1, "$eq": 2}}}, {"val__gte": 1, "tag__startswith": "t"},
    {"where": {"val": [1]}}, {"where": {"val": {"a": 1}}}, {"where": {"$or": [{"val": 1}, {"val": "ab"}]}},
]


@pytest.mark.parametrize("query", ODD_QUERIES, ids=[repr(q) for q in ODD_QUERIES])
def test_indexed_queries_match_what_a_scan_of_every_record_matches(Odd: Any, query: dict[str, Any]) -> None:
    """Whatever path the planner takes (an index walk with or without the filter, candidates,
    a full scan), every read call finds the matches that the server read, filtered record by
    record, finds: find with and without limit and order, find_one, exists, count, paginate."""
    expected = sorted(o.id for o in Odd.find(consistency="server", **query))
    assert [o.id for o in Odd.find(**query)] == expected
    assert Odd.count(**query) == len(expected)
    assert Odd.exists(**query) == bool(expected)
    found = Odd.find_one(**query)
    assert (found.id in expected) if expected else found is None
    for limit in (1, 3, 100):
        got = [o.id for o in Odd.find(limit=limit, **query)]
        assert len(got) == min(limit, len(expected)) and set(got) <= set(expected), (limit, got)
        assert len(set(got)) == len(got)
    for order_by in ("val", "-val", "tag", "id", "note", "-note"):
        ordered = [o.id for o in Odd.find(order_by=order_by, **query)]
        assert sorted(ordered) == expected
        assert [o.id for o in Odd.find(order_by=order_by, limit=4, **query)] == ordered[:4], order_by
        paged = collect_pages(Odd, 3, order_by=order_by, **query)
        assert paged == [o.id for o in Odd.find(order_by=order_by, consistency="server", **query)], order_by


def test_queries_that_differ_only_in_a_values_type_do_not_share_a_plan(Odd: Any) -> None:
    """The plan cache keys keyword lookups by their values and the values' types: 1, 1.0 and True
    compare equal in Python, but True matches only bools, and "1" only str."""
    for _ in range(2):  # the second round reads every plan from the cache
        assert [o.id for o in Odd.find(val=1)] == [3, 4, 22]
        assert [o.id for o in Odd.find(val=True)] == [1]
        assert [o.id for o in Odd.find(val=1.0, limit=10)] == [3, 4, 22]
        assert [o.id for o in Odd.find(val="2")] == [9]
        assert Odd.count(val=0) == 2 and Odd.count(val=-0.0) == 2 and Odd.count(val=False) == 1


@pytest.mark.parametrize("kinds", ["numbers", "str", "numbers and nulls", "mixed"])
def test_first_records_are_the_first_of_the_full_sort(kinds: str) -> None:
    """query.first_records (a limited order_by over candidates) keeps exactly the first rows of
    query.sort_records, ties by primary key in the order's direction, nulls last both ways."""
    import random

    from natskv.models import query

    rng = random.Random(kinds)
    pools: dict[str, list[Any]] = {
        "numbers": [0, 1, 1.0, 2.5, -3, 7, 2**40],
        "str": ["a", "b", "ab", "", "é", "B"],
        "numbers and nulls": [1, 2.0, 3, None, -1],
        "mixed": [1, "a", None, True, False, 2.5, [1], {"a": 1}, "b"],
    }
    pairs = []
    for pk in rng.sample(range(1000), 300):
        record: dict[str, Any] = {"id": pk}
        value = rng.choice(pools[kinds])
        if value is not None or rng.random() < 0.5:  # missing or null
            record["v"] = value
        pairs.append(record)  # the planner hands over stored records (mappings), revision inside
    for order in ([("v", False)], [("v", True)], [("id", True)]):
        full = query.sort_records(pairs, order, "id")
        for count in (1, 5, 20, 74):
            assert query.first_records(pairs, order, "id", count) == full[:count], (order, count)
