"""A pull consumer that reads the latest message of every key under a filter, one page at a time.

Backups read a whole bucket through it. A watch's push consumer (:mod:`natskv.aio.watch`) sends
as fast as the server can, and its flow control lets up to 32 MiB be in flight: a slow reader
would hold that much. Here the reader asks for each page when it has written the last one, so
at most one page of messages is ever held, however large the bucket.

The consumer is ephemeral, in memory, ack-less, with ``deliver_policy: last_per_subject``. Each
page is one ``CONSUMER.MSG.NEXT`` request with ``no_wait``: the server sends the messages it has,
up to the page size, and a status (404 / 408) when it has fewer. Each page's request gets a reply
subject of its own, so a status left over from an earlier page is told apart from this page's.

Everything in this module runs on natskv's loop thread (the sync layer calls it through
``runner.call``, one call per page).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from natskv._speedups import core
from natskv.aio.connection import Connection
from natskv.errors import JetStreamError, NatsKVError
from natskv.wire.kv import NANOS, KVProtocol
from natskv.wire.replies import encode_command, parse_reply_headers, status_of

INACTIVE_THRESHOLD = 120.0  # the server removes the consumer of a reader that went away

# (subject, payload, raw headers or None, ack reply subject) of one delivered message.
Delivery = tuple[str, bytes, Any, str]


class Scan:
    """One pull consumer over ``filter_subject`` (relative to the bucket). Loop thread only."""

    def __init__(self, conn: Connection, proto: KVProtocol, filter_subject: str) -> None:
        self.conn = conn
        self.proto = proto
        self.filter_subject = proto.subject_prefix + filter_subject
        self.consumer_name = ""
        self._inbox = ""
        self._sid: int | None = None
        self._page = 0
        self._want = 0
        self._items: list[Delivery] = []
        self._done: asyncio.Future[int] | None = None
        self._status_headers: Any = None

    async def start(self, timeout: float) -> int:
        """Create the consumer; the number of messages it will deliver (an upper bound on the
        keys: it counts delete markers, and keys written from now on add to it)."""
        nc, mux = self.conn.nc, self.conn.mux
        assert nc is not None and mux is not None
        self._inbox = nc.new_inbox()
        self._sid = await mux.subscribe(self._inbox + ".*", self._on_message)
        name = self._inbox.rpartition(".")[2]
        config = {
            "name": name,
            "deliver_policy": "last_per_subject",
            "ack_policy": "none",
            "filter_subject": self.filter_subject,
            "mem_storage": True,
            "num_replicas": 1,
            "replay_policy": "instant",
            "inactive_threshold": int(INACTIVE_THRESHOLD * NANOS),
        }
        try:
            info = await self.conn.js_api(f"CONSUMER.CREATE.{self.proto.stream}.{name}",
                                          {"stream_name": self.proto.stream, "config": config}, timeout)
        except BaseException:
            await self.stop()
            raise
        self.consumer_name = name
        denied = self.conn.subscription_denied(self._inbox + ".*")
        if denied is not None:
            await self.stop()
            raise denied
        return int(info.get("num_pending", 0))

    async def page(self, size: int, timeout: float) -> tuple[list[Delivery], bool]:
        """The next ``size`` messages at most, and whether the consumer has no more for now (a
        message with nothing pending after it, or the server's "no messages" status)."""
        mux = self.conn.mux
        assert mux is not None and self.consumer_name
        self._page += 1
        self._want = size
        self._items = []
        done = self._done = asyncio.get_running_loop().create_future()
        body = orjson.dumps({"batch": size, "no_wait": True})
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.proto.stream}.{self.consumer_name}"
        mux.write_now(encode_command(subject, f"{self._inbox}.{self._page}", body, None), 1, len(body))
        try:
            status = await asyncio.wait_for(done, timeout)
        finally:
            self._done = None
        items = self._items
        self._items = []
        if status in (0, 404, 408):
            return items, status != 0 or not items or _pending(items[-1][3]) == 0
        _, desc, _ = parse_reply_headers(self._status_headers)
        raise JetStreamError(desc or f"the server ended a backup's read with status {status}", status)

    def _on_message(self, subject: str, data: bytes, headers: Any, reply: str) -> None:
        done = self._done
        if done is None or done.done():
            return
        if not data and headers is not None and subject.startswith(self._inbox):
            status = status_of(headers)
            if status:
                if subject == f"{self._inbox}.{self._page}" and status != 100:
                    self._status_headers = headers
                    done.set_result(status)
                return  # a status of an earlier page's request, or a heartbeat
        self._items.append((subject, data, headers, reply))
        if len(self._items) >= self._want or _pending(reply) == 0:
            done.set_result(0)

    async def stop(self) -> None:
        """Unsubscribe and delete the consumer (best effort: the inactive threshold removes it
        otherwise)."""
        mux = self.conn.mux
        if self._sid is not None and mux is not None:
            sid, self._sid = self._sid, None
            await mux.unsubscribe(sid)
        name, self.consumer_name = self.consumer_name, ""
        if name and self.conn.nc is not None and self.conn.nc.is_connected:
            try:
                await self.conn.js_api(f"CONSUMER.DELETE.{self.proto.stream}.{name}", None, timeout=2.0)
            except NatsKVError:
                pass


def _pending(reply: str) -> int:
    """Messages the consumer still holds after the one acked by ``reply`` (-1: unreadable)."""
    try:
        return core.parse_ack_subject(reply)[6]
    except ValueError:
        return -1


def parse_delivery(delivery: Delivery) -> tuple[str, int, int, dict[str, str]]:
    """``(subject, stream sequence, time in ns, headers)`` of a delivered message (any thread)."""
    subject, _, headers, reply = delivery
    _, _, _, sseq, _, ts_ns, _ = core.parse_ack_subject(reply)
    _, _, hdrs = parse_reply_headers(headers)
    return subject, sseq, ts_ns, hdrs
