"""Per-operation statistics of a client: counts, latency percentiles, errors and results, and the
optional publishing of every operation as an event.

Each blocking KV call (``get``, ``set``, ``delete``, ``keys``, ``find`` ...) and each watch event
is recorded by :meth:`Stats.record` on the caller's thread. The cost is two clock reads and a few
integer operations under a lock, so well under a microsecond. Bytes are the value payloads a call
sent (writes) and received (reads, listings with values, watch events): the Bucket adds each
payload's length to :data:`flow`, a per-thread pair of counters, and the recording wrapper takes
the difference a call made (headers, keys and protocol framing are not counted; the
connection's totals are ``in_bytes`` / ``out_bytes`` of :meth:`natskv.Client.stats`). A call made
by another (``find`` reads through ``items``) counts in both. Latencies go into a log-linear
histogram: four buckets per power of two of nanoseconds, so a percentile is exact to within
about 19 %. Memory stays fixed however many calls are made.

With :meth:`natskv.Client.publish_stats`, each recorded operation also becomes an event
``{"operation", "bucket", "key", "duration_us", "timestamp", "result_count", "error",
"bytes_sent", "bytes_received"}``. Events
are queued (at most ``max_queued``; beyond that they are counted as dropped, never blocking the
caller) and published by a background thread in batches, one message per batch: ``{"client": ...,
"events": [...]}``. A failed publish is logged and counted, never raised into the caller's call.
``natskv stats`` subscribes to those messages and shows them.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

log = logging.getLogger("natskv")

_SUB_BUCKETS = 4  # per power of two
_SLOTS = 64 * _SUB_BUCKETS


class _Flow(threading.local):
    """The value bytes the current thread has sent and received through Bucket calls (only ever
    growing: readers take differences). Class defaults make a new thread start at zero."""

    sent = 0
    received = 0


flow = _Flow()


def _slot(nanos: int) -> int:
    """The histogram slot of a duration: its power of two and the next two bits below it."""
    if nanos < 8:
        return nanos
    bits = nanos.bit_length()
    return (bits << 2) | ((nanos >> (bits - 3)) & 3)


def _slot_floor(slot: int) -> int:
    """The smallest duration (ns) that falls into ``slot``."""
    if slot < 8:
        return slot
    if slot < 16:  # slots 8-15 are never used: 8 ns starts slot 16
        return 8
    bits, sub = slot >> 2, slot & 3
    return (4 | sub) << (bits - 3)


class Histogram:
    """Counts of durations in log-linear slots (not thread-safe: :class:`Stats` locks)."""

    __slots__ = ("count", "slots", "total")

    def __init__(self) -> None:
        self.slots = [0] * _SLOTS
        self.count = 0
        self.total = 0

    def add(self, nanos: int) -> None:
        self.slots[_slot(nanos)] += 1
        self.count += 1
        self.total += nanos

    def percentile(self, fraction: float) -> float:
        """The duration (µs) below which ``fraction`` of the recorded ones fall (the middle of its
        slot); 0 with nothing recorded."""
        if not self.count:
            return 0.0
        wanted = max(1, round(fraction * self.count))
        seen = 0
        for slot, n in enumerate(self.slots):
            seen += n
            if seen >= wanted:
                low, high = _slot_floor(slot), _slot_floor(slot + 1)
                return (low + high) / 2 / 1000
        return 0.0  # pragma: no cover - the counts add up to count


class OperationStats:
    """The statistics of one operation name."""

    __slots__ = ("errors", "latency", "received", "results", "sent")

    def __init__(self) -> None:
        self.latency = Histogram()
        self.errors: dict[str, int] = {}
        self.results = 0
        self.sent = 0
        self.received = 0

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.latency.count,
            "p50_us": round(self.latency.percentile(0.50), 1),
            "p99_us": round(self.latency.percentile(0.99), 1),
            "mean_us": round(self.latency.total / self.latency.count / 1000, 1) if self.latency.count else 0.0,
            "errors": dict(self.errors),
            "results": self.results,
            "bytes_sent": self.sent,
            "bytes_received": self.received,
        }


class Stats:
    """A client's operation statistics (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, OperationStats] = {}
        self._publisher: Publisher | None = None
        self.last_used: dict[str, float] = {}  # bucket -> time.monotonic() of its last operation

    def record(
        self, operation: str, bucket: str, key: str, started: float, *, result_count: int = 1,
        error: BaseException | None = None, sent: int = 0, received: int = 0,
    ) -> None:
        """Count one call of ``operation`` that began at ``started`` (``time.perf_counter()``) and
        moved ``sent`` / ``received`` bytes of values."""
        self.record_elapsed(operation, bucket, key, time.perf_counter() - started, result_count=result_count,
                            error=error, sent=sent, received=received)

    def record_elapsed(
        self, operation: str, bucket: str, key: str, elapsed: float, *, result_count: int = 1,
        error: BaseException | None = None, sent: int = 0, received: int = 0,
    ) -> None:
        """Count one ``operation`` that took ``elapsed`` seconds (a watch event: its age)."""
        nanos = int(elapsed * 1e9)
        self.last_used[bucket] = time.monotonic()
        with self._lock:
            stats = self._ops.get(operation)
            if stats is None:
                stats = self._ops[operation] = OperationStats()
            stats.latency.add(nanos)
            stats.results += result_count
            stats.sent += sent
            stats.received += received
            if error is not None:
                name = type(error).__name__
                stats.errors[name] = stats.errors.get(name, 0) + 1
        publisher = self._publisher
        if publisher is not None:
            publisher.offer(operation, bucket, key, elapsed, result_count, error, sent, received)

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{operation: {count, p50_us, p99_us, mean_us, errors, results, bytes_sent,
        bytes_received}}`` (value bytes, see the module; the connection's totals are ``in_bytes``
        and ``out_bytes`` of :meth:`natskv.Client.stats`)."""
        with self._lock:
            return {name: stats.summary() for name, stats in sorted(self._ops.items())}

    def reset(self) -> None:
        with self._lock:
            self._ops.clear()

    @property
    def publisher(self) -> Publisher | None:
        return self._publisher

    def publish_to(self, publisher: Publisher | None) -> None:
        old, self._publisher = self._publisher, publisher
        if old is not None:
            old.stop()
        if publisher is not None:
            publisher.start()


class Publisher:
    """Publishes recorded operations as events, in batches, from a background thread.

    ``send(payload)`` publishes one batch (a plain NATS publish, or a JetStream publish when the
    events go to a stream); it runs on the publisher's thread, and what it raises is logged and
    counted in :attr:`failed`, never passed to the caller of the recorded operation.
    """

    def __init__(self, send: Callable[[bytes], None], *, client_name: str, every: float = 0.25,
                 max_batch: int = 1000, max_queued: int = 100_000) -> None:
        self._send = send
        self.client_name = client_name or f"{socket.gethostname()}:{os.getpid()}"
        self.every = every
        self.max_batch = max_batch
        self.max_queued = max_queued
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = self.dropped = self.failed = 0

    def offer(self, operation: str, bucket: str, key: str, elapsed: float, result_count: int,
              error: BaseException | None, sent: int = 0, received: int = 0) -> None:
        """Queue one event (any thread; never blocks; counted as dropped when the queue is full)."""
        if len(self._queue) >= self.max_queued:
            self.dropped += 1
            return
        self._queue.append((operation, bucket, key, elapsed, time.time(), result_count,
                            None if error is None else type(error).__name__, sent, received))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="natskv-stats", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish what is queued, then stop."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            stopping = self._stopped.wait(self.every)
            self._flush()
            if stopping:
                return

    def _flush(self) -> None:
        queue = self._queue
        while queue:
            events: list[dict[str, Any]] = []
            while queue and len(events) < self.max_batch:
                operation, bucket, key, elapsed, stamp, results, error, sent, received = queue.popleft()
                events.append({"operation": operation, "bucket": bucket, "key": key,
                               "duration_us": round(elapsed * 1e6, 1), "timestamp": stamp,
                               "result_count": results, "error": error,
                               "bytes_sent": sent, "bytes_received": received})
            try:
                self._send(orjson.dumps({"client": self.client_name, "events": events}))
                self.published += len(events)
            except Exception:
                self.failed += len(events)
                log.warning("natskv: could not publish %d stats events", len(events), exc_info=True)
