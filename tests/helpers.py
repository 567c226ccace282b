"""Small helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations


def default_sigint() -> None:
    """``preexec_fn`` for children a test interrupts with SIGINT.

    A shell runs background jobs with SIGINT ignored, and a child inherits that; Python then never
    raises KeyboardInterrupt. Tests that send SIGINT restore the default in the child first.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
