"""natskv.watermarks against the real server: forward-only versions, from threads and processes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from hypothesis import given
from hypothesis import strategies as st

import natskv
from natskv.watermarks import LexiVersion, Watermark, WatermarkStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(db: natskv.Client, name: str) -> Iterator[WatermarkStore]:
    yield WatermarkStore(db, bucket=name)
    db.delete_bucket(name)


def test_a_watermark_only_moves_forward(store: WatermarkStore) -> None:
    assert store.get("orders") is None
    assert store.set("orders", "b10", {"batch": 1}) is True
    mark = store.get("orders")
    assert mark is not None and (mark.key, mark.version, mark.data) == ("orders", "b10", {"batch": 1})
    assert mark.timestamp is not None and mark.timestamp.tzinfo is not None
    assert store.set("orders", "a9") is False  # lower: ignored, nothing written
    assert store.set("orders", "b10") is False  # equal: ignored
    assert store.get("orders") == mark
    assert store.set("orders", "b11") is True
    assert store.get("orders").version == "b11"  # type: ignore[union-attr]
    assert store.set("orders", "a1", force=True) is True  # a deliberate reset
    assert store.get("orders").version == "a1"  # type: ignore[union-attr]


def test_delete_get_all_and_bad_input(store: WatermarkStore) -> None:
    store.set("a", "x")
    store.set("b", "y", [1, 2])
    assert {k: (w.version, w.data) for k, w in store.get_all().items()} == {"a": ("x", None), "b": ("y", [1, 2])}
    store.delete("a")
    assert store.get("a") is None and list(store.get_all()) == ["b"]
    assert store.set("a", "0")  # starts again from any version
    revision = store.bucket.status().last_revision
    with pytest.raises(natskv.InvalidArgumentError, match="LexiVersion"):
        store.set("a", 5)  # type: ignore[arg-type]
    with pytest.raises(natskv.SerializationError):
        store.set("a", "z", data=float("nan"))
    assert store.bucket.status().last_revision == revision


def test_watch_iterates_and_calls_back(store: WatermarkStore) -> None:
    store.set("k", "a1")
    with store.watch() as watch:
        first = watch.get(5)
        assert first is not None and (first.key, first.version) == ("k", "a1")
        store.set("k", "a2")
        second = watch.get(5)
        assert second is not None and second.version == "a2"
        store.delete("k")
        gone = watch.get(5)
        assert gone is not None and gone.deleted and gone.version is None
    seen: list[Watermark] = []
    done = threading.Event()

    def on_mark(mark: Watermark) -> None:
        assert threading.current_thread() is not threading.main_thread()
        seen.append(mark)
        if mark.version == "a4":
            done.set()

    with store.watch(on_mark, updates_only=True):
        store.set("k", "a3")
        store.set("k", "a4")
        assert done.wait(5)
    assert [m.version for m in seen] == ["a3", "a4"]


WRITER = """
    import random, sys, natskv
    from natskv.watermarks import LexiVersion, WatermarkStore
    db = natskv.connect(sys.argv[1])
    store = WatermarkStore(db, bucket=sys.argv[2])
    rng = random.Random(int(sys.argv[3]))
    moved = 0
    for _ in range(60):
        moved += store.set("offset", LexiVersion.encode(rng.randrange(10_000)))
    db.close()
    print(moved)
"""


@pytest.mark.slow
def test_concurrent_writers_in_processes_never_move_it_backwards(nats_url: str, store: WatermarkStore) -> None:
    versions: list[str] = []
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with store.watch(lambda mark: versions.append(mark.version or ""), updates_only=True):
        procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), nats_url, store.bucket.name,
                                   str(seed)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for seed in range(4)]
        outputs = [proc.communicate(timeout=120) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
        final = store.get("offset")
        assert final is not None
        expected = max(LexiVersion.encode(random.Random(seed).randrange(10_000)) for seed in range(4))
        assert final.version is not None and final.version >= expected
        moves = sum(int(out) for out, _ in outputs)
        assert wait_until(lambda: len(versions) >= moves, 10)
    assert len(versions) == moves  # every move seen once
    assert versions == sorted(versions) and len(set(versions)) == len(versions)  # strictly forward
    assert versions[-1] == final.version


@given(st.integers(min_value=0, max_value=LexiVersion.MAX), st.integers(min_value=0, max_value=LexiVersion.MAX))
def test_lexiversion_order_is_numeric_order(a: int, b: int) -> None:
    ea, eb = LexiVersion.encode(a), LexiVersion.encode(b)
    assert (ea < eb) == (a < b) and (ea == eb) == (a == b)
    assert LexiVersion.decode(ea) == a


@pytest.mark.parametrize("bad", [-1, 10**26, 1.0, True, "5"])
def test_lexiversion_refuses_what_it_cannot_order(bad: object) -> None:
    with pytest.raises(natskv.InvalidArgumentError):
        LexiVersion.encode(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "a", "b1", "a01", "A1", "a1x", 7])
def test_lexiversion_decode_refuses_other_strings(bad: object) -> None:
    with pytest.raises(natskv.InvalidArgumentError):
        LexiVersion.decode(bad)  # type: ignore[arg-type]
