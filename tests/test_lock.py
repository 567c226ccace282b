"""Distributed locks (``db.lock``) against the real server: exclusion across processes, expiry of a
holder killed with SIGKILL, waiting woken by the watch, and the owner-only release."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import natskv
import natskv.lock
from natskv import InvalidArgumentError, InvalidKeyError, LockNotOwnedError, NatsKVTimeoutError

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def locks(db: natskv.Client, name: str) -> Iterator[str]:
    """The name of a locks bucket of this test's own, deleted afterwards."""
    yield name
    db.delete_bucket(name)


def test_a_held_lock_excludes_others_until_released(db: natskv.Client, locks: str) -> None:
    first = db.lock("report", bucket=locks)
    with first:
        assert first.owned() and first.locked()
        other = db.lock("report", bucket=locks)
        assert other.acquire(blocking=False) is False
        assert other.acquire(timeout=0.3) is False
        assert not other.owned() and other.locked()
        assert db.lock("another", bucket=locks).acquire(blocking=False)  # names are independent
        holder = db.bucket(locks).get("report")
        assert holder["pid"] == os.getpid() and len(holder["owner"]) == 32
    assert not first.locked() and not first.owned()
    assert other.acquire(blocking=False)
    other.release()


def test_a_with_block_that_cannot_get_the_lock_raises(db: natskv.Client, locks: str) -> None:
    held = db.lock("busy", bucket=locks)
    held.acquire()
    ran = []
    waits = db.lock("busy", bucket=locks, timeout=0.2)
    with pytest.raises(NatsKVTimeoutError, match="held by another holder"), waits:
        ran.append(1)
    skips = db.lock("busy", bucket=locks, blocking=False)
    with pytest.raises(NatsKVTimeoutError, match="blocking=False"), skips:
        ran.append(1)
    assert ran == []
    held.release()


def test_release_only_by_the_holder(db: natskv.Client, locks: str) -> None:
    lock = db.lock("x", bucket=locks)
    with pytest.raises(LockNotOwnedError, match="does not hold"):
        lock.release()
    with pytest.raises(LockNotOwnedError, match="does not hold"):
        lock.extend()
    lock.acquire()
    lock.release()
    with pytest.raises(LockNotOwnedError):
        lock.release()  # twice


def test_a_holder_whose_ttl_ran_out_cannot_release_the_next_holders_lock(db: natskv.Client, locks: str) -> None:
    slow = db.lock("job", bucket=locks, ttl=1)
    slow.acquire()
    fast = db.lock("job", bucket=locks, timeout=10)
    assert fast.acquire()  # once the slow holder's TTL ran out
    assert not slow.owned()
    with pytest.raises(LockNotOwnedError, match="TTL of 1 s ran out"):
        slow.release()
    assert fast.owned()  # untouched by the late release
    fast.release()


def test_extend_holds_the_lock_past_its_ttl(db: natskv.Client, locks: str) -> None:
    lock = db.lock("long", bucket=locks, ttl=1)
    lock.acquire()
    for _ in range(4):
        time.sleep(0.5)
        lock.extend(2)
    assert lock.owned()  # 2 s after acquiring with ttl=1
    assert db.lock("long", bucket=locks).acquire(blocking=False) is False
    lock.release()
    lost = db.lock("lost", bucket=locks, ttl=1)
    lost.acquire()
    time.sleep(2.5)
    with pytest.raises(LockNotOwnedError, match="could not be extended"):
        lost.extend()
    with pytest.raises(LockNotOwnedError):
        lost.release()  # extend() found it lost: no longer held by this object


def test_a_waiter_is_woken_by_the_release_without_polling(
    db: natskv.Client, locks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = db.lock("w", bucket=locks, ttl=60)
    holder.acquire()
    tries: list[float] = []
    real = natskv.lock.Lock._try_create

    def counted(self: natskv.lock.Lock, *args: object) -> int:
        tries.append(time.monotonic())
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(natskv.lock.Lock, "_try_create", counted)
    got: list[float] = []
    waiter = threading.Thread(target=lambda: got.append(db.lock("w", bucket=locks, timeout=30).acquire()
                                                        and time.monotonic()))
    waiter.start()
    time.sleep(1.5)
    released = time.monotonic()
    holder.release()
    waiter.join(10)
    assert got and got[0] and got[0] >= released
    # One try before the wait, one after the release: the 1.5 s wait was no polling loop.
    assert len(tries) == 2, tries


def test_a_waiter_follows_a_holder_that_extends(db: natskv.Client, locks: str) -> None:
    holder = db.lock("e", bucket=locks, ttl=1)
    holder.acquire()
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(0.3):
            holder.extend(1)

    keeper = threading.Thread(target=keep)
    keeper.start()
    try:
        assert db.lock("e", bucket=locks, timeout=2.5).acquire() is False  # never free in 2.5 s
    finally:
        stop.set()
        keeper.join()
    assert holder.owned()
    holder.release()


def test_lock_names_with_pattern_characters_are_exact(db: natskv.Client, locks: str) -> None:
    star = db.lock("job*", bucket=locks)
    plain = db.lock("job1", bucket=locks)
    assert star.acquire() and plain.acquire()
    waiter = db.lock("job*", bucket=locks, timeout=10)
    done: list[bool] = []
    thread = threading.Thread(target=lambda: done.append(waiter.acquire()))
    thread.start()
    plain.release()  # another name: must not wake the waiter into taking "job*"
    time.sleep(0.3)
    assert done == []
    star.release()
    thread.join(10)
    assert done == [True]
    waiter.release()


def test_bad_arguments_fail_before_anything_is_written(db: natskv.Client, locks: str) -> None:
    bucket = db.bucket(locks)
    before = bucket.status().last_revision
    for ttl in (0, -1, math.nan, "30"):
        with pytest.raises(InvalidArgumentError, match="ttl"):
            db.lock("a", bucket=locks, ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        db.lock(42, bucket=locks)  # type: ignore[arg-type]
    lock = db.lock("a", bucket=locks)
    lock.acquire()
    with pytest.raises(InvalidArgumentError, match="ttl"):
        lock.extend(0)
    assert lock.owned()
    lock.release()
    assert bucket.status().last_revision == before + 2  # the acquire and the release only


INCREMENT_UNDER_LOCK = """
    import sys, natskv
    db = natskv.connect(sys.argv[1])
    kv = db.bucket(sys.argv[2])
    for _ in range(int(sys.argv[3])):
        with db.lock("guard", bucket=sys.argv[2], ttl=10, timeout=60):
            value = kv.get("total", 0)   # a read-modify-write that is only safe under the lock
            kv.set("total", value + 1)
    db.close()
    print("done")
"""


@pytest.mark.slow
def test_four_processes_increment_exactly_under_the_lock(nats_url: str, db: natskv.Client, locks: str) -> None:
    rounds = 50
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(INCREMENT_UNDER_LOCK), nats_url, locks,
                               str(rounds)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out == "done\n", err
    assert db.bucket(locks).get("total") == 4 * rounds


HOLD_UNTIL_KILLED = """
    import sys, time, natskv
    db = natskv.connect(sys.argv[1])
    lock = db.lock("crash", bucket=sys.argv[2], ttl=2)
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_holder_killed_with_sigkill_frees_the_lock_within_its_ttl(
    nats_url: str, db: natskv.Client, locks: str
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD_UNTIL_KILLED), nats_url, locks],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        held_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        lock = db.lock("crash", bucket=locks, timeout=15)
        assert lock.locked()  # the dead holder's key is still there
        assert lock.acquire()
        # Its TTL is 2 s; the server expires whole seconds on a sweep.
        assert time.monotonic() - held_at < 2 + 1.5
        lock.release()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
