"""Group commit: the multi-key writes that threads make at the same time, sent as one atomic batch.

A model write with unique fields is an atomic batch (record and unique markers, each with
compare-and-set). nats-server stages every atomic batch of a one-replica file-backed stream in a
store of its own, created and deleted per batch (``server/jetstream_batching.go``,
``newBatchStore``), and a stream takes its batches one at a time: on a plain disk that costs
about 20 ms per batch whatever its size, so threads that each send their own batch queue up
behind one another at about 50 batches a second in all. Sent together, the writes of 16 threads
cost one batch.

How: the first writer to arrive leads. It commits its own writes alone when nobody waits, or
takes the writes queued while the previous batch was out (up to the server's 1000 messages,
keys distinct) and commits them as one batch; each member gets the revision of its own last
write (a batch is stored at consecutive revisions). Then it hands the lead to the next queued
writer and returns. Joining changes nothing a writer can observe: its writes are stored all
together or not at all, with their own checks. When the joint batch fails a check (someone's
unique value was taken) or cannot be sent, nothing of it was stored, and every member commits
its own writes alone, so each gets its own answer. An error whose outcome is unknown (a timeout,
a lost connection) reaches every member.

Every call runs on the caller's thread; a follower blocks on a lock until the leader answers.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from natskv.errors import (
    BatchError,
    InvalidArgumentError,
    KeyExistsError,
    NatsKVError,
    NatsKVTimeoutError,
    PayloadTooLargeError,
    RevisionMismatchError,
)

if TYPE_CHECKING:
    from natskv.kv import Bucket

MAX_OPS = 1000  # messages in one atomic batch (the server's limit)

# Failures of a joint batch that say nothing was stored and that the members may get different
# answers to alone: retry each alone.
_ALONE_ERRORS = (KeyExistsError, RevisionMismatchError, InvalidArgumentError, BatchError, PayloadTooLargeError)

_WAITING, _LEAD, _DONE, _ALONE = range(4)


class _Write:
    """One caller's writes, waiting in the queue or in a joint batch."""

    __slots__ = ("deadline", "error", "keys", "lock", "ops", "revision", "state")

    def __init__(self, ops: list[tuple[Any, ...]], limit: float | None) -> None:
        self.ops = ops
        self.keys = {op[1] for op in ops}
        self.deadline = None if limit is None else time.monotonic() + limit
        self.lock = threading.Lock()
        self.lock.acquire()
        self.state = _WAITING
        self.revision = 0
        self.error: BaseException | None = None


class GroupCommit:
    """Joins concurrent atomic commits to one bucket (see the module docstring)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a write was queued (for a lingering leader)
        self._queue: list[_Write] = []
        self._busy = False
        self._lingering = False
        self._last_size = 1  # members of the last joint batch
        self._last_took = 0.0  # seconds the last commit took

    def commit(self, ops: list[tuple[Any, ...]], timeout: float | None) -> int:
        """``bucket.commit(ops, timeout=timeout)``, joined with the commits of other threads
        waiting at the same time; returns the revision of the last of ``ops`` and raises what
        ``bucket.commit`` raises. ``timeout=None`` is the client's default, as there."""
        limit = self.bucket._timeout(timeout)  # None from here on: no limit
        if self._pid != os.getpid():
            self._reset()  # a forked child: the parent's queue and leader are not here
        me = _Write(ops, limit)
        with self._lock:
            lead = not self._busy
            self._busy = True
            if not lead:
                self._queue.append(me)
                if self._lingering:
                    self._arrived.notify()
        if not lead:
            state = self._wait(me, limit)
            if state == _DONE:
                if me.error is not None:
                    raise _copy(me.error)
                return me.revision
            if state == _ALONE:
                return self._alone(me)
        return self._lead(me)

    def _alone(self, me: _Write) -> int:
        return self.bucket.commit(me.ops, timeout=_left(me.deadline))

    def _wait(self, me: _Write, limit: float | None) -> int:
        """Wait (a follower) until the leader answers or hands over the lead; return the state."""
        try:
            if me.lock.acquire(True, -1 if limit is None else limit):
                return me.state
        except BaseException:  # Ctrl-C while queued: leave the queue, or pass on the lead
            self._withdraw(me)
            raise
        if self._withdraw(me):
            raise NatsKVTimeoutError(
                f"a commit to bucket {self.bucket.name!r} waited {limit} s behind the commits of other "
                "threads and was not sent; nothing of it is stored"
            )
        if me.lock.acquire(False):  # answered just now
            return me.state
        raise NatsKVTimeoutError(
            f"a commit to bucket {self.bucket.name!r} was not acknowledged within {limit} s "
            "(sent in one batch with other threads' writes); all of it or none of it is stored"
        )

    def _withdraw(self, me: _Write) -> bool:
        """Take a write that gives up waiting out of the queue, or pass on the lead it was just
        handed; True when it was not sent (False: it is in a batch already)."""
        with self._lock:
            if me.state == _WAITING:
                self._queue.remove(me)
                return True
            if me.state == _LEAD:
                self._pass_lead()
                return True
            return False

    def _lead(self, me: _Write) -> int:
        """Commit ``me`` with whatever else is queued, answer the members, hand over the lead."""
        group = [me]
        try:
            try:
                with self._lock:
                    self._gather(group)
            except BaseException:  # Ctrl-C while gathering: the members send their own writes
                for w in group[1:]:
                    w.state = _ALONE
                raise
            started = time.monotonic()
            try:
                if len(group) == 1:
                    return self._alone(me)
                self._joint(group)
            finally:
                self._last_took = time.monotonic() - started
                self._last_size = len(group)
        finally:
            with self._lock:
                self._pass_lead()
            for w in group[1:]:
                w.lock.release()
        if me.state == _ALONE:
            return self._alone(me)
        if me.error is not None:
            raise me.error
        return me.revision

    def _pass_lead(self) -> None:
        """Wake the next queued write as the leader, or mark the committer idle (under the lock)."""
        if self._queue:
            nxt = self._queue.pop(0)
            nxt.state = _LEAD
            nxt.lock.release()
        else:
            self._busy = False

    def _gather(self, group: list[_Write]) -> None:
        """Add the queued writes that fit to ``group`` (under the lock).

        The members of the last joint batch are on their way back with their next writes, but
        a few microseconds behind the writes queued while it was out: when fewer are queued
        than took part last time, wait for the others a little (a tenth of the last commit's
        time, at most 2 ms), or the batches would alternate between two half groups.
        """
        size = len(group[0].ops)
        keys = set(group[0].keys)
        size = self._take(group, size, keys)
        if len(group) >= self._last_size or self._last_size == 1:
            return
        until = time.monotonic() + min(0.002, self._last_took / 10)
        self._lingering = True
        try:
            while len(group) < self._last_size and size < MAX_OPS:
                left = until - time.monotonic()
                if left <= 0 or not self._arrived.wait(left):
                    break
                size = self._take(group, size, keys)
        finally:
            self._lingering = False

    def _take(self, group: list[_Write], size: int, keys: set[str]) -> int:
        """Move the queued writes that fit beside ``size`` ops with ``keys`` into ``group`` (under
        the lock); the others stay queued, in order. Returns the new size.

        The leader (``group[0]``) waits for the batch with its own time limit, so it takes only
        writes that may wait at least as long (None: no limit); one that times out earlier waits
        for the next batch. Should the batch time out, a member hears it up to the gap between
        the leader's deadline and its own early (writes made at about the same time with the same
        timeout: the gap between their starts).
        """
        deadline = group[0].deadline
        kept: list[_Write] = []
        for w in self._queue:
            patient = w.deadline is None if deadline is None else w.deadline is None or w.deadline >= deadline
            if patient and size + len(w.ops) <= MAX_OPS and keys.isdisjoint(w.keys):
                w.state = _DONE  # taken: no longer withdrawable by its own timeout
                group.append(w)
                size += len(w.ops)
                keys |= w.keys
            else:
                kept.append(w)
        self._queue = kept
        return size

    def _joint(self, group: list[_Write]) -> None:
        """Commit the writes of ``group`` as one batch and record each member's answer."""
        ops = [op for w in group for op in w.ops]
        try:
            last = self.bucket.commit(ops, timeout=_left(group[0].deadline))
        except _ALONE_ERRORS:
            for w in group:
                w.state = _ALONE
            return
        except NatsKVError as exc:
            for w in group:
                w.error = exc
            return
        except BaseException as exc:  # Ctrl-C in the leader: the others must not wait forever
            for w in group[1:]:
                w.error = NatsKVError(
                    f"a commit to bucket {self.bucket.name!r} was interrupted in the thread that sent it "
                    f"with this one ({exc!r}); all of it or none of it is stored"
                )
            raise
        end = 0
        first = last - len(ops) + 1
        for w in group:
            end += len(w.ops)
            w.revision = first + end - 1


def _left(deadline: float | None) -> float:
    """The ``timeout=`` of a commit that must end by ``deadline`` (None: no limit)."""
    return math.inf if deadline is None else max(0.001, deadline - time.monotonic())


def _copy(error: BaseException) -> BaseException:
    """A copy of the error a joint batch got, for one member to raise: one instance raised in
    several threads would collect all their tracebacks."""
    copied = copy.copy(error)
    copied.__cause__ = error.__cause__
    return copied.with_traceback(None)


_committers: weakref.WeakKeyDictionary[Any, GroupCommit] = weakref.WeakKeyDictionary()
_committers_lock = threading.Lock()


def group_commit(owner: Any, bucket: Bucket) -> GroupCommit:
    """The group committer of ``owner`` (a model's store), made on first use."""
    found = _committers.get(owner)
    if found is None:
        with _committers_lock:
            found = _committers.get(owner)
            if found is None:
                found = _committers[owner] = GroupCommit(bucket)
    return found


__all__ = ["GroupCommit", "group_commit"]
