"""Plain NATS messaging on natskv's connection: subscriptions, request/reply services, and
JetStream publishing (the calls are on :class:`natskv.Client`).

A :class:`Subscription` receives on the loop thread and hands each message to the caller's side
through a bounded queue: iterate the subscription, call :meth:`Subscription.get`, or give a
callback, which runs on the subscription's own dispatcher thread (never natskv's loop thread,
so it may block and call natskv). When the consumer falls behind by ``max_pending`` messages,
newer messages are dropped and counted. The loss is reported, never silent: a callback
subscription passes a :class:`~natskv.errors.SlowConsumerError` to ``on_error`` (and logs a
warning), and an iterated one raises it once from the next ``get`` or iteration step.

Subscriptions do not carry over into a forked child: subscribe after the fork.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from natskv._runner import runner, wait_limit
from natskv.aio.subscriptions import end_subscription
from natskv.errors import InvalidArgumentError, NatsKVError, SlowConsumerError
from natskv.wire.replies import parse_reply_headers

if TYPE_CHECKING:
    from natskv.client import Client

log = logging.getLogger("natskv")

DEFAULT_MAX_PENDING = 65_536
_STOP: Any = object()


@dataclass
class Message:
    """A received message: ``subject``, ``data``, ``headers`` (None when it had none) and
    ``reply`` (the inbox of a request, or ``""``)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None = None
    reply: str = ""
    _client: Client | None = field(default=None, repr=False, compare=False)
    _responded: bool = field(default=False, repr=False, compare=False)

    def respond(self, data: bytes = b"", *, headers: dict[str, str] | None = None) -> None:
        """Answer a request (publish ``data`` to its reply inbox). InvalidArgumentError when the
        message was not a request."""
        if not self.reply or self._client is None:
            raise InvalidArgumentError(f"the message on {self.subject!r} is not a request: it has no reply subject")
        self._client.publish(self.reply, data, headers=headers)
        self._responded = True


@dataclass(frozen=True)
class PubAck:
    """JetStream's acknowledgement of a stored message: the ``stream`` that took it, its
    sequence ``seq`` there, and ``duplicate`` when a message with the same ``msg_id`` was
    already stored (this one was not stored again)."""

    stream: str
    seq: int
    duplicate: bool = False


@dataclass(frozen=True)
class StreamInfo:
    """A stream's configuration and state, as the server reports them."""

    name: str
    subjects: tuple[str, ...]
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    replicas: int
    storage: str
    config: dict[str, Any]

    @classmethod
    def of(cls, info: dict[str, Any]) -> StreamInfo:
        config, state = info.get("config", {}), info.get("state", {})
        return cls(
            name=config.get("name", ""), subjects=tuple(config.get("subjects") or ()),
            messages=state.get("messages", 0), bytes=state.get("bytes", 0), first_seq=state.get("first_seq", 0),
            last_seq=state.get("last_seq", 0), replicas=config.get("num_replicas", 1),
            storage=config.get("storage", "file"), config=config,
        )


class Subscription:
    """A running subscription. Create it with :meth:`natskv.Client.subscribe`.

    Iterate it (``for msg in sub``), call :meth:`get`, or pass ``callback``. End it with
    :meth:`unsubscribe` (at once; queued messages are dropped) or :meth:`drain` (queued and
    in-flight messages are delivered first), or by leaving its ``with`` block (a drain).
    """

    def __init__(
        self,
        client: Client,
        subject: str,
        callback: Callable[[Message], Any] | None,
        *,
        queue_group: str,
        max_pending: int,
        on_error: Callable[[BaseException], None] | None,
        timeout: float | None,
    ) -> None:
        check_subscribe_subject(subject)
        if queue_group and (not isinstance(queue_group, str) or any(c in queue_group for c in " \t\r\n.*>")):
            raise InvalidArgumentError(f"queue must be a plain name (no spaces, '.', '*' or '>'), not {queue_group!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise InvalidArgumentError(f"max_pending must be a positive int, not {max_pending!r}")
        if callback is not None and not callable(callback):
            raise InvalidArgumentError(f"callback must be a function, not {callback!r}")
        self.subject = subject
        self.queue = queue_group
        self.max_pending = max_pending
        self.dropped = 0  # messages lost because the consumer fell behind
        self.delivered = 0
        self._client = client
        self._callback = callback
        self._on_error = on_error
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._reported = 0  # dropped messages already reported
        self._stopped = False
        self._dispatcher: threading.Thread | None = None
        self._conn = client._conn
        mux = self._conn.mux
        assert mux is not None
        self._sid = runner.call(mux.subscribe(subject, self._on_message, queue=queue_group), timeout)
        if callback is not None:
            self._dispatcher = threading.Thread(target=self._dispatch, name=f"natskv-sub-{subject}", daemon=True)
            self._dispatcher.start()

    def __repr__(self) -> str:
        group = f" queue={self.queue!r}" if self.queue else ""
        return f"<natskv.Subscription {self.subject!r}{group}{' stopped' if self._stopped else ''}>"

    # -- receiving (loop thread) ----------------------------------------------------------------

    def _on_message(self, subject: str, data: bytes, headers: Any, reply: str) -> None:
        try:
            self._queue.put_nowait((subject, data, headers, reply))
        except queue.Full:
            self.dropped += 1

    # -- consuming (caller's or dispatcher thread) -----------------------------------------------

    def _message(self, item: tuple[str, bytes, Any, str]) -> Message:
        subject, data, raw_headers, reply = item
        headers = None
        if raw_headers:
            _, _, headers = parse_reply_headers(raw_headers)
        self.delivered += 1
        return Message(subject, bytes(data), headers or None, reply or "", self._client)

    def _overflow(self) -> SlowConsumerError | None:
        dropped = self.dropped
        if dropped == self._reported:
            return None
        lost, self._reported = dropped - self._reported, dropped
        return SlowConsumerError(
            f"subscription to {self.subject!r} fell {self.max_pending} messages behind and dropped {lost} "
            f"({dropped} in all); consume faster, or subscribe with a larger max_pending"
        )

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to ``timeout`` seconds (None: the client's default,
        ``math.inf``: without limit); None when stopped or timed out. Raises
        SlowConsumerError once after messages were dropped."""
        if self._callback is not None:
            raise TypeError("this subscription delivers to its callback; it cannot also be read")
        runner.check_not_loop_thread("Subscription.get()")
        overflow = self._overflow()
        if overflow is not None:
            raise overflow
        limit = 0.0 if timeout == 0 else wait_limit(timeout, self._client.options.request_timeout)
        try:
            item = self._queue.get(timeout=limit) if limit != 0.0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if item is _STOP:
            self._queue_stop()
            return None
        return self._message(item)

    def __iter__(self) -> Iterator[Message]:
        while True:
            message = self.get(timeout=float("inf"))
            if message is None:
                return
            yield message

    def _dispatch(self) -> None:
        callback = self._callback
        assert callback is not None
        while True:
            item = self._queue.get()
            overflow = self._overflow()
            if overflow is not None:
                log.warning("natskv: %s", overflow)
                self._report(overflow)
            if item is _STOP:
                return
            try:
                callback(self._message(item))
            except Exception as exc:
                log.exception("natskv: error in the subscription callback on %r", self.subject)
                self._report(exc)

    def _report(self, error: BaseException) -> None:
        if self._on_error is not None:
            try:
                self._on_error(error)
            except Exception:
                log.exception("natskv: error in the on_error hook")

    def _queue_stop(self) -> None:
        # Keep later get() calls returning at once: put the marker back, making room if needed.
        while True:
            try:
                self._queue.put_nowait(_STOP)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass

    # -- ending ----------------------------------------------------------------------------------

    def unsubscribe(self, timeout: float | None = None) -> None:
        """Stop receiving at once; messages not yet consumed are dropped. Safe to call twice."""
        if self._stopped:
            return
        self._end(timeout, drain=False)
        while True:  # what was queued is not wanted any more
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._finish(timeout)

    def drain(self, timeout: float | None = None) -> None:
        """Stop receiving, but first deliver what was already sent: messages in flight and in the
        queue are handed to the callback (waiting for it, up to ``timeout``) or left for the
        iterator, which then ends."""
        if self._stopped:
            return
        self._end(timeout, drain=True)
        self._finish(timeout)

    def _end(self, timeout: float | None, drain: bool) -> None:
        self._stopped = True
        limit = wait_limit(timeout, self._client.options.request_timeout)
        if self._conn is not self._client._conn or runner.in_loop_thread():
            return  # a forked child: the parent's subscription is not this process's
        try:
            runner.call(end_subscription(self._conn, self._sid, drain), limit)
        except NatsKVError:
            log.debug("natskv: error ending a subscription", exc_info=True)

    def _finish(self, timeout: float | None) -> None:
        self._queue_stop()
        dispatcher = self._dispatcher
        if dispatcher is not None and dispatcher is not threading.current_thread():
            dispatcher.join(wait_limit(timeout, self._client.options.request_timeout))

    @property
    def stopped(self) -> bool:
        return self._stopped

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.drain()


def check_subscribe_subject(subject: object) -> None:
    """A subject a subscription may take: tokens separated by '.', none empty, ``*`` and ``>`` as
    whole tokens, ``>`` last."""
    if not isinstance(subject, str) or not subject:
        raise InvalidArgumentError(f"a subject is a non-empty str, not {subject!r}")
    if any(c.isspace() for c in subject):
        raise InvalidArgumentError(f"subject {subject!r} holds whitespace")
    tokens = subject.split(".")
    for i, part in enumerate(tokens):
        if not part:
            raise InvalidArgumentError(f"subject {subject!r} has an empty token: no leading, trailing or doubled '.'")
        if (">" in part and (part != ">" or i != len(tokens) - 1)) or ("*" in part and part != "*"):
            raise InvalidArgumentError(
                f"subject {subject!r}: '*' matches one whole token and '>' the rest, so each is a token "
                "of its own, and '>' comes last"
            )
