"""The background event loop that every blocking natskv call runs on.

One daemon thread per process runs one asyncio loop. It starts lazily on first use, is reset in a
forked child (the child gets its own loop on first use; the parent's is untouched), and is stopped
at interpreter exit after the clients registered with it have been closed.

Blocking calls come in through :meth:`Runner.call`: the coroutine runs on the loop, the caller's
thread waits with a timeout. A call made *from* the loop thread raises :class:`DeadlockError` at
once, because it could never finish. Ctrl-C while waiting cancels the coroutine, waits briefly for
its clean-up, then lets ``KeyboardInterrupt`` through.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import math
import os
import threading
import types
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from natskv.errors import ConfigurationError, DeadlockError, InvalidArgumentError, NatsKVError, NatsKVTimeoutError

log = logging.getLogger("natskv")

T = TypeVar("T")

# Frames from these files are plumbing between the caller and the failing code; they are dropped
# from tracebacks that cross the thread boundary so users see their call and the natskv code.
_PLUMBING = (
    os.path.dirname(asyncio.__file__),
    os.path.dirname(concurrent.futures.__file__),
    __file__,
)


def _trim_traceback(exc: BaseException) -> BaseException:
    tb = exc.__traceback__
    kept: list[types.TracebackType] = []
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_PLUMBING):
            kept.append(tb)
        tb = tb.tb_next
    new_tb = None
    for frame_tb in reversed(kept):
        new_tb = types.TracebackType(new_tb, frame_tb.tb_frame, frame_tb.tb_lasti, frame_tb.tb_lineno)
    return exc.with_traceback(new_tb)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop: uvloop when it is installed (a dependency of natskv except on Windows), else
    asyncio's.

    ``NATSKV_LOOP=asyncio`` forces asyncio's loop; ``NATSKV_LOOP=uvloop`` requires uvloop.
    """
    choice = os.environ.get("NATSKV_LOOP", "").strip().lower()
    if choice not in ("", "auto", "asyncio", "uvloop"):
        raise ConfigurationError(f"NATSKV_LOOP={choice!r} is not valid: use 'uvloop', 'asyncio' or leave it unset")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if choice == "uvloop":
                raise ConfigurationError(
                    "NATSKV_LOOP=uvloop but uvloop is not installed: pip install uvloop"
                ) from exc
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``: which loop implementation runs natskv's thread."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def check_timeout(timeout: object) -> None:
    """Reject a ``timeout=`` that is not None or a positive, finite number of seconds."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout <= 0:
        raise InvalidArgumentError(
            f"timeout must be a positive number of seconds (math.inf: no limit) or None, not {timeout!r}"
        )


def wait_limit(timeout: float | None, default: float) -> float | None:
    """The one timeout rule, as a limit to wait: ``None`` is ``default`` (the client's
    ``request_timeout``), ``math.inf`` is no limit (``None`` to the waiting primitives), any other
    positive number is itself. Raises InvalidArgumentError for anything else."""
    check_timeout(timeout)
    if timeout is None:
        return default
    return None if timeout == math.inf else timeout


class Runner:
    """Owns the loop thread of this process. Use the module-level :data:`runner`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        # Objects with a ``_close_at_exit()`` method (clients), closed before the loop stops.
        self._closeables: weakref.WeakSet[Any] = weakref.WeakSet()
        # Tasks started by start_soon(): the loop itself keeps only weak references to tasks.
        self._tasks: set[asyncio.Task[Any]] = set()
        # The loop thread's identifier (0: none), compared on every blocking call.
        self._ident = 0
        # Forks this process descends from (counted in the child at each fork): a blocking
        # call compares it with the count its client last saw instead of asking the kernel
        # for the process id on every call.
        self.forks = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop of this process, started on first use."""
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._start()
            assert self._loop is not None
            return self._loop

    def _start(self) -> None:
        self._pid = os.getpid()
        loop = new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        thread = threading.Thread(target=run, name="natskv-loop", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread
        self._ident = thread.ident or 0

    def _after_fork_in_child(self) -> None:
        # The parent's loop thread does not exist here. Forget it without touching it: its sockets
        # are shared with the parent, which still uses them.
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._ident = 0
        self._pid = os.getpid()
        self._closeables = weakref.WeakSet()
        self._tasks = set()
        self.forks += 1

    def register(self, obj: Any) -> None:
        """Close ``obj`` (via ``obj._close_at_exit()``) when the interpreter exits."""
        self._closeables.add(obj)

    def unregister(self, obj: Any) -> None:
        self._closeables.discard(obj)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Close registered clients, then stop the loop thread. Called at interpreter exit."""
        if self._loop is None or self._pid != os.getpid():
            return
        for obj in list(self._closeables):
            try:
                obj._close_at_exit()
            except Exception:
                log.debug("natskv: error while closing %r at exit", obj, exc_info=True)
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        self._ident = 0
        if loop is not None and not loop.is_closed():
            # Cancel what is still running (watch recoveries, timers) and let it finish, so the
            # loop closes with no pending task.
            async def finish() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks, timeout=1.0)
                loop.stop()

            asyncio.run_coroutine_threadsafe(finish(), loop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- calls -------------------------------------------------------------------------------

    def in_loop_thread(self) -> bool:
        """True when called from natskv's loop thread."""
        return threading.get_ident() == self._ident

    def check_not_loop_thread(self, what: str = "a blocking natskv call") -> None:
        """Raise :class:`DeadlockError` if the caller is the loop thread."""
        if self.in_loop_thread():
            raise DeadlockError(
                f"{what} was made from natskv's event-loop thread and would deadlock; "
                "run it from another thread (natskv callbacks already run on a dispatcher thread)"
            )

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result in the calling thread.

        Raises :class:`NatsKVTimeoutError` naming the operation (``what``, by default the
        coroutine's name) and ``timeout`` when the coroutine has not finished within ``timeout``
        seconds (the coroutine is then cancelled); :class:`DeadlockError` from the loop thread;
        and whatever the coroutine raised, a timeout of its own included, as it is, with the
        thread plumbing trimmed from its traceback.
        """
        if self.in_loop_thread():
            coro.close()
            self.check_not_loop_thread()
        operation = what or getattr(coro, "__qualname__", "the operation")
        finished = threading.Event()

        async def tracked() -> T:
            try:
                return await coro
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(tracked(), self.loop)
        try:
            done, _ = concurrent.futures.wait((future,), timeout)
        except KeyboardInterrupt:
            future.cancel()
            finished.wait(1.0)  # give the cancelled work a moment to clean up (consumers, etc.)
            raise
        # cancel() fails when the coroutine finished in the meantime: its outcome counts then.
        if not done and future.cancel():
            finished.wait(1.0)  # let the cancelled work clean up before the caller moves on
            raise NatsKVTimeoutError(
                f"{operation} did not complete within timeout={timeout} s; "
                "check the server is reachable or pass a larger timeout="
            )
        try:
            return future.result()
        except TimeoutError as exc:
            if isinstance(exc, NatsKVError):
                raise _trim_traceback(exc) from exc.__cause__
            # A bare asyncio/OS timeout from inside: keep it as the cause, say which call it ended.
            raise NatsKVTimeoutError(
                f"{operation} (timeout={timeout} s) gave up on an inner timeout: "
                f"{str(exc) or type(exc).__name__}; check the server is reachable or pass a larger timeout="
            ) from _trim_traceback(exc)
        except BaseException as exc:
            raise _trim_traceback(exc) from exc.__cause__

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain function on the loop thread, from any thread."""
        self.loop.call_soon_threadsafe(fn, *args)

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> bool:
        """Run ``fn(*args)`` as a task on this process's loop if the loop runs; never starts one.

        Callable from any thread, a finalizer on the loop thread included; does not wait. The task
        is referenced until it ends. Returns whether it was scheduled.
        """
        loop = self._loop
        if loop is None or self._pid != os.getpid() or loop.is_closed():
            return False

        def start() -> None:
            task = loop.create_task(fn(*args))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # closed between the check and the call (interpreter exit)
            return False
        return True


runner = Runner()

# Objects holding threads or locks that a forked child must replace: see follow_fork().
_FORK_FOLLOWERS: weakref.WeakSet[Any] = weakref.WeakSet()


def follow_fork(obj: Any) -> None:
    """Call ``obj._after_fork()`` in a forked child, right after fork() while it has one thread
    (after the runner has forgotten the parent's loop). ``obj`` is held weakly."""
    _FORK_FOLLOWERS.add(obj)


def unfollow_fork(obj: Any) -> None:
    """Undo :func:`follow_fork`."""
    _FORK_FOLLOWERS.discard(obj)


def _after_fork_in_child() -> None:
    runner._after_fork_in_child()
    for obj in list(_FORK_FOLLOWERS):
        obj._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(runner.shutdown)
