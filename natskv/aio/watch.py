"""Ordered push consumers: the server side of watches and of large key listings.

A :class:`ConsumerFeed` owns one ephemeral, in-memory, ack-less JetStream consumer that pushes a
bucket's messages to a private inbox. It checks the delivery sequence of every message and the idle
heartbeats; on a gap, a stall or a reconnect it recreates the consumer from the last stream sequence
it delivered, so subscribers miss nothing and see nothing twice. It runs on the loop thread and hands
events to ``sink`` (which must not block: the sync layer puts them on a queue).

Everything in this module runs on natskv's loop thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

import orjson

from natskv._collector import collector_paused
from natskv._speedups import core
from natskv.aio.connection import Connection
from natskv.errors import BucketNotFoundError, NatsKVError, NatsKVTimeoutError
from natskv.wire.headers import OP_PUT
from natskv.wire.jsapi import API_LEVEL_TTL
from natskv.wire.kv import NANOS, KVProtocol, RawEntry, entry_from_headers
from natskv.wire.replies import RawReply, encode_command, fresh_error, parse_reply_headers, status_of

log = logging.getLogger("natskv")

# The server sends an idle heartbeat when a consumer has delivered nothing for HEARTBEAT seconds.
# A consumer dies silently with its node (the client stays connected to another one), so the
# feed counts silence: MISSED_HEARTBEATS beats without a message mean the consumer is gone and
# is recreated (about 1 s of detection; the cost is 1 / HEARTBEAT messages a second per idle
# feed, and a feed is shared by every watcher of a bucket and filter on a connection).
HEARTBEAT = 0.5
MISSED_HEARTBEATS = 2
FAST_RECREATE_TRIES = 6  # consumer creates with a short timeout before backing off (see _recreate)
INACTIVE_THRESHOLD = 120.0  # the server removes a consumer nobody listens to after this long


class InitialDone:
    """Marker event: every value that existed when the watch started has been delivered."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "InitialDone"


INITIAL_DONE = InitialDone()


class FeedClosed:
    """Last event of a feed whose connection nats-py closed for good: ``error`` says why.

    Nothing more will be delivered; watchers raise (or report) it, replicas refuse reads with it.
    """

    __slots__ = ("error",)

    def __init__(self, error: NatsKVError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"FeedClosed({self.error!r})"


def _each(sink: Callable[[Any], None], events: list[Any]) -> None:
    for event in events:
        sink(event)


class ConsumerFeed:
    """One ordered push consumer and its recovery logic. Loop thread only."""

    def __init__(
        self,
        conn: Connection,
        proto: KVProtocol,
        filter_subject: str,
        sink: Callable[[Any], None],
        *,
        deliver_policy: str = "last_per_subject",
        headers_only: bool = False,
        sink_many: Callable[[list[RawEntry]], None] | None = None,
    ) -> None:
        self.conn = conn
        self.proto = proto
        self.filter_subject = proto.subject_prefix + filter_subject
        self.sink = sink
        # Takes a run of consecutive entries at once (the same as ``sink`` on each, in order).
        self.sink_many = sink_many if sink_many is not None else functools.partial(_each, sink)
        self.deliver_policy = deliver_policy
        self.headers_only = headers_only
        self.consumer_name = ""
        self.last_sseq = 0  # stream sequence of the last message handed to sink
        # True once last_sseq is a resume point (a message was delivered, or the consumer started
        # with nothing pending): recreated consumers then start right after it.
        self._positioned = False
        self._next_dseq = 1
        self._initial_pending = deliver_policy != "new"
        self._sid: int | None = None
        self._inbox = ""
        self._stopped = False
        self._resetting = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._loop = asyncio.get_running_loop()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        assert self.conn.nc is not None and self.conn.mux is not None
        self._inbox = self.conn.nc.new_inbox()
        self._sid = await self.conn.mux.subscribe(self._inbox, self._on_message, self._on_messages)
        self.conn.on_reconnect.append(self._on_reconnect)
        self.conn.on_closed.append(self._on_closed)
        await self._create_consumer()
        # A refused SUB is answered (with -ERR) before the consumer's create request.
        denied = self.conn.subscription_denied(self._inbox)
        if denied is not None:
            await self.stop()
            raise denied
        self._arm_watchdog()

    def _halt(self) -> bool:
        """Stop the watchdog and leave the connection's hooks; False when already stopped."""
        if self._stopped:
            return False
        self._stopped = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._on_reconnect in self.conn.on_reconnect:
            self.conn.on_reconnect.remove(self._on_reconnect)
        if self._on_closed in self.conn.on_closed:
            self.conn.on_closed.remove(self._on_closed)
        return True

    async def stop(self) -> None:
        """Stop deliveries and delete the server consumer."""
        if not self._halt():
            return
        assert self.conn.mux is not None
        if self._sid is not None:
            await self.conn.mux.unsubscribe(self._sid)
        await self._delete_consumer(self.consumer_name)

    async def _delete_consumer(self, name: str) -> None:
        if not name or self.conn.nc is None or not self.conn.nc.is_connected:
            return
        try:
            await self.conn.js_api(f"CONSUMER.DELETE.{self.proto.stream}.{name}", None, timeout=2.0)
        except NatsKVError:
            # Already gone (server restart) or unreachable: the inactive threshold removes it.
            log.debug("natskv: could not delete consumer %s", name, exc_info=True)

    async def _create_consumer(self, timeout: float | None = None) -> None:
        config: dict[str, Any] = {
            "deliver_subject": self._inbox,
            "ack_policy": "none",
            "max_deliver": 1,
            "flow_control": True,
            "idle_heartbeat": int(HEARTBEAT * NANOS),
            "headers_only": self.headers_only,
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(INACTIVE_THRESHOLD * NANOS),
            "replay_policy": "instant",
            "filter_subject": self.filter_subject,
        }
        # Name the consumer before creating it: deliveries can arrive before the API's answer.
        name = self.conn.nc.new_inbox().rpartition(".")[2] if self.conn.nc else "natskv"
        config["name"] = name
        self.consumer_name = name
        self._next_dseq = 1
        if self._positioned:
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = self.last_sseq + 1
        else:
            config["deliver_policy"] = self.deliver_policy
        try:
            info = await self.conn.js_api(
                f"CONSUMER.CREATE.{self.proto.stream}.{name}",
                {"stream_name": self.proto.stream, "config": config},
                timeout,
            )
        except BaseException as exc:
            self.consumer_name = ""
            if isinstance(exc, NatsKVTimeoutError):
                # Placed on a server that died and is not yet known as offline (only that server
                # answers a create): remove the assignment; the next try is placed again.
                self._loop.create_task(self._delete_consumer(name))
            raise
        self._last_activity = self._loop.time()
        if info.get("num_pending", 0) == 0 and not self._positioned:
            # Nothing to deliver yet: remember where the stream stood, so a consumer recreated
            # after a restart starts there and misses nothing written in between.
            self.last_sseq = int((info.get("delivered") or {}).get("stream_seq", 0))
            self._positioned = True
        if self._initial_pending and info.get("num_pending", 0) == 0:
            self._initial_pending = False
            self.sink(INITIAL_DONE)

    # -- deliveries -------------------------------------------------------------------------

    def _on_message(self, subject: str, data: bytes, headers: Any, reply: str) -> None:
        if self._stopped:
            return
        self._last_activity = self._loop.time()
        status = status_of(headers) if not data else 0
        if status == 100:
            self._on_control(headers, reply)
            return
        if not reply.startswith("$JS.ACK."):
            return
        try:
            _, consumer, _, sseq, dseq, ts_ns, pending = core.parse_ack_subject(reply)
        except ValueError:
            log.warning("natskv: unparseable ack subject %r", reply)
            return
        if consumer != self.consumer_name:
            return  # a late message from a consumer we replaced
        if dseq != self._next_dseq:
            self._reset(f"delivery gap (expected {self._next_dseq}, got {dseq})")
            return
        self._next_dseq = dseq + 1
        self.last_sseq = sseq
        self._positioned = True
        if headers is None and not self.headers_only:
            # A plain put (no TTL, no marker, not raw bytes): nothing in the headers to read.
            entry = RawEntry(subject, data, sseq, str(ts_ns), OP_PUT, pending)
        else:
            _, _, hdrs = parse_reply_headers(headers)
            entry = entry_from_headers(hdrs, data, subject)
            entry.revision = sseq
            entry.timestamp = str(ts_ns)
            entry.delta = pending
            if self.headers_only:
                entry.data = b""
        self.sink(entry)
        if self._initial_pending and pending == 0:
            self._initial_pending = False
            self.sink(INITIAL_DONE)

    def _on_messages(self, frames: list[Any]) -> None:
        # The frame reader's run of this consumer's messages: the plain deliveries (the whole
        # initial load of a bucket written without headers) are checked and turned into entries
        # in one _core call per run; anything else goes through _on_message, one at a time.
        if self._stopped:
            return
        self._last_activity = self._loop.time()
        if not self._initial_pending:
            self._take_runs(frames)
            return
        # The initial values are kept (a replica holds them): the collector's passes over the
        # growing heap, started by these allocations, would find nothing to free.
        with collector_paused():
            self._take_runs(frames)

    def _take_runs(self, frames: list[Any]) -> None:
        take = core.take_deliveries
        count = len(frames)
        index = 0
        while index < count:
            initial = self._initial_pending
            # With ``initial``, the run also ends after the last of the initial values.
            entries, stop = take(frames, index, self.consumer_name, self._next_dseq, RawEntry, initial)
            if entries:
                last = entries[-1]
                self._next_dseq += len(entries)
                self.last_sseq = last.revision
                self._positioned = True
                self.sink_many(entries)
                if initial and last.delta == 0:
                    self._initial_pending = False
                    self.sink(INITIAL_DONE)
                    index = stop
                    continue
            if stop < count:  # a frame the run stopped at: a control message, headers, a gap ...
                _, subject, reply, headers, data = frames[stop]
                self._on_message(subject, data, headers, reply)
                if self._stopped:
                    return
                stop += 1
            index = stop

    def _on_control(self, headers: Any, reply: str) -> None:
        _, desc, hdrs = parse_reply_headers(headers)
        assert self.conn.mux is not None
        if desc.startswith("FlowControl") and reply:
            self.conn.mux.write_now(core.pub_command(reply, "", b"", None))
            return
        stalled = hdrs.get("Nats-Consumer-Stalled")
        if stalled:
            self.conn.mux.write_now(core.pub_command(stalled, "", b"", None))
        last_consumer = hdrs.get("Nats-Last-Consumer")
        if last_consumer is not None and int(last_consumer) != self._next_dseq - 1:
            self._reset(f"heartbeat reports delivery {last_consumer}, saw {self._next_dseq - 1}")

    # -- recovery -----------------------------------------------------------------------------

    def _on_reconnect(self) -> None:
        self._reset("reconnected")

    def _on_closed(self, error: NatsKVError) -> None:
        # The connection will not come back: no consumer can be recreated, so say so once
        # instead of leaving the subscribers waiting in silence.
        if self._halt():
            self.sink(FeedClosed(error))

    def _reset(self, why: str) -> None:
        if self._stopped or self._resetting:
            return
        self._resetting = True
        log.info("natskv: resuming watch on %s after stream sequence %d: %s", self.filter_subject, self.last_sseq, why)
        self._loop.create_task(self._recreate())

    async def _recreate(self) -> None:
        old = self.consumer_name
        self.consumer_name = ""  # drop whatever the old consumer still delivers
        delay = 0.05
        # A create answers in milliseconds, unless the server it was placed on is dead (the meta
        # leader places it at random, and learns of a death only seconds later): then try again
        # soon, a new placement, rather than after the whole request timeout; six times (with one
        # of three nodes dead, three dead placements in a row happened about once in a hundred
        # failovers and cost over 2 s), then with longer waits in case the servers are just slow.
        create_timeout = 0.25
        timeouts = 0
        try:
            while not self._stopped:
                try:
                    await self._create_consumer(create_timeout)
                    # Deleted after the new one is up: a consumer on a dead node makes the delete
                    # wait for its timeout, which must not delay the resumed deliveries.
                    self._loop.create_task(self._delete_consumer(old))
                    return
                except BucketNotFoundError:
                    log.warning("natskv: bucket %r was deleted; its watch stops", self.proto.bucket)
                    await self.stop()
                    return
                except NatsKVTimeoutError as exc:
                    log.info("natskv: could not recreate watch consumer yet: %s", exc)
                    timeouts += 1
                    if timeouts >= FAST_RECREATE_TRIES:
                        create_timeout = min(create_timeout * 2, self.conn.options.request_timeout)
                except NatsKVError as exc:
                    log.info("natskv: could not recreate watch consumer yet: %s", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
        finally:
            self._resetting = False

    def _arm_watchdog(self) -> None:
        # One timer per feed, due when the silence would reach the limit; a message in between
        # only moves the due time (the timer does not fire per message).
        limit = MISSED_HEARTBEATS * HEARTBEAT

        def check() -> None:
            if self._stopped:
                return
            silent = self._loop.time() - self._last_activity
            if silent < limit:
                self._watchdog = self._loop.call_later(limit - silent, check)
                return
            if not self._resetting and self.conn.nc is not None and self.conn.nc.is_connected:
                self._reset(f"no message or heartbeat for {silent:.1f} s (consumer lost with its server?)")
                self._last_activity = self._loop.time()  # give the new consumer a full period
            self._watchdog = self._loop.call_later(limit, check)

        self._watchdog = self._loop.call_later(limit, check)


async def snapshot(
    conn: Connection, proto: KVProtocol, filter_subject: str, headers_only: bool, timeout: float
) -> list[RawEntry]:
    """The latest message of every subject under ``filter_subject``, read through a consumer.

    Used where a batch direct get would match too many subjects. Deletes are included.
    """
    return (await _snapshot_at(conn, proto, filter_subject, headers_only, timeout))[0]


async def _snapshot_at(
    conn: Connection, proto: KVProtocol, filter_subject: str, headers_only: bool, timeout: float
) -> tuple[list[RawEntry], int]:
    """:func:`snapshot`, and the stream sequence it is complete up to: every message under the
    filter up to that sequence is reflected in it, none after it."""
    out: list[RawEntry] = []
    done = asyncio.Event()
    closed: list[NatsKVError] = []
    position: list[int] = []

    def sink(event: Any) -> None:
        if position:
            return  # a change after the end of the initial values: not part of the snapshot
        if event is INITIAL_DONE:
            position.append(feed.last_sseq)
            done.set()
        elif type(event) is FeedClosed:
            closed.append(event.error)
            done.set()
        else:
            out.append(event)

    feed = ConsumerFeed(conn, proto, filter_subject, sink, headers_only=headers_only)
    await feed.start()
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await feed.stop()
    if closed:
        raise fresh_error(closed[0])
    return out, position[0]


async def latest_async(
    conn: Connection, proto: KVProtocol, filter_subject: str, timeout: float
) -> list[RawEntry] | None:
    """The latest message per subject under ``filter_subject`` in one batch direct get, the
    loop thread's form of :meth:`KVProtocol.get_last_many`. None when it matches too many
    subjects for one batch get (413) or the server has no batch get."""
    if conn.api_level < API_LEVEL_TTL:
        return None
    mux = conn.mux
    assert mux is not None
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    replies: list[RawReply] = []

    def collect(data: bytes, headers: Any, reply: str) -> bool:
        replies.append((data, headers, reply))
        if not data and status_of(headers):
            if not done.done():
                done.set_result(None)
            return True
        return False

    token = mux.new_token()
    mux.add_route(token, collect)
    body = orjson.dumps({"multi_last": [proto.subject_prefix + filter_subject]})
    mux.write_now(encode_command(proto.direct_batch, mux.prefix + token, body, None), 1, len(body))
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        mux.remove_route(token)
    return proto.batch_entries(replies)


# A shared feed's initial values are checked against one batch direct get (see
# SharedFeed._complete_initial), which the server answers only for this many subjects at most.
BATCH_GET_SUBJECTS = 1024


class FeedSubscriber:
    """One watcher's place on a shared feed. Loop thread only.

    ``wants_initial`` marks subscribers still waiting for the feed's end-of-initial-values marker;
    ``held`` (not None) the live changes of a subscriber that joined a running feed, kept while its
    own initial values are read (:meth:`SharedFeed.join`).
    """

    __slots__ = ("held", "sink", "sink_many", "wants_initial")

    def __init__(self, sink: Callable[[Any], None], sink_many: Callable[[list[RawEntry]], None] | None = None) -> None:
        self.sink = sink
        # A run of entries in one call: the same as ``sink`` on each, in order.
        self.sink_many = sink_many if sink_many is not None else functools.partial(_each, sink)
        self.wants_initial = False
        self.held: list[Any] | None = None


class SharedFeed:
    """A consumer feed fanned out to every watcher of the same bucket, filter and start policy.

    The feed keeps no copy of the values it delivers (a replica of a large bucket would hold them
    twice): a watcher that joins a running ``last_per_subject`` feed reads its initial values from
    a snapshot consumer of its own, complete up to a known stream sequence, and then gets the
    shared feed's changes after that sequence, held until then: nothing missed, nothing twice.
    """

    def __init__(self, conn: Connection, proto: KVProtocol, filter_subject: str, policy: str) -> None:
        self.key = (proto.stream, filter_subject, policy)
        self.subscribers: list[FeedSubscriber] = []
        self.initial_done = policy == "new"
        self.replays = policy == "last_per_subject"
        self.closed = False
        # During the initial values only: the revision of each subject delivered, which
        # _complete_initial needs. Dropped (None) once there are more subjects than its batch get
        # can answer for: the check is then skipped, as the server would refuse it.
        self._seen: dict[str, int] | None = {} if self.replays else None
        # Revisions that _complete_initial delivered ahead of the consumer, which sends them later.
        self._ahead: dict[str, int] = {}
        # Live changes that arrive while the initial values are being checked (_complete_initial):
        # held back, so that every subscriber sees them after the end-of-initial-values marker.
        self._held: list[Any] | None = None
        self.feed = ConsumerFeed(conn, proto, filter_subject, self._fan_out, deliver_policy=policy,
                                 sink_many=self._fan_out_many)

    def _fan_out(self, event: Any) -> None:
        if type(event) is FeedClosed:
            self.closed = True
            conn = self.feed.conn
            if conn.feeds.get(self.key) is self:
                del conn.feeds[self.key]
            for sub in self.subscribers:
                sub.held = None
                sub.sink(event)
            return
        if event is INITIAL_DONE:
            if self.replays and not self.initial_done:
                # Check the initial values against a snapshot before declaring them complete.
                self._held = []
                asyncio.get_running_loop().create_task(self._complete_initial())
            else:
                self._initial_done()
            return
        if self._held is not None:
            self._held.append(event)
            return
        self._deliver(event)

    def _fan_out_many(self, entries: list[RawEntry]) -> None:
        # A run of entries (no markers): the same as _fan_out on each, with one call per
        # subscriber once the bookkeeping of the first initial values is over.
        if self._held is not None:
            self._held.extend(entries)
            return
        if self._seen is not None or self._ahead:
            for entry in entries:
                self._deliver(entry)
            return
        for sub in self.subscribers:
            if sub.held is None:
                sub.sink_many(entries)
            else:
                sub.held.extend(entries)

    def _deliver(self, event: RawEntry) -> None:
        seen = self._seen
        if seen is not None:
            if event.operation == "PUT":
                seen[event.subject] = event.revision
                if len(seen) > BATCH_GET_SUBJECTS:
                    self._seen = None
            else:
                seen.pop(event.subject, None)
        ahead = self._ahead
        if ahead:
            revision = ahead.get(event.subject)
            if revision is not None:
                if revision >= event.revision:
                    return  # already delivered (from the completion check)
                del ahead[event.subject]
        for sub in self.subscribers:
            if sub.held is None:
                sub.sink(event)
            else:
                sub.held.append(event)

    async def _complete_initial(self) -> None:
        # With history=1, a key overwritten while the consumer sends its initial values loses
        # the revision the consumer was going to send; its new revision would only come after
        # the marker. One batch get fills such gaps first, so the initial values are complete.
        seen, self._seen = self._seen, None
        entries = None
        if seen is not None:
            try:
                entries = await latest_async(self.feed.conn, self.feed.proto, self.key[1], 5.0)
            except Exception:
                log.debug("natskv: could not check a watch's initial values", exc_info=True)
        for entry in sorted(entries or (), key=lambda e: e.revision):
            # Only keys the consumer never sent: a newer revision of a key already sent is a live
            # change, which the consumer delivers (held until after the marker).
            if entry.operation == "PUT" and seen is not None and entry.subject not in seen:
                self._deliver(entry)
                self._ahead[entry.subject] = entry.revision
        self._initial_done()
        held, self._held = self._held or [], None
        for event in held:
            self._deliver(event)

    def _initial_done(self) -> None:
        self.initial_done = True
        for sub in self.subscribers:
            if sub.wants_initial:
                sub.wants_initial = False
                sub.sink(INITIAL_DONE)

    def join(self, sub: FeedSubscriber) -> None:
        """Attach a subscriber to a running feed; on a ``last_per_subject`` feed, its initial
        values (then the marker) come from a snapshot read in a task of its own."""
        if self.replays:
            sub.held = []
            asyncio.get_running_loop().create_task(self._catch_up(sub))
        self.subscribers.append(sub)

    async def _catch_up(self, sub: FeedSubscriber) -> None:
        feed = self.feed
        try:
            entries, position = await _snapshot_at(
                feed.conn, feed.proto, self.key[1], False, max(feed.conn.options.request_timeout, 60.0)
            )
            current: dict[str, RawEntry] = {}
            for entry in entries:
                if entry.operation == "PUT":
                    current[entry.subject] = entry
                else:
                    current.pop(entry.subject, None)
            # The gaps a key overwritten during the snapshot leaves (see _complete_initial), filled
            # the same way; such a key's revision is past the snapshot, so the changes held for
            # the subscriber skip it by subject.
            ahead: dict[str, int] = {}
            if len(current) <= BATCH_GET_SUBJECTS:
                try:
                    latest = await latest_async(feed.conn, feed.proto, self.key[1], 5.0)
                except Exception:
                    log.debug("natskv: could not check a watch's initial values", exc_info=True)
                    latest = None
                for entry in latest or ():
                    if entry.operation == "PUT" and entry.subject not in current:
                        current[entry.subject] = entry
                        ahead[entry.subject] = entry.revision
        except Exception as exc:
            if sub in self.subscribers and not self.closed:
                self.subscribers.remove(sub)
                error = exc if isinstance(exc, NatsKVError) else NatsKVError(
                    f"could not read a watch's initial values: {exc}")
                sub.held = None
                sub.sink(FeedClosed(error))
            return
        if sub not in self.subscribers or self.closed:
            return  # unsubscribed meanwhile, or the connection closed (the subscriber was told)
        for entry in sorted(current.values(), key=lambda e: e.revision):
            sub.sink(entry)
        sub.sink(INITIAL_DONE)
        held, sub.held = sub.held or [], None
        for event in held:
            if event.revision > max(position, ahead.get(event.subject, 0)):
                sub.sink(event)


async def subscribe_feed(
    conn: Connection,
    proto: KVProtocol,
    filter_subject: str,
    policy: str,
    sink: Callable[[Any], None],
    sink_many: Callable[[list[RawEntry]], None] | None = None,
) -> tuple[SharedFeed, FeedSubscriber]:
    """Attach ``sink`` to the client's feed for this bucket and filter, starting one if needed.

    ``policy`` is ``last_per_subject`` (initial values, then changes), ``new`` (changes only) or
    ``all`` (full history, never shared). ``sink_many``, when given, receives runs of entries
    (never a marker) in one call, as ``sink`` would one by one.
    """
    sub = FeedSubscriber(sink, sink_many)
    shared = conn.feeds.get((proto.stream, filter_subject, policy)) if policy != "all" else None
    if shared is None:
        return await _start_feed(conn, proto, filter_subject, policy, sub, register=policy != "all")
    shared.join(sub)
    return shared, sub


async def _start_feed(
    conn: Connection, proto: KVProtocol, filter_subject: str, policy: str, sub: FeedSubscriber, register: bool
) -> tuple[SharedFeed, FeedSubscriber]:
    shared = SharedFeed(conn, proto, filter_subject, policy)
    sub.wants_initial = policy != "new"
    shared.subscribers.append(sub)
    if register:
        conn.feeds[shared.key] = shared
    try:
        await shared.feed.start()
    except BaseException:
        if conn.feeds.get(shared.key) is shared:
            del conn.feeds[shared.key]
        await shared.feed.stop()
        raise
    return shared, sub


async def unsubscribe_feed(shared: SharedFeed, sub: FeedSubscriber) -> None:
    """Detach a subscriber; the last one out stops the feed and deletes its consumer."""
    if sub in shared.subscribers:
        shared.subscribers.remove(sub)
    if not shared.subscribers:
        conn = shared.feed.conn
        if conn.feeds.get(shared.key) is shared:
            del conn.feeds[shared.key]
        await shared.feed.stop()


async def stop_feeds_of(conn: Connection, stream: str) -> None:
    """Stop every shared feed of ``stream`` (its bucket is being deleted)."""
    for key, shared in list(conn.feeds.items()):
        if key[0] == stream:
            del conn.feeds[key]
            shared.subscribers.clear()
            await shared.feed.stop()
