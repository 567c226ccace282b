"""Regular expressions that run in linear time: ``$regex`` filters and regex key patterns.

Python's ``re`` backtracks: ``(a+)+$`` against ``"a" * 30 + "b"`` runs for minutes while holding the
GIL, so one hostile filter stalls every thread of the process. natskv matches user regexes with
RE2 (the ``google-re2`` package) instead: time linear in the text, the GIL released while it
matches. RE2 has no backreferences or lookaround, and ``\\w \\d \\s \\b`` are ASCII-only; a pattern
RE2 cannot run is refused with ``ValueError`` before anything is read.

Shared by both cores (``_core.pyx`` and ``_core_py.py``), so they match identically.
"""

from __future__ import annotations

import re
from typing import Any

try:
    import re2  # type: ignore[import-untyped]
except ImportError:  # no wheel for this platform: regexes are refused, never run with backtracking
    re2 = None

# re flags RE2 can honour, as the inline flags that say the same to RE2 (re.UNICODE is the
# default for str patterns; re.ASCII only narrows \w & co., which RE2 keeps ASCII anyway).
_FLAGS = {re.IGNORECASE: "i", re.MULTILINE: "m", re.DOTALL: "s"}
_IGNORED_FLAGS = re.UNICODE | re.ASCII
# A lone surrogate has no UTF-8 form: it is matched as one U+FFFD, one character for one.
_SURROGATE = re.compile("[\ud800-\udfff]")


class LinearRegex:
    """A compiled RE2 pattern; :meth:`matches` is ``re.search(...) is not None`` in linear time."""

    __slots__ = ("_match", "source")

    def __init__(self, source: str, inline_flags: str = "") -> None:
        if re2 is None:
            raise ValueError(
                "regular expressions need the google-re2 package (linear-time matching), which is not "
                "installed for this Python; install it, or use a glob / $startswith / $contains"
            )
        self.source = source
        pattern = f"(?{inline_flags}){source}" if inline_flags else source
        options = re2.Options()
        options.log_errors = False  # RE2 would print every refused pattern to stderr
        options.never_capture = True
        try:
            re2.compile(pattern, options)  # the check that says why a pattern is refused
            search_set = re2.Set.SearchSet(options)
            search_set.Add(pattern)
        except re2.error as exc:
            reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            raise ValueError(
                f"bad regular expression {source!r}: {reason} (natskv runs regexes with RE2, in linear "
                "time: no backreferences or lookaround)"
            ) from None
        except UnicodeEncodeError:
            raise ValueError(f"regular expression {source!r} holds a lone surrogate, which RE2 cannot match") from None
        search_set.Compile()
        self._match = search_set.Match

    def matches(self, text: str) -> bool:
        """True if the pattern matches anywhere in ``text``. Runs without the GIL."""
        try:
            return self._match(text) is not None
        except UnicodeEncodeError:  # lone surrogates (keys may hold any str): RE2 reads UTF-8
            return self._match(_SURROGATE.sub("\ufffd", text)) is not None

    def __repr__(self) -> str:
        return f"LinearRegex({self.source!r})"


def compile_linear(pattern: Any) -> LinearRegex:
    """A :class:`LinearRegex` of a str or a ``re.Pattern`` (its i, m and s flags carried over).

    Raises ValueError for a pattern RE2 cannot run (or a ``re.VERBOSE`` one), TypeError for a
    bytes pattern or anything but str / ``re.Pattern``.
    """
    if isinstance(pattern, str):
        return LinearRegex(pattern)
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, str):
            raise TypeError("a bytes regular expression cannot match str; use a str one")
        flags = pattern.flags & ~_IGNORED_FLAGS
        inline = "".join(letter for flag, letter in _FLAGS.items() if flags & flag)
        for flag in _FLAGS:
            flags &= ~flag
        if flags:
            raise ValueError(
                f"regular expression {pattern.pattern!r} uses flags RE2 cannot honour "
                f"({re.RegexFlag(flags)!r}); use only re.IGNORECASE, re.MULTILINE and re.DOTALL"
            )
        return LinearRegex(pattern.pattern, inline)
    raise TypeError(f"a regular expression is a str or re.Pattern, not {type(pattern).__name__}")
