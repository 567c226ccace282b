"""Model writes at volume against a real nats-server: pipelined bulk_create, group commit of
concurrent writes, and the protocol's pipelined atomic batches under them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

import natskv
from natskv import Field, KeyExistsError, Model, NatsKVTimeoutError, UniqueConstraintError
from natskv.errors import BatchError, JetStreamError
from natskv.models.group_commit import GroupCommit
from natskv.wire.jsapi import CAS_ERROR_CODES

ROWS_PER_BATCH = 500  # one unique field: a marker and the record per row, 1000 messages a batch


@pytest.fixture
def Person(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    class Person(Model):
        __bucket__ = name
        id = Field(int, primary_key=True)
        email = Field(str, unique=True)
        age = Field(int, index=True)

    db.register(Person)
    try:
        yield Person
    finally:
        db.delete_bucket(name)


def rows(ids: range, taken: dict[int, str] | None = None) -> list[dict[str, Any]]:
    taken = taken or {}
    return [{"id": i, "email": taken.get(i, f"p{i}@example.com"), "age": i % 50} for i in ids]


def server_keys(db: natskv.Client, bucket: str) -> set[str]:
    return set(db.bucket(bucket).keys())


def test_bulk_create_many_batches_reads_back_everywhere(db: natskv.Client, Person: Any, nats_url: str) -> None:
    n = 3 * ROWS_PER_BATCH + 17  # four batches, several in flight at once
    created = Person.bulk_create(rows(range(n)))
    assert [p.id for p in created] == list(range(n))
    kv = db.bucket(Person.__bucket__)
    # each record's _version is its revision on the server, and the writer's replica has it
    for p in (created[0], created[ROWS_PER_BATCH - 1], created[ROWS_PER_BATCH], created[-1]):
        assert kv.entry(f"r:i:{p.id}").revision == p._version
        assert Person.get(p.id)._version == p._version and p._stored is not None
    assert Person.count() == n and Person.find_one(email=f"p{n - 1}@example.com").id == n - 1
    assert len(server_keys(db, Person.__bucket__)) == 2 * n
    other = natskv.connect(nats_url)
    try:
        again = type("Person", (Model,), {"__bucket__": Person.__bucket__, "id": Field(int, primary_key=True),
                                          "email": Field(str, unique=True), "age": Field(int, index=True)})
        assert other.register(again).count() == n
    finally:
        other.close()


def test_bulk_rows_reach_the_replica_in_bulk_and_db_on_still_hears_each(db: natskv.Client, Person: Any) -> None:
    store = Person._store
    bulk_runs: list[int | None] = []
    apply_entries = store.apply_entries

    def counted(*args: Any) -> int | None:
        top = apply_entries(*args)
        bulk_runs.append(top)
        return top

    store.apply_entries = counted
    made = Person.bulk_create(rows(range(1, 1501)))
    # Read back at once (the call waited for its watch) with the revisions it returned.
    assert all(Person.get(p.id)._version == p._version for p in made)
    assert Person.count() == 1500 and len(Person.find(age=7)) == 30
    # db.on() with no handler leaves the replica free to apply runs in one _core call.
    assert any(top is not None for top in bulk_runs)
    heard: list[str] = []
    off = db.on(f"{Person.__bucket__}.*", lambda event: heard.append(event.type))
    try:
        bulk_runs.clear()
        Person.bulk_create(rows(range(2001, 2101)))
        deadline = time.monotonic() + 5
        while len(heard) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert heard == ["inserted"] * 100
        assert all(top is None for top in bulk_runs)  # one change at a time, so the handler hears each
    finally:
        off()
        store.apply_entries = apply_entries


def test_bulk_rows_are_applied_by_the_call_when_the_watch_has_not_delivered_them(Person: Any) -> None:
    store = Person._store
    replica = store.replica
    real_wait, real_apply = replica.wait_for, store.apply_entries
    waited: list[int] = []

    def watch_late(revision: int, timeout: float | None = None) -> None:
        waited.append(revision)
        raise natskv.NatsKVTimeoutError("the watch has not delivered it")

    # As if the watch were cut off: what it delivers meanwhile never reaches the records.
    replica.wait_for = watch_late
    store.apply_entries = lambda *args: 0
    try:
        made = Person.bulk_create(rows(range(1, 1201)))
        assert waited  # the call waited for the watch first, then applied the rows itself
        assert all(Person.get(p.id)._version == p._version for p in made)
        assert Person.count() == 1200
    finally:
        replica.wait_for, store.apply_entries = real_wait, real_apply
    assert Person.get(7).email == "p7@example.com"


def test_bulk_create_rows_clashing_with_each_other_write_nothing(db: natskv.Client, Person: Any) -> None:
    before = db.bucket(Person.__bucket__).status().last_revision
    batch = rows(range(1300), taken={1200: "p3@example.com"})
    with pytest.raises(UniqueConstraintError) as info:
        Person.bulk_create(batch)
    err = info.value
    assert (err.field, err.value, err.row) == ("email", "p3@example.com", 1200)
    assert err.written == [] and err.not_written == list(range(1300))
    with pytest.raises(UniqueConstraintError) as info:
        Person.bulk_create([*rows(range(5)), {"id": 2, "email": "other@example.com", "age": 1}])
    assert (info.value.field, info.value.row) == ("id", 5)
    assert db.bucket(Person.__bucket__).status().last_revision == before and Person.count() == 0


def test_bulk_create_clash_with_a_stored_record_says_which_rows_were_written(db: natskv.Client, Person: Any) -> None:
    clash = 3 * ROWS_PER_BATCH + 20  # in the fourth batch
    Person.create(id=100_000, email=f"p{clash}@example.com", age=1)
    n = 6 * ROWS_PER_BATCH
    with pytest.raises(UniqueConstraintError) as info:
        Person.bulk_create(rows(range(n)))
    err = info.value
    assert (err.field, err.value, err.row) == ("email", f"p{clash}@example.com", clash)
    written, not_written = set(err.written or []), set(err.not_written or [])
    assert written | not_written == set(range(n)) and not written & not_written
    assert set(range(3 * ROWS_PER_BATCH)) <= written  # the batches before it, acknowledged
    assert set(range(3 * ROWS_PER_BATCH, 4 * ROWS_PER_BATCH)) <= not_written  # the whole rejected batch
    # what the error says is what the server and the writer's replica hold
    keys = server_keys(db, Person.__bucket__)
    assert {i for i in range(n) if f"r:i:{i}" in keys} == written
    assert {p.id for p in Person.find(id__lt=n)} == written


def test_bulk_create_reuses_the_values_of_deleted_records(db: natskv.Client, Person: Any) -> None:
    # the markers of deleted records are tombstones: the batch's "must not exist" checks fail
    # on them, and the batch goes again against the tombstones
    for p in Person.bulk_create(rows(range(3))):
        p.delete()
    created = Person.bulk_create(rows(range(2 * ROWS_PER_BATCH)))
    assert len(created) == Person.count() == 2 * ROWS_PER_BATCH
    assert Person.find_one(email="p1@example.com").id == 1


def test_bulk_create_rows_without_a_unique_value_take_no_marker(db: natskv.Client, name: str) -> None:
    # rows with no value in a unique field write no marker for it: the batches hold different
    # numbers of rows, none over the server's 1000 messages
    class Account(Model):
        __bucket__ = name
        id = Field(int, primary_key=True)
        email = Field(str, unique=True)
        phone = Field(str, unique=True)

    db.register(Account)
    try:
        given = [{"id": i, "email": f"a{i}@x.io" if i % 3 else None, "phone": f"+{i}" if i % 5 else None}
                 for i in range(1500)]
        made = Account.bulk_create(given)
        assert [a.id for a in made] == list(range(1500)) and Account.count() == 1500
        markers = [k for k in server_keys(db, name) if k.startswith("u:")]
        assert len(markers) == sum(1 for i in range(1500) if i % 3) + sum(1 for i in range(1500) if i % 5)
        assert Account.find_one(phone="+7").email == "a7@x.io" and Account.get(3).email is None
        with pytest.raises(UniqueConstraintError) as info:  # a clash in the second field, found before sending
            Account.bulk_create([{"id": 2000, "phone": "+1"}, {"id": 2001, "email": "n@x.io", "phone": "+1"}])
        assert (info.value.field, info.value.row) == ("phone", 1) and not info.value.written
    finally:
        db.delete_bucket(name)


def test_bulk_create_generated_values(db: natskv.Client, name: str) -> None:
    class Doc(Model):
        __bucket__ = name
        id = Field(str, primary_key=True, generated="uuid")
        seq = Field(int, generated="autoincrement", unique=True)
        title = Field(str)

    db.register(Doc)
    try:
        docs = Doc.bulk_create([{"title": f"t{i}"} for i in range(1200)])
        assert len({d.id for d in docs}) == 1200 and sorted(d.seq for d in docs) == list(range(1, 1201))
        assert Doc.count() == 1200 and Doc.find_one(seq=600).title == docs[599].title
    finally:
        db.delete_bucket(name)


# -- group commit ------------------------------------------------------------------------------


def test_concurrent_creates_are_all_stored_with_their_own_revisions(db: natskv.Client, Person: Any) -> None:
    threads, each = 16, 12
    made: list[Any] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        made.extend(Person.create(id=t * 1000 + k, email=f"t{t}.{k}@example.com", age=k) for k in range(each))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(made) == threads * each == Person.count()
    kv = db.bucket(Person.__bucket__)
    for p in made:
        assert kv.entry(f"r:i:{p.id}").revision == p._version == Person.get(p.id)._version


def test_concurrent_creates_racing_for_the_same_values_have_one_winner_each(db: natskv.Client, Person: Any) -> None:
    values = [f"v{i}@example.com" for i in range(10)]
    wins: list[tuple[int, str]] = []
    losses: list[tuple[int, str]] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        start.wait()
        for i, email in enumerate(values):
            try:
                Person.create(id=t * 100 + i, email=email, age=1)
                wins.append((t, email))
            except UniqueConstraintError as exc:
                assert exc.field == "email"
                losses.append((t, exc.value))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(e for _, e in wins) == values
    assert sorted(e for _, e in losses) == sorted(v for v in values for _ in range(7))
    assert Person.count() == 10 and {p.email for p in Person.find()} == set(values)


class SlowBucket:
    """A bucket whose first commit waits for ``release`` (a slow server), recording every commit."""

    def __init__(self, bucket: natskv.Bucket) -> None:
        self.bucket = bucket
        self.name = bucket.name
        self.release = threading.Event()
        self.calls: list[list[tuple[Any, ...]]] = []

    def _timeout(self, timeout: float | None) -> float | None:
        return self.bucket._timeout(timeout)

    def commit(self, ops: list[tuple[Any, ...]], timeout: float | None = None) -> int:
        self.calls.append(list(ops))
        if len(self.calls) == 1:
            assert self.release.wait(10)
        return self.bucket.commit(ops, timeout=timeout)


def queued(group: GroupCommit, n: int) -> bool:
    deadline = time.monotonic() + 5
    while len(group._queue) < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_group_commit_joins_waiting_writes_and_retries_them_alone_on_a_clash(kv: natskv.Bucket) -> None:
    kv.create("taken", 0)
    slow = SlowBucket(kv)
    group = GroupCommit(slow)  # type: ignore[arg-type]
    results: dict[str, Any] = {}

    def write(label: str, ops: list[tuple[Any, ...]]) -> None:
        try:
            results[label] = group.commit(ops, 10)
        except Exception as exc:
            results[label] = exc

    first = threading.Thread(target=write, args=("a", [("create", "a1", 1), ("create", "a2", 2)]))
    first.start()
    assert queued(group, 0) and group._busy
    others = [
        threading.Thread(target=write, args=("b", [("create", "b1", 1), ("create", "b2", 2)])),
        threading.Thread(target=write, args=("c", [("create", "c1", 1), ("create", "taken", 2)])),
        threading.Thread(target=write, args=("d", [("create", "d1", 1), ("create", "d2", 2)])),
    ]
    for t in others:
        t.start()
        assert queued(group, others.index(t) + 1)
    slow.release.set()
    for t in [first, *others]:
        t.join(10)
    # b, c and d went as one batch, which "taken" rejected whole; then each alone
    assert [len(ops) for ops in slow.calls[:2]] == [2, 6]
    assert isinstance(results["c"], KeyExistsError) and results["c"].key == "taken"
    for label in "abd":
        assert results[label] == kv.entry(f"{label}2").revision
    assert kv.get("c1") is None and kv.get("taken") == 0 and not group._busy


def test_group_commit_gives_each_member_the_revision_of_its_own_writes(kv: natskv.Bucket) -> None:
    slow = SlowBucket(kv)
    group = GroupCommit(slow)  # type: ignore[arg-type]
    results: dict[int, int] = {}

    def write(i: int) -> None:
        results[i] = group.commit([("set", f"k{i}.a", i), ("set", f"k{i}.b", i)], 10)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(5)]
    threads[0].start()
    assert queued(group, 0)
    for i, t in enumerate(threads[1:], start=1):
        t.start()
        assert queued(group, i)
    slow.release.set()
    for t in threads:
        t.join(10)
    assert len(slow.calls) == 2 and len(slow.calls[1]) == 8
    for i in range(5):
        assert results[i] == kv.entry(f"k{i}.b").revision == kv.entry(f"k{i}.a").revision + 1


def test_group_commit_keeps_writes_to_the_same_key_apart(kv: natskv.Bucket) -> None:
    slow = SlowBucket(kv)
    group = GroupCommit(slow)  # type: ignore[arg-type]
    results: dict[str, Any] = {}

    def write(label: str, key: str) -> None:
        try:
            results[label] = group.commit([("create", key, label), ("set", f"{label}.x", 1)], 10)
        except KeyExistsError as exc:
            results[label] = exc

    threads = [threading.Thread(target=write, args=(label, key))
               for label, key in (("a", "a"), ("b", "same"), ("c", "same"), ("d", "d"))]
    threads[0].start()
    assert queued(group, 0)
    for i, t in enumerate(threads[1:], start=1):
        t.start()
        assert queued(group, i)
    slow.release.set()
    for t in threads:
        t.join(10)
    assert [len(ops) for ops in slow.calls] == [2, 4, 2]  # b with d, then c on its own
    assert isinstance(results["c"], KeyExistsError) and kv.get("same") == "b" and kv.get("c.x") is None


def test_group_commit_a_write_that_times_out_while_queued_is_not_sent(kv: natskv.Bucket) -> None:
    slow = SlowBucket(kv)
    group = GroupCommit(slow)  # type: ignore[arg-type]
    first = threading.Thread(target=group.commit, args=([("set", "a", 1), ("set", "b", 1)], 10))
    first.start()
    assert queued(group, 0)
    with pytest.raises(NatsKVTimeoutError, match="not sent; nothing of it is stored"):
        group.commit([("set", "late", 1), ("set", "later", 1)], 0.1)
    slow.release.set()
    first.join(10)
    assert kv.get("a") == 1 and kv.get("late") is None and len(slow.calls) == 1 and not group._busy


def test_group_commit_an_error_of_unknown_outcome_reaches_every_member(kv: natskv.Bucket) -> None:
    class Failing(SlowBucket):
        def commit(self, ops: list[tuple[Any, ...]], timeout: float | None = None) -> int:
            if len(ops) > 2:
                raise NatsKVTimeoutError("no acknowledgement (test)")
            return super().commit(ops, timeout)

    slow = Failing(kv)
    group = GroupCommit(slow)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            group.commit([("set", f"k{i}", i), ("set", f"j{i}", i)], 10)
        except NatsKVTimeoutError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    threads[0].start()
    assert queued(group, 0)
    for i, t in enumerate(threads[1:], start=1):
        t.start()
        assert queued(group, i)
    slow.release.set()
    for t in threads:
        t.join(10)
    assert len(errors) == 2 and errors[0] is not errors[1] and not group._busy  # one copy each


# -- the protocol: pipelined atomic batches -----------------------------------------------------


def test_commit_batches_answers_each_batch_and_stops_sending_after_a_failure(kv: natskv.Bucket) -> None:
    proto = kv._proto
    kv.create("taken", 0)
    new = {"Nats-Expected-Last-Subject-Sequence": "0"}

    def batch(prefix: str, clash: bool = False) -> list[tuple[str, bytes, dict[str, str]]]:
        return [(f"{prefix}{i}", b"1", new) for i in range(3)] + ([("taken", b"1", new)] if clash else [])

    acked: list[tuple[int, int]] = []
    batches = [batch("a"), batch("b"), batch("c", clash=True), *(batch(f"d{i}.") for i in range(6))]
    results = proto.commit_batches(batches, 10, inflight=2, on_ack=lambda i, rev: acked.append((i, rev)))
    assert isinstance(results[0], int) and isinstance(results[1], int)
    assert isinstance(results[2], JetStreamError) and results[2].err_code in CAS_ERROR_CODES
    assert results[-1] is None  # not sent after the failure
    assert acked == [(i, r) for i, r in enumerate(results) if isinstance(r, int)]
    for i, result in enumerate(results):
        stored = [kv.get(key.replace(".", ":")) for key, _, _ in batches[i] if key != "taken"]
        assert stored == ([1, 1, 1] if isinstance(result, int) else [None, None, None])
        if isinstance(result, int):
            assert kv.entry(batches[i][-1][0].replace(".", ":")).revision == result
    with pytest.raises(BatchError):
        proto.commit_batches([[]], 10)


def test_commit_batches_gives_each_batch_the_whole_timeout(kv: natskv.Bucket) -> None:
    # bulk_create's timeout= is per batch: a call that takes longer than it in all, every batch
    # acknowledged well within it, succeeds (a 100,000-row bulk_create takes several seconds)
    new = {"Nats-Expected-Last-Subject-Sequence": "0"}

    class SlowToBuild(list[list[tuple[str, bytes, dict[str, str]]]]):
        built: ClassVar[set[int]] = set()

        def __getitem__(self, i: Any) -> Any:
            if i not in self.built:  # the caller building the batch: nothing is waiting meanwhile
                self.built.add(i)
                time.sleep(0.25)
            return super().__getitem__(i)

    # full batches: the last one's acknowledgement is still on its way when the call waits for it
    batches = SlowToBuild([[(f"t{b}.{i}", b"1", new) for i in range(1000)] for b in range(6)])
    started = time.monotonic()
    results = kv._proto.commit_batches(batches, 1.0, inflight=2)
    assert time.monotonic() - started > 1.25
    assert all(isinstance(r, int) for r in results), results
    assert kv.get("t5:999") == 1


def test_group_commit_joins_only_writes_that_may_wait_as_long_as_its_leader(kv: natskv.Bucket) -> None:
    # the leader waits for the joint batch with its own time limit: a write with less time left
    # is not joined to it (it would hear of a timeout only after its own), it goes next
    slow = SlowBucket(kv)
    group = GroupCommit(slow)  # type: ignore[arg-type]
    threads = [
        threading.Thread(target=group.commit, args=([("set", "a", 1), ("set", "a2", 1)], 10)),
        threading.Thread(target=group.commit, args=([("set", "b", 1), ("set", "b2", 1)], 8)),
        threading.Thread(target=group.commit, args=([("set", "c", 1), ("set", "c2", 1)], 3)),
        threading.Thread(target=group.commit, args=([("set", "d", 1), ("set", "d2", 1)], 9)),
    ]
    threads[0].start()
    assert queued(group, 0)
    for i, t in enumerate(threads[1:], start=1):
        t.start()
        assert queued(group, i)
    slow.release.set()
    for t in threads:
        t.join(10)
    assert [sorted({op[1][0] for op in ops}) for ops in slow.calls] == [["a"], ["b", "d"], ["c"]]
    assert all(kv.get(k) == 1 for k in "abcd")
