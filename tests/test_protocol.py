"""natskv's frame reader inside nats-py's read loop, against a real nats-server.

natskv replaces the protocol parser of the nats-py version it knows (``Multiplexer``): MSG/HMSG
frames are split by ``_core.parse_frames``; natskv's own subscriptions are handled directly and
everything else goes to nats-py as its parser would hand it over. These tests drive nats-py's own
subscriptions, PING/PONG and large frames through that reader alongside natskv's traffic.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

import natskv
from natskv._runner import runner

# history 1, db.bucket()'s default (the kv fixture lives in conftest.py)
pytestmark = pytest.mark.bucket()


def nats_client(db: natskv.Client) -> Any:
    nc = db._conn.nc
    assert nc is not None
    return nc


def test_the_frame_reader_is_installed_on_the_known_nats_py(db: natskv.Client) -> None:
    from nats.aio.client import __version__ as nats_version

    nc = nats_client(db)
    expected = nats_version.startswith("2.16.") and os.environ.get("NATSKV_NO_PARSER_HOOK") != "1"
    assert db._conn.mux.hooked == expected
    assert (getattr(nc._ps.parse, "__module__", None) == "natskv.aio.mux") == expected


def test_nats_py_subscriptions_flush_and_large_values_pass_through(
    db: natskv.Client, kv: natskv.Bucket, name: str
) -> None:
    nc = nats_client(db)
    subject = f"plain.{name}"
    big = os.urandom(1000 * 1000)  # arrives in many socket reads

    async def exchange() -> list[tuple[str, str, bytes, dict[str, str] | None]]:
        got: list[tuple[str, str, bytes, dict[str, str] | None]] = []
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            got.append((msg.subject, msg.reply, msg.data, msg.headers))
            if len(got) == 4:
                done.set()

        sub = await nc.subscribe(subject + ".>", cb=on_msg)
        await nc.flush()  # PING / PONG through the reader
        await nc.publish(subject + ".a", b"one")
        await nc.publish(subject + ".b", b"", reply="reply.to", headers={"X-Kind": "empty"})
        await nc.publish(subject + ".c", big)
        await nc.publish(subject + ".d", b"MSG x 1 3\r\nabc\r\n", headers={"A": "1", "B": "two words"})
        await asyncio.wait_for(done.wait(), 10)
        await sub.unsubscribe()
        return got

    kv.set("big", big)  # natskv traffic before and after, on the same connection
    got = runner.call(exchange(), 20)
    assert got == [
        (subject + ".a", "", b"one", None),
        (subject + ".b", "reply.to", b"", {"X-Kind": "empty"}),
        (subject + ".c", "", big, None),
        (subject + ".d", "", b"MSG x 1 3\r\nabc\r\n", {"A": "1", "B": "two words"}),
    ]
    assert kv.get("big") == big
    assert kv.get_many(["big", "absent"]) == {"big": big}


def test_nats_py_request_reply_alongside_blocking_calls(db: natskv.Client, kv: natskv.Bucket, name: str) -> None:
    nc = nats_client(db)
    subject = f"svc.{name}"

    async def serve_and_ask() -> list[bytes]:
        async def handler(msg: Any) -> None:
            await msg.respond(msg.data.upper())

        sub = await nc.subscribe(subject, cb=handler)
        answers = [(await nc.request(subject, f"q{i}".encode(), timeout=5)).data for i in range(50)]
        await sub.unsubscribe()
        return answers

    for i in range(50):
        kv.set(f"k{i}", i)
    assert runner.call(serve_and_ask(), 30) == [f"Q{i}".encode() for i in range(50)]
    assert kv.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}


def reader_is_hooked(db: natskv.Client) -> bool:
    """Whether natskv's replies are read in the transport's callback (the connection's
    StreamReader.feed_data replaced), rather than by nats-py's read loop."""
    reader = getattr(nats_client(db)._transport, "_io_reader", None)
    return reader is not None and "feed_data" in vars(reader)


def test_replies_are_read_in_the_transport_callback(db: natskv.Client, kv: natskv.Bucket) -> None:
    kv.set("k", 1)
    assert kv.get("k") == 1
    assert reader_is_hooked(db) == db._conn.mux.hooked


def test_nats_py_messages_keep_their_order_among_many_concurrent_replies(
    db: natskv.Client, kv: natskv.Bucket, name: str
) -> None:
    # natskv's replies are delivered in the transport's callback; a chunk holding another
    # subscription's message or a protocol line goes to nats-py's read loop with all that
    # follows it, until that loop has caught up. Mixed traffic must keep its order both ways.
    nc = nats_client(db)
    subject = f"mixed.{name}"
    kv.set_many({f"k{i}": i for i in range(50)})
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(offset: int) -> None:
        try:
            i = offset
            while not stop.is_set():
                assert kv.get(f"k{i % 50}") == i % 50
                i += 1
        except BaseException as exc:
            errors.append(exc)

    async def exchange() -> list[bytes]:
        got: list[bytes] = []
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            got.append(msg.data)
            if len(got) == 500:
                done.set()

        sub = await nc.subscribe(subject, cb=on_msg)
        for i in range(500):
            await nc.publish(subject, str(i).encode())
            if i % 50 == 0:
                await nc.flush()  # PING / PONG in the middle of the replies
        await asyncio.wait_for(done.wait(), 20)
        await sub.unsubscribe()
        return got

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        got = runner.call(exchange(), 30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert got == [str(i).encode() for i in range(500)]
    assert kv.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}


def test_the_reader_is_hooked_again_after_a_reconnect(fresh_server: natskv.EmbeddedServer) -> None:
    with natskv.connect(fresh_server.url) as db:
        kv = db.bucket("again", storage="file")
        kv.set("k", "before")
        assert kv.get("k") == "before"
        old_reader = nats_client(db)._transport._io_reader
        fresh_server.restart()
        deadline = time.monotonic() + 20
        while True:
            try:
                kv.set("k", "after", timeout=2)
                break
            except natskv.NatsKVError:
                if time.monotonic() > deadline:
                    raise
        assert kv.get("k") == "after"
        assert nats_client(db)._transport._io_reader is not old_reader
        assert reader_is_hooked(db) == db._conn.mux.hooked


def test_a_timed_out_request_leaves_the_next_one_on_its_thread_its_own_reply(
    db: natskv.Client, kv: natskv.Bucket, name: str
) -> None:
    # Each thread reuses its request waiter; one whose request timed out may still be
    # released by the late reply, so it must never serve the thread's next request.
    nc = nats_client(db)
    subject = f"slow.{name}"

    async def serve() -> Any:
        async def handler(msg: Any) -> None:
            await asyncio.sleep(0.3)
            await msg.respond(b"late")

        return await nc.subscribe(subject, cb=handler)

    sub = runner.call(serve(), 5)
    try:
        kv.set("k", "mine")
        for _ in range(3):
            with pytest.raises(natskv.NatsKVTimeoutError):
                db.request(subject, b"?", timeout=0.05)
            assert kv.get("k") == "mine"
            time.sleep(0.35)  # the late reply arrives meanwhile
            assert kv.get("k") == "mine"
            assert kv.get_many(["k"]) == {"k": "mine"}
    finally:
        runner.call(sub.unsubscribe(), 5)


# -- the caller-side send ---------------------------------------------------------------------


def direct_path_expected(db: natskv.Client) -> bool:
    """Whether this client's caller threads may write to the socket themselves: natskv's frame
    reader is installed, the connection is plain TCP, and NATSKV_NO_DIRECT_WRITE is not set."""
    return db._conn.mux.hooked and os.environ.get("NATSKV_NO_DIRECT_WRITE") != "1"


def count_loop_wakeups(mux: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    woken = [0]
    wake = mux._wake_writer

    def counting() -> None:
        woken[0] += 1
        wake()

    monkeypatch.setattr(mux, "_wake_writer", counting)
    return woken


def test_a_lone_request_is_written_by_its_callers_thread(
    db: natskv.Client, kv: natskv.Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    mux = db._conn.mux
    kv.set("k", "v")
    woken = count_loop_wakeups(mux, monkeypatch)
    for i in range(50):
        kv.set("k", i)
        assert kv.get("k") == i
    if direct_path_expected(db):
        assert mux._fd >= 0
        assert woken[0] == 0  # the loop thread was never asked to write
    else:
        assert woken[0] == 100


def test_a_partial_write_leaves_its_end_to_the_loop_on_the_same_connection(
    db: natskv.Client, kv: natskv.Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The socket takes only part of what a caller writes: the loop thread writes the rest before
    # anything else, so the server still reads whole commands.
    from natskv.aio import mux as mux_module

    assert direct_path_expected(db), (
        "the caller-side send needs natskv's frame reader on plain TCP, with NATSKV_NO_DIRECT_WRITE "
        "and NATSKV_NO_PARSER_HOOK unset"
    )
    real_write = os.write
    partial = [0]

    def short_write(fd: int, data: bytes) -> int:
        partial[0] += 1
        return real_write(fd, data[: max(1, len(data) // 3)])

    monkeypatch.setattr(mux_module.os, "write", short_write)
    for i in range(20):
        kv.set(f"k{i}", "x" * (i * 50))
    monkeypatch.setattr(mux_module.os, "write", real_write)
    assert partial[0] >= 20
    assert kv.get_many([f"k{i}" for i in range(20)]) == {f"k{i}": "x" * (i * 50) for i in range(20)}
    assert kv.get("k19") == "x" * 950


def test_a_refused_or_failed_write_hands_the_command_to_the_loop(
    db: natskv.Client, kv: natskv.Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing was written (the socket buffer is full, or the write failed): the loop's writer
    # sends the whole command instead, and the call completes.
    from natskv.aio import mux as mux_module

    assert direct_path_expected(db), (
        "the caller-side send needs natskv's frame reader on plain TCP, with NATSKV_NO_DIRECT_WRITE "
        "and NATSKV_NO_PARSER_HOOK unset"
    )
    woken = count_loop_wakeups(db._conn.mux, monkeypatch)
    errors = iter([BlockingIOError(11, "full"), ConnectionResetError(104, "reset")] * 10)

    def failing_write(fd: int, data: bytes) -> int:
        raise next(errors)

    monkeypatch.setattr(mux_module.os, "write", failing_write)
    for i in range(10):
        assert kv.set("k", i) > 0
        assert kv.get("k") == i
    assert woken[0] == 20


def test_nats_py_writes_wait_for_a_caller_that_is_writing(
    db: natskv.Client, kv: natskv.Bucket, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While a caller's thread writes (slowly, and in parts, here), nats-py publishes from the
    # loop thread: its writes wait for the caller's, and the unwritten end of the caller's write
    # goes before them, so the server reads whole commands.
    from natskv.aio import mux as mux_module

    assert direct_path_expected(db), (
        "the caller-side send needs natskv's frame reader on plain TCP, with NATSKV_NO_DIRECT_WRITE "
        "and NATSKV_NO_PARSER_HOOK unset"
    )
    nc = nats_client(db)
    real_write = os.write

    def slow_write(fd: int, data: bytes) -> int:
        time.sleep(0.002)  # the GIL is free meanwhile: the loop thread runs nats-py
        return real_write(fd, data[: max(1, len(data) // 2)])

    async def publish_many() -> list[bytes]:
        got: list[bytes] = []

        async def on_msg(msg: Any) -> None:
            got.append(msg.data)

        sub = await nc.subscribe(f"q.{name}", cb=on_msg)
        for i in range(200):
            await nc.publish(f"q.{name}", str(i).encode())
            if i % 20 == 0:
                await nc.flush()
                await asyncio.sleep(0.001)
        await nc.flush()
        for _ in range(200):
            if len(got) == 200:
                break
            await asyncio.sleep(0.01)
        await sub.unsubscribe()
        return got

    monkeypatch.setattr(mux_module.os, "write", slow_write)
    future = asyncio.run_coroutine_threadsafe(publish_many(), runner.loop)
    for i in range(40):
        kv.set("k", "y" * 300 + str(i))
    got = future.result(30)
    monkeypatch.setattr(mux_module.os, "write", real_write)
    assert got == [str(i).encode() for i in range(200)]
    assert kv.get("k") == "y" * 300 + "39"


def test_the_socket_duplicate_follows_reconnects_and_is_closed_with_the_client(
    fresh_server: natskv.EmbeddedServer,
) -> None:
    with natskv.connect(fresh_server.url) as db:
        kv = db.bucket("dup", storage="file")
        kv.set("k", "before")
        mux = db._conn.mux
        assert direct_path_expected(db), (
            "the caller-side send needs natskv's frame reader on plain TCP, with NATSKV_NO_DIRECT_WRITE "
            "and NATSKV_NO_PARSER_HOOK unset"
        )
        old_fd = mux._fd
        old_stat = os.fstat(old_fd)
        fresh_server.restart()
        deadline = time.monotonic() + 20
        while True:
            try:
                kv.set("k", "after", timeout=2)
                break
            except natskv.NatsKVError:
                if time.monotonic() > deadline:
                    raise
        assert kv.get("k") == "after"
        for _ in range(100):  # the new connection is hooked by the first data read on it
            if mux._fd >= 0 and mux._direct_writer is nats_client(db)._transport._io_writer:
                break
            time.sleep(0.01)
        assert mux._direct_writer is nats_client(db)._transport._io_writer
        new_fd = mux._fd
        assert new_fd >= 0
        # the old duplicate is closed (its number may be reused by the new one: compare inodes)
        assert new_fd != old_fd or os.fstat(new_fd).st_ino != old_stat.st_ino
        if new_fd != old_fd:
            with pytest.raises(OSError):
                os.fstat(old_fd)
    assert mux._fd == -1
    with pytest.raises(OSError):
        os.fstat(new_fd)


def test_no_caller_side_send_with_no_direct_write_set(nats_url: str) -> None:
    import subprocess
    import sys

    code = (
        "import natskv\n"
        f"db = natskv.connect({nats_url!r})\n"
        "kv = db.bucket('nodirect_' + str(__import__('os').getpid()))\n"
        "kv.set('k', 1); assert kv.get('k') == 1\n"
        "assert db._conn.mux._fd == -1, db._conn.mux._fd\n"
        "db.delete_bucket(kv.name); db.close()\n"
    )
    env = dict(os.environ, NATSKV_NO_DIRECT_WRITE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_nats_py_dropping_its_connection_closes_the_socket_duplicate_at_once(
    db: natskv.Client, kv: natskv.Bucket
) -> None:
    assert direct_path_expected(db), (
        "the caller-side send needs natskv's frame reader on plain TCP, with NATSKV_NO_DIRECT_WRITE "
        "and NATSKV_NO_PARSER_HOOK unset"
    )
    nc = nats_client(db)
    mux = db._conn.mux
    kv.set("k", "before")
    fd = mux._fd
    assert fd >= 0
    inode = os.fstat(fd).st_ino

    async def drop() -> None:
        # what nats-py does with a stale connection: close its transport, then reconnect
        await nc._process_op_err(ConnectionResetError("test"))

    runner.call(drop(), 10)
    assert mux._fd == -1 or mux._direct_writer is nc._transport._io_writer
    try:
        assert os.fstat(fd).st_ino != inode  # closed (or the number reused by a new descriptor)
    except OSError:
        pass
    deadline = time.monotonic() + 20
    while True:
        try:
            kv.set("k", "after", timeout=2)
            break
        except natskv.NatsKVError:
            if time.monotonic() > deadline:
                raise
    assert kv.get("k") == "after"


def test_a_publish_right_after_a_subscribe_reaches_it(db: natskv.Client, name: str) -> None:
    # subscribe() returns once nats-py has queued its SUB, which its flusher writes a moment
    # later; a publish made right then from the same thread must not overtake it, whether the
    # caller's thread or the loop's writer sends it.
    for i in range(30):
        sub = db.subscribe(f"order.{name}.{i}")
        try:
            db.publish(f"order.{name}.{i}", str(i).encode())
            msg = sub.get(timeout=5)
            assert msg is not None and msg.data == str(i).encode()
        finally:
            sub.unsubscribe()


def test_a_batch_replys_run_of_frames_is_delivered_at_once_and_ends_at_its_status() -> None:
    from natskv.wire.waiters import StreamWaiter

    waiter = StreamWaiter("$JS.API.DIRECT.GET.KV_x")
    end = b"NATS/1.0 204 EOB\r\n\r\n"
    frames = [(1, "_INBOX.t", "", b"NATS/1.0\r\nNats-Subject: a\r\n\r\n", b"1"),
              (1, "_INBOX.t", "", b"NATS/1.0\r\nNats-Subject: b\r\n\r\n", b"2")]
    assert waiter.deliver_run(frames, 0, 2) is False and not waiter.done
    late = (1, "_INBOX.t", "", b"NATS/1.0\r\nNats-Subject: c\r\n\r\n", b"3")
    assert waiter.deliver_run([*frames, (1, "_INBOX.t", "", end, b""), late], 2, 4) is True
    assert waiter.done and waiter.wait(0)
    assert [data for data, _, _ in waiter.replies] == [b"1", b"2", b""]  # nothing after the status


def test_batch_gets_and_single_gets_from_many_threads_each_get_their_own_answers(kv: natskv.Bucket) -> None:
    kv.set_many({f"k{i}": {"i": i} for i in range(3000)})
    wrong: list[str] = []

    def batches(t: int) -> None:
        for _ in range(5):
            want = [f"k{i}" for i in range(t, 3000, 7)]
            got = kv.get_many([*want, "absent"])
            if got != {k: {"i": int(k[1:])} for k in want}:
                wrong.append(f"batch {t}")

    def singles(t: int) -> None:
        wrong.extend(f"single {i}" for i in range(t, 3000, 97) if kv.get(f"k{i}") != {"i": i})

    threads = [threading.Thread(target=batches, args=(t,)) for t in range(3)]
    threads += [threading.Thread(target=singles, args=(t,)) for t in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert wrong == []
