"""The caller half of the request multiplexer: what a blocking request does on the caller's thread.

One :class:`~natskv.aio.mux.Multiplexer` per connection shares the connection's inbox between
every thread. Its two halves live where they run:

* this module, the caller's thread: encode the whole protocol command (``_core.pub_command``),
  register a waiter under a fresh reply token, append the bytes to the outbox (only the first
  caller since the last drain wakes the loop's writer, so commands from many threads go out in
  one system call; a lone request is written by its own thread, see ``_write_here``), then block
  on the waiter's lock until the loop thread delivers the reply;
* :mod:`natskv.aio.mux`, the loop thread: the writer that drains the outbox, the frame reader that
  routes each reply to its waiter, subscriptions, and requests made by the loop itself.

The two share one object (``Multiplexer`` subclasses :class:`CallerMux`) because they share its
state: the routes, the outbox and its lock, the set of waiting requests and the closed/refused
state. Splitting that state between two objects would put a hop between them on every request.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from natskv._speedups import core
from natskv.errors import NatsKVTimeoutError, NotConnectedError
from natskv.wire.replies import RawReply, encode_command, fresh_error, short_subject
from natskv.wire.waiters import CountWaiter, StreamWaiter, Waiter

if TYPE_CHECKING:
    from natskv.aio.mux import AsyncWaiter

_pub_command = core.pub_command  # bound once: request() calls it on every get and set


class CallerMux:
    """The caller-thread half of :class:`natskv.aio.mux.Multiplexer` (see the module docstring).

    ``wake_writer()`` schedules the loop's writer (thread-safe, never blocks); ``is_connected()``
    says whether the connection is up, to word a timeout.
    """

    def __init__(self, prefix: str, wake_writer: Callable[[], Any], is_connected: Callable[[], bool]) -> None:
        self.prefix = prefix  # the inbox prefix of replies: "<inbox>.<nuid>."
        self._wake_writer = wake_writer
        self._is_connected = is_connected
        self._routes: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._local = threading.local()  # each thread's reusable Waiter (see request)
        self._outbox: list[bytes] = []
        # Callers' waiters whose reply is in, not yet woken (see aio.mux's frame reader).
        self._ready: collections.deque[Waiter] = collections.deque()
        self._out_lock = threading.Lock()
        self._scheduled = False  # the loop's writer is woken and will drain the outbox
        # Requests waiting for a reply (caller threads, and the loop's own): close(), refuse()
        # and the server's refusals fail them.
        self._waiting: set[Waiter | StreamWaiter | CountWaiter | AsyncWaiter] = set()
        # Messages and payload bytes natskv wrote itself, past nats-py's publish() and so its
        # counters (under _out_lock: caller threads add to them).
        self.out_msgs = 0
        self.out_bytes = 0
        self.closed = False
        self._closed_error: BaseException | None = None
        # Set while the server refuses to take the connection back (credentials withdrawn):
        # calls fail with it at once instead of waiting for a reconnect. Cleared on reconnect.
        self.refused: BaseException | None = None

    # -- routes (any thread) ---------------------------------------------------------------------

    def new_token(self) -> str:
        return format(next(self._ids), "x")

    def add_route(self, token: str, handler: Callable[[bytes, Any, str], bool]) -> None:
        """Send messages arriving at ``prefix + token`` to ``handler`` (on the loop thread)."""
        self._routes[token] = handler

    def remove_route(self, token: str) -> None:
        self._routes.pop(token, None)

    # -- sending (caller's thread) ---------------------------------------------------------------

    def send(self, command: bytes, msgs: int = 1, payload_bytes: int = 0) -> None:
        """Queue an encoded protocol command (``msgs`` messages carrying ``payload_bytes`` of
        payload, for the statistics) for the loop thread to write; never blocks."""
        if self.closed or self.refused is not None:
            raise self._refusal()
        with self._out_lock:
            self._outbox.append(command)
            self.out_msgs += msgs
            self.out_bytes += payload_bytes
            if self._scheduled:
                return
            if self._write_here():
                return
            self._scheduled = True
        self._wake_writer()

    def _write_here(self) -> bool:
        """Write the outbox to the socket on this thread when that keeps the stream's order, and
        say whether it did (False: wake the loop's writer). Called under ``_out_lock``, with
        nothing queued but this caller's command; this half never writes itself."""
        return False

    def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Fire-and-forget publish from any thread but the loop's."""
        self.send(encode_command(subject, "", payload, headers), 1, len(payload))

    def _send_and_wait(self, waiter: Any, command: bytes, timeout: float | None, msgs: int, payload_bytes: int) -> bool:
        # Known as waiting before the command leaves: the server's refusal of it, or close(),
        # can arrive before this thread gets to wait.
        self._waiting.add(waiter)
        try:
            self.send(command, msgs, payload_bytes)
            completed: bool = waiter.wait(timeout)
        finally:
            self._waiting.discard(waiter)
        if waiter.error is not None:
            raise fresh_error(waiter.error)
        return completed

    def request(self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float | None) -> RawReply:
        """Send one request and block the calling thread until its reply or the timeout.

        The hot path of every ``get`` and ``set``: one waiter per thread is kept and used again
        (a lock that the loop thread releases and this thread takes back leaves it as it was
        made), so a request allocates no lock. A waiter whose request did not end cleanly (a
        timeout, an error, Ctrl-C) may still be released late by the loop thread: it is dropped.
        """
        local = self._local
        waiter: Waiter | None = getattr(local, "waiter", None)
        if waiter is None:
            waiter = local.waiter = Waiter(subject)
        else:
            waiter.subject = subject
        token = format(next(self._ids), "x")
        routes = self._routes
        routes[token] = waiter
        waiting = self._waiting
        # Known as waiting before the command leaves: the server's refusal of it, or close(),
        # can arrive before this thread gets to wait.
        waiting.add(waiter)
        try:
            try:
                command = _pub_command(subject, self.prefix + token, payload, headers)
            except (ValueError, TypeError):
                command = encode_command(subject, self.prefix + token, payload, headers)  # raises natskv's error
            self.send(command, 1, len(payload))
            completed = waiter._lock.acquire(True, -1 if timeout is None else max(timeout, 0.0))  # waiter.wait()
        except BaseException:  # Ctrl-C while waiting, or a bad command: forget the request
            local.waiter = None
            routes.pop(token, None)
            raise
        finally:
            waiting.discard(waiter)
        reply = waiter.reply
        if completed and waiter.error is None:
            waiter.reply = None
            assert reply is not None
            return reply
        local.waiter = None
        if waiter.error is not None:
            routes.pop(token, None)
            raise fresh_error(waiter.error)
        routes.pop(token, None)
        if reply is not None:  # delivered between the timeout and the pop
            return reply
        raise self.timeout_error(subject, timeout)

    def request_stream(self, subject: str, payload: bytes, timeout: float | None) -> list[RawReply]:
        """Send one request whose answer is several messages ending with a status message."""
        token = self.new_token()
        waiter = StreamWaiter(subject)
        self._routes[token] = waiter
        try:
            command = encode_command(subject, self.prefix + token, payload, None)
            completed = self._send_and_wait(waiter, command, timeout, 1, len(payload))
        except BaseException:
            self._routes.pop(token, None)
            raise
        if not completed:
            self._routes.pop(token, None)
            if not waiter.done:
                raise self.timeout_error(subject, timeout)
        return waiter.replies

    def request_streams(
        self, subject: str, payloads: list[bytes], timeout: float | None
    ) -> Generator[list[RawReply], None, None]:
        """Several requests answered like :meth:`request_stream`, sent in one write; yields each
        one's replies, in order, as soon as that one is complete, so the caller reads the first
        answers while the server still sends the later ones. ``timeout`` covers them all.

        Close the generator when leaving early (its routes are removed then)."""
        waiters = [StreamWaiter(subject) for _ in payloads]
        tokens = [self.new_token() for _ in payloads]
        for token, waiter in zip(tokens, waiters, strict=True):
            self._routes[token] = waiter
            self._waiting.add(waiter)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            commands = [
                encode_command(subject, self.prefix + token, payload, None)
                for token, payload in zip(tokens, payloads, strict=True)
            ]
            self.send(b"".join(commands), len(commands), sum(len(p) for p in payloads))
            for waiter in waiters:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                completed = waiter.wait(left)
                if waiter.error is not None:
                    raise fresh_error(waiter.error)
                if not completed and not waiter.done:
                    raise self.timeout_error(subject, timeout)
                yield waiter.replies
        finally:
            for token, waiter in zip(tokens, waiters, strict=True):
                self._routes.pop(token, None)
                self._waiting.discard(waiter)

    def request_many(
        self, commands: list[tuple[str, bytes, dict[str, str] | None]], timeout: float | None
    ) -> list[RawReply | None]:
        """Pipeline several requests in one write; the replies come back in the same order.

        A ``None`` in the result means that request got no reply within the timeout.
        """
        if not commands:
            return []
        waiter = CountWaiter(len(commands), frozenset(subject for subject, _, _ in commands))
        tokens = [self.new_token() for _ in commands]
        encoded = [
            encode_command(subject, self.prefix + token, payload, headers)
            for (subject, payload, headers), token in zip(commands, tokens, strict=True)
        ]
        for i, token in enumerate(tokens):
            self._routes[token] = waiter.slot(i)
        try:
            size = sum(len(payload) for _, payload, _ in commands)
            completed = self._send_and_wait(waiter, b"".join(encoded), timeout, len(encoded), size)
        except BaseException:
            completed = False
            raise
        finally:
            if not completed:
                for token in tokens:
                    self._routes.pop(token, None)
        return waiter.replies

    # -- errors ------------------------------------------------------------------------------------

    def _refusal(self) -> BaseException:
        """The error for a call made while the connection is refused or closed."""
        error = self.refused or self._closed_error
        if error is None:
            return NotConnectedError("the client is closed; create a new one with natskv.connect()")
        return fresh_error(error)

    def timeout_error(self, subject: str, timeout: float | None) -> BaseException:
        """The error of a request on ``subject`` that got no reply within ``timeout`` seconds,
        naming why when natskv knows (the client closed, the connection down)."""
        if self.closed:
            return fresh_error(self._closed_error) if self._closed_error else NotConnectedError(
                "the client was closed while this call waited for its reply"
            )
        if not self._is_connected():
            return NatsKVTimeoutError(
                f"no reply to a request on {short_subject(subject)} within timeout={timeout} s: the connection to "
                "NATS is down and reconnecting; a write that timed out may still be applied once it is back"
            )
        return NatsKVTimeoutError(
            f"no reply to a request on {short_subject(subject)} within timeout={timeout} s; "
            "the server may be overloaded or the stream may have no leader; pass a larger timeout="
        )
