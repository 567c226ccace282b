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
