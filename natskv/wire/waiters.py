"""What a caller's thread waits on while its request is out: a ``threading.Lock`` acquired twice,
the cheapest wait primitive in CPython.

The caller's thread creates a waiter and blocks in :meth:`ThreadWaiter.wait`; the loop thread's
frame reader hands it the reply (``deliver``) or an error (``fail``), which releases the lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from natskv.wire.replies import RawReply, status_of


class ThreadWaiter:
    """What the waiters of caller threads share: the lock and an error that wakes the thread
    instead of a reply."""

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
        """Block the caller's thread until delivered or failed; False when ``timeout`` passed."""
        return self._lock.acquire(True, -1 if timeout is None else max(timeout, 0.0))


class Waiter(ThreadWaiter):
    """Waits for one reply."""

    __slots__ = ("reply", "subject")

    def __init__(self, subject: str = "") -> None:
        super().__init__()
        self.reply: RawReply | None = None
        self.subject = subject  # what the request was sent to (to match permission errors)

    def deliver(self, data: bytes, headers: Any, reply: str) -> bool:
        """Store the reply (loop thread); return True when the waiter is complete (the route is
        then removed)."""
        if self.error is None:  # not already woken by close()
            self.reply = (data, headers, reply)
            self._lock.release()
        return True

    __call__ = deliver

    def wake(self) -> None:
        """Release the waiting thread once its reply is stored (any thread; a waiter that
        close() already woke stays as it is)."""
        with contextlib.suppress(RuntimeError):
            self._lock.release()


class StreamWaiter(ThreadWaiter):
    """Collects a multi-message reply (batch direct get) until its end-of-batch status message.

    Any status reply ends the batch: 204 is the normal end; 404, 408, 413 and errors end it too
    and are kept as the last element for the caller to interpret.
    """

    __slots__ = ("done", "replies", "subject")

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

    __call__ = deliver

    def deliver_run(self, frames: list[tuple[int, str, str, Any, bytes]], start: int, end: int) -> bool:
        """:meth:`deliver` of each of ``frames[start:end]`` (parsed frames ``(sid, subject,
        reply, headers, payload)``, all of them replies to this waiter), in one call: the frame
        reader hands a batch's run of replies over at once. Loop thread."""
        if self.error is not None:
            return True
        append = self.replies.append
        for k in range(start, end):
            _, _, reply, headers, data = frames[k]
            append((data, headers, reply))
            if not data and status_of(headers):
                self.done = True
                self._lock.release()
                return True
        return False


class CountWaiter(ThreadWaiter):
    """Waits for ``n`` single replies sent under tokens ``base+0 .. base+n-1`` (pipelined writes)."""

    __slots__ = ("_left", "replies", "subjects")

    def __init__(self, n: int, subjects: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.replies: list[RawReply | None] = [None] * n
        self._left = n
        self.subjects = subjects

    def slot(self, i: int) -> Callable[[bytes, Any, str], bool]:
        """The delivery function of the ``i``-th request (called on the loop thread)."""

        def deliver(data: bytes, headers: Any, reply: str) -> bool:
            if self.replies[i] is None and self.error is None:
                self.replies[i] = (data, headers, reply)
                self._left -= 1  # loop thread only: no lock needed
                if self._left == 0:
                    self._lock.release()
            return True

        return deliver
