"""The loop half of the request multiplexer: writing, the frame reader, subscriptions.

A blocking request is encoded and queued on the caller's thread (:mod:`natskv.wire.mux`, the
caller half); everything here runs on natskv's loop thread, except :meth:`Multiplexer.close`,
which any thread may call:

* the writer drains the outbox that callers fill, writing the whole batch in one system call;
* replies arrive on one wildcard inbox subscription (``<inbox>.*``). When the installed nats-py is
  the version natskv was built against, natskv reads the protocol itself: its frame reader takes
  the place of nats-py's parser (``_core.parse_frames`` splits each chunk read from the socket)
  and hands natskv's messages straight to their handlers, before any ``Msg`` is built or header
  parsed, and everything else to nats-py as its parser would. Otherwise the subscription's
  documented ``future=`` hook receives them. Either way the loop thread only stores the raw
  reply and releases the caller's waiter; the caller's thread parses headers and decodes the value;
* requests made by the loop itself (JetStream API calls of watches and of connecting) wait on an
  asyncio future instead of a thread lock.

Watch consumers deliver to tokens under the same inbox, routed to their handler on the loop thread.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from natskv._speedups import core
from natskv.errors import NotConnectedError
from natskv.wire.mux import CallerMux
from natskv.wire.replies import RawReply, encode_command
from natskv.wire.waiters import CountWaiter

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

log = logging.getLogger("natskv")

# Above this many bytes queued in the socket's write buffer, hand writes to nats-py's flusher,
# which waits for the buffer to drain (back-pressure) instead of growing it without bound.
_WRITE_BUFFER_HIGH = 1 << 20

# nats-py versions whose private parser hook natskv knows (see Multiplexer._install_parser_hook).
_HOOKED_NATS_VERSIONS = ("2.16.",)


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


class Multiplexer(CallerMux):
    """Shares one connection's inbox between any number of threads and watch consumers.

    This class is the loop half; the caller half (``request``, ``send`` ...) is its base,
    :class:`natskv.wire.mux.CallerMux`, which says why the halves share one object.
    """

    def __init__(self, nc: NatsClient, loop: asyncio.AbstractEventLoop, inbox_prefix: str) -> None:
        super().__init__(
            f"{inbox_prefix}.{nc._nuid.next().decode()}.",
            functools.partial(loop.call_soon_threadsafe, self._flush_outbox),
            lambda: nc.is_connected,
        )
        self._nc = nc
        self._loop = loop
        self._plen = len(self.prefix)
        self._handlers: dict[int, Callable[[str, bytes, Any, str], None]] = {}
        # What natskv's frame reader receives it adds to nats-py's own in_msgs/in_bytes (loop
        # thread, as nats-py does); what natskv writes is counted in out_msgs/out_bytes.
        self.hooked = False
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
        :func:`natskv.wire.replies.parse_reply_headers` to read either.
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
                    except Exception:
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

    # -- closing and refusals (loop thread; close() from any thread) ------------------------

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

    # -- loop thread: writing and the loop's own requests ------------------------------------

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
