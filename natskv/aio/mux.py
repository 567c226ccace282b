"""The loop half of the request multiplexer: writing, the frame reader, subscriptions.

A blocking request is encoded and queued on the caller's thread (:mod:`natskv.wire.mux`, the
caller half); everything here runs on natskv's loop thread, except :meth:`Multiplexer.close`,
which any thread may call:

* the writer drains the outbox that callers fill, writing the whole batch in one system call. A
  caller whose request is the only one out writes the outbox to the socket on its own thread
  instead (see "the caller-side send" below; ``NATSKV_NO_DIRECT_WRITE=1`` turns that off);
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
import contextlib
import functools
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from natskv._speedups import core
from natskv.errors import NotConnectedError
from natskv.wire.mux import CallerMux
from natskv.wire.replies import RawReply, encode_command
from natskv.wire.waiters import CountWaiter, StreamWaiter, Waiter

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

log = logging.getLogger("natskv")

# Above this many bytes queued in the socket's write buffer, hand writes to nats-py's flusher,
# which waits for the buffer to drain (back-pressure) instead of growing it without bound.
_WRITE_BUFFER_HIGH = 1 << 20

# nats-py versions whose private parser hook natskv knows (see Multiplexer._install_parser_hook).
_HOOKED_NATS_VERSIONS = ("2.16.",)

# Every multiplexer of this process: a forked child drops their socket duplicates (see
# _forget_sockets_in_child).
_live: weakref.WeakSet[Multiplexer] = weakref.WeakSet()


def _forget_sockets_in_child() -> None:
    # The parent's connections are not the child's to write to (the child's clients reconnect).
    for mux in list(_live):
        mux._out_lock = threading.Lock()  # possibly held by a parent thread at the fork
        mux._direct_writer = mux._direct_raw = None
        fd, mux._fd = mux._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_forget_sockets_in_child)


DIRECT_WRITE_BYTES = 32 * 1024  # a command this large is written by its caller's thread (see _write_here)


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
        # Subscriptions that also take a run of their frames in one call (natskv's frame reader
        # only): a watch consumer's burst costs one call, not one per message.
        self._many: dict[int, Callable[[list[Any]], None]] = {}
        # What natskv's frame reader receives it adds to nats-py's own in_msgs/in_bytes (loop
        # thread, as nats-py does); what natskv writes is counted in out_msgs/out_bytes.
        self.hooked = False
        self._inbox_sid = 0
        # The stream writer last written to, and the asyncio transport under it (write_now).
        self._writer: Any = None
        self._raw_transport: Any = None
        # The caller-side send (see _attach_writer): the plain-TCP stream writer callers may
        # write around, its transport, and natskv's own duplicate of its socket descriptor
        # (-1: none). Set and cleared on the loop thread under _out_lock; read by callers under it.
        self._direct_writer: Any = None
        self._direct_raw: Any = None
        self._fd = -1
        # The unwritten end of a caller's partial write, and the writer it belongs to: written
        # before anything else on that connection (on another it would be garbage).
        self._remainder: tuple[Any, bytes] | None = None
        _live.add(self)
        # Called on the loop thread with the server's "Permissions Violation ..." text, in its
        # original case, by natskv's frame reader (nats-py's parser lower-cases it).
        self.on_permission_violation: Callable[[str], None] | None = None

    async def start(self) -> None:
        self._inbox_sid = await self.subscribe(self.prefix + "*", self._on_inbox)
        if os.environ.get("NATSKV_NO_PARSER_HOOK") != "1":
            self._install_parser_hook()

    async def subscribe(
        self,
        subject: str,
        handler: Callable[[str, bytes, Any, str], None],
        many: Callable[[list[Any]], None] | None = None,
        queue: str = "",
    ) -> int:
        """Subscribe ``handler(subject, data, headers, reply)``, called on the loop thread per message
        (as a member of the queue group ``queue`` when given: each message to one member).

        ``headers`` is the raw header block (bytes) or, on nats-py's own path, a parsed dict; use
        :func:`natskv.wire.replies.parse_reply_headers` to read either. With ``many``, natskv's
        frame reader calls ``many(frames)`` instead, once per run of consecutive messages of this
        subscription in what it read, with the frames of ``_core.parse_frames``
        (``(sid, subject, reply, raw header block or None, payload)``); nats-py's own path still
        calls ``handler``.
        """
        if self.closed or self.refused is not None:
            raise self._refusal()
        sub = await self._nc.subscribe(subject, queue=queue, future=_HookFuture(handler))  # type: ignore[arg-type]
        self._handlers[sub._id] = handler
        if many is not None:
            self._many[sub._id] = many
        return sub._id

    async def unsubscribe(self, sid: int) -> None:
        self._handlers.pop(sid, None)
        self._many.pop(sid, None)
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
        #
        # A step earlier still: the connection's StreamReader.feed_data, which the transport's
        # protocol calls with each chunk, is replaced too (see feed). A chunk made only of
        # natskv's messages is delivered right there, in the transport's callback, without
        # waking nats-py's read loop (a future, a task step and five coroutine frames per chunk,
        # and the GIL held that much longer after the waiters were released). Anything else (a
        # protocol line, another subscription's message, a malformed frame) is handed to the
        # reader as it came, and everything after it too until the read loop has caught up, so
        # the order of the stream is kept.
        from nats.aio.client import __version__ as nats_version
        from nats.errors import ProtocolError

        if not nats_version.startswith(_HOOKED_NATS_VERSIONS):
            return
        nc = self._nc
        ps = nc._ps
        process_msg = nc._process_msg
        handlers = self._handlers
        many_handlers = self._many
        parse_frames = core.parse_frames
        frames_known = core.frames_known
        frames_run = core.frames_run
        stats = nc.stats
        routes = self._routes
        ready = self._ready
        inbox_sid = self._inbox_sid
        plen = self._plen
        # The StreamReader whose feed_data is replaced, and whether chunks go through nats-py's
        # read loop for now (from the start, and after a chunk natskv handed over).
        hooked: list[Any] = [None]
        passing = [True]

        def deliver(frames: list[tuple[int, str, str, Any, bytes]]) -> None:
            size = 0
            count = len(frames)
            i = 0
            while i < count:
                sid, subject, reply, headers, payload = frames[i]
                size += len(payload)
                i += 1
                try:
                    if sid == inbox_sid:  # a reply: Multiplexer._on_inbox, inlined
                        token = subject[plen:]
                        route = routes.get(token)
                        if type(route) is Waiter:  # a caller's single request: woken below
                            routes.pop(token, None)
                            if route.error is None:
                                route.reply = (payload, headers, reply)
                                ready.append(route)
                        elif type(route) is StreamWaiter:  # a batch reply: its run of frames at once
                            end = i
                            while end < count and frames[end][1] == subject and frames[end][0] == sid:
                                size += len(frames[end][4])
                                end += 1
                            if route.deliver_run(frames, i - 1, end):
                                routes.pop(token, None)
                            i = end
                        elif route is not None and route(payload, headers, reply):
                            routes.pop(token, None)
                    elif sid in many_handlers:
                        first = i - 1
                        i, run_size = frames_run(frames, i, sid)  # the rest of its run, in _core
                        size += run_size
                        many_handlers[sid](frames[first:i] if first or i < count else frames)
                    else:
                        handler = handlers.get(sid)
                        if handler is not None:  # None: unsubscribed while parse() awaited
                            handler(subject, payload, headers, reply)
                except Exception:
                    log.exception("natskv: error handling a message on %r", subject)
            stats["in_msgs"] += count
            stats["in_bytes"] += size
            # The callers' threads are woken last, in one pass, so that they find the frame
            # reader done rather than wait for it to let go of the GIL.
            while ready:
                ready.popleft().wake()

        def feed(reader: Any, data: bytes) -> None:
            # The transport's data callback (loop thread). Must not raise: the transport would
            # report it and drop the connection. Errors are left to the read loop's parse.
            if reader is not hooked[0]:  # a connection already replaced: not this stream's bytes
                type(reader).feed_data(reader, data)
                return
            if passing[0]:
                hand_over(data)
                return
            buf = ps.buf
            buf.extend(data)
            try:
                frames, used, control = parse_frames(buf)
            except ValueError:
                frames, control = [], True  # parse (below) raises it as nats-py would
            if not control and not frames_known(frames, handlers):
                control = True
            if control:
                passing[0] = True
                data = bytes(buf)
                buf.clear()
                hand_over(data)
                return
            if used:
                del buf[:used]
            if frames:
                deliver(frames)

        def hand_over(data: bytes) -> None:
            reader = hooked[0]
            if reader is not None:
                type(reader).feed_data(reader, data)

        def caught_up() -> None:
            # End of a parse() call: the read loop has taken everything it was given. Chunks go
            # straight to feed() from now on, unless more waits in the reader. A new connection
            # (a reconnect, a TLS upgrade) has a new reader: hook it.
            reader = getattr(nc._transport, "_io_reader", None)
            if reader is None or not isinstance(getattr(reader, "_buffer", None), bytearray):
                return  # a transport without a StreamReader (websocket): nats-py's read loop only
            if reader is not hooked[0]:
                hooked[0] = reader
                reader.feed_data = functools.partial(feed, reader)
                self._attach_writer()
            if not reader._buffer:
                passing[0] = False

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
                start = 0  # natskv's frames from here on are delivered in one run
                for i, frame in enumerate(frames):
                    if frame[0] in handlers:
                        continue
                    if i > start:
                        deliver(frames[start:i])
                    start = i + 1
                    # nats-py counts these itself. Its own parser passes None for no headers
                    # too; its annotation says bytes.
                    await process_msg(
                        frame[0], frame[1].encode(), frame[2].encode(), frame[4], frame[3]  # type: ignore[arg-type]
                    )
                if start < len(frames):
                    deliver(frames[start:])
                if not control:
                    break
                end = buf.find(b"\r\n")
                line = bytes(buf[:end])
                del buf[: end + 2]
                await _control_line(line)
            caught_up()

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
        with self._out_lock:
            self._detach_writer()

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
                self._write_locked(b"".join(commands))
            elif self._remainder is not None:
                self._write_remainder()

    def write_now(self, data: bytes, msgs: int = 0, payload_bytes: int = 0) -> None:
        """Write protocol bytes from the loop thread, keeping order with nats-py's own writes;
        ``msgs`` and ``payload_bytes`` count them (commands queued by :meth:`send` are counted)."""
        with self._out_lock:
            self.out_msgs += msgs
            self.out_bytes += payload_bytes
            self._write_locked(data)

    def _write_locked(self, data: bytes) -> None:
        # Loop thread, under _out_lock: no caller writes to the socket meanwhile.
        if self._remainder is not None:
            self._write_remainder()
        nc = self._nc
        # TcpTransport's private stream writer (a new one per connection and TLS upgrade), and
        # the asyncio transport under it, looked up once per writer. A websocket transport has
        # none: its writes always go through nats-py's flusher below.
        writer = getattr(nc._transport, "_io_writer", None)
        if writer is not self._writer:
            self._writer, self._raw_transport = writer, getattr(writer, "transport", None)
        raw = self._raw_transport
        if nc.is_connected and not nc._pending and raw is not None and raw.get_write_buffer_size() < _WRITE_BUFFER_HIGH:
            raw.write(data)
            return
        # Reconnecting, or back-pressure: nats-py buffers it and its flusher writes it in order
        # (after a reconnect too).
        nc._pending.append(data)
        nc._pending_data_size += len(data)
        if nc.is_connected and nc._flush_queue is not None and nc._flush_queue.empty():
            nc._flush_queue.put_nowait(self._loop.create_future())

    def _write_remainder(self) -> None:
        # Loop thread, under _out_lock: the end of a caller's partial write goes first, on its
        # own connection only.
        assert self._remainder is not None
        (writer, rest), self._remainder = self._remainder, None
        raw = writer.transport
        if writer is getattr(self._nc._transport, "_io_writer", None) and not raw.is_closing():
            raw.write(rest)

    # -- the caller-side send ----------------------------------------------------------------
    #
    # A caller's thread whose request is the only one out, and that finds nothing queued before
    # its command (no outbox, nothing in the transport's write buffer or nats-py's, the
    # connection up), writes the command to the socket itself instead of waking the loop thread
    # to write it: one system call in place of a wake-up of the loop (its self-pipe, a poll, a
    # read) and a task switch. It writes under _out_lock, and every other write to the socket
    # (the loop's writer and write_now, nats-py's through its hooked stream writer) is made under
    # that lock too, so the bytes of two writers never interleave. The socket is nonblocking: a
    # write it takes only in part leaves its end to the loop, for that connection only. Reading,
    # connecting and reconnecting stay with the loop thread.

    def _attach_writer(self) -> None:
        """Let callers write around the current connection's stream writer when it is plain
        TCP (loop thread; called when natskv's frame reader hooks a new connection)."""
        nc = self._nc
        writer = getattr(nc._transport, "_io_writer", None)
        with self._out_lock:
            if writer is self._direct_writer:
                return
            self._detach_writer()
            if writer is None or self.closed or os.environ.get("NATSKV_NO_DIRECT_WRITE") == "1":
                return
            raw = writer.transport
            if raw.get_extra_info("sslcontext") is not None or raw.get_extra_info("ssl_object") is not None:
                return  # TLS: the socket carries ciphertext that only the transport makes
            sock = raw.get_extra_info("socket")
            try:
                fd = os.dup(sock.fileno())
            except (AttributeError, OSError, ValueError):
                return
            plain_write = writer.write
            plain_close = writer.close

            def write(data: Any) -> None:
                # nats-py's writes (loop thread): never in the middle of a caller's.
                with self._out_lock:
                    if self._remainder is not None:
                        self._write_remainder()
                    plain_write(data)

            def close() -> None:
                # nats-py drops the connection (loop thread): let go of natskv's duplicate now,
                # or the socket stays open (no FIN to the server) until the next connection.
                with self._out_lock:
                    if writer is self._direct_writer:
                        self._detach_writer()
                plain_close()

            writer.write = write
            writer.writelines = lambda lines: write(b"".join(lines))
            writer.close = close
            self._direct_writer, self._direct_raw, self._fd = writer, raw, fd

    def _detach_writer(self) -> None:
        # Under _out_lock (any thread), so no caller is writing to the duplicate.
        fd, self._fd = self._fd, -1
        self._direct_writer = self._direct_raw = None
        if fd >= 0:
            os.close(fd)

    def _write_here(self) -> bool:
        # Caller's thread, under _out_lock. nats-py's state is read, never changed, here.
        raw = self._direct_raw
        if raw is None:
            return False
        if len(self._waiting) > 1 and len(self._outbox[0]) < DIRECT_WRITE_BYTES:
            # Other requests are out: the loop thread is awake for their replies anyway, and
            # its writer sends the commands of many threads in one system call. A large command
            # (a batch of bulk_create) goes now all the same: the loop thread may be busy with
            # those replies for a while, and there is little to gain from joining it to others.
            return False
        nc = self._nc
        writer = self._direct_writer
        if (
            nc._pending
            or not nc.is_connected
            or raw.get_write_buffer_size()
            or raw.is_closing()
            or getattr(nc._transport, "_io_writer", None) is not writer
        ):
            return False
        box, self._outbox = self._outbox, []
        data = box[0] if len(box) == 1 else b"".join(box)
        try:
            written = os.write(self._fd, data)
        except BaseException as exc:
            # Nothing was written (the socket is full, the connection broke, a signal handler
            # raised): the loop's writer sends it, or nats-py keeps it for the reconnect.
            self._outbox = [data]
            if isinstance(exc, OSError):
                return False
            self._scheduled = True
            self._wake_writer()
            raise
        if written < len(data):
            self._remainder = (writer, data[written:])
            return False
        return True

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
