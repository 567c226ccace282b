"""Request multiplexing between caller threads and the loop thread.

This is the hot path of every blocking get and put. It is built so that the loop thread does as
little as possible per request:

* the *caller* thread encodes the whole protocol command (``_core.pub_command``) and registers a
  waiter under a fresh reply token;
* commands from many threads are coalesced: callers append to an outbox and only the first one
  since the last drain schedules the loop, which writes the whole batch in one system call;
* replies arrive on one wildcard inbox subscription (``<inbox>.*``). When the installed nats-py is
  the version natskv was built against, natskv reads the protocol itself: its frame reader takes
  the place of nats-py's parser (``_core.parse_frames`` splits each chunk read from the socket)
  and hands natskv's messages straight to their handlers, before any ``Msg`` is built or header
  parsed, and everything else to nats-py as its parser would. Otherwise the subscription's
  documented ``future=`` hook receives them. Either way the loop thread only stores the raw
  reply and releases the waiter; the caller thread parses headers and decodes the value.
* a waiter is a ``threading.Lock`` acquired twice: the cheapest wait primitive in CPython.

Watch consumers deliver to tokens under the same inbox, routed to their handler on the loop thread.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from natskv._speedups import core
from natskv.errors import InvalidArgumentError, NatsKVTimeoutError, NotConnectedError

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

log = logging.getLogger("natskv")

# Above this many bytes queued in the socket's write buffer, hand writes to nats-py's flusher,
# which waits for the buffer to drain (back-pressure) instead of growing it without bound.
_WRITE_BUFFER_HIGH = 1 << 20

# nats-py versions whose private parser hook natskv knows (see Multiplexer._install_parser_hook).
_HOOKED_NATS_VERSIONS = ("2.16.",)


E = TypeVar("E", bound=BaseException)

RawReply = tuple[bytes, "bytes | dict[str, str] | None", str]
"""(payload, headers, reply subject): headers are the raw header block, or a parsed dict when the
reply came through nats-py's own message path."""


def status_of(headers: bytes | dict[str, str] | None) -> int:
    """The inline status code of a reply (0 when it carries none). Cheap: no full header parse."""
    if headers is None:
        return 0
    if type(headers) is dict:
        return int(headers.get("Status", 0) or 0)
    # Raw bytes here (a dict is always nats-py's plain dict). mypy does not narrow the other side
    # of ``type() is``; isinstance would, but costs more on bytes, the common case.
    # b"NATS/1.0 404 ..." : a status reply has a space right after the version.
    if len(headers) > 12 and headers[8] == 32:  # type: ignore[index]
        return int(headers[9:12])  # type: ignore[index]
    return 0


def parse_reply_headers(headers: bytes | dict[str, str] | None) -> tuple[int, str, dict[str, str]]:
    """(status, description, headers) of a reply, whichever path delivered it."""
    if headers is None:
        return 0, "", {}
    if type(headers) is dict:
        h = dict(headers)
        status = int(h.pop("Status", 0) or 0)
        return status, h.pop("Description", ""), h
    return core.parse_headers(headers)  # type: ignore[arg-type]  # raw bytes: see status_of


class _ThreadWaiter:
    """What the waiters of caller threads share: a ``threading.Lock`` acquired twice (the
    cheapest wait in CPython) and an error that wakes the thread instead of a reply."""

    __slots__ = ("_lock", "error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """Wake the waiting thread with ``error`` (the client was closed). Loop thread only, like
        ``deliver``, so the two never both release the lock."""
        if self.error is None and self._lock.locked():
            self.error = error
            self._lock.release()

    def wait(self, timeout: float | None) -> bool:
        return self._lock.acquire(True, -1 if timeout is None else max(timeout, 0.0))


class Waiter(_ThreadWaiter):
    """Waits for one reply. Delivered on the loop thread, waited on by a caller thread."""

    __slots__ = ("reply", "subject")

    def __init__(self, subject: str = "") -> None:
        super().__init__()
        self.reply: RawReply | None = None
        self.subject = subject  # what the request was sent to (to match permission errors)

    def deliver(self, data: bytes, headers: Any, reply: str) -> bool:
        """Store the reply; return True when the waiter is complete (the route is then removed)."""
        if self.error is None:  # not already woken by close()
            self.reply = (data, headers, reply)
            self._lock.release()
        return True


class StreamWaiter(_ThreadWaiter):
    """Collects a multi-message reply (batch direct get) until its end-of-batch status message.

    Any status reply ends the batch: 204 is the normal end; 404, 408, 413 and errors end it too
    and are kept as the last element for the caller to interpret.
    """

    __slots__ = ("replies", "done", "subject")

    def __init__(self, subject: str = "") -> None:
        super().__init__()
        self.replies: list[RawReply] = []
        self.done = False
        self.subject = subject

    def deliver(self, data: bytes, headers: Any, reply: str) -> bool:
        if self.error is not None:
            return True
        self.replies.append((data, headers, reply))
        if not data and status_of(headers):
            self.done = True
            self._lock.release()
            return True
        return False


class CountWaiter(_ThreadWaiter):
    """Waits for ``n`` single replies sent under tokens ``base+0 .. base+n-1`` (pipelined writes)."""

    __slots__ = ("replies", "_left", "subjects")

    def __init__(self, n: int, subjects: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.replies: list[RawReply | None] = [None] * n
        self._left = n
        self.subjects = subjects

    def slot(self, i: int) -> Callable[[bytes, Any, str], bool]:
        def deliver(data: bytes, headers: Any, reply: str) -> bool:
            if self.replies[i] is None and self.error is None:
                self.replies[i] = (data, headers, reply)
                self._left -= 1  # loop thread only: no lock needed
                if self._left == 0:
                    self._lock.release()
            return True

        return deliver


class AsyncWaiter:
    """Waits for one reply on the loop thread itself (``Multiplexer.request_async``)."""

    __slots__ = ("future", "subject")

    def __init__(self, future: asyncio.Future[RawReply], subject: str) -> None:
        self.future = future
        self.subject = subject

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def deliver(self, data: bytes, headers: Any, reply: str) -> bool:
        if not self.future.done():
            self.future.set_result((data, headers, reply))
        return True


class _HookFuture:
    """Stands in for the ``asyncio.Future`` nats-py resolves synchronously per message.

    ``nc.subscribe(subject, future=obj)`` makes nats-py call ``obj.set_result(msg)`` for every
    message on that subscription, on the loop thread, without a task. It never completes.
    """

    def __init__(self, on_msg: Callable[[str, bytes, Any, str], None]) -> None:
        self._on_msg = on_msg

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Any) -> None:
        self._on_msg(msg.subject, msg.data, msg.headers, msg.reply)


class Multiplexer:
    """Shares one connection's inbox between any number of threads and watch consumers."""

    def __init__(self, nc: NatsClient, loop: asyncio.AbstractEventLoop, inbox_prefix: str) -> None:
        self._nc = nc
        self._loop = loop
        self.prefix = f"{inbox_prefix}.{nc._nuid.next().decode()}."
        self._plen = len(self.prefix)
        self._routes: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._outbox: list[bytes] = []
        self._out_lock = threading.Lock()
        self._scheduled = False
        self._handlers: dict[int, Callable[[str, bytes, Any, str], None]] = {}
        # Requests waiting for a reply (caller threads, and the loop's own): close(), refuse()
        # and the server's refusals fail them.
        self._waiting: set[Waiter | StreamWaiter | CountWaiter | AsyncWaiter] = set()
        # Messages and payload bytes natskv wrote itself, past nats-py's publish() and so its
        # counters (under _out_lock: caller threads add to them). What natskv's frame reader
        # receives it adds to nats-py's own in_msgs/in_bytes (loop thread, as nats-py does).
        self.out_msgs = 0
        self.out_bytes = 0
        self.hooked = False
        self.closed = False
        self._closed_error: BaseException | None = None
        # Set while the server refuses to take the connection back (credentials withdrawn):
        # calls fail with it at once instead of waiting for a reconnect. Cleared on reconnect.
        self.refused: BaseException | None = None
        # Called on the loop thread with the server's "Permissions Violation ..." text, in its
        # original case, by natskv's frame reader (nats-py's parser lower-cases it).
        self.on_permission_violation: Callable[[str], None] | None = None

    async def start(self) -> None:
        await self.subscribe(self.prefix + "*", self._on_inbox)
        if os.environ.get("NATSKV_NO_PARSER_HOOK") != "1":
            self._install_parser_hook()

    async def subscribe(self, subject: str, handler: Callable[[str, bytes, Any, str], None]) -> int:
        """Subscribe ``handler(subject, data, headers, reply)``, called on the loop thread per message.

        ``headers`` is the raw header block (bytes) or, on nats-py's own path, a parsed dict; use
        :func:`parse_reply_headers` to read either.
        """
        if self.closed or self.refused is not None:
            raise self._refusal()
        sub = await self._nc.subscribe(subject, future=_HookFuture(handler))  # type: ignore[arg-type]
        self._handlers[sub._id] = handler
        return sub._id

    async def unsubscribe(self, sid: int) -> None:
        self._handlers.pop(sid, None)
        sub = self._nc._subs.get(sid)
        if sub is not None and not self._nc.is_closed:
            await sub.unsubscribe()

    def _install_parser_hook(self) -> None:
        # nats-py's read loop hands every chunk read from the socket to nc._ps.parse(), which
        # matches each protocol line with a regex and awaits nc._process_msg per message. On the
        # nats-py versions natskv knows, this replacement splits the chunk's MSG/HMSG frames in
        # _core and calls natskv's handlers directly; other subscriptions' messages go to
        # nats-py's own _process_msg, and the other operations (PING, PONG, +OK, -ERR, INFO) to
        # the same nats-py methods its parser calls.
        from nats.aio.client import __version__ as nats_version
        from nats.errors import ProtocolError

        if not nats_version.startswith(_HOOKED_NATS_VERSIONS):
            return
        nc = self._nc
        ps = nc._ps
        process_msg = nc._process_msg
        handlers = self._handlers
        parse_frames = core.parse_frames
        stats = nc.stats

        async def parse(data: bytes = b"") -> None:
            buf = ps.buf  # replaced by ps.reset() on reconnect: looked up on each call
            buf.extend(data)
            while buf:
                try:
                    frames, used, control = parse_frames(buf)
                except ValueError as exc:
                    log.error("natskv: %s", exc)
                    raise ProtocolError() from exc
                if used:
                    del buf[:used]
                mine = size = 0
                for sid, subject, reply, headers, payload in frames:
                    handler = handlers.get(sid)
                    if handler is None:  # nats-py counts these itself
                        # nats-py's own parser passes None for no headers too; its annotation says bytes.
                        await process_msg(
                            sid, subject.encode(), reply.encode(), payload, headers  # type: ignore[arg-type]
                        )
                        continue
                    mine += 1
                    size += len(payload)
                    try:
                        handler(subject, payload, headers, reply)
                    except Exception:  # noqa: BLE001 - never let one message stop nats-py's reader
                        log.exception("natskv: error handling a message on %r", subject)
                if mine:
                    stats["in_msgs"] += mine
                    stats["in_bytes"] += size
                if not control:
                    return
                end = buf.find(b"\r\n")
                line = bytes(buf[:end])
                del buf[: end + 2]
                await _control_line(line)

        async def _control_line(line: bytes) -> None:
            op, _, rest = line.partition(b" ")
            op = op.strip()
            if op == b"PING":
                await nc._process_ping()
            elif op == b"PONG":
                await nc._process_pong()
            elif op == b"+OK":
                pass
            elif op == b"-ERR":
                text = rest.strip().decode(errors="replace")
                if self.on_permission_violation is not None and "permissions violation" in text.lower():
                    self.on_permission_violation(text.strip("'"))  # all nats-py does with it is report it
                else:
                    await nc._process_err(text.lower())
            elif op == b"INFO":
                await nc._process_info(json.loads(rest))
            else:
                log.error("natskv: unknown protocol line from the server: %r", line[:80])
                raise ProtocolError()

        ps.parse = parse  # type: ignore[method-assign]
        self.hooked = True

    # -- loop thread: delivery -------------------------------------------------------------

    def _on_inbox(self, subject: str, data: bytes, headers: Any, reply: str) -> None:
        token = subject[self._plen :]
        route = self._routes.get(token)
        if route is not None and route(data, headers, reply):
            self._routes.pop(token, None)

    # -- any thread: sending ---------------------------------------------------------------

    def new_token(self) -> str:
        return format(next(self._ids), "x")

    def add_route(self, token: str, handler: Callable[[bytes, Any, str], bool]) -> None:
        """Send messages arriving at ``prefix + token`` to ``handler`` (on the loop thread)."""
        self._routes[token] = handler

    def remove_route(self, token: str) -> None:
        self._routes.pop(token, None)

    def close(self, error: BaseException | None = None) -> None:
        """Refuse new requests and wake every thread still waiting for a reply (any thread).

        ``error`` (default: "the client was closed") is raised by the waiting calls and the
        later ones: why the connection ended."""
        self.closed = True
        self._closed_error = error
        error = error or NotConnectedError("the client was closed while this call waited for its reply")

        def fail_all() -> None:
            for waiter in list(self._waiting):
                waiter.fail(error)

        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(fail_all)

    def refuse(self, error: BaseException) -> None:
        """Fail the waiting calls and every new one with ``error`` until ``refused`` is reset.
        Loop thread only."""
        self.refused = error
        for waiter in list(self._waiting):
            waiter.fail(error)

    def fail_subject(self, subject: str, error: Callable[[str], BaseException], exact: bool = True) -> None:
        """Fail the requests waiting on a reply to a message sent to ``subject`` (the server
        refused it) with ``error(<the subject as sent>)``. ``exact=False`` compares without case,
        for a subject nats-py lower-cased. Loop thread only."""
        if not exact:
            subject = subject.lower()
        for waiter in list(self._waiting):
            for sent in waiter.subjects if isinstance(waiter, CountWaiter) else (waiter.subject,):
                if (sent if exact else sent.lower()) == subject:
                    waiter.fail(error(sent))
                    break

    def fail_replies_to(self, subscription: str, error: BaseException, exact: bool = True) -> None:
        """The server refused the subscription ``subscription``: when it is this multiplexer's
        inbox no reply can arrive, so fail every waiting request. Loop thread only."""
        inbox = self.prefix + "*"
        if subscription == inbox or (not exact and subscription == inbox.lower()):
            for waiter in list(self._waiting):
                waiter.fail(error)

    def _send_and_wait(self, waiter: Any, command: bytes, timeout: float | None, msgs: int, payload_bytes: int) -> bool:
        # Known as waiting before the command leaves: the server's refusal of it, or close(),
        # can arrive before this thread gets to wait.
        self._waiting.add(waiter)
        try:
            self.send(command, msgs, payload_bytes)
            completed = waiter.wait(timeout)
        finally:
            self._waiting.discard(waiter)
        if waiter.error is not None:
            raise fresh_error(waiter.error)
        return completed

    def _refusal(self) -> BaseException:
        """The error for a call made while the connection is refused or closed."""
        error = self.refused or self._closed_error
        if error is None:
            return NotConnectedError("the client is closed; create a new one with natskv.connect()")
        return fresh_error(error)

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
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._flush_outbox)

    def _flush_outbox(self) -> None:
        with self._out_lock:
            commands, self._outbox = self._outbox, []
            self._scheduled = False
        if commands:
            self.write_now(b"".join(commands))

    def write_now(self, data: bytes, msgs: int = 0, payload_bytes: int = 0) -> None:
        """Write protocol bytes from the loop thread, keeping order with nats-py's own writes;
        ``msgs`` and ``payload_bytes`` count them (commands queued by :meth:`send` are counted)."""
        if msgs:
            with self._out_lock:
                self.out_msgs += msgs
                self.out_bytes += payload_bytes
        nc = self._nc
        transport = nc._transport
        # TcpTransport's private stream writer. A websocket transport has none: its writes
        # always go through nats-py's flusher below.
        writer = getattr(transport, "_io_writer", None)
        if (
            nc.is_connected
            and not nc._pending
            and writer is not None
            and writer.transport.get_write_buffer_size() < _WRITE_BUFFER_HIGH
        ):
            assert transport is not None
            transport.write(data)
            return
        # Reconnecting, or back-pressure: nats-py buffers it and its flusher writes it in order
        # (after a reconnect too).
        nc._pending.append(data)
        nc._pending_data_size += len(data)
        if nc.is_connected and nc._flush_queue is not None and nc._flush_queue.empty():
            nc._flush_queue.put_nowait(self._loop.create_future())

    # -- caller threads: requests -----------------------------------------------------------

    def request(self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float | None) -> RawReply:
        """Send one request and block the calling thread until its reply or the timeout."""
        token = self.new_token()
        waiter = Waiter(subject)
        self._routes[token] = waiter.deliver
        try:
            command = encode_command(subject, self.prefix + token, payload, headers)
            completed = self._send_and_wait(waiter, command, timeout, 1, len(payload))
        except BaseException:  # Ctrl-C while waiting, or a bad command: forget the request
            self._routes.pop(token, None)
            raise
        if not completed:
            self._routes.pop(token, None)
            if waiter.reply is not None:  # delivered between the timeout and the pop
                return waiter.reply
            raise self.timeout_error(subject, timeout)
        assert waiter.reply is not None
        return waiter.reply

    def request_stream(
        self, subject: str, payload: bytes, timeout: float | None
    ) -> list[RawReply]:
        """Send one request whose answer is several messages ending with a status message."""
        token = self.new_token()
        waiter = StreamWaiter(subject)
        self._routes[token] = waiter.deliver
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
            for (subject, payload, headers), token in zip(commands, tokens)
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

    async def request_async(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float | None
    ) -> RawReply:
        """The loop thread's form of :meth:`request` (JetStream API calls of watches, connect).

        Works after a client's ``close()`` began (watches delete their consumers then), but not
        once the connection itself was closed for good."""
        if self._closed_error is not None or self.refused is not None:
            raise self._refusal()
        token = self.new_token()
        waiter = AsyncWaiter(self._loop.create_future(), subject)
        self._routes[token] = waiter.deliver
        self._waiting.add(waiter)
        try:
            self.write_now(encode_command(subject, self.prefix + token, payload, headers), 1, len(payload))
            return await asyncio.wait_for(waiter.future, timeout)
        except asyncio.TimeoutError:
            raise self.timeout_error(subject, timeout) from None
        finally:
            self._routes.pop(token, None)
            self._waiting.discard(waiter)

    def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Fire-and-forget publish from any thread."""
        self.send(encode_command(subject, "", payload, headers), 1, len(payload))

    def timeout_error(self, subject: str, timeout: float | None) -> BaseException:
        """The error of a request on ``subject`` that got no reply within ``timeout`` seconds,
        naming why when natskv knows (the client closed, the connection down)."""
        if self.closed:
            return fresh_error(self._closed_error) if self._closed_error else NotConnectedError(
                "the client was closed while this call waited for its reply"
            )
        if not self._nc.is_connected:
            return NatsKVTimeoutError(
                f"no reply to a request on {_short(subject)} within timeout={timeout} s: the connection to "
                "NATS is down and reconnecting; a write that timed out may still be applied once it is back"
            )
        return NatsKVTimeoutError(
            f"no reply to a request on {_short(subject)} within timeout={timeout} s; "
            "the server may be overloaded or the stream may have no leader; pass a larger timeout="
        )


def encode_command(subject: str, reply: str, payload: bytes, headers: dict[str, str] | None) -> bytes:
    """``_core.pub_command`` with its refusals as natskv errors: a subject or header NATS cannot
    carry, or a protocol line the server would answer by closing the connection (over its
    default max_control_line), fails here, before anything is sent."""
    try:
        return core.pub_command(subject, reply, payload, headers)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"cannot send a message to {_short(subject)}: {exc}") from exc


def fresh_error(error: E) -> E:
    """A copy of a stored error to raise: one instance raised by call after call would collect
    every call's traceback (and be shared between threads). The errors stored here
    (NotConnectedError, AuthenticationError, PermissionDeniedError) are made of one message."""
    copied = copy.copy(error)
    copied.__cause__ = error.__cause__
    return copied.with_traceback(None)


def _short(subject: object) -> str:
    """A subject for an error message: repr()'d and cut to a readable length."""
    text = repr(subject)
    return text if len(text) <= 100 else f"{text[:80]}... ({len(str(subject))} characters)"
