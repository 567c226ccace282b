"""Autoincrement counters: a counter stream ``KVC_<bucket>`` beside each bucket, from the caller's thread.

Counters cannot live in a KV stream: nats-server 2.12 keeps them in a stream with
``allow_msg_counter``, where a message to ``$KVC.<bucket>.<field>`` carrying ``Nats-Incr: +n`` adds
``n`` to that subject's counter and the PubAck answers with the new value. Everything here blocks
the caller's thread.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING

import orjson

from natskv.errors import BucketNotFoundError, JetStreamError
from natskv.wire import headers as h
from natskv.wire import jsapi
from natskv.wire.jsapi import API_LEVEL_ATOMIC, ERR_NO_MESSAGE, ERR_STREAM_NAME_IN_USE
from natskv.wire.retry import publish_resending, request_retrying_on_503

if TYPE_CHECKING:
    from natskv.aio.connection import Connection

log = logging.getLogger("natskv")


def stream_of(bucket: str) -> str:
    """The counter stream of ``bucket``."""
    return f"KVC_{bucket}"


def next_value(conn: Connection, known: dict[str, int], bucket: str, field: str, count: int, timeout: float) -> int:
    """Add ``count`` to the counter of ``field`` of ``bucket`` and return its new value.

    ``known`` maps the counter streams this client has seen to their replicas (a cache the
    caller keeps per connection): the first use of a stream creates or checks it. Raises
    FeatureNotSupportedError before nats-server 2.12.
    """
    replicas = prepare(conn, known, bucket, "autoincrement fields (counter streams)", timeout)
    return add(conn, stream_of(bucket), f"$KVC.{bucket}.{field}", count, replicas, timeout)


def prepare(conn: Connection, known: dict[str, int], bucket: str, feature: str, timeout: float) -> int:
    """Make sure the counter stream of ``bucket`` exists (once per client: ``known`` caches it)
    and return its replicas. FeatureNotSupportedError, naming ``feature``, before nats-server 2.12."""
    conn.require(API_LEVEL_ATOMIC, feature)
    stream = stream_of(bucket)
    replicas = known.get(stream)
    if replicas is None:
        replicas = known[stream] = ensure_stream(conn, bucket, timeout)
    return replicas


def named_subject(bucket: str, token: str) -> str:
    """The subject of the named counter ``token`` (an encoded key) of ``bucket``. Autoincrement
    counters are one token after the bucket (a field name); named ones are two or more, under
    ``ctr``, so the two never meet."""
    return f"$KVC.{bucket}.ctr.{token}"


def read(conn: Connection, stream: str, subject: str, timeout: float | None) -> int:
    """The value of the counter ``subject`` (0 when it was never added to, or was reset), read
    through the stream leader: never older than an increment acknowledged before."""
    try:
        stored = jsapi.call_leader(conn, f"STREAM.MSG.GET.{stream}", {"last_by_subj": subject}, timeout)
    except JetStreamError as exc:
        if exc.err_code == ERR_NO_MESSAGE:
            return 0
        raise
    return int(orjson.loads(base64.b64decode(stored["message"]["data"]))["val"])


def reset(conn: Connection, stream: str, subject: str, timeout: float | None) -> None:
    """Set the counter ``subject`` back to 0 by purging its messages (the server's counters
    start again from nothing)."""
    jsapi.call(conn, f"STREAM.PURGE.{stream}", {"filter": subject}, timeout)


def ensure_stream(conn: Connection, bucket: str, timeout: float) -> int:
    """Create the counter stream with its bucket's replicas and storage, or scale an existing
    one up to the bucket's replicas (its storage cannot change on the server); return its
    replicas."""
    stream = stream_of(bucket)
    kv = jsapi.call(conn, f"STREAM.INFO.KV_{bucket}", None, timeout)["config"]
    replicas: int = kv.get("num_replicas", 1)
    storage: str = kv.get("storage", "file")
    try:
        config = jsapi.call(conn, f"STREAM.INFO.{stream}", None, timeout)["config"]
    except BucketNotFoundError:
        config = {
            "name": stream, "subjects": [f"$KVC.{bucket}.>"], "allow_msg_counter": True,
            "allow_direct": True, "storage": storage, "num_replicas": replicas,
        }
        try:
            jsapi.call(conn, f"STREAM.CREATE.{stream}", config, timeout)
        except JetStreamError as exc:
            if exc.err_code != ERR_STREAM_NAME_IN_USE:
                raise
        return replicas
    if config.get("storage", "file") != storage:
        log.warning("natskv: counter stream %s is %s storage, its bucket %s; the server cannot change it",
                    stream, config.get("storage"), storage)
    if config.get("num_replicas", 1) < replicas:
        # Made before counters followed their bucket (always R1): one node down stopped
        # every create. Scaling up keeps the counts.
        jsapi.call(conn, f"STREAM.UPDATE.{stream}", dict(config, num_replicas=replicas), timeout)
        return replicas
    return int(config.get("num_replicas", 1))


def add(conn: Connection, stream: str, subject: str, count: int, replicas: int, timeout: float | None) -> int:
    """Add ``count`` to the counter ``subject`` of counter stream ``stream``; return its new value."""
    mux = conn.mux
    assert mux is not None
    what = f"counter stream {stream!r}"
    if replicas == 1:
        data, _, _ = request_retrying_on_503(mux, subject, b"", h.increment(count), timeout, what)
        return int(jsapi.check_api_reply("counter", data)["val"])
    # Replicated: an increment in flight when its leader dies is sent again (deduplicated).
    ack = publish_resending(mux, subject, b"", h.increment(count), timeout, what)
    if "val" in ack:
        return int(ack["val"])
    # A duplicate's answer has no value: the first copy was stored, and its value with it.
    stored = jsapi.call_leader(conn, f"STREAM.MSG.GET.{stream}", {"seq": ack["seq"]}, timeout)
    return int(orjson.loads(base64.b64decode(stored["message"]["data"]))["val"])
