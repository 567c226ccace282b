"""natskv's frame reader inside nats-py's read loop, against a real nats-server.

natskv replaces the protocol parser of the nats-py version it knows (``Multiplexer``): MSG/HMSG
frames are split by ``_core.parse_frames``; natskv's own subscriptions are handled directly and
everything else goes to nats-py as its parser would hand it over. These tests drive nats-py's own
subscriptions, PING/PONG and large frames through that reader alongside natskv's traffic.
"""

from __future__ import annotations

import asyncio
import os
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
