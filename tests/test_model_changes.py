"""Instance dirty tracking on a real server: ``changed()``, ``previous()``, and ``save()`` writing
only when something changed."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import drop_model_bucket

import natskv
from natskv import Field, InvalidArgumentError, Model


@pytest.fixture
def Item(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    class Item(Model):
        __bucket__ = name
        id = Field(int, primary_key=True, generated="autoincrement")
        title = Field(str)
        price = Field(float)
        due = Field(dt.datetime)
        ref = Field(uuid.UUID)
        sku = Field(str, unique=True)

    db.register(Item)
    try:
        yield Item
    finally:
        drop_model_bucket(db, name)


def test_changed_and_previous_follow_the_stored_record(Item: Any) -> None:
    new = Item(title="pen", price=1.5)
    assert new.changed() == ["title", "price"] and new.previous("title") is None
    due = dt.datetime(2026, 12, 24, tzinfo=dt.timezone.utc)
    ref = uuid.uuid4()
    item = Item.create(title="pen", price=1.5, due=due, ref=ref, sku="P-1")
    assert item.changed() == []
    item.title = "pencil"
    item.price = 2.0
    assert item.changed() == ["title", "price"]
    assert item.previous("title") == "pen" and item.previous("price") == 1.5
    assert item.previous("due") == due and item.previous("ref") == ref  # Python forms, not JSON
    item.price = 1.5  # back to what is stored
    assert item.changed() == ["title"]
    item.due = dt.datetime(2026, 12, 24)  # naive: stored as UTC, the same instant
    assert item.changed() == ["title"]
    with pytest.raises(InvalidArgumentError, match="no field"):
        item.previous("nope")
    assert item._changes == 0
    item.save()
    assert item.changed() == [] and item.previous("title") == "pencil"
    fetched = Item.get(item.id)
    assert fetched.changed() == [] and fetched.previous("title") == "pencil"
    assert fetched._changes == item._changes == 1 and "_changes" not in fetched.to_dict()
    fetched.price = 3.0
    fetched.save()
    assert Item.get(item.id)._changes == 2


def test_save_without_changes_writes_nothing(db: natskv.Client, Item: Any) -> None:
    item = Item.create(title="pen", sku="P-2")
    version = item._version
    bucket = db.bucket(Item.__bucket__)
    before = bucket.status().last_revision
    assert item.save() is item
    assert item._version == version and bucket.status().last_revision == before
    item.title = "pen"  # assigned, but the same value
    item.save()
    assert bucket.status().last_revision == before
    item.sku = "P-3"
    item.save()
    assert item._version > version and Item.find_one(sku="P-3").id == item.id
    assert Item.find_one(sku="P-2") is None  # the unique value moved with the change
