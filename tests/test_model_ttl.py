"""Records that expire (``Model.__ttl__``, ``create(ttl=)``, ``save(ttl=)``), against the real
server: the server removes them and their unique values, and every replica and watch tells of an
``expired`` event."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import drop_model_bucket

import natskv
from natskv import Field, InvalidArgumentError, Model, UniqueConstraintError


def until(predicate: Callable[[], bool], timeout: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def Session(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    class Session(Model):
        __bucket__ = name
        __ttl__ = 2
        id = Field(int, primary_key=True, generated="autoincrement")
        token = Field(str, unique=True)
        user = Field(str, index=True)

    db.register(Session)
    try:
        yield Session
    finally:
        drop_model_bucket(db, name)


def test_a_record_expires_with_its_unique_values_and_says_so(db: natskv.Client, Session: Any) -> None:
    events: list[natskv.ModelEvent] = []
    watched: list[str] = []
    done = threading.Event()

    def on_event(event: Any) -> None:
        events.append(event)
        if event.type == "expired":
            done.set()

    off = db.on(f"{Session.__bucket__}.*", on_event)
    watcher = Session.watch(lambda e: watched.append(e.type))
    try:
        before = dt.datetime.now(dt.timezone.utc)
        s = Session.create(token="t-1", user="ann")
        assert s._expires_at is not None
        assert dt.timedelta(seconds=1.5) < s._expires_at - before < dt.timedelta(seconds=3)
        assert Session.get(s.id)._expires_at == s._expires_at
        with pytest.raises(UniqueConstraintError):
            Session.create(token="t-1", user="bob")
        assert until(lambda: Session.get(s.id) is None)  # gone from the replica
        assert Session.find(user="ann") == []
        assert db.bucket(Session.__bucket__).get(f"r:i:{s.id}") is None  # and from the server
        assert done.wait(5)
        assert Session.create(token="t-1", user="bob").user == "bob"  # the unique value is free
        assert [e.type for e in events][:2] == ["inserted", "expired"]
        assert events[1].name == f"{Session.__bucket__}.expired" and events[1].old.token == "t-1"
        assert until(lambda: watched[:2] == ["inserted", "expired"], 3)
    finally:
        off()
        watcher.stop()


def test_ttl_per_record_save_keeps_or_renews_the_expiry(db: natskv.Client, Session: Any) -> None:
    forever_ish = Session.create(token="long", user="x", ttl=3600)
    assert forever_ish._expires_at - dt.datetime.now(dt.timezone.utc) > dt.timedelta(seconds=3500)
    kept = Session.create(token="kept", user="y")
    expires = kept._expires_at
    kept.user = "y2"
    kept.save()  # keeps the expiry it had
    assert kept._expires_at == expires
    renewed = Session.create(token="renewed", user="z")
    renewed.save(ttl=6)  # nothing changed, but a new expiry: written
    assert renewed._expires_at - dt.datetime.now(dt.timezone.utc) > dt.timedelta(seconds=5)
    assert until(lambda: Session.get(kept.id) is None)
    assert Session.get(renewed.id) is not None and Session.get(forever_ish.id) is not None
    with pytest.raises(UniqueConstraintError):  # its unique marker was renewed with it
        Session.create(token="renewed", user="other")
    assert until(lambda: Session.get(renewed.id) is None, 8)


def test_bulk_create_follows_the_model_ttl(Session: Any) -> None:
    made = Session.bulk_create([{"token": f"b{i}", "user": "bulk"} for i in range(20)])
    assert all(m._expires_at is not None for m in made)
    assert len(Session.find(user="bulk")) == 20
    assert until(lambda: Session.find(user="bulk") == [])
    assert Session.create(token="b3", user="again").token == "b3"


def test_records_without_ttl_and_bad_ttls(db: natskv.Client, name: str) -> None:
    class Plain(Model):
        __bucket__ = name
        id = Field(int, primary_key=True)
        ttl = Field(int)  # a field called ttl: set through the values mapping

    db.register(Plain)
    try:
        kinds: list[str] = []
        watcher = Plain.watch(lambda e: kinds.append(e.type))
        p = Plain.create(id=1)
        assert p._expires_at is None
        p.delete()
        assert until(lambda: kinds == ["inserted", "deleted"], 3)
        watcher.stop()
        before = db.bucket(name).status().last_revision
        for bad in (0, -1, "5", float("nan")):
            with pytest.raises(InvalidArgumentError):
                Plain.create({"id": 2}, ttl=bad)
        with pytest.raises(InvalidArgumentError, match="field named 'ttl'"):
            Plain.create(id=3, ttl=5)
        assert Plain.create({"id": 4, "ttl": 5}).ttl == 5
        assert db.bucket(name).status().last_revision == before + 1
        with pytest.raises(InvalidArgumentError):
            Plain.get(4).save(ttl=-2)
    finally:
        db.delete_bucket(name)
