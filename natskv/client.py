"""Client: one connection to NATS, shared by every thread of the process.

``natskv.connect()`` returns a :class:`Client`. It is thread-safe: any number of threads may use it
(and its buckets) at once; their requests are multiplexed over the one connection. It is fork-safe:
a forked child that uses an inherited client gets its own connection on first use, and the parent's
is untouched (watches do not carry over into the child).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from natskv._runner import check_timeout, loop_name, runner, wait_limit
from natskv.aio.connection import Connection
from natskv.aio.watch import stop_feeds_of
from natskv.codec import Codec, get_codec
from natskv.config import ConnectOptions
from natskv.errors import (
    BucketNotFoundError,
    InvalidArgumentError,
    JetStreamError,
    NoRespondersError,
    NotConnectedError,
    PayloadTooLargeError,
    ServiceError,
)
from natskv.kv import Bucket
from natskv.pubsub import DEFAULT_MAX_PENDING
from natskv.stats import Stats
from natskv.wire import counters, jsapi
from natskv.wire import headers as h
from natskv.wire.jsapi import API_LEVEL_ATOMIC, API_LEVEL_TTL
from natskv.wire.kv import KVProtocol, validate_bucket_name
from natskv.wire.replies import parse_reply_headers
from natskv.wire.retry import request_retrying_on_503

if TYPE_CHECKING:
    from natskv.counter import Counter
    from natskv.lock import Lock
    from natskv.manager import BucketManager
    from natskv.models.live import ModelEvent
    from natskv.models.model import Model
    from natskv.models.registry import ModelRegistry
    from natskv.models.transaction import Transaction
    from natskv.pubsub import Message, PubAck, StreamInfo, Subscription
    from natskv.server import EmbeddedServer
    from natskv.watch import Watcher

log = logging.getLogger("natskv")
T = TypeVar("T")
SERVICE_ERROR, SERVICE_ERROR_CODE = "Nats-Service-Error", "Nats-Service-Error-Code"


class Client:
    """A connection to NATS JetStream and the entry point to buckets.

    Use it as a context manager, or call :meth:`close` when done.
    """

    def __init__(self, options: ConnectOptions, server: EmbeddedServer | None = None) -> None:
        self.options = options
        self.server = server
        self._servers = list(options.servers) if options.servers else [server.url] if server else []
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str, int], Bucket] = {}
        # Every Bucket handed out, open or closed by the bucket manager: a forked child points
        # them all at its own connection.
        self._every_bucket: weakref.WeakSet[Bucket] = weakref.WeakSet()
        self._manager: BucketManager | None = None
        self._watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
        self._registry: ModelRegistry | None = None  # made by _models() on the first model call
        self._counters: dict[str, int] = {}  # counter streams known to exist: their replicas
        self._stats = Stats()  # per-operation counts and latencies (natskv.stats)
        self._closed = False
        self._pid = os.getpid()
        self._conn = self._open()
        self._finalizer = self._close_when_dropped()
        runner.register(self)
        if options.bucket_keep_alive is not None:
            self.bucket_manager(keep_alive=options.bucket_keep_alive, sweep_every=options.bucket_sweep_every)

    def _open(self) -> Connection:
        conn = Connection(self.options, self._servers)
        # Connection.connect() bounds the TCP/TLS connect itself (and raises NotConnectedError);
        # this outer limit only adds room for reading the server's JetStream info.
        budget = self.options.connect_timeout * max(1, len(self._servers)) + 1.0 + self.options.request_timeout
        runner.call(conn.connect(), budget + 1.0, what=f"connecting to {', '.join(self._servers)}")
        return conn

    def _close_when_dropped(self) -> weakref.finalize[[Connection, int], Client]:
        # A client that is garbage-collected without close() must not keep its socket (and the
        # server's resources) until the process exits. The finalizer holds the connection, never
        # the client, so it does not keep the client alive. At interpreter exit the runner
        # closes open clients in order (with a drain), so the finalizer stays out of that.
        finalizer = weakref.finalize(self, _close_dropped, self._conn, self._pid)
        finalizer.atexit = False
        return finalizer

    def _check(self) -> None:
        """Reconnect in a forked child; refuse use after close()."""
        if self._closed:
            raise NotConnectedError("this client is closed; create a new one with natskv.connect()")
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._finalizer.detach()  # the parent's connection: not this process's to close
                    self._conn = self._open()
                    for bucket in list(self._every_bucket):
                        bucket._proto.conn = self._conn
                    self._watchers = weakref.WeakSet()
                    self._pid = os.getpid()
                    self._finalizer = self._close_when_dropped()
                    runner.register(self)

    # -- buckets -------------------------------------------------------------------------------

    def bucket(
        self,
        name: str,
        *,
        history: int = 1,
        ttl: float | None = None,
        replicas: int = 1,
        max_value_size: int | None = None,
        max_bytes: int = -1,
        storage: str = "file",
        codec: str | Codec | None = None,
        sep: str = ":",
        create: bool = True,
        timeout: float | None = None,
    ) -> Bucket:
        """The bucket ``name``, created with these settings if it does not exist yet.

        ``history`` revisions are kept per key (1..64); ``ttl`` (seconds) expires every value;
        ``codec`` is ``"json"`` (default), ``"bytes"``, ``"str"`` or a Codec object; ``sep`` is the
        key hierarchy separator used for server-side pattern filtering (``""`` for none). With
        ``create=False`` a missing bucket raises :class:`BucketNotFoundError`. Settings of an
        existing bucket are not changed.
        """
        validate_bucket_name(name)
        check_timeout(timeout)
        if not isinstance(sep, str) or len(sep) > 1:
            raise InvalidArgumentError(f"sep must be one character or '', not {sep!r}")
        self._check()
        runner.check_not_loop_thread()
        codec_obj = get_codec(codec)  # an unknown codec fails before the bucket is created
        key = (name, sep, id(codec_obj))
        cached = self._buckets.get(key)
        if cached is not None and cached.codec is codec_obj:
            return cached
        proto = KVProtocol(self._conn, name)
        config = proto.stream_config(history, ttl, replicas, max_value_size, storage, max_bytes)
        proto.ensure(config, create, timeout if timeout is not None else self.options.request_timeout)
        bucket = Bucket(self, proto, codec_obj, sep)
        self._buckets[key] = bucket
        self._every_bucket.add(bucket)
        if self._manager is not None:
            self._manager.opened(name)
        return bucket

    def _reopen(self, bucket: Bucket) -> None:
        """A bucket the manager closed is used again: back in the table, and observers told."""
        bucket._dormant = False
        with self._lock:
            self._buckets.setdefault((bucket.name, bucket.sep, id(bucket.codec)), bucket)
        if self._manager is not None:
            self._manager.opened(bucket.name)

    def bucket_manager(self, *, keep_alive: float = 3600, sweep_every: float = 60) -> BucketManager:
        """Close the buckets, replicas and near caches' watches nobody used for ``keep_alive``
        seconds, looking every ``sweep_every`` seconds (a background thread); what was closed
        opens again on its next use. Buckets with a running watcher, a registered model or an
        open replica stay open (see :mod:`natskv.manager`). Returns the
        :class:`~natskv.manager.BucketManager` (``on(event, cb)``, ``sweep()``,
        ``open_buckets()``, ``stop()``); calling again replaces it with these settings. The
        connect options ``bucket_keep_alive=`` and ``bucket_sweep_every=`` start one too."""
        from natskv.manager import BucketManager

        self._check()
        manager = BucketManager(self, keep_alive=keep_alive, sweep_every=sweep_every)
        old, self._manager = self._manager, manager
        if old is not None:
            old.stop()
        return manager

    def delete_bucket(self, name: str, *, timeout: float | None = None) -> bool:
        """Delete a bucket and all its data. Returns False when it did not exist."""
        validate_bucket_name(name)
        self._check()
        proto = KVProtocol(self._conn, name)
        # This client's watches and model replicas on the bucket end with it.
        runner.call(
            stop_feeds_of(self._conn, proto.stream), self.options.request_timeout,
            what=f"delete_bucket({name!r}) stopping the bucket's watches",
        )
        if self._registry is not None:
            self._registry.forget_bucket(name)
        t = timeout if timeout is not None else self.options.request_timeout
        try:
            proto.destroy(t)
        except BucketNotFoundError:
            return False
        finally:
            for key in [k for k in self._buckets if k[0] == name]:
                del self._buckets[key]
            self._counters.pop(f"KVC_{name}", None)
        try:  # the bucket's autoincrement counters go with it
            jsapi.call(self._conn, f"STREAM.DELETE.KVC_{name}", None, t)
        except BucketNotFoundError:
            pass
        return True

    def buckets(self, *, timeout: float | None = None) -> list[str]:
        """Names of the KV buckets on the server."""
        self._check()
        t = timeout if timeout is not None else self.options.request_timeout
        names: list[str] = []
        offset = 0
        while True:
            reply = jsapi.call(self._conn, "STREAM.NAMES", {"offset": offset, "subject": "$KV.*.>"}, t)
            batch = reply.get("streams") or []
            names.extend(s[3:] for s in batch if s.startswith("KV_"))
            offset += len(batch)
            if not batch or offset >= reply.get("total", 0):
                return sorted(names)

    # -- models (natskv.models.registry does the work) --------------------------------------------

    def _models(self) -> ModelRegistry:
        """This client's model registry, made on first use. natskv.models is imported here, not
        at the top of this module: the model layer sits above the client and imports it (for
        types only), so a module-level import would make a cycle."""
        registry = self._registry
        if registry is None:
            from natskv.models.registry import ModelRegistry

            with self._lock:
                if self._registry is None:
                    self._registry = ModelRegistry(self)
                registry = self._registry
        return registry

    def register(self, model: type[Model], *, bucket: str | None = None, timeout: float | None = None) -> type[Model]:
        """Bind ``model`` to this client: create its bucket if needed, load its records into a
        live in-memory replica with its indexes, and return the model class.

        The bucket is ``model.__bucket__`` or the class name in lower case. ``timeout=None`` is
        the client's default, but at least 30 s for the first load of the records (it streams the
        whole bucket); NatsKVTimeoutError when the load takes longer.
        """
        return self._models().register(model, bucket=bucket, timeout=timeout)

    def transaction(self, *, timeout: float | None = None) -> Transaction:
        """``with db.transaction() as tx:`` -- record changes (``tx.create``, ``tx.save``,
        ``tx.delete``) committed as one atomic batch when the block ends, each changed record
        checked against the version it was read at. Optimistic: on a conflict the commit raises
        RevisionMismatchError (or UniqueConstraintError) and stores nothing; run the block again.
        The records must share one bucket (a JetStream batch covers one stream). ``timeout`` is
        that of every request the transaction makes (None: the client's default)."""
        return self._models().transaction(timeout)

    def run_transaction(self, fn: Callable[[Transaction], T], *, retries: int = 5, timeout: float | None = None) -> T:
        """Call ``fn(tx)`` in a transaction and commit it; on a conflict (another client changed a
        record ``fn`` read, RevisionMismatchError) run ``fn`` again in a fresh one, up to
        ``retries`` more times. Returns what ``fn`` returned. ``fn`` must read what it changes
        through ``tx.get`` (so each run sees fresh records) and have no other side effects."""
        return self._models().run_transaction(fn, retries, timeout)

    def on(self, pattern: str, callback: Callable[[ModelEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for model events whose name matches the glob ``pattern``.

        Names are ``"<bucket>.inserted"``, ``"<bucket>.updated"``, ``"<bucket>.deleted"`` and
        ``"<bucket>.expired"``, the last for a record the server removed when its TTL ran out
        (see ``Model.__ttl__``). A model's bucket is its lower-case class name unless set.
        Patterns use the glob rules of keys (``kv.keys()``): ``*`` any run of characters (``.``
        included), ``?`` one character, ``[abc]``, ``[a-z]``, ``[^abc]`` / ``[!abc]``, ``\\x`` a
        literal x; so ``"*.deleted"``, ``"user.*"``, ``"*"``. A malformed pattern (an
        unterminated ``[``) raises InvalidArgumentError. Callbacks run on one dispatcher thread,
        in order; the event carries ``old`` and ``new`` records. Returns a function that removes
        the handler.
        """
        return self._models().on(pattern, callback)

    def define(self, name: str, attributes: Mapping[str, Any], *, indexes: Iterable[str | Mapping[str, Any]] = (),
               bucket: str | None = None, timeout: float | None = None) -> type[Model]:
        """Define and register a model from Sequelize-style attribute dicts, e.g.
        ``db.define("User", {"id": {"type": "INTEGER", "primaryKey": True, "autoIncrement": True},
        "email": {"type": "STRING", "unique": True, "validate": {"isEmail": True}}},
        indexes=["age"])``. ``indexes`` names fields to index (or Sequelize index dicts with
        ``fields`` and optional ``unique``). See natskv.models.attributes for every option."""
        return self._models().define(name, attributes, indexes=indexes, bucket=bucket, timeout=timeout)

    def get_model(self, name: str) -> type[Model]:
        """A model registered with this client, by class name."""
        return self._models().get_model(name)

    # -- counters and locks ------------------------------------------------------------------------

    def counter(self, name: str, *, bucket: str = "counters", timeout: float | None = None) -> Counter:
        """The distributed counter ``name``: the server adds (nats-server 2.12 or newer), so any
        number of threads and processes count exactly. It lives in the counter stream of
        ``bucket`` (created with default settings if missing; create it first with
        ``db.bucket(bucket, replicas=3)`` for a replicated counter). See :class:`natskv.Counter`."""
        return self.bucket(bucket, timeout=timeout).counter(name)

    def lock(
        self, name: str, *, ttl: float = 30, timeout: float | None = None, blocking: bool = True,
        bucket: str = "locks",
    ) -> Lock:
        """The distributed mutex ``name`` (not yet acquired): use it in a ``with`` statement or
        call ``acquire()``. A holder that dies keeps it at most ``ttl`` seconds; ``timeout`` and
        ``blocking`` are the defaults of ``acquire()``. The lock's key lives in ``bucket``
        (created with default settings if missing). Needs per-key TTL (nats-server 2.11). See
        :class:`natskv.Lock`."""
        from natskv.lock import Lock

        self._check()
        self._conn.require(API_LEVEL_TTL, "locks (per-key TTL)")  # before the bucket is made
        return Lock(self.bucket(bucket, timeout=timeout if timeout != math.inf else None), name,
                    ttl=ttl, timeout=timeout, blocking=blocking)

    def _counter_value(self, bucket: str, field: str, timeout: float | None) -> int:
        """The value of an autoincrement counter (0 when it never counted; its stream is made
        if missing)."""
        self._check()
        t = timeout if timeout is not None else self.options.request_timeout
        counters.prepare(self._conn, self._counters, bucket, "autoincrement fields (counter streams)", t)
        return counters.read(self._conn, counters.stream_of(bucket), f"$KVC.{bucket}.{field}", t)

    def _reset_counter(self, bucket: str, field: str, timeout: float | None) -> None:
        """Set an autoincrement counter back to 0 (nothing to do when its stream does not exist)."""
        self._check()
        t = timeout if timeout is not None else self.options.request_timeout
        try:
            counters.reset(self._conn, counters.stream_of(bucket), f"$KVC.{bucket}.{field}", t)
        except BucketNotFoundError:
            pass  # no counter stream: nothing was ever counted

    def _next_counter(self, bucket: str, field: str, timeout: float | None, count: int = 1) -> int:
        """Add ``count`` to an autoincrement counter and return its new value (see natskv.wire.counters)."""
        self._check()
        t = timeout if timeout is not None else self.options.request_timeout
        return counters.next_value(self._conn, self._counters, bucket, field, count, t)

    # -- plain NATS ------------------------------------------------------------------------------

    def publish(self, subject: str, data: bytes = b"", *, headers: dict[str, str] | None = None) -> None:
        """Publish a plain NATS message (fire and forget).

        Raises :class:`InvalidArgumentError` for a subject or headers NATS cannot carry (empty,
        whitespace, an empty token as in ``"a..b"``, a wildcard token, longer than the server's
        4096-byte protocol line) or data that is not bytes, and :class:`PayloadTooLargeError`
        above the server's max payload, before sending: the server would close the connection.
        """
        self._check()
        assert self._conn.mux is not None
        data = _outgoing(subject, data)
        self._check_size(data, headers)
        self._conn.mux.publish(subject, data, headers)

    def request(
        self, subject: str, data: bytes = b"", *, headers: dict[str, str] | None = None, timeout: float | None = None
    ) -> bytes:
        """Send a plain NATS request and return the reply's payload. Checks its arguments as
        :meth:`publish` does; raises :class:`NoRespondersError` when nothing subscribes to
        ``subject``, and :class:`ServiceError` when the responder answers with an error (the
        ``Nats-Service-Error`` headers of :meth:`respond` and NATS micro services)."""
        self._check()
        runner.check_not_loop_thread()
        assert self._conn.mux is not None
        data = _outgoing(subject, data)
        self._check_size(data, headers)
        wait = timeout if timeout is not None else self.options.request_timeout
        reply = self._conn.mux.request(subject, data, headers, wait)
        if not reply[0] and reply[1]:
            status, _, headers = parse_reply_headers(reply[1])
            if status == 503:
                raise NoRespondersError(
                    f"no subscriber answers requests on {subject!r}; start the responder or check the subject"
                )
            if SERVICE_ERROR in headers:
                code = headers.get(SERVICE_ERROR_CODE, "500")
                raise ServiceError(subject, int(code) if code.isdigit() else 500, headers[SERVICE_ERROR])
        return reply[0]

    def subscribe(
        self,
        subject: str,
        callback: Callable[[Message], Any] | None = None,
        *,
        queue: str = "",
        max_pending: int = DEFAULT_MAX_PENDING,
        on_error: Callable[[BaseException], None] | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """Receive the messages published to ``subject`` (``*`` matches one token, ``>`` the
        rest). Iterate the :class:`~natskv.pubsub.Subscription`, or pass ``callback``, which
        runs on the subscription's dispatcher thread (never natskv's loop thread). With
        ``queue``, the subscriptions of one queue group share the messages: each goes to one
        member, in any process. A consumer ``max_pending`` messages behind loses the newer ones,
        reported as :class:`SlowConsumerError` (to ``on_error``, or raised by the iterator).
        Stop it with ``unsubscribe()``, ``drain()`` or a ``with`` block."""
        from natskv.pubsub import Subscription

        self._check()
        runner.check_not_loop_thread()
        return Subscription(self, subject, callback, queue_group=queue, max_pending=max_pending,
                            on_error=on_error, timeout=wait_limit(timeout, self.options.request_timeout))

    def respond(
        self,
        subject: str,
        handler: Callable[[Message], bytes | str | None],
        *,
        queue: str = "",
        on_error: Callable[[BaseException], None] | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """Serve requests on ``subject``: ``handler(message)`` runs on a dispatcher thread and its
        return value (bytes, a str sent as UTF-8, or None for an empty body) is the reply. A
        handler that raises is logged and answered with the headers ``Nats-Service-Error`` and
        ``Nats-Service-Error-Code: 500``, so the requester does not wait for its timeout. Give
        several responders the same ``queue`` to share the load."""
        if not callable(handler):
            raise InvalidArgumentError(f"handler must be a function, not {handler!r}")

        def serve(message: Message) -> None:
            if not message.reply:
                return  # a publish, not a request: nothing to answer
            try:
                answer = handler(message)
            except Exception as exc:
                log.exception("natskv: error in the request handler on %r", subject)
                if on_error is not None:
                    on_error(exc)
                if not message._responded:
                    message.respond(b"", headers={SERVICE_ERROR: f"{type(exc).__name__}: {exc}"[:1000],
                                                  SERVICE_ERROR_CODE: "500"})
                return
            if message._responded:
                return
            if answer is None:
                answer = b""
            elif isinstance(answer, str):
                answer = answer.encode()
            message.respond(answer)

        return self.subscribe(subject, serve, queue=queue, on_error=on_error, timeout=timeout)

    def jetstream_publish(
        self,
        subject: str,
        data: bytes = b"",
        *,
        msg_id: str | None = None,
        expected_last_seq: int | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> PubAck:
        """Publish to a JetStream stream and return its :class:`~natskv.pubsub.PubAck` once the
        message is stored. ``msg_id`` deduplicates: a message with an id the stream stored within
        its duplicate window is not stored again (``PubAck.duplicate``). ``expected_last_seq``
        stores only if the stream's last sequence is that (JetStreamError otherwise). Raises
        NoRespondersError when no stream takes ``subject`` (declare one with :meth:`stream`)."""
        from natskv.pubsub import PubAck

        self._check()
        runner.check_not_loop_thread()
        assert self._conn.mux is not None
        data = _outgoing(subject, data)
        if headers is not None and not isinstance(headers, dict):
            raise InvalidArgumentError(f"headers must be a dict of str to str, not {type(headers).__name__}")
        sent = dict(headers or {})
        if msg_id is not None:
            if not isinstance(msg_id, str) or not msg_id:
                raise InvalidArgumentError(f"msg_id must be a non-empty str, not {msg_id!r}")
            sent[h.MSG_ID] = msg_id
        if expected_last_seq is not None:
            if isinstance(expected_last_seq, bool) or not isinstance(expected_last_seq, int) or expected_last_seq < 0:
                raise InvalidArgumentError(f"expected_last_seq must be an int >= 0, not {expected_last_seq!r}")
            sent[h.EXPECTED_LAST_SEQUENCE] = str(expected_last_seq)
        self._check_size(data, sent)
        limit = wait_limit(timeout, self.options.request_timeout)

        def no_stream(wait: float) -> None:
            # No stream takes the subject, or its stream has no leader (an election): only the
            # first is worth failing at once for.
            names = jsapi.call(self._conn, "STREAM.NAMES", {"subject": subject}, wait).get("streams") or []
            if not names:
                raise NoRespondersError(
                    f"no JetStream stream takes subject {subject!r}; declare one with db.stream(name, subjects=[...])"
                )

        reply = request_retrying_on_503(self._conn.mux, subject, data, sent or None, limit,
                                        f"publish to {subject!r}", no_stream)
        ack = jsapi.check_pub_ack(reply[0])
        return PubAck(stream=ack["stream"], seq=int(ack["seq"]), duplicate=bool(ack.get("duplicate")))

    def stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        storage: str = "file",
        replicas: int = 1,
        max_age: float | None = None,
        max_msgs: int = -1,
        max_bytes: int = -1,
        duplicate_window: float = 120.0,
        timeout: float | None = None,
    ) -> StreamInfo:
        """Declare the JetStream stream ``name`` capturing ``subjects``: created when missing; an
        existing one with other subjects or limits is updated to these (its storage cannot
        change). Returns its :class:`~natskv.pubsub.StreamInfo`. Calling it again with the same
        settings changes nothing. ``max_age`` (seconds, None: forever), ``max_msgs`` and
        ``max_bytes`` (-1: no limit) bound it, oldest messages going first; ``duplicate_window``
        is how long a ``msg_id`` deduplicates (at most ``max_age``)."""
        from natskv.pubsub import StreamInfo, check_subscribe_subject

        validate_bucket_name(name)  # stream names follow the same rule
        if isinstance(subjects, str) or not subjects:
            raise InvalidArgumentError(f"subjects is a non-empty list of subjects, not {subjects!r}")
        for subject in subjects:
            check_subscribe_subject(subject)
        if storage not in ("file", "memory"):
            raise InvalidArgumentError(f"storage is 'file' or 'memory', not {storage!r}")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
            raise InvalidArgumentError(f"replicas is an int from 1 to 5, not {replicas!r}")
        for label, seconds in (("max_age", max_age), ("duplicate_window", duplicate_window)):
            if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                        or not 0 <= seconds < math.inf):
                raise InvalidArgumentError(f"{label} is a number of seconds >= 0, not {seconds!r}")
        self._check()
        runner.check_not_loop_thread()
        wait = wait_limit(timeout, self.options.request_timeout)
        nanos = 1_000_000_000
        wanted = {
            "name": name, "subjects": list(subjects), "storage": storage, "num_replicas": replicas,
            "max_age": int((max_age or 0) * nanos), "max_msgs": max_msgs, "max_bytes": max_bytes,
            # The server refuses a duplicate window longer than max_age.
            "duplicate_window": int(min(duplicate_window, max_age or math.inf) * nanos),
            "retention": "limits", "discard": "old",
        }
        try:
            info = jsapi.call(self._conn, f"STREAM.INFO.{name}", None, wait)
        except BucketNotFoundError:
            try:
                return StreamInfo.of(jsapi.call(self._conn, f"STREAM.CREATE.{name}", wanted, wait))
            except JetStreamError as exc:
                if exc.err_code != jsapi.ERR_STREAM_NAME_IN_USE:
                    raise
                info = jsapi.call(self._conn, f"STREAM.INFO.{name}", None, wait)  # created meanwhile
        current = info.get("config", {})
        changes = {k: v for k, v in wanted.items() if k != "storage" and current.get(k) != v}
        if not changes:
            return StreamInfo.of(info)
        return StreamInfo.of(jsapi.call(self._conn, f"STREAM.UPDATE.{name}", {**current, **changes}, wait))

    def _check_size(self, data: bytes, headers: dict[str, str] | None) -> None:
        size = len(data)
        if headers and isinstance(headers, dict):  # other types: refused by the encoder
            # The header block counts: "NATS/1.0\r\n", "name: value\r\n" each, "\r\n".
            size += 12 + sum(len(f"{k}: {v}\r\n".encode(errors="replace")) for k, v in headers.items())
        if size > self._conn.max_payload:
            raise PayloadTooLargeError(
                f"a message of {size} bytes (headers included) exceeds the server's max payload of "
                f"{self._conn.max_payload} bytes; send less or raise max_payload in the server config"
            )

    # -- state -----------------------------------------------------------------------------------

    @property
    def server_version(self) -> str:
        """Version of the nats-server this client is connected to."""
        return self._conn.server_version

    @property
    def has_atomic_batches(self) -> bool:
        """Whether the connected server takes atomic batches (nats-server 2.12 and up), which
        ``commit()``, transactions and unique or autoincrement model fields need."""
        return self._conn.api_level >= API_LEVEL_ATOMIC

    @property
    def connected(self) -> bool:
        """Whether this process's connection is up now (False while reconnecting or after close)."""
        nc = self._conn.nc
        return bool(nc is not None and nc.is_connected) and not self._closed and self._pid == os.getpid()

    def stats(self) -> dict[str, Any]:
        """Connection statistics: messages and payload bytes in and out (natskv's own requests and
        replies included), reconnects, server, fast path."""
        nc = self._conn.nc
        assert nc is not None
        mux = self._conn.mux
        return {
            **nc.stats,
            "out_msgs": nc.stats["out_msgs"] + (mux.out_msgs if mux else 0),
            "out_bytes": nc.stats["out_bytes"] + (mux.out_bytes if mux else 0),
            "reconnects": self._conn.reconnects,
            "server_version": self._conn.server_version,
            "api_level": self._conn.api_level,
            "connected_url": nc.connected_url.geturl() if nc.connected_url else None,
            "parser_hook": bool(self._conn.mux and self._conn.mux.hooked),
            "event_loop": loop_name(runner.loop),
            "operations": self._stats.summary(),
            "stats_events": self._publisher_counts(),
        }

    def _publisher_counts(self) -> dict[str, int] | None:
        publisher = self._stats.publisher
        if publisher is None:
            return None
        return {"published": publisher.published, "dropped": publisher.dropped, "failed": publisher.failed}

    def publish_stats(
        self, subject: str | None = "natskv.stats.events", *, stream: bool = False, every: float = 0.25,
        max_queued: int = 100_000,
    ) -> None:
        """Publish every recorded operation as an event to ``subject`` (None stops), in batches
        every ``every`` seconds, from a background thread: ``{"client": ..., "events":
        [{"operation", "bucket", "key", "duration_us", "timestamp", "result_count", "error"},
        ...]}``. With ``stream=True`` each batch is a JetStream publish (declare a stream taking
        ``subject`` first, e.g. with :meth:`stream`). Never slows a call by more than a queue
        append, and never fails one: a full queue drops events and a failed publish is logged,
        both counted in ``stats()["stats_events"]``. ``natskv stats`` shows the events live."""
        from natskv.pubsub import check_subscribe_subject
        from natskv.stats import Publisher

        if subject is None:
            self._stats.publish_to(None)
            return
        check_subscribe_subject(subject)
        _outgoing(subject, b"")  # a literal subject: no wildcards
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not 0 < every <= 60:
            raise InvalidArgumentError(f"every is a number of seconds from 0 to 60, not {every!r}")

        def send(payload: bytes) -> None:
            if stream:
                self.jetstream_publish(subject, payload)
            else:
                self.publish(subject, payload)

        self._stats.publish_to(Publisher(send, client_name=self.options.name or "", every=every,
                                         max_queued=max_queued))

    # -- closing ---------------------------------------------------------------------------------

    def close(self, *, timeout: float | None = None) -> None:
        """Stop this client's watches, drain the connection and close it. Safe to call twice."""
        if self._closed:
            return
        if self._stats.publisher is not None and self._pid == os.getpid():
            self._stats.publish_to(None)  # the queued stats events go out while the connection is up
        if self._manager is not None:
            self._manager.stop()
        self._closed = True
        self._finalizer.detach()
        runner.unregister(self)
        if self._pid != os.getpid():
            return  # the connection belongs to the parent process
        if self._conn.mux is not None:
            self._conn.mux.close()  # wake threads blocked in calls on this client
        for w in list(self._watchers):
            w.stop()
        if self._registry is not None:
            self._registry.close()
        try:
            runner.call(
                self._conn.close(), timeout if timeout is not None else self.options.drain_timeout,
                what="close() draining the connection",
            )
        except Exception:
            log.debug("natskv: error while closing", exc_info=True)

    def _close_at_exit(self) -> None:
        self.close(timeout=2.0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mux = self._conn.mux
        state = "closed" if self._closed or (mux is not None and mux.closed) else "open"
        return f"<natskv.Client {', '.join(self._servers)} {state}>"


def _close_dropped(conn: Connection, pid: int) -> None:
    """Close the connection of a client collected without close(). Runs in whichever thread the
    garbage collector ran (the loop thread included), so it only schedules the close."""
    if pid != os.getpid():
        return
    log.debug("natskv: a Client was garbage-collected without close(); closing its connection")
    if conn.mux is not None:
        conn.mux.close()
    runner.start_soon(conn.close, False)


def _outgoing(subject: Any, data: Any) -> bytes:
    """The payload of a plain publish or request, after the checks the protocol encoder does
    not make: a message to a wildcard or an empty token would be refused or misrouted."""
    if not isinstance(subject, str) or not subject:
        raise InvalidArgumentError(f"a subject is a non-empty str, not {subject!r}")
    tokens = subject.split(".")
    if "" in tokens:
        raise InvalidArgumentError(f"subject {subject!r} has an empty token: no leading, trailing or doubled '.'")
    if "*" in tokens or ">" in tokens:
        raise InvalidArgumentError(f"subject {subject!r} holds a wildcard: messages go to one literal subject")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        hint = " (encode a str with .encode())" if isinstance(data, str) else ""
        raise InvalidArgumentError(f"data must be bytes, not {type(data).__name__}{hint}")
    return bytes(data)


def connect(
    url_or_servers: str | Sequence[str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Client:
    """Connect to NATS and return a :class:`Client`.

    ``url_or_servers`` is one URL, several comma-separated, or a list (credentials may be in the
    URL). Without it, ``NATS_URL`` is used; without that, natskv starts (or reuses) an embedded
    nats-server on loopback that keeps its data in ``data_dir`` (default: a per-user data
    directory, or ``NATSKV_DATA_DIR``). Options: user, password, token, creds, nkey_seed, tls_ca,
    tls_cert, tls_key, tls_hostname, tls_handshake_first, name, connect_timeout, request_timeout
    (alias timeout: the default of every blocking call), max_reconnect (default -1: forever),
    reconnect_wait, drain_timeout, ping_interval, inbox_prefix, bucket_keep_alive and
    bucket_sweep_every (seconds: start :meth:`Client.bucket_manager` with these settings).

    Any TLS option or a ``tls://`` URL makes TLS mandatory (a server without TLS is refused before
    the credentials are sent). Each server is tried once.

    Raises :class:`ConfigurationError` for bad options (before connecting),
    :class:`AuthenticationError` when the server refuses the credentials, and
    :class:`NotConnectedError` naming each server's failure when none could be reached.
    """
    opts = ConnectOptions.from_args(url_or_servers, **options)
    server = None
    if opts.uses_embedded_server:
        from natskv.server import EmbeddedServer

        server = EmbeddedServer.shared(data_dir=data_dir)
    return Client(opts, server)
