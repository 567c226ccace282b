"""Threads, the loop thread, fork, interpreter exit and Ctrl-C, against a real nats-server."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import child_exit_code, default_sigint

import natskv
from natskv import DeadlockError, NatsKVError, NotConnectedError, RevisionMismatchError
from natskv._runner import runner
from natskv.wire import jsapi

REPO = Path(__file__).resolve().parent.parent
# history 1, db.bucket()'s default (the kv fixture lives in conftest.py)
pytestmark = pytest.mark.bucket()


def run_threads(n: int, target: Callable[[int], None], timeout: float = 60.0) -> list[BaseException]:
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            start.wait(10)
            target(i)
        except BaseException as exc:  # reported to the test
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.0))
    alive = [t for t in threads if t.is_alive()]
    assert not alive, f"{len(alive)} threads still running after {timeout} s"
    return errors


def run_script(script: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


# -- threads ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_32_threads_mixed_operations_with_cas_counter(kv: natskv.Bucket) -> None:
    threads, rounds = 32, 15
    kv.create("counter", 0)
    conflicts = [0] * threads

    def worker(i: int) -> None:
        rng = random.Random(i)
        own = f"thread:{i}"
        for r in range(rounds):
            # CAS increment, retried on conflict
            while True:
                e = kv.entry("counter")
                assert e is not None
                try:
                    kv.update("counter", e.value + 1, e.revision)
                    break
                except RevisionMismatchError as exc:
                    assert exc.current_revision is None or exc.current_revision > e.revision
                    conflicts[i] += 1
            # mixed traffic on the same connection
            op = rng.randrange(6)
            if op == 0:
                kv.set(own, {"r": r, "i": i})
                assert kv.get(own) == {"r": r, "i": i}
            elif op == 1:
                kv.set_many({f"{own}:a": r, f"{own}:b": r})
                assert kv.get_many([f"{own}:a", f"{own}:b"]) == {f"{own}:a": r, f"{own}:b": r}
            elif op == 2:
                assert "counter" in kv.keys("count*")
            elif op == 3:
                kv.set(f"{own}:tmp", r)
                kv.delete(f"{own}:tmp")
                assert kv.get(f"{own}:tmp") is None
            elif op == 4:
                assert kv.replace("counter:missing", 1) is False
            else:
                assert isinstance(kv.get("counter"), int)
        kv.set(own, "done")

    errors = run_threads(threads, worker)
    assert errors == [], errors[:3]
    assert kv.get("counter") == threads * rounds
    assert kv.get_many([f"thread:{i}" for i in range(threads)]) == {f"thread:{i}": "done" for i in range(threads)}
    assert sum(conflicts) > 0  # the threads really contended
    hist = kv.history("counter")
    assert hist[-1].value == threads * rounds


def test_racing_creates_and_commits_have_one_winner(kv: natskv.Bucket) -> None:
    winners: list[int] = []
    commit_winners: list[int] = []
    lock = threading.Lock()

    def racer(i: int) -> None:
        try:
            kv.create("lock", i)
            with lock:
                winners.append(i)
        except natskv.KeyExistsError:
            pass
        try:
            kv.commit([("create", "unique:email", i), ("set", f"owner:{i}", i)])
            with lock:
                commit_winners.append(i)
        except natskv.KeyExistsError as exc:
            assert exc.key == "unique:email"

    assert run_threads(12, racer) == []
    assert len(winners) == 1 and kv.get("lock") == winners[0]
    assert len(commit_winners) == 1
    (w,) = commit_winners
    assert kv.get("unique:email") == w
    assert kv.keys("owner:*") == [f"owner:{w}"]


@pytest.mark.slow
def test_16_threads_of_concurrent_gets_get_the_right_values(kv: natskv.Bucket) -> None:
    data = {f"key:{i}": {"i": i, "pad": "x" * (i % 50)} for i in range(300)}
    kv.set_many(data)
    keys = list(data)
    counts = [0] * 16

    def reader(t: int) -> None:
        rng = random.Random(t)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            k = rng.choice(keys)
            assert kv.get(k) == data[k], k
            counts[t] += 1
            if counts[t] % 50 == 0:
                some = rng.sample(keys, 20)
                assert kv.get_many(some) == {x: data[x] for x in some}
                assert kv.get("absent:key", "dflt") == "dflt"

    errors = run_threads(16, reader)
    assert errors == [], errors[:3]
    assert all(c > 20 for c in counts), counts


def test_threads_and_watch_together(kv: natskv.Bucket) -> None:
    """Writes from 8 threads all reach one watcher exactly once, in revision order."""
    with kv.watch("w:*") as w:
        first = w.get(timeout=5)
        assert first is not None and first.initial_done
        revs: list[int] = []
        lock = threading.Lock()

        def writer(t: int) -> None:
            for j in range(25):
                r = kv.set(f"w:{t}:{j}", j)
                with lock:
                    revs.append(r)

        assert run_threads(8, writer) == []
        seen = []
        while len(seen) < len(revs):
            ch = w.get(timeout=5)
            assert ch is not None, f"only {len(seen)} of {len(revs)} changes arrived"
            seen.append(ch.revision)
        assert seen == sorted(revs)
        assert w.get(timeout=0.2) is None


def test_watchers_started_and_stopped_from_many_threads(db: natskv.Client, kv: natskv.Bucket) -> None:
    """Watchers of one filter share a consumer; starting and stopping them concurrently while
    another thread writes never loses the initial values or leaves a consumer behind."""
    kv.set_many({f"s:{i}": i for i in range(50)})
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            kv.set(f"s:{n % 50}", 1000 + n)
            n += 1

    wt = threading.Thread(target=writer, daemon=True)
    wt.start()

    def watcher(t: int) -> None:
        for _ in range(15):
            w = kv.watch("s:*", updates_only=(t % 4 == 3))
            try:
                keys = set()
                while t % 4 != 3:  # updates_only has no initial values and no marker
                    ch = w.get(timeout=5)
                    assert ch is not None, "no initial_done marker"
                    if ch.initial_done:
                        break
                    keys.add(ch.key)
                if t % 4 != 3:
                    assert keys == {f"s:{i}" for i in range(50)}
                ch = w.get(timeout=5)  # the writer keeps going: a live change arrives
                assert ch is not None and ch.key.startswith("s:") and not ch.initial_done
            finally:
                w.stop()

    try:
        errors = run_threads(12, watcher)
    finally:
        stop.set()
        wt.join(5)
    assert errors == [], errors[:3]
    assert jsapi.call(db._conn, f"STREAM.INFO.KV_{kv.name}", None, 5)["state"]["consumer_count"] == 0


# -- the loop thread ------------------------------------------------------------------------------


def test_blocking_call_from_the_loop_thread_raises_deadlock_error(db: natskv.Client, kv: natskv.Bucket) -> None:
    kv.set("k", 1)
    w = kv.watch()
    results: dict[str, Any] = {}
    done = threading.Event()

    def on_loop() -> None:
        results["thread"] = threading.current_thread().name
        for label, call in [
            ("get", lambda: kv.get("k")),
            ("set", lambda: kv.set("k", 2)),
            ("keys", kv.keys),
            ("bucket", lambda: db.bucket(kv.name)),
            ("watch", kv.watch),
            ("watcher.get", lambda: w.get(timeout=1)),
        ]:
            t0 = time.monotonic()
            try:
                call()
                results[label] = None
            except BaseException as exc:  # recorded for the test
                results[label] = exc
            results[label + ":elapsed"] = time.monotonic() - t0
        done.set()

    try:
        runner.loop.call_soon_threadsafe(on_loop)
        assert done.wait(10), "the loop thread is stuck: a blocking call from it deadlocked"
    finally:
        w.stop()
    assert results["thread"] == "natskv-loop"
    for label in ("get", "set", "keys", "bucket", "watch", "watcher.get"):
        exc = results[label]
        assert isinstance(exc, DeadlockError), f"{label}: {exc!r}"
        assert isinstance(exc, NatsKVError) and isinstance(exc, RuntimeError)
        assert results[label + ":elapsed"] < 0.5
    # nothing was written and the client still works
    assert kv.get("k") == 1


@pytest.fixture
def silent_subject(nats_url: str, name: str) -> Iterator[str]:
    """A subject with a subscriber that never answers: requests to it wait for their timeout."""
    import socket

    host, port = nats_url.rsplit("//", 1)[1].rsplit(":", 1)
    subject = f"silent.{name}"
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(f'CONNECT {{"verbose":false}}\r\nSUB {subject} 1\r\nPING\r\n'.encode())
    buf = b""
    while b"PONG" not in buf:
        buf += s.recv(4096)
    try:
        yield subject
    finally:
        s.close()


def test_close_releases_threads_blocked_in_calls(nats_url: str, name: str, silent_subject: str) -> None:
    c = natskv.connect(nats_url)
    kv = c.bucket(name)
    kv.set("k", 1)
    w = kv.watch("nothing:*")
    assert w.get(timeout=5).initial_done
    outcome: dict[str, Any] = {}

    def blocked_request() -> None:
        t0 = time.monotonic()
        try:
            c.request(silent_subject, b"?", timeout=30)
            outcome["request"] = "returned"
        except BaseException as exc:  # checked below
            outcome["request"] = exc
        outcome["request_took"] = time.monotonic() - t0

    def blocked_watch() -> None:
        t0 = time.monotonic()
        outcome["watch"] = w.get(timeout=math.inf)
        outcome["watch_took"] = time.monotonic() - t0

    threads = [threading.Thread(target=f, daemon=True) for f in (blocked_request, blocked_watch)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    try:
        c.close(timeout=5)
        for t in threads:
            t.join(5)
        assert not any(t.is_alive() for t in threads), f"threads still blocked after close(): {outcome}"
        assert outcome["watch"] is None
        assert isinstance(outcome["request"], NotConnectedError), repr(outcome["request"])
        assert outcome["request_took"] < 3
    finally:
        with natskv.connect(nats_url) as other:
            other.delete_bucket(name)


# -- fork -------------------------------------------------------------------------------------

FORK_SCRIPT = r"""
import os, sys, threading, time
import natskv

url, bucket = sys.argv[1], sys.argv[2]
db = natskv.connect(url, timeout=5)
kv = db.bucket(bucket)
kv.set("parent:before", 1)
w = kv.watch("parent:*")
while True:
    ch = w.get(timeout=5)
    assert ch is not None, "no initial_done marker"
    if ch.initial_done:
        break

# keep the connection busy from other threads while forking
stop = threading.Event()
busy_errors = []
def busy(i):
    try:
        n = 0
        while not stop.is_set():
            kv.set(f"busy:{i}", n)
            assert kv.get(f"busy:{i}") == n
            n += 1
    except BaseException as exc:
        busy_errors.append(exc)
threads = [threading.Thread(target=busy, args=(i,), daemon=True) for i in range(4)]
for t in threads:
    t.start()
time.sleep(0.2)

pid = os.fork()
if pid == 0:
    code = 1
    try:
        assert kv.get("parent:before") == 1
        r = kv.set("child:key", os.getpid())
        assert kv.entry("child:key").revision == r
        assert kv.get_many(["parent:before", "child:key"]) == {"parent:before": 1, "child:key": os.getpid()}
        assert "child:key" in kv.keys("child:*")
        with kv.watch("child:*") as cw:
            first = cw.get(timeout=5)
            assert first is not None and first.key == "child:key", first
        db.close()
        code = 0
    except BaseException as exc:
        import traceback
        traceback.print_exc()
        code = 3
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)

# parent: keeps working while the child runs
for i in range(50):
    kv.set("parent:during", i)
    assert kv.get("parent:during") == i
deadline = time.monotonic() + 20
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        print("child hung", flush=True)
        sys.exit(5)
    time.sleep(0.02)
stop.set()
for t in threads:
    t.join(5)
assert not busy_errors, busy_errors
child_code = os.waitstatus_to_exitcode(status)
assert child_code == 0, f"child exit code {child_code}"
assert kv.get("child:key") == pid
# the parent's own watch still delivers
kv.set("parent:after", 2)
seen = set()
deadline = time.monotonic() + 5
while "parent:after" not in seen and time.monotonic() < deadline:
    ch = w.get(timeout=1)
    if ch is not None:
        seen.add(ch.key)
assert "parent:after" in seen, seen
w.stop()
db.close()
print("ok", flush=True)
"""


@pytest.mark.slow
def test_forked_child_uses_inherited_client(nats_url: str, db: natskv.Client, name: str) -> None:
    try:
        proc = run_script(FORK_SCRIPT, nats_url, name, timeout=60)
        assert proc.returncode == 0, f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        assert proc.stdout.strip().endswith("ok")
        assert "Traceback" not in proc.stderr, proc.stderr
    finally:
        db.delete_bucket(name)


def test_fork_in_this_process(db: natskv.Client, kv: natskv.Bucket) -> None:
    """The same, forking the test process itself (which runs the loop thread and watches)."""
    kv.set("before", 1)
    pid = os.fork()
    if pid == 0:  # child: only os._exit, never return into pytest
        code = 1
        try:
            code = 2
            assert kv.get("before", timeout=3) == 1
            code = 3
            kv.set("from-child", os.getpid(), timeout=3)
            code = 0
        finally:
            os._exit(code)  # whatever happened: the exit code says how far the child got
    for i in range(20):
        kv.set("from-parent", i)
    code = child_exit_code(pid, 20, "the forked child hung using the inherited client")
    assert code == 0, {2: "the child's get failed", 3: "the child's set failed"}.get(code, code)
    assert kv.get("from-child") == pid
    assert kv.get("from-parent") == 19


# -- interpreter exit ------------------------------------------------------------------------------

EXIT_SCRIPT = r"""
import sys, threading, time
import natskv

url, bucket = sys.argv[1], sys.argv[2]
db = natskv.connect(url)
kv = db.bucket(bucket)
kv.set("k", 1)
it = kv.watch()
cb = kv.watch("k", callback=lambda ch: None)
assert it.get(timeout=5).key == "k"
# a daemon thread blocked in an endless watch.get() at exit
threading.Thread(target=lambda: [c for c in it], daemon=True).start()
# and one making calls in a loop until the client is closed at exit
def loop_calls():
    try:
        while True:
            kv.get("k")
    except natskv.NotConnectedError:
        pass
threading.Thread(target=loop_calls, daemon=True).start()
time.sleep(0.3)
print("exiting", flush=True)
"""


@pytest.mark.slow
def test_clean_exit_with_open_client_and_running_watches(nats_url: str, db: natskv.Client, name: str) -> None:
    try:
        t0 = time.monotonic()
        proc = run_script(EXIT_SCRIPT, nats_url, name, timeout=30)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, f"rc={proc.returncode}\nstderr: {proc.stderr}"
        assert proc.stdout.strip() == "exiting"
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "Exception ignored" not in proc.stderr, proc.stderr
        assert "Error" not in proc.stderr, proc.stderr
        assert elapsed < 8, f"exit took {elapsed:.1f} s"
        # the exiting client removed its watch consumers
        state = jsapi.call(db._conn, f"STREAM.INFO.KV_{name}", None, 5)["state"]
        assert state["consumer_count"] == 0
    finally:
        db.delete_bucket(name)


# -- Ctrl-C ----------------------------------------------------------------------------------------

INTERRUPT_SCRIPT = r"""
import math, socket, sys, time
import natskv

url, bucket, mode = sys.argv[1], sys.argv[2], sys.argv[3]
db = natskv.connect(url)
kv = db.bucket(bucket)
kv.set("k", 1)
if mode == "watch":
    w = kv.watch("nothing:*")
    assert w.get(timeout=5).initial_done
    blocking = lambda: w.get(timeout=math.inf)
else:
    # a subscriber that never answers: the request waits for its whole timeout
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.sendall(b'CONNECT {"verbose":false}\r\nSUB slow.subject 1\r\nPING\r\n')
    buf = b""
    while b"PONG" not in buf:
        buf += s.recv(4096)
    blocking = lambda: db.request("slow.subject", b"hi", timeout=60)
print("ready", flush=True)
t0 = time.monotonic()
try:
    blocking()
    print("returned", flush=True)
    sys.exit(1)
except KeyboardInterrupt:
    print(f"interrupted {time.monotonic() - t0:.2f}", flush=True)
# the client still works after the interrupt
kv.set("k", 2)
assert kv.get("k") == 2
print("still works", flush=True)
sys.exit(42)
"""


@pytest.mark.parametrize("mode", ["watch", "request"])
@pytest.mark.slow
def test_ctrl_c_interrupts_a_blocked_call(nats_url: str, db: natskv.Client, name: str, mode: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPT_SCRIPT, nats_url, name, mode],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_sigint if os.name == "posix" else None,  # noqa: PLW1509 - it only resets a signal handler
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", line + (proc.stderr.read() if proc.stderr else "")
        time.sleep(0.3)  # let it block
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"SIGINT did not interrupt the blocked {mode} call; stderr: {err}")
        elapsed = time.monotonic() - t0
        assert "interrupted" in out, f"stdout: {out}\nstderr: {err}"
        assert proc.returncode == 42, f"rc={proc.returncode}\nstdout: {out}\nstderr: {err}"
        assert "still works" in out
        assert elapsed < 3, f"took {elapsed:.1f} s to react to SIGINT"
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        db.delete_bucket(name)


# -- the loop ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("choice", "expected"), [
    ("", "uvloop" if sys.platform != "win32" else "asyncio"),  # uvloop is a dependency outside Windows
    ("asyncio", "asyncio"),
    ("uvloop", "uvloop"),
])
@pytest.mark.slow
def test_the_loop_thread_runs_the_chosen_loop(nats_url: str, choice: str, expected: str) -> None:
    script = """
        import sys, natskv
        db = natskv.connect(sys.argv[1])
        print(db.stats()["event_loop"])
        db.close()
    """
    env_choice = {} if not choice else {"NATSKV_LOOP": choice}
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NATSKV_LOOP", None)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), nats_url], cwd=REPO,
                            env={**env, **env_choice}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.slow
def test_an_unknown_loop_choice_is_refused(nats_url: str) -> None:
    result = run_script("""
        import os, sys, natskv
        os.environ["NATSKV_LOOP"] = "tokio"
        try:
            natskv.connect(sys.argv[1])
        except natskv.ConfigurationError as exc:
            print("refused:", exc)
    """, nats_url)
    assert "refused: NATSKV_LOOP='tokio' is not valid" in result.stdout, result.stderr
