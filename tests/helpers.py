"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def default_sigint() -> None:
    """``preexec_fn`` for children a test interrupts with SIGINT.

    A shell runs background jobs with SIGINT ignored, and a child inherits that; Python then never
    raises KeyboardInterrupt. Tests that send SIGINT restore the default in the child first.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def eventually(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns the last answer.
    An error in ``predicate`` fails the test at once (see :func:`wait_until` for polling across
    a restart)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; natskv errors (a server
    restarting, a client reconnecting) count as "not yet". Returns the last answer."""
    import natskv

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except natskv.NatsKVError:
            pass
        time.sleep(interval)
    return predicate()


def child_exit_code(pid: int, timeout: float, hung: str) -> int:
    """The exit code of the forked child ``pid``, waited for at most ``timeout`` seconds; a child
    still running then is killed and the test fails with ``hung``."""
    import os
    import signal

    import pytest

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(hung)
        time.sleep(0.02)


def drop_model_bucket(db: Any, name: str) -> None:
    """Delete a test model's bucket and its autoincrement counter stream (if it has one)."""
    import natskv
    from natskv.wire import jsapi

    db.delete_bucket(name)
    try:
        jsapi.call(db._conn, f"STREAM.DELETE.KVC_{name}", None, 5)
    except natskv.NatsKVError:
        pass
