"""natskv._collector: pauses of the cyclic garbage collector that nest and overlap across threads."""

from __future__ import annotations

import gc
import threading

from natskv._collector import collector_paused


def test_pauses_nest_and_overlap_across_threads_and_the_last_turns_it_back_on() -> None:
    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with collector_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause goes on
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread's pause goes on after this one ended
    release.set()
    thread.join(10)
    assert gc.isenabled()


def test_a_collector_turned_off_before_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_inside_still_ends_the_pause() -> None:
    try:
        with collector_paused():
            raise KeyError("boom")
    except KeyError:
        pass
    assert gc.isenabled()
