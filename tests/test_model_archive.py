"""Model backups, restores and truncation against the real server: records, unique markers and
counters made again, clashes refused before anything is written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import drop_model_bucket

import natskv
from natskv import BackupError, Field, Model, UniqueConstraintError


def model_class(bucket: str) -> type[Model]:
    class Member(Model):
        __bucket__ = bucket
        id = Field(int, primary_key=True, generated="autoincrement")
        email = Field(str, unique=True)
        team = Field(str, index=True)

    return Member


@pytest.fixture
def Member(db: natskv.Client, name: str) -> Iterator[type[Model]]:
    cls = model_class(name)
    db.register(cls)
    try:
        yield cls
    finally:
        drop_model_bucket(db, name)


def test_backup_truncate_restore(Member: Any, tmp_path: Path) -> None:
    Member.bulk_create([{"email": f"m{i}@x.org", "team": "red" if i % 2 else "blue"} for i in range(1500)])
    path = tmp_path / "members.jsonl"
    assert Member.backup(path) == 1500
    header = orjson.loads(path.read_bytes().splitlines()[0])
    assert header["model"]["name"] == "Member" and header["pattern"] == "r:*"
    assert Member.truncate() == 1500
    assert Member.count() == 0 and Member.find_one(email="m7@x.org") is None
    assert Member.create(email="m7@x.org", team="new").id == 1  # counters reset, unique value free
    Member.truncate()
    assert Member.restore(path) == 1500
    assert Member.count() == 1500 and Member.count(team="red") == 750
    assert Member.find_one(email="m7@x.org").id == 8
    assert Member.create(email="new@x.org", team="x").id == 1501  # the counter moved past them
    with pytest.raises(UniqueConstraintError):  # the unique markers came back
        Member.create(email="m7@x.org", team="x")


def test_records_changed_during_a_backup_come_back_once(Member: Any, tmp_path: Path) -> None:
    # A model backup streams like a bucket's: records saved or deleted while it runs are read
    # again at its end, so the file holds each record once, and a restore's unique markers
    # follow the record's latest value (a stale line would leave its old email taken).
    Member.bulk_create([{"email": f"m{i}@x.org", "team": "red"} for i in range(1200)])

    def change_meanwhile(done: int, total: int | None) -> None:
        if done != 1000:
            return  # after the first page: ids 1-1000 are in the file, 1001-1200 not yet
        for pk in (3, 1100):
            member = Member.get(pk)
            member.email = f"changed{pk}@x.org"
            member.save()
        Member.get(5).delete()
        Member.get(1150).delete()

    path = tmp_path / "busy.jsonl"
    assert Member.backup(path, progress=change_meanwhile) == 1198
    keys = [orjson.loads(line)["key"] for line in path.read_bytes().splitlines()[1:-1]]
    assert len(keys) == len(set(keys)) == 1198
    Member.truncate()
    assert Member.restore(path) == 1198
    assert Member.get(3).email == "changed3@x.org" and Member.get(1100).email == "changed1100@x.org"
    assert Member.get(5) is None and Member.get(1150) is None
    assert Member.create(email="m2@x.org", team="x").id == 1201  # id 3's old email is free


def test_restore_refuses_clashes_and_bad_files_before_writing(db: natskv.Client, Member: Any,
                                                              tmp_path: Path) -> None:
    Member.create(email="a@x.org", team="t")
    Member.create(email="b@x.org", team="t")
    path = tmp_path / "m.jsonl"
    Member.backup(path)
    Member.truncate()
    Member.create(email="b@x.org", team="other")  # id 1 again, after the truncate reset the counter
    Member.create(email="c@x.org", team="other")  # id 2
    Member.create(email="a@x.org", team="other")  # id 3: holds a value record 1 of the file claims
    before = db.bucket(Member.__bucket__).status().last_revision
    with pytest.raises(UniqueConstraintError, match=r"a@x\.org"):
        Member.restore(path)
    assert db.bucket(Member.__bucket__).status().last_revision == before
    assert Member.restore(path, clear=True) == 2  # into an emptied model: no clash
    assert sorted(m.email for m in Member.find()) == ["a@x.org", "b@x.org"]
    lines = path.read_bytes().splitlines()
    dup = orjson.loads(lines[2])
    dup["key"], dup["value"]["id"] = "r:i:9", 9  # a second record with the same email
    clashing = tmp_path / "dup.jsonl"
    end = orjson.loads(lines[-1])
    end["records"] += 1
    clashing.write_bytes(b"\n".join([*lines[:-1], orjson.dumps(dup), orjson.dumps(end)]))
    with pytest.raises(UniqueConstraintError):
        Member.restore(clashing, clear=True)
    assert Member.count() == 2  # not even the clear ran
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"\n".join(lines[:-1]))
    with pytest.raises(BackupError, match="cut short"):
        Member.restore(cut, clear=True)
    kv_only = tmp_path / "kv.jsonl"
    db.bucket(Member.__bucket__).backup(kv_only)
    with pytest.raises(BackupError, match="not a model backup"):
        Member.restore(kv_only)
    moved = tmp_path / "moved.jsonl"
    wrong = orjson.loads(lines[1])
    wrong["key"] = "r:i:77"  # the record says id 1
    moved.write_bytes(b"\n".join([lines[0], orjson.dumps(wrong), b'{"natskv":"end","records":1}']))
    with pytest.raises(BackupError, match="another key"):
        Member.restore(moved)
    assert Member.count() == 2
