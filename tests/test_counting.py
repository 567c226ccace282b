"""Counting: ``Bucket.incr`` / ``decr`` (a compare-and-set loop on an ordinary key) and
``Counter`` (the server's counter streams, nats-server 2.12), against the real server, from
threads and from several processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import natskv
from natskv import InvalidArgumentError, InvalidKeyError

REPO = Path(__file__).resolve().parents[1]


def run_processes(script: str, *args: str, count: int, timeout: float = 90.0) -> list[str]:
    """Run ``script`` in ``count`` processes at once; their outputs, each checked to have ended well."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"a worker failed:\n{err}"
        outputs.append(out)
    return outputs


# -- Bucket.incr / decr -----------------------------------------------------------------------------


def test_incr_starts_a_missing_key_at_zero_and_keeps_an_int(kv: natskv.Bucket) -> None:
    assert kv.incr("hits") == 1
    assert kv.incr("hits", 41) == 42
    assert kv.decr("hits") == 41
    assert kv.decr("hits", 50) == -9
    assert kv.get("hits") == -9  # an ordinary value, read like any other
    kv.set("hits", 100)
    assert kv.incr("hits", 0) == 100
    assert kv.incr("big", 2**62) == 2**62


def test_incr_counts_a_deleted_or_purged_key_from_zero(kv: natskv.Bucket) -> None:
    kv.set("a", 7)
    kv.delete("a")
    assert kv.incr("a") == 1
    kv.purge("a")
    assert kv.incr("a", 3) == 3


@pytest.mark.parametrize("stored", ["seven", 1.5, True, None, [1], {"n": 1}, b"\x01"])
def test_incr_of_a_value_that_is_not_an_int_changes_nothing(kv: natskv.Bucket, stored: object) -> None:
    rev = kv.set("v", stored)
    with pytest.raises(InvalidArgumentError, match="not an int"):
        kv.incr("v")
    with pytest.raises(InvalidArgumentError, match="not an int"):
        kv.decr("v")
    entry = kv.entry("v")
    assert entry is not None and entry.revision == rev and entry.value == stored


@pytest.mark.parametrize("by", [1.0, True, "1", None])
def test_incr_by_must_be_an_int_and_nothing_is_sent(kv: natskv.Bucket, by: object) -> None:
    kv.set("n", 1)
    before = kv.status().last_revision
    with pytest.raises(InvalidArgumentError, match=r"by=\.\.\.\) takes an int"):
        kv.incr("n", by)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"by=\.\.\.\) takes an int"):
        kv.decr("n", by)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        kv.incr(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="ttl"):
        kv.incr("n", ttl=0)
    assert kv.status().last_revision == before and kv.get("n") == 1


def test_incr_with_ttl_sets_a_new_expiry(kv: natskv.Bucket) -> None:
    kv.set("short", 5)
    assert kv.incr("short", ttl=1) == 6
    deadline = time.monotonic() + 10
    while kv.get("short") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kv.get("short") is None
    assert kv.incr("short") == 1  # expired: counts from zero again, and no longer expires
    time.sleep(1.5)
    assert kv.get("short") == 1


def test_incr_keeps_the_expiry_the_key_had_without_creeping(kv: natskv.Bucket) -> None:
    """Each write restarts a per-key TTL, and the server counts whole seconds: an incr that
    rewrote "the time left, rounded up" would push the expiry later at every call."""
    start = time.monotonic()
    kv.set("rate", 0, ttl=3)
    count = 0
    while time.monotonic() - start < 2.7:
        count += 1
        assert kv.incr("rate") == count  # never expired in between
        time.sleep(0.2)
    # Correct: gone by 3 s (+ up to 1 s of rounding, + the server's expiry sweep). Creeping
    # expiries would keep it until about 2.7 + 3 s.
    while kv.get("rate") is not None and time.monotonic() - start < 10:
        time.sleep(0.05)
    assert kv.get("rate") is None
    assert time.monotonic() - start < 4.9, "the key outlived its expiry: incr pushed it later"


def test_incr_from_threads_loses_nothing(kv: natskv.Bucket) -> None:
    threads, each = 16, 25

    def work() -> None:
        for _ in range(each):
            kv.incr("shared")
            kv.decr("down")

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert kv.get("shared") == threads * each
    assert kv.get("down") == -threads * each


INCR_WORKER = """
    import sys, threading, natskv
    db = natskv.connect(sys.argv[1])
    kv = db.bucket(sys.argv[2])
    counter = db.counter("jobs", bucket=sys.argv[2])
    def work():
        for _ in range(int(sys.argv[3])):
            kv.incr("hits")
            counter.incr(2)
    pool = [threading.Thread(target=work) for _ in range(16)]
    for t in pool: t.start()
    for t in pool: t.join()
    db.close()
    print("done")
"""


@pytest.mark.slow
def test_incr_and_counter_exact_under_16_threads_in_3_processes(nats_url: str, kv: natskv.Bucket) -> None:
    each = 15
    outputs = run_processes(INCR_WORKER, nats_url, kv.name, str(each), count=3)
    assert outputs == ["done\n"] * 3
    assert kv.get("hits") == 3 * 16 * each
    assert kv.counter("jobs").value() == 3 * 16 * each * 2


def test_incr_timeout_is_checked(kv: natskv.Bucket) -> None:
    with pytest.raises(InvalidArgumentError):
        kv.incr("n", timeout=-1)
    assert kv.get("n") is None


# -- Counter -----------------------------------------------------------------------------------------


def test_counter_adds_on_the_server(db: natskv.Client, kv: natskv.Bucket) -> None:
    views = kv.counter("page:views")
    assert repr(views) == f"<natskv.Counter 'page:views' of bucket {kv.name!r}>"
    assert views.value() == 0
    assert views.incr() == 1
    assert views.incr(10) == 11
    assert views.decr(3) == 8
    assert views.decr(20) == -12
    assert views.value() == -12
    assert views.incr(2**70) == 2**70 - 12  # the server's counters are big integers
    views.reset()
    assert views.value() == 0
    assert views.incr() == 1
    # Its own stream: not a key of the bucket, and independent of a key of the same name.
    assert kv.keys() == []
    kv.set("page:views", "a value")
    assert kv.counter("page:views").value() == 1
    assert db.counter("page:views", bucket=kv.name).value() == 1
    assert kv.counter("other").value() == 0


@pytest.mark.parametrize("by", [1.5, True, "2", None])
def test_counter_by_must_be_an_int(kv: natskv.Bucket, by: object) -> None:
    views = kv.counter("v")
    views.incr()
    with pytest.raises(InvalidArgumentError, match="takes an int"):
        views.incr(by)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="takes an int"):
        views.decr(by)  # type: ignore[arg-type]
    assert views.value() == 1


def test_counter_names_follow_key_rules(kv: natskv.Bucket) -> None:
    with pytest.raises(InvalidKeyError):
        kv.counter(7)  # type: ignore[arg-type]
    odd = kv.counter("a b*c")  # encoded like a key
    assert odd.incr(4) == 4 and odd.value() == 4


def test_counters_and_autoincrement_share_a_stream_without_meeting(db: natskv.Client, name: str) -> None:
    class Ticket(natskv.Model):
        id = natskv.Field(int, primary_key=True, generated="autoincrement")
        title = natskv.Field(str)

    db.register(Ticket, bucket=name)
    try:
        first = Ticket.create(title="a")
        named = db.counter("id", bucket=name)  # the name of the autoincrement field
        assert named.incr(100) == 100
        second = Ticket.create(title="b")
        assert second.id == first.id + 1
        assert named.value() == 100
    finally:
        db.delete_bucket(name)
