"""db.transaction(): record changes committed as one atomic batch, against a real nats-server."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import natskv
from natskv import Field, InvalidArgumentError, Model, RevisionMismatchError, UniqueConstraintError, ValidationError


@pytest.fixture
def Account(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    class Account(Model):
        __bucket__ = name
        id = Field(int, primary_key=True)
        owner = Field(str, unique=True)
        balance = Field(int, min=0)

    db.register(Account)
    try:
        yield Account
    finally:
        db.delete_bucket(name)


def balances(model: Any) -> dict[int, int]:
    return {a.id: a.balance for a in model.find()}


def test_a_transfer_commits_both_records(db: natskv.Client, Account: Any) -> None:
    Account.bulk_create([{"id": 1, "owner": "ann", "balance": 100}, {"id": 2, "owner": "bob", "balance": 0}])
    with db.transaction() as tx:
        a, b = tx.get(Account, 1), tx.get(Account, 2)
        a.balance -= 30
        b.balance += 30
        tx.save(a)
        tx.save(b)
        assert balances(Account) == {1: 100, 2: 0}  # nothing sent before the block ends
    assert balances(Account) == {1: 70, 2: 30}
    assert a._version == Account.get(1)._version and b._version == Account.get(2)._version
    assert Account.get(1, consistency="server").balance == 70
    a.balance = 1
    a.save()  # the instance carries its new version: a plain save after the commit works


def test_a_conflict_stores_nothing(db: natskv.Client, Account: Any) -> None:
    Account.bulk_create([{"id": 1, "owner": "ann", "balance": 100}, {"id": 2, "owner": "bob", "balance": 0}])
    with pytest.raises(RevisionMismatchError), db.transaction() as tx:
        a, b = tx.get(Account, 1), tx.get(Account, 2)
        Account.update({"balance": 90}, id=1)  # someone else changes a after it was read
        a.balance -= 30
        b.balance += 30
        tx.save(a)
        tx.save(b)
    assert balances(Account) == {1: 90, 2: 0}


def test_an_exception_in_the_block_discards_the_changes(db: natskv.Client, Account: Any) -> None:
    Account.create(id=1, owner="ann", balance=5)
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.create(Account, id=2, owner="bob", balance=1)
        tx.delete(tx.get(Account, 1))
        raise RuntimeError("changed my mind")
    assert balances(Account) == {1: 5}
    with pytest.raises(InvalidArgumentError, match="has ended"):
        tx.create(Account, id=3, owner="cy", balance=1)


def test_unique_values_are_checked_at_commit_and_can_move(db: natskv.Client, Account: Any) -> None:
    Account.bulk_create([{"id": 1, "owner": "ann", "balance": 1}, {"id": 2, "owner": "bob", "balance": 2}])
    with pytest.raises(UniqueConstraintError) as info, db.transaction() as tx:
        tx.create(Account, id=3, owner="cy", balance=3)
        tx.create(Account, id=4, owner="ann", balance=4)
    assert (info.value.field, info.value.value) == ("owner", "ann")
    assert sorted(balances(Account)) == [1, 2]  # id 3 was not stored either
    # Swap two unique values, and hand a freed one to a new record, in one commit.
    with db.transaction() as tx:
        a, b = tx.get(Account, 1), tx.get(Account, 2)
        a.owner, b.owner = "bob", "ann"
        tx.save(a)
        tx.save(b)
    assert Account.find_one(owner="bob").id == 1 and Account.find_one(owner="ann").id == 2
    with db.transaction() as tx:
        tx.delete(tx.get(Account, 1))
        new = tx.create(Account, id=5, owner="bob", balance=0)
    assert new._version > 0 and Account.get(1) is None and Account.find_one(owner="bob").id == 5
    with pytest.raises(UniqueConstraintError):
        Account.create(id=6, owner="bob", balance=0)  # the marker is held by the new record


def test_bad_changes_fail_before_anything_is_sent(db: natskv.Client, Account: Any, name: str) -> None:
    Account.create(id=1, owner="ann", balance=5)
    before = db.bucket(name).status().last_revision

    class Other(Model):
        __bucket__ = name + "_other"
        id = Field(int, primary_key=True)

    db.register(Other)
    try:
        with db.transaction() as tx:
            with pytest.raises(ValidationError):
                tx.create(Account, id=2, owner="bob", balance=-1)
            a = tx.get(Account, 1)
            tx.save(a)
            with pytest.raises(InvalidArgumentError, match="already changed"):
                tx.save(a)
            with pytest.raises(InvalidArgumentError, match="one bucket"):
                tx.create(Other, id=1)
            with pytest.raises(InvalidArgumentError, match="stored model instance"):
                tx.delete(Account(id=9, owner="x", balance=0))
            tx.rollback()
        assert db.bucket(name).status().last_revision == before
    finally:
        db.delete_bucket(name + "_other")


@pytest.mark.slow
def test_concurrent_transfers_conserve_the_total(db: natskv.Client, Account: Any) -> None:
    n = 5
    Account.bulk_create([{"id": i, "owner": f"o{i}", "balance": 100} for i in range(n)])
    conflicts = []
    errors: list[BaseException] = []

    def move(tx: Any, src: int, dst: int) -> None:
        a, b = tx.get(Account, src), tx.get(Account, dst)
        amount = min(a.balance, 7)
        a.balance -= amount
        b.balance += amount
        tx.save(a)
        tx.save(b)

    def transfers(seed: int) -> None:
        try:
            for k in range(15):
                src, dst = (seed + k) % n, (seed + 2 * k + 1) % n
                if src == dst:
                    continue
                if k % 2:  # optimistic, by hand: run the block again on a conflict
                    while True:
                        try:
                            with db.transaction() as tx:
                                move(tx, src, dst)
                            break
                        except RevisionMismatchError:
                            conflicts.append(1)
                else:  # the same, by run_transaction
                    db.run_transaction(functools.partial(move, src=src, dst=dst), retries=100)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=transfers, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sum(balances(Account).values()) == 100 * n
    server = {a.id: a.balance for a in Account.find(consistency="server")}
    assert server == balances(Account)


def test_run_transaction_retries_conflicts(db: natskv.Client, Account: Any) -> None:
    Account.bulk_create([{"id": 1, "owner": "ann", "balance": 100}, {"id": 2, "owner": "bob", "balance": 0}])
    runs = []

    def transfer(tx: Any) -> int:
        a, b = tx.get(Account, 1), tx.get(Account, 2)
        if not runs:  # the first run loses a race: someone changes a after it was read
            Account.update({"balance": 90}, id=1)
        runs.append(a.balance)
        a.balance -= 30
        b.balance += 30
        tx.save(a)
        tx.save(b)
        return a.balance

    assert db.run_transaction(transfer) == 60  # the second run read the new balance
    assert runs == [100, 90] and balances(Account) == {1: 60, 2: 30}

    def always_conflicts(tx: Any) -> None:
        a = tx.get(Account, 1)
        Account.update({"balance": a.balance + 1}, id=1)
        a.balance = 0
        tx.save(a)

    with pytest.raises(RevisionMismatchError):
        db.run_transaction(always_conflicts, retries=2)
    assert Account.get(1).balance == 63  # three runs, each lost to the update it made itself
    with pytest.raises(InvalidArgumentError, match="retries"):
        db.run_transaction(transfer, retries=-1)
    with pytest.raises(ZeroDivisionError):  # other errors are not retried
        db.run_transaction(lambda tx: 1 / 0)


def test_update_and_destroy_by_query_in_a_transaction(db: natskv.Client, Account: Any) -> None:
    Account.bulk_create([{"id": i, "owner": f"o{i}", "balance": i * 10} for i in range(1, 7)])
    with db.transaction() as tx:
        assert tx.update(Account, {"balance": 0}, balance__gte=40) == 3  # ids 4, 5, 6
        assert tx.destroy(Account, id__in=[1, 2]) == 2
        assert balances(Account) == {1: 10, 2: 20, 3: 30, 4: 40, 5: 50, 6: 60}  # nothing sent yet
    assert balances(Account) == {3: 30, 4: 0, 5: 0, 6: 0}
    with pytest.raises(ValidationError), db.transaction() as tx:  # validated when queued, like save()
        tx.update(Account, {"balance": -5}, id=3)
    with pytest.raises(RevisionMismatchError), db.transaction() as tx:  # one record changed meanwhile: none stored
        tx.update(Account, {"balance": 1}, id__gte=3)
        Account.update({"balance": 99}, id=6)
    assert balances(Account) == {3: 30, 4: 0, 5: 0, 6: 99}
    with pytest.raises(InvalidArgumentError, match="needs values"), db.transaction() as tx:
        tx.update(Account, {}, id=3)
