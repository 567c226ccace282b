"""Bucket backups (JSON Lines) against the real server: round trips of every kind of value, TTLs
kept, and files that are cut short or corrupt refused before anything is written."""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

import natskv
from natskv import BackupError
from natskv.contrib.cache import CacheCodec


@pytest.fixture
def target(db: natskv.Client, name: str) -> Iterator[natskv.Bucket]:
    bucket = db.bucket(name + "_to")
    yield bucket
    db.delete_bucket(bucket.name)


def fill(kv: natskv.Bucket) -> dict[str, object]:
    values: dict[str, object] = {f"user:{i}": {"id": i, "tags": ["a", "b"], "score": i / 3} for i in range(2500)}
    values.update({"text": "héllo ✓", "int": 7, "null": None, "list": [1, [2]], "bytes": b"\x00\xff", "empty": b""})
    kv.set_many(values)
    return values


def test_backup_and_restore_round_trip(kv: natskv.Bucket, target: natskv.Bucket, tmp_path: Path) -> None:
    values = fill(kv)
    kv.delete("user:0")  # deleted keys are not backed up
    del values["user:0"]
    seen: list[tuple[int, int | None]] = []
    path = tmp_path / "b.jsonl"
    assert kv.backup(path, progress=lambda done, total: seen.append((done, total))) == len(values)
    # One call a page of 1,000; the total is the consumer's count (the delete marker included,
    # an upper bound) until the last call, which has the number written.
    assert seen == [(1000, len(values) + 1), (2000, len(values) + 1), (len(values), len(values) + 1),
                    (len(values), len(values))]
    lines = path.read_bytes().splitlines()
    header, end = orjson.loads(lines[0]), orjson.loads(lines[-1])
    assert header["natskv"] == "backup" and header["bucket"] == kv.name and header["config"]["history"] == 10
    assert end == {"natskv": "end", "records": len(values)}
    assert not (tmp_path / "b.jsonl.partial").exists()
    assert target.restore(path) == len(values)
    assert target.get_many(list(values)) == values
    assert sorted(target.keys()) == sorted(values)


def test_restore_keeps_the_time_left_and_clear_empties_first(
    kv: natskv.Bucket, target: natskv.Bucket, tmp_path: Path
) -> None:
    kv.set("short", 1, ttl=2)
    kv.set("long", 2, ttl=3600)
    kv.set("forever", 3)
    target.set("stale", "old")
    path = tmp_path / "t.jsonl"
    kv.backup(path)
    records = {r["key"]: r for r in map(orjson.loads, path.read_bytes().splitlines()[1:-1])}
    assert 0 < records["short"]["ttl"] <= 2 and 3500 < records["long"]["ttl"] <= 3600
    assert "ttl" not in records["forever"]
    assert target.restore(path, clear=True) == 3
    assert target.get("stale") is None and target.get_many(["short", "long", "forever"]) == {
        "short": 1, "long": 2, "forever": 3}
    deadline = time.monotonic() + 6
    while target.get("short") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert target.get("short") is None and target.get("long") == 2


def test_pickled_and_other_codec_payloads_come_back_byte_for_byte(
    db: natskv.Client, name: str, tmp_path: Path
) -> None:
    source = db.bucket(name + "_pickle", codec=CacheCodec())
    copy = db.bucket(name + "_copy", codec=CacheCodec())
    try:
        source.set("obj", {"when": (1, 2), "set": {3}})
        source.set("n", 5)
        source.backup(tmp_path / "p.jsonl")
        copy.restore(tmp_path / "p.jsonl")
        assert copy.get("obj") == {"when": (1, 2), "set": {3}} and copy.incr("n") == 6
    finally:
        db.delete_bucket(source.name)
        db.delete_bucket(copy.name)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda lines: lines[:-1], "without its closing line"),
        (lambda lines: lines[:40], "without its closing line"),
        (lambda lines: [*lines[:5], b'{"key": "x", "value": ', *lines[6:]], "line 6 .* not JSON"),
        (lambda lines: [*lines[:5], b'{"value": 1}', *lines[6:]], "line 6 .* string \"key\""),
        (lambda lines: [*lines[:5], b'{"key": "x", "bytes": "%%%"}', *lines[6:]], "line 6 .* not base64"),
        (lambda lines: [*lines[:5], b'{"key": "x", "value": 1, "ttl": -5}', *lines[6:]], 'line 6 .* "ttl"'),
        (lambda lines: [*lines[:5], *lines[6:]], "counts 100 records, the file holds 99"),
        (lambda lines: [b'{"hello": 1}', *lines[1:]], "line 1 .* not a natskv backup"),
        (lambda lines: [lines[0].replace(b'"format":1', b'"format":9'), *lines[1:]], "format 9"),
        (lambda lines: [*lines, b'{"key": "late", "value": 1}'], "after the closing line"),
        (lambda lines: [], "empty file"),
        (lambda lines: [*lines[:5], b"\xff\xfe", *lines[6:]], "line 6 .* not UTF-8"),
    ],
)
def test_a_damaged_file_writes_nothing(
    kv: natskv.Bucket, target: natskv.Bucket, tmp_path: Path, damage: object, message: str
) -> None:
    kv.set_many({f"k{i:03d}": i for i in range(100)})
    good = tmp_path / "good.jsonl"
    kv.backup(good)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(damage(good.read_bytes().splitlines())))  # type: ignore[operator]
    before = target.status().last_revision
    with pytest.raises(BackupError, match=message):
        target.restore(bad, clear=True)
    assert target.status().last_revision == before and target.keys() == []


def test_missing_files_and_paths(target: natskv.Bucket, tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="cannot read"):
        target.restore(tmp_path / "nope.jsonl")
    with pytest.raises(natskv.InvalidArgumentError):
        target.restore(42)  # type: ignore[arg-type]


def test_a_failed_backup_leaves_no_file(kv: natskv.Bucket, tmp_path: Path) -> None:
    kv.set("a", 1)
    path = tmp_path / "x.jsonl"

    def fail(done: int, total: int | None) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        kv.backup(path, progress=fail)
    assert not path.exists() and not (tmp_path / "x.jsonl.partial").exists()


def _key_lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()[1:-1]]


def test_a_backup_holds_one_page_not_the_bucket(kv: natskv.Bucket, tmp_path: Path) -> None:
    # 20,000 keys with long names: a backup that lists every key first holds them all (and, for
    # a listing that large, an entry per key) at once; a streamed one holds about one page.
    names = [f"customer:{i:06d}:" + "x" * 80 for i in range(20_000)]
    for start in range(0, len(names), 5000):
        kv.set_many({key: {"n": i} for i, key in enumerate(names[start : start + 5000], start)})
    kv.backup(tmp_path / "warm.jsonl", "customer:00000*")  # connection, imports, caches
    tracemalloc.start()
    try:
        assert kv.backup(tmp_path / "big.jsonl") == len(names)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    listing = sum(sys.getsizeof(key) for key in names)  # the key names alone, ~2.6 MB
    assert peak < listing / 2, f"peak {peak} bytes while backing up {listing} bytes of key names"
    lines = _key_lines(tmp_path / "big.jsonl")
    assert [line["key"] for line in lines] == names and lines[-1]["value"] == {"n": 19_999}


@pytest.mark.bucket(history=1)
def test_writes_during_a_backup(kv: natskv.Bucket, target: natskv.Bucket, tmp_path: Path) -> None:
    # history=1: a key overwritten before the backup reaches it loses the revision the backup was
    # about to read; it must still be in the file, once, like every other key.
    expected: dict[str, object] = {f"k:{i:04d}": i for i in range(5000)}
    kv.set_many(expected)
    kv.set("gone", 1)
    kv.delete("gone")  # deleted before the backup: absent

    def write_meanwhile(done: int, total: int | None) -> None:
        if done != 1000:
            return  # once, after the first page: k:0000-k:0999 are in the file, the rest not yet
        for i in [*range(0, 100), *range(4000, 4100)]:  # already written; not yet reached
            kv.set(f"k:{i:04d}", {"new": i})
            expected[f"k:{i:04d}"] = {"new": i}
        for i in [*range(500, 550), *range(4500, 4550)]:
            kv.delete(f"k:{i:04d}")
            del expected[f"k:{i:04d}"]
        for i in range(10):
            kv.create(f"new:{i}", i)
            expected[f"new:{i}"] = i

    path = tmp_path / "busy.jsonl"
    written = kv.backup(path, progress=write_meanwhile)
    lines = _key_lines(path)
    keys = [line["key"] for line in lines]
    assert len(keys) == len(set(keys)) == written == len(expected)
    assert {line["key"]: line["value"] for line in lines} == expected
    assert target.restore(path) == len(expected)
    assert target.get_many(list(expected)) == expected


def test_patterns_deletes_and_ttls(kv: natskv.Bucket, tmp_path: Path) -> None:
    kv.set_many({"user:1": 1, "user:22": 22, "user:3": 3, "order:1": "o"})
    kv.set("user:4", 4, ttl=3600)
    kv.delete("user:3")
    kv.set("user:5", 5, ttl=1)
    time.sleep(1.2)  # user:5 expires (its marker may not be written yet: a backup skips it either way)
    kv.backup(tmp_path / "all.jsonl", "user:*")
    lines = {line["key"]: line for line in _key_lines(tmp_path / "all.jsonl")}
    assert sorted(lines) == ["user:1", "user:22", "user:4"]
    assert 3500 < lines["user:4"]["ttl"] <= 3600 and "ttl" not in lines["user:1"]  # type: ignore[operator]
    assert kv.backup(tmp_path / "one.jsonl", "user:?") == 2  # a glob the server cannot filter
    assert sorted(line["key"] for line in _key_lines(tmp_path / "one.jsonl")) == ["user:1", "user:4"]
    assert kv.backup(tmp_path / "none.jsonl", "nobody:*") == 0
    assert _key_lines(tmp_path / "none.jsonl") == []
    with pytest.raises(natskv.InvalidKeyError):
        kv.backup(tmp_path / "bad.jsonl", "user:[")
    assert not (tmp_path / "bad.jsonl").exists()
