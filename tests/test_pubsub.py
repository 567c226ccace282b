"""Plain NATS messaging on natskv's client, against the real server: subscriptions (wildcards,
queue groups across processes, callbacks, drain, slow consumers), request/reply services, and
JetStream publishing with streams declared by the client."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import natskv
from natskv import (
    InvalidArgumentError,
    JetStreamError,
    Message,
    NoRespondersError,
    ServiceError,
    SlowConsumerError,
)
from natskv.wire import jsapi

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def subject(name: str) -> str:
    """A subject prefix of this test's own (tests share the server)."""
    return f"t.{name}"


def drain_all(sub: natskv.Subscription, timeout: float = 1.0) -> list[Message]:
    out = []
    while True:
        message = sub.get(timeout)
        if message is None:
            return out
        out.append(message)


def test_wildcard_subscriptions_receive_every_matching_subject(db: natskv.Client, subject: str) -> None:
    star = db.subscribe(f"{subject}.*.created")
    rest = db.subscribe(f"{subject}.>")
    sent = [f"{subject}.order.created", f"{subject}.user.created", f"{subject}.order.paid",
            f"{subject}.a.b.created", f"{subject}.x"]
    for s in sent:
        db.publish(s, s.encode())
    assert sorted(m.subject for m in drain_all(star)) == [f"{subject}.order.created", f"{subject}.user.created"]
    got = drain_all(rest)
    assert sorted(m.subject for m in got) == sorted(sent)
    assert all(m.data == m.subject.encode() and m.reply == "" for m in got)
    star.unsubscribe()
    rest.unsubscribe()


def test_headers_and_get_timeouts(db: natskv.Client, subject: str) -> None:
    with db.subscribe(subject) as sub:
        assert sub.get(timeout=0) is None
        t0 = time.monotonic()
        assert sub.get(timeout=0.2) is None and time.monotonic() - t0 >= 0.2
        db.publish(subject, b"x", headers={"Trace": "abc", "N": "1"})
        message = sub.get(5)
        assert message is not None and message.headers == {"Trace": "abc", "N": "1"} and message.data == b"x"
        with pytest.raises(InvalidArgumentError, match="not a request"):
            message.respond(b"no")


def test_a_callback_runs_on_its_dispatcher_thread_and_may_call_natskv(
    db: natskv.Client, subject: str, kv: natskv.Bucket
) -> None:
    threads: list[str] = []
    done = threading.Event()

    def on_message(message: Message) -> None:
        threads.append(threading.current_thread().name)
        kv.set(message.subject.rsplit(".", 1)[1], message.data.decode())  # a blocking call: allowed here
        if len(threads) == 3:
            done.set()

    sub = db.subscribe(f"{subject}.*", on_message)
    for i in range(3):
        db.publish(f"{subject}.k{i}", str(i).encode())
    assert done.wait(5)
    sub.drain()
    assert kv.get_many(["k0", "k1", "k2"]) == {"k0": "0", "k1": "1", "k2": "2"}
    assert all(name.startswith("natskv-sub-") for name in threads)
    with pytest.raises(TypeError, match="callback"):
        sub.get()


def test_unsubscribe_stops_and_drain_delivers_what_was_sent(db: natskv.Client, subject: str) -> None:
    sub = db.subscribe(subject)
    db.publish(subject, b"1")
    assert sub.get(5) is not None
    sub.unsubscribe()
    db.publish(subject, b"2")
    assert sub.get(0.3) is None and sub.stopped
    sub.unsubscribe()  # twice is fine

    drained = db.subscribe(subject)
    for i in range(200):
        db.publish(subject, str(i).encode())
    drained.drain()  # everything published before the drain is still delivered
    assert [m.data for m in drain_all(drained, 0.5)] == [str(i).encode() for i in range(200)]
    assert list(drained) == []  # and iteration then ends

    seen: list[bytes] = []
    slow = db.subscribe(subject, lambda m: (time.sleep(0.002), seen.append(m.data)))
    for i in range(100):
        db.publish(subject, str(i).encode())
    slow.drain(timeout=30)  # waits for the callback to take every message
    assert seen == [str(i).encode() for i in range(100)]


def test_a_slow_iterator_is_told_what_it_lost(db: natskv.Client, subject: str) -> None:
    sub = db.subscribe(subject, max_pending=10)
    for i in range(50):
        db.publish(subject, str(i).encode())
    deadline = time.monotonic() + 5
    while sub.dropped < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(SlowConsumerError, match="dropped 40"):
        sub.get(1)
    kept = drain_all(sub, 0.3)  # then the ten it kept, once
    assert [m.data for m in kept] == [str(i).encode() for i in range(10)]
    assert sub.dropped == 40
    sub.unsubscribe()


def test_a_slow_callback_gets_the_loss_through_on_error_only(db: natskv.Client, subject: str) -> None:
    errors: list[BaseException] = []
    received: list[Message] = []
    gate = threading.Event()

    def on_message(message: Message) -> None:
        gate.wait(5)
        received.append(message)

    sub = db.subscribe(subject, on_message, max_pending=5, on_error=errors.append)
    for i in range(30):
        db.publish(subject, str(i).encode())
    deadline = time.monotonic() + 5
    while sub.dropped < 24 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    sub.drain()
    assert len(errors) >= 1 and all(isinstance(e, SlowConsumerError) for e in errors)
    assert all(isinstance(m, Message) for m in received)  # the loss never reaches the callback
    assert len(received) + sub.dropped == 30


def test_subscribe_checks_its_arguments(db: natskv.Client) -> None:
    for bad in ("", "a..b", "a.>.b", "a.b*", "a b", ">x", 5):
        with pytest.raises(InvalidArgumentError):
            db.subscribe(bad)  # type: ignore[arg-type]
    for bad_pending in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="max_pending"):
            db.subscribe("ok", max_pending=bad_pending)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="queue"):
        db.subscribe("ok", queue="a b")
    with pytest.raises(InvalidArgumentError, match="callback"):
        db.subscribe("ok", "not callable")  # type: ignore[arg-type]


QUEUE_MEMBER = """
    import sys, natskv
    db = natskv.connect(sys.argv[1])
    sub = db.subscribe(sys.argv[2], queue="workers")
    db.publish(sys.argv[2] + ".ready", b"")
    got = []
    while True:
        message = sub.get(timeout=3)
        if message is None:
            break
        got.append(message.data.decode())
    print(",".join(got))
    db.close()
"""


@pytest.mark.slow
def test_a_queue_group_spreads_messages_over_processes(nats_url: str, db: natskv.Client, subject: str) -> None:
    ready = db.subscribe(f"{subject}.ready")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(QUEUE_MEMBER), nats_url, subject], cwd=REPO,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for _ in procs:
            assert ready.get(30) is not None
        for i in range(200):
            db.publish(subject, str(i).encode())
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        ready.unsubscribe()
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs]
    members = [set(filter(None, out.strip().split(","))) for out, _ in outputs]
    assert members[0] and members[1], "one member got everything"
    assert not members[0] & members[1]  # each message to exactly one member
    assert members[0] | members[1] == {str(i) for i in range(200)}


def test_request_reply_services(db: natskv.Client, subject: str) -> None:
    upper = db.respond(f"{subject}.upper", lambda m: m.data.upper())
    text = db.respond(f"{subject}.text", lambda m: f"{m.headers.get('Who') if m.headers else None}!")
    empty = db.respond(f"{subject}.empty", lambda m: None)
    manual = db.respond(f"{subject}.manual", lambda m: m.respond(b"by hand", headers={"X": "1"}))
    failing = db.respond(f"{subject}.fail", lambda m: 1 / 0)
    try:
        assert db.request(f"{subject}.upper", b"hi") == b"HI"
        assert db.request(f"{subject}.text", b"", headers={"Who": "ann"}) == b"ann!"
        assert db.request(f"{subject}.empty") == b""
        assert db.request(f"{subject}.manual") == b"by hand"
        with pytest.raises(ServiceError, match="ZeroDivisionError") as info:
            db.request(f"{subject}.fail", timeout=5)
        assert info.value.code == 500
        with pytest.raises(NoRespondersError):
            db.request(f"{subject}.nobody", timeout=5)
        db.publish(f"{subject}.upper", b"a publish, not a request")  # answered by nothing, breaks nothing
        assert db.request(f"{subject}.upper", b"again") == b"AGAIN"
    finally:
        for service in (upper, text, empty, manual, failing):
            service.drain()


def test_responders_in_a_queue_group_share_the_requests(db: natskv.Client, subject: str) -> None:
    served = {"a": 0, "b": 0}

    def member(label: str) -> natskv.Subscription:
        def handle(message: Message) -> bytes:
            served[label] += 1
            return label.encode()

        return db.respond(subject, handle, queue="svc")

    a, b = member("a"), member("b")
    answers = {db.request(subject, b"") for _ in range(100)}
    a.drain()
    b.drain()
    assert answers == {b"a", b"b"} and served["a"] + served["b"] == 100


# -- JetStream -----------------------------------------------------------------------------------------


@pytest.fixture
def stream(db: natskv.Client, name: str, subject: str) -> Iterator[str]:
    db.stream(name, [f"{subject}.>"])
    yield name
    jsapi.call(db._conn, f"STREAM.DELETE.{name}", None, 5.0)


def test_jetstream_publish_stores_and_deduplicates(db: natskv.Client, stream: str, subject: str) -> None:
    first = db.jetstream_publish(f"{subject}.a", b"1", msg_id="id-1", headers={"Kind": "test"})
    assert (first.stream, first.seq, first.duplicate) == (stream, 1, False)
    again = db.jetstream_publish(f"{subject}.a", b"1", msg_id="id-1")
    assert (again.seq, again.duplicate) == (1, True)
    second = db.jetstream_publish(f"{subject}.b", b"2")
    assert second.seq == 2
    assert db.jetstream_publish(f"{subject}.c", b"3", expected_last_seq=2).seq == 3
    with pytest.raises(JetStreamError, match="wrong last sequence"):
        db.jetstream_publish(f"{subject}.c", b"4", expected_last_seq=2)
    stored = jsapi.call(db._conn, f"STREAM.MSG.GET.{stream}", {"seq": 1}, 5.0)["message"]
    assert stored["subject"] == f"{subject}.a" and "Kind" in __import__("base64").b64decode(stored["hdrs"]).decode()
    info = db.stream(stream, [f"{subject}.>"])
    assert info.messages == 3 and info.last_seq == 3


def test_jetstream_publish_without_a_stream_fails_at_once(db: natskv.Client, subject: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(NoRespondersError, match="no JetStream stream takes"):
        db.jetstream_publish(f"{subject}.nowhere", b"x", timeout=20)
    assert time.monotonic() - t0 < 10  # not the whole timeout
    for bad in ({"msg_id": ""}, {"expected_last_seq": -1}, {"expected_last_seq": True}, {"headers": [("a", "b")]}):
        with pytest.raises(InvalidArgumentError):
            db.jetstream_publish(f"{subject}.x", b"x", **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        db.jetstream_publish(f"{subject}.*", b"x")


def test_stream_is_declared_idempotently(db: natskv.Client, name: str, subject: str) -> None:
    try:
        created = db.stream(name, [f"{subject}.a"], storage="memory", max_age=60)
        assert created.subjects == (f"{subject}.a",) and created.storage == "memory"
        assert db.stream(name, [f"{subject}.a"], storage="memory", max_age=60).config == created.config
        widened = db.stream(name, [f"{subject}.a", f"{subject}.b"], storage="memory", max_age=60)
        assert widened.subjects == (f"{subject}.a", f"{subject}.b")
        assert db.jetstream_publish(f"{subject}.b", b"x").stream == name
    finally:
        jsapi.call(db._conn, f"STREAM.DELETE.{name}", None, 5.0)
    for bad in ({"subjects": []}, {"subjects": "a.b"}, {"storage": "disk"}, {"replicas": 0}, {"max_age": -1}):
        with pytest.raises(InvalidArgumentError):
            db.stream(name, **{"subjects": ["ok.x"], **bad})  # type: ignore[arg-type]
    with pytest.raises(natskv.InvalidBucketNameError):
        db.stream("bad name", ["ok.x"])
