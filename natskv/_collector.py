"""Pausing Python's cyclic garbage collector around work that only allocates.

Loading a replica, rebuilding its indexes and ``bulk_create`` allocate objects that all stay
alive. Each allocation burst starts collector passes, and the full passes walk the whole heap,
which grows with every record: they find nothing to free and cost a sixth to a third of the
work. :func:`collector_paused` turns the collector off for the duration of such work.

The pauses nest and may overlap across threads (the loop thread loading a replica while the
caller's thread bulk-creates): the collector goes off with the first pause and back on when the
last one ends, and only if it was on before the first. Reference counting frees garbage
without cycles as usual meanwhile.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Pauses:
    """The pauses in progress, in any thread, and whether the last to end turns it back on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.resume = False

    def begin(self) -> None:
        with self.lock:
            if self.count == 0:
                self.resume = gc.isenabled()
                if self.resume:
                    gc.disable()
            self.count += 1

    def end(self) -> None:
        with self.lock:
            self.count -= 1
            if self.count == 0 and self.resume:
                gc.enable()


_pauses = _Pauses()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with the cyclic garbage collector off (see the module docstring)."""
    _pauses.begin()
    try:
        yield
    finally:
        _pauses.end()


__all__ = ["collector_paused"]
