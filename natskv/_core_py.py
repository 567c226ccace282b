"""The pure-Python core of natskv: the readable reference for ``natskv._core``.

Everything here is a pure function or an immutable object (the indexes excepted, see below): no
I/O, no NATS, no asyncio, safe to call from any thread. ``natskv._core`` (Cython) exposes the
same names with the same behaviour, including the exact exception types and messages;
``tests/test_core.py`` and ``tests/test_core_index.py`` check both against each other. The rest
of natskv imports whichever one ``natskv._speedups`` picked, never either module directly.

Five groups of names live here:

- keys: ``encode_key`` / ``decode_key`` map any ``str`` to a NATS KV key and back, reversibly;
- patterns: ``compile_pattern`` turns a Redis-style glob into a matcher plus the narrowest NATS
  subject filter that still selects every matching key;
- protocol helpers: ``parse_headers``, ``pub_command``, ``parse_ack_subject``;
- query filters: ``compile_filter`` compiles a MongoDB-style ``where`` dict once, to be matched
  against many decoded JSON values;
- indexes: ``index_key`` (the total order of indexed values), ``SortedIndex`` and ``UniqueIndex``,
  the in-memory secondary indexes of the model replica. Unlike everything else here they are
  mutable, and their owner serializes access to them.
"""

from __future__ import annotations

import bisect
import operator
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from sortedcontainers import SortedKeyList, SortedList  # type: ignore[import-untyped]

from natskv._regex import LinearRegex, compile_linear

__all__ = [
    "MAX_CONTROL_LINE",
    "Filter",
    "IndexSet",
    "Pattern",
    "Record",
    "RecordBuilder",
    "SortedIndex",
    "UniqueIndex",
    "atomic_batch",
    "compile_filter",
    "compile_pattern",
    "decode_entries",
    "decode_key",
    "decode_keys",
    "decode_subjects",
    "encode_key",
    "encode_keys",
    "frames_known",
    "frames_run",
    "index_key",
    "parse_ack_subject",
    "parse_frames",
    "parse_header_fields",
    "parse_headers",
    "plain_header_block",
    "pub_command",
    "record_pk",
    "record_type",
    "take_deliveries",
]

# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

# Characters a key token keeps as they are. "." separates tokens and "=" starts an escape, so both
# are escaped like any other character outside this set.
_LITERAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_/-")
_LITERAL_TOKEN = re.compile(r"[A-Za-z0-9_/\-]+")
_UPPER_HEX = frozenset("0123456789ABCDEF")


def _check_sep(sep: object) -> None:
    if not isinstance(sep, str):
        raise TypeError(f"sep must be str, not {type(sep).__name__}")
    if len(sep) > 1:
        raise ValueError(f"sep must be a single character or '', not {sep!r}")


def _escape_token(token: str, offset: int) -> str:
    """Escape one token of a key; ``offset`` is where the token starts in the key."""
    parts = []
    for i, ch in enumerate(token):
        if ch in _LITERAL:
            parts.append(ch)
            continue
        try:
            data = ch.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"key has a lone surrogate {ch!r} at position {offset + i}, which UTF-8 cannot"
                " encode; keys must be valid Unicode text"
            ) from None
        parts.append("".join(f"={byte:02X}" for byte in data))
    return "".join(parts)


def encode_key(key: str, sep: str = ":") -> str:
    """Encode any ``str`` into a NATS KV key (alphabet ``[-/_=.a-zA-Z0-9]``), reversibly.

    ``sep`` is the hierarchy separator: each occurrence becomes a ``.`` token boundary, so NATS
    subject wildcards work on the same boundaries. ``""`` means no hierarchy (``.`` is escaped).
    Inside a token ``[A-Za-z0-9_/-]`` stay literal and every other character becomes ``=XX`` per
    UTF-8 byte; an empty token is written as a lone ``=``.

    >>> encode_key("user:42"), encode_key("a.b"), encode_key(""), encode_key("a::b")
    ('user.42', 'a=2Eb', '=', 'a.=.b')

    Raises TypeError for a non-str key or sep, ValueError for a sep longer than one character or
    a key containing a lone surrogate.
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")
    _check_sep(sep)
    tokens = key.split(sep) if sep else [key]
    out = []
    offset = 0
    for token in tokens:
        if not token:
            out.append("=")
        elif _LITERAL_TOKEN.fullmatch(token):
            out.append(token)
        else:
            out.append(_escape_token(token, offset))
        offset += len(token) + 1
    return ".".join(out)


def _bad_key(encoded: str, reason: str, position: int) -> ValueError:
    return ValueError(f"invalid encoded key {encoded!r}: {reason} at position {position}")


def _unescape_token(encoded: str, token: str, offset: int, sep: str) -> str:
    """Decode one token that is not plain literal text, validating it strictly.

    Errors are reported in reading order: a run of ``=XX`` escapes is first checked for syntax,
    then decoded as UTF-8 character by character, each decoded character being checked before
    the next one is decoded. ``natskv._core`` follows the same order so both report the same
    position.
    """
    out = []
    i = 0
    n = len(token)
    while i < n:
        ch = token[i]
        if ch == "=":
            start = i
            raw = bytearray()
            while i < n and token[i] == "=":
                digits = token[i + 1 : i + 3]
                if len(digits) != 2 or not _UPPER_HEX.issuperset(digits):
                    raise _bad_key(encoded, f"malformed escape {token[i : i + 3]!r}", offset + i)
                raw.append(int(digits, 16))
                i += 3
            try:
                text = raw.decode("utf-8")
                bad_byte = -1
            except UnicodeDecodeError as exc:
                text = raw[: exc.start].decode("utf-8")
                bad_byte = exc.start
            position = offset + start
            for decoded in text:
                if decoded == sep:
                    raise _bad_key(encoded, f"escaped separator {decoded!r}", position)
                if decoded in _LITERAL:
                    reason = f"escaped character {decoded!r} must be written literally"
                    raise _bad_key(encoded, reason, position)
                out.append(decoded)
                position += 3 * len(decoded.encode("utf-8"))
            if bad_byte >= 0:
                raise _bad_key(encoded, "invalid UTF-8 in escapes", offset + start + 3 * bad_byte)
        elif ch == sep:
            raise _bad_key(encoded, f"separator character {ch!r} inside a token", offset + i)
        elif ch in _LITERAL:
            out.append(ch)
            i += 1
        else:
            raise _bad_key(encoded, f"invalid character {ch!r}", offset + i)
    return "".join(out)


def decode_key(encoded: str, sep: str = ":") -> str:
    """Decode a key produced by ``encode_key`` (same ``sep``) back to the original ``str``.

    Strict: anything ``encode_key`` could not have produced raises ValueError naming the reason
    and position (empty token, bad or lowercase escape, invalid UTF-8, an escaped character that
    should have been literal, ...). So every accepted input round-trips:
    ``encode_key(decode_key(x, sep), sep) == x``. Raises TypeError for non-str input.
    """
    if not isinstance(encoded, str):
        raise TypeError(f"encoded key must be str, not {type(encoded).__name__}")
    _check_sep(sep)
    tokens = encoded.split(".") if sep else [encoded]
    out = []
    offset = 0
    for token in tokens:
        if not token:
            raise _bad_key(encoded, "empty token", offset)
        if token == "=":  # noqa: S105 - a key token, not a secret
            out.append("")
        elif _LITERAL_TOKEN.fullmatch(token) and not (sep and sep in token):
            out.append(token)
        else:
            out.append(_unescape_token(encoded, token, offset, sep))
        offset += len(token) + 1
    return sep.join(out)


def encode_keys(keys: Iterable[str], sep: str = ":") -> list[str]:
    """``[encode_key(k, sep) for k in keys]`` in one call."""
    return [encode_key(key, sep) for key in keys]


def decode_keys(encoded: Iterable[str], sep: str = ":") -> list[str]:
    """``[decode_key(e, sep) for e in encoded]`` in one call."""
    return [decode_key(item, sep) for item in encoded]


def decode_subjects(subjects: Iterable[str], prefix_len: int, sep: str = ":") -> list[str]:
    """Decode ``s[prefix_len:]`` of each subject, e.g. ``"$KV.b.user.42"`` with 6 -> ``"user:42"``.

    Raises ValueError for a negative ``prefix_len`` or a remainder that is not a valid key.
    """
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, not {prefix_len}")
    return [decode_key(subject[prefix_len:], sep) for subject in subjects]


# ---------------------------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------------------------

# A parsed glob is a list of elements: ("lit", ch), ("one",), ("star",) or
# ("class", negated, ((lo, hi), ...)). Consecutive stars are merged: "**" means the same as "*".
_Element = tuple[Any, ...]
_STAR: _Element = ("star",)
_ONE: _Element = ("one",)


def _bad_pattern(pattern: str, reason: str, position: int) -> ValueError:
    return ValueError(f"invalid pattern {pattern!r}: {reason} at position {position}")


def _parse_class(pattern: str, start: int) -> tuple[_Element, int]:
    """Parse ``[...]`` starting at ``start``; return the element and the index after ``]``."""
    n = len(pattern)
    j = start + 1
    negated = j < n and pattern[j] in "^!"
    if negated:
        j += 1
    ranges: list[tuple[str, str]] = []
    while True:
        if j >= n:
            raise _bad_pattern(pattern, "unterminated character class", start)
        ch = pattern[j]
        if ch == "]":
            if not ranges:
                raise _bad_pattern(
                    pattern, "empty character class (write \\] to match ']')", start
                )
            return ("class", negated, tuple(ranges)), j + 1
        if ch == "\\":
            if j + 1 >= n:
                raise _bad_pattern(pattern, "unterminated character class", start)
            low = pattern[j + 1]
            j += 2
        else:
            low = ch
            j += 1
        high = low
        if j + 1 < n and pattern[j] == "-" and pattern[j + 1] != "]":
            j += 1
            if pattern[j] == "\\":
                if j + 1 >= n:
                    raise _bad_pattern(pattern, "unterminated character class", start)
                high = pattern[j + 1]
                j += 2
            else:
                high = pattern[j]
                j += 1
            if low > high:
                low, high = high, low
        ranges.append((low, high))


def _parse_glob(pattern: str) -> list[_Element]:
    elements: list[_Element] = []
    i = 0
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if not elements or elements[-1] is not _STAR:
                elements.append(_STAR)
            i += 1
        elif ch == "?":
            elements.append(_ONE)
            i += 1
        elif ch == "[":
            element, i = _parse_class(pattern, i)
            elements.append(element)
        elif ch == "\\":
            if i + 1 >= n:
                raise _bad_pattern(pattern, "trailing backslash", i)
            elements.append(("lit", pattern[i + 1]))
            i += 2
        else:
            elements.append(("lit", ch))
            i += 1
    return elements


def _glob_segments(elements: list[_Element]) -> list[tuple[re.Pattern[str], int]]:
    """The glob cut at its stars: each star-free run as ``(regex, length)`` (a run may be empty).

    Every element but a star matches exactly one character, so each run has a fixed length and
    its regex has no repetition: searching for it is linear. ``_glob_match`` places the runs
    leftmost first, which finds a match whenever there is one, in O(len(key) * len(glob)) like
    the compiled core's matcher (a regex with ``.*`` per star can take exponential time).
    """
    runs: list[list[_Element]] = [[]]
    for element in elements:
        if element is _STAR:
            runs.append([])
        else:
            runs[-1].append(element)
    return [(_glob_regex(run), len(run)) for run in runs]


def _glob_match(segments: list[tuple[re.Pattern[str], int]], key: str) -> bool:
    first, first_len = segments[0]
    if len(segments) == 1:
        return first.fullmatch(key) is not None
    last, last_len = segments[-1]
    end = len(key) - last_len
    if end < first_len or first.match(key) is None or last.match(key, end) is None:
        return False
    pos = first_len
    for regex, _ in segments[1:-1]:
        found = regex.search(key, pos, end)
        if found is None:
            return False
        pos = found.end()
    return True


def _glob_regex(elements: list[_Element]) -> re.Pattern[str]:
    parts = []
    for element in elements:
        kind = element[0]
        if kind == "lit":
            parts.append(re.escape(element[1]))
        elif kind == "one":
            parts.append(".")
        elif kind == "star":
            parts.append(".*")
        else:
            members = "".join(
                re.escape(low) if low == high else f"{re.escape(low)}-{re.escape(high)}"
                for low, high in element[2]
            )
            parts.append(f"[{'^' if element[1] else ''}{members}]")
    return re.compile("".join(parts), re.DOTALL)


def _glob_filter(elements: list[_Element], sep: str) -> tuple[str, bool]:
    """The narrowest subject filter (relative to the bucket prefix) and whether it is exact.

    The glob is split into tokens at literal separators. Leading tokens without wildcards are
    kept (encoded); the first token with a wildcard and everything after it become ``>``. That
    is exact only when the rest is a single lone ``*``: ``user:*`` matches precisely the keys
    whose first token is ``user`` followed by at least one more token, which is what
    ``user.>`` selects. A glob without wildcards is its own encoded key, exactly.
    """
    tokens: list[list[_Element]] = [[]]
    for element in elements:
        if sep and element == ("lit", sep):
            tokens.append([])
        else:
            tokens[-1].append(element)
    literal: list[str] = []
    for token in tokens:
        if any(element[0] != "lit" for element in token):
            break
        literal.append("".join(element[1] for element in token))
    if len(literal) == len(tokens):
        return encode_key(sep.join(literal), sep), True
    rest = tokens[len(literal) :]
    exact = len(rest) == 1 and rest[0] == [_STAR]
    return ".".join([encode_key(token, "") for token in literal] + [">"]), exact


class Pattern:
    """A compiled key pattern: a matcher over decoded keys plus a NATS subject filter.

    Attributes (read-only): ``pattern`` (the source given to ``compile_pattern``: a str glob or
    a ``re.Pattern``), ``sep``, ``filter`` (subject filter relative to the bucket prefix) and
    ``exact`` (True when the filter alone selects exactly the matching keys). Immutable and
    thread-safe.
    """

    __slots__ = ("_exact", "_filter", "_pattern", "_regex", "_segments", "_sep")

    def __init__(self, pattern: str | re.Pattern[str], sep: str = ":") -> None:
        _check_sep(sep)
        self._pattern = pattern
        self._sep = sep
        self._regex: LinearRegex | None = None
        if isinstance(pattern, re.Pattern):
            if not isinstance(pattern.pattern, str):
                raise TypeError("a bytes regular expression cannot match str keys; use a str one")
            self._regex = compile_linear(pattern)
            self._filter = ">"
            self._exact = False
        elif isinstance(pattern, str):
            elements = _parse_glob(pattern)
            self._segments = _glob_segments(elements)
            self._filter, self._exact = _glob_filter(elements, sep)
        else:
            raise TypeError(f"pattern must be str or re.Pattern, not {type(pattern).__name__}")

    @property
    def pattern(self) -> str | re.Pattern[str]:
        return self._pattern

    @property
    def sep(self) -> str:
        return self._sep

    @property
    def filter(self) -> str:
        return self._filter

    @property
    def exact(self) -> bool:
        return self._exact

    def __repr__(self) -> str:
        return f"Pattern({self._pattern!r}, filter={self._filter!r}, exact={self._exact})"

    def __reduce__(self) -> tuple[Any, ...]:
        return compile_pattern, (self._pattern, self._sep)

    def match(self, key: str) -> bool:
        """True if the decoded ``key`` matches. Raises TypeError for a non-str key."""
        if not isinstance(key, str):
            raise TypeError(f"key must be str, not {type(key).__name__}")
        if self._regex is not None:
            return self._regex.matches(key)
        return _glob_match(self._segments, key)

    def match_encoded(self, encoded: str) -> bool:
        """True if the encoded key matches; False if ``encoded`` is not a valid encoded key."""
        try:
            key = decode_key(encoded, self._sep)
        except ValueError:
            return False
        return self.match(key)

    def filter_keys(self, keys: Iterable[str]) -> list[str]:
        """The keys (decoded) that match, in order. Raises TypeError for a non-str key."""
        return [key for key in keys if self.match(key)]


def compile_pattern(pattern: str | re.Pattern[str], sep: str = ":") -> Pattern:
    """Compile a Redis KEYS-style glob (or a ``re.Pattern``) over decoded keys.

    Glob syntax: ``*`` any run of characters (separator included), ``?`` one character,
    ``[abc]``, ``[a-z]``, ``[^abc]`` / ``[!abc]``, ``\\x`` a literal x. A reversed range such as
    ``[z-a]`` means ``[a-z]`` (as in Redis); ``-`` first or last in a class is literal. The
    result's ``filter`` is the narrowest server-side subject filter (see ``_glob_filter``): for
    ``"user:*"`` it is ``"user.>"`` with ``exact`` True, for ``"user:a?"`` ``"user.>"`` with
    ``exact`` False (keys must still be checked with ``match``). A ``re.Pattern`` matches with
    ``search`` and filters with ``>``. Raises ValueError with the position for an unterminated
    or empty ``[...]`` (write ``\\]`` for a literal ``]``) or a trailing backslash, TypeError
    for anything but str / ``re.Pattern``.
    """
    return Pattern(pattern, sep)


# ---------------------------------------------------------------------------------------------
# Protocol helpers
# ---------------------------------------------------------------------------------------------

_WHITESPACE = b" \t\n\r\x0b\x0c"


def parse_headers(raw: bytes) -> tuple[int, str, dict[str, str]]:
    """Parse a NATS header block into ``(status or 0, description or "", headers)``.

    ``raw`` looks like ``b"NATS/1.0 404 Not Found\\r\\nName: Value\\r\\n\\r\\n"``. Names keep their
    case, values are stripped, a repeated name keeps its last value, lines without a colon are
    skipped, and text is decoded as UTF-8 (invalid bytes replaced). Raises ValueError if the
    block does not start with ``NATS/`` or the status is not a number, TypeError if ``raw`` is
    not bytes-like.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"raw must be bytes, not {type(raw).__name__}")
    raw = bytes(raw)
    if not raw.startswith(b"NATS/"):
        raise ValueError(f"not a NATS header block: {raw[:32]!r}")
    lines = raw.split(b"\n")
    first = lines[0].rstrip(b"\r")
    version_and_rest = first.split(None, 1)
    rest = version_and_rest[1].strip(_WHITESPACE) if len(version_and_rest) > 1 else b""
    status = 0
    description = ""
    if rest:
        parts = rest.split(None, 1)
        code = parts[0]
        if not code.isdigit():
            raise ValueError(f"malformed NATS status line: {first!r}")
        status = int(code)
        if len(parts) > 1:
            description = parts[1].strip(_WHITESPACE).decode("utf-8", "replace")
    headers: dict[str, str] = {}
    for raw_line in lines[1:]:
        line = raw_line.rstrip(b"\r")
        if not line:
            break
        name, colon, value = line.partition(b":")
        name = name.strip(_WHITESPACE)
        if not colon or not name:
            continue
        headers[name.decode("utf-8", "replace")] = value.strip(_WHITESPACE).decode(
            "utf-8", "replace"
        )
    return status, description, headers


def parse_header_fields(raw: bytes, names: tuple[bytes, ...]) -> tuple[int, str, tuple[str | None, ...]]:
    """``(status, description, values)`` of a NATS header block, where ``values[i]`` is the value
    of the header named ``names[i]`` (ASCII bytes, matched with case) or None when absent.

    The same as looking the names up in :func:`parse_headers`'s dict, without building the
    strings of the other headers: the hot path of a direct get reads six headers of about ten.
    Raises as :func:`parse_headers` does, TypeError unless ``names`` is a tuple of bytes and
    ValueError for a name that is not ASCII (both before reading ``raw``).
    """
    if type(names) is not tuple or any(type(name) is not bytes for name in names):
        raise TypeError("names must be a tuple of bytes")
    for name in names:
        if not name.isascii():
            raise ValueError(f"header names must be ASCII, not {name!r}")
    status, description, headers = parse_headers(raw)
    return status, description, tuple(headers.get(name.decode("ascii")) for name in names)


# nats-server closes the connection of a client whose protocol line (the arguments after PUB or
# HPUB: subject, reply and sizes) is longer than its max_control_line, 4096 bytes by default.
# Its INFO does not announce the setting, so natskv keeps within the default.
MAX_CONTROL_LINE = 4096


def _line_too_long(length: int) -> str:
    return (
        f"subject and reply subject too long: the protocol line would be {length} bytes and nats-server "
        f"closes the connection beyond {MAX_CONTROL_LINE} (its max_control_line); use a shorter subject"
    )


def _check_token(what: str, value: object, allow_empty: bool) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    if any(ch in value for ch in " \t\r\n"):
        raise ValueError(f"{what} {value!r} must not contain whitespace")
    return value.encode("utf-8")


def _header_block(headers: dict[str, str]) -> bytes:
    lines = [b"NATS/1.0\r\n"]
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(
                f"header names and values must be str, got {type(name).__name__}: "
                f"{type(value).__name__}"
            )
        if not name or any(ch in name for ch in " \t\r\n:"):
            raise ValueError(
                f"invalid header name {name!r}: it must be non-empty, without spaces, colons,"
                " tabs or line breaks"
            )
        if "\r" in value or "\n" in value:
            raise ValueError(f"invalid value for header {name!r}: it must not contain CR or LF")
        lines.append(f"{name}: {value}\r\n".encode())
    lines.append(b"\r\n")
    return b"".join(lines)


def pub_command(
    subject: str, reply: str, payload: bytes, headers: dict[str, str] | None
) -> bytes:
    """Build a ``PUB`` (no or empty headers) or ``HPUB`` client protocol command.

    ``reply`` ``""`` means no reply subject. Raises ValueError for an empty subject, whitespace in
    the subject or reply, a header name that is empty or holds a space, tab, colon, CR or LF, a
    header value holding CR or LF, or a command line (subject, reply and sizes) longer than
    ``MAX_CONTROL_LINE`` bytes; TypeError for wrongly typed arguments.
    """
    subject_bytes = _check_token("subject", subject, allow_empty=False)
    reply_bytes = _check_token("reply", reply, allow_empty=True)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if headers is not None and not isinstance(headers, dict):
        raise TypeError(f"headers must be a dict or None, not {type(headers).__name__}")
    block = _header_block(headers) if headers else b""
    sizes = b"%d %d" % (len(block), len(block) + len(payload)) if block else b"%d" % len(payload)
    reply_part = b" " + reply_bytes if reply_bytes else b""
    line = len(subject_bytes) + len(reply_part) + 1 + len(sizes)
    if line > MAX_CONTROL_LINE:
        raise ValueError(_line_too_long(line))
    op = b"HPUB" if block else b"PUB"
    return b"%s %s%s %s\r\n%s%s\r\n" % (op, subject_bytes, reply_part, sizes, block, payload)


def atomic_batch(
    prefix: str,
    items: list[tuple[str, bytes, dict[str, str] | None]],
    batch_id: str,
    first_reply: str,
    last_reply: str,
) -> bytes:
    """The protocol commands of one atomic batch publish, in one bytes object.

    ``items`` are (subject token, payload, headers or None); message ``i`` (from 1) goes to
    ``prefix + token`` as an ``HPUB`` whose headers are the item's, then ``Nats-Batch-Id``,
    ``Nats-Batch-Sequence: i`` and, on the last message, ``Nats-Batch-Commit: 1``. The first
    message carries ``first_reply`` (a failed check is answered there), the last ``last_reply``
    (the commit's acknowledgement); a batch of one message carries ``last_reply``. The same as
    joining :func:`pub_command` of each message, with the same refusals; ValueError also for no
    items or an empty batch id.
    """
    if not isinstance(items, list):
        raise TypeError(f"items must be a list, not {type(items).__name__}")
    if not items:
        raise ValueError("an atomic batch holds at least one message")
    if not isinstance(batch_id, str):
        raise TypeError(f"batch_id must be str, not {type(batch_id).__name__}")
    if not batch_id or "\r" in batch_id or "\n" in batch_id:
        raise ValueError(f"invalid batch id {batch_id!r}: it must be non-empty, without CR or LF")
    first_bytes = _check_token("reply", first_reply, allow_empty=True)
    last_bytes = _check_token("reply", last_reply, allow_empty=True)
    n = len(items)
    out = []
    for seq, item in enumerate(items, start=1):
        if not isinstance(item, tuple):
            raise TypeError(f"an item must be a tuple, not {type(item).__name__}")
        if len(item) != 3:
            raise ValueError(f"an item is (subject token, payload, headers), not {len(item)} values")
        token, payload, headers = item
        if not isinstance(token, str):
            raise TypeError(f"subject must be str, not {type(token).__name__}")
        subject_bytes = _check_token("subject", prefix + token, allow_empty=False)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        payload = bytes(payload)
        if headers is not None and not isinstance(headers, dict):
            raise TypeError(f"headers must be a dict or None, not {type(headers).__name__}")
        # The item's own headers come first, then the batch's (appended, never merged).
        own = _header_block(headers)[:-2] if headers else b"NATS/1.0\r\n"
        tail = f"Nats-Batch-Id: {batch_id}\r\nNats-Batch-Sequence: {seq}\r\n"
        if seq == n:
            tail += "Nats-Batch-Commit: 1\r\n"
        block = own + tail.encode() + b"\r\n"
        reply = last_bytes if seq == n else first_bytes if seq == 1 else b""
        reply_part = b" " + reply if reply else b""
        sizes = b"%d %d" % (len(block), len(block) + len(payload))
        line = len(subject_bytes) + len(reply_part) + 1 + len(sizes)
        if line > MAX_CONTROL_LINE:
            raise ValueError(_line_too_long(line))
        out.append(b"HPUB %s%s %s\r\n%s%s\r\n" % (subject_bytes, reply_part, sizes, block, payload))
    return b"".join(out)


def _ack_number(reply: str, token: str) -> int:
    if not token or not token.isascii() or not token.isdigit():
        raise ValueError(f"not a JetStream ack subject: {reply!r} (bad number {token!r})")
    return int(token)


def parse_ack_subject(reply: str) -> tuple[str, str, int, int, int, int, int]:
    """Parse a JetStream ack reply subject.

    Returns ``(stream, consumer, num_delivered, stream_seq, consumer_seq, timestamp_ns,
    num_pending)``. Accepts the v1 form ``$JS.ACK.<stream>.<consumer>.<5 numbers>`` and the v2 form
    ``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<5 numbers>[.<token>]``. Raises ValueError for
    anything else, TypeError for non-str input.
    """
    if not isinstance(reply, str):
        raise TypeError(f"reply must be str, not {type(reply).__name__}")
    tokens = reply.split(".")
    if len(tokens) not in (9, 11, 12) or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    if "" in tokens:
        raise ValueError(f"not a JetStream ack subject: {reply!r} (empty token)")
    base = 2 if len(tokens) == 9 else 4
    numbers = [_ack_number(reply, token) for token in tokens[base + 2 : base + 7]]
    return (
        tokens[base],
        tokens[base + 1],
        numbers[0],
        numbers[1],
        numbers[2],
        numbers[3],
        numbers[4],
    )


Frame = tuple[int, str, str, "bytes | None", bytes]
"""A message delivered by the server: (sid, subject, reply or "", header block or None, payload)."""


def _frame_number(line: bytes, token: bytes) -> int:
    if not token.isdigit() or len(token) > 18:
        raise ValueError(f"malformed message line {line[:80]!r} (bad number {token[:20]!r})")
    return int(token)


def parse_frames(buf: bytes | bytearray) -> tuple[list[Frame], int, bool]:
    """Split the complete ``MSG`` / ``HMSG`` frames at the front of a NATS protocol buffer.

    Returns ``(frames, used, control)``: the frames in order, the number of bytes they took from
    the start of ``buf``, and whether ``buf`` continues there with a complete line that is not a
    message (``PING``, ``PONG``, ``+OK``, ``-ERR``, ``INFO``: the caller reads one line and calls
    again). ``control`` is False when the rest is empty or an incomplete frame (wait for more
    bytes). Subjects are decoded as UTF-8; a ``HMSG`` with an empty header block gives None, as
    a ``MSG`` does. Raises ValueError for a malformed message line or a payload not followed by
    CRLF, TypeError unless ``buf`` is bytes or bytearray. ``buf`` is not modified.
    """
    if not isinstance(buf, (bytes, bytearray)):
        raise TypeError(f"buf must be bytes or bytearray, not {type(buf).__name__}")
    frames: list[Frame] = []
    pos, size = 0, len(buf)
    while pos < size:
        if buf.startswith((b"MSG ", b"MSG\t"), pos):
            headed = False
        elif buf.startswith((b"HMSG ", b"HMSG\t"), pos):
            headed = True
        else:  # another operation, or the start of one not yet received
            return frames, pos, buf.find(b"\r\n", pos) >= 0
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return frames, pos, False
        line = bytes(buf[pos:end])
        args = line.split(None)[1:]
        if len(args) not in ((4, 5) if headed else (3, 4)):
            raise ValueError(f"malformed message line {line[:80]!r}")
        subject, sid = args[0], _frame_number(line, args[1])
        reply = args[2] if len(args) == (5 if headed else 4) else b""
        total = _frame_number(line, args[-1])
        header_size = _frame_number(line, args[-2]) if headed else 0
        if header_size > total:
            raise ValueError(f"malformed message line {line[:80]!r} (header larger than message)")
        start = end + 2
        if start + total + 2 > size:
            return frames, pos, False
        if buf[start + total : start + total + 2] != b"\r\n":
            raise ValueError(f"message of {total} bytes not followed by CRLF after {line[:80]!r}")
        headers = bytes(buf[start : start + header_size]) if header_size else None
        payload = bytes(buf[start + header_size : start + total])
        frames.append((sid, subject.decode(), reply.decode(), headers, payload))
        pos = start + total + 2
    return frames, pos, False



def frames_known(frames: list[Frame], sids: Any) -> bool:
    """Whether the subscription id of every frame is in ``sids`` (a dict or set)."""
    return all(frame[0] in sids for frame in frames)

def frames_run(frames: list[Frame], start: int, sid: int) -> tuple[int, int]:
    """``(stop, size)``: ``frames[start:stop]`` is the run of frames of subscription ``sid`` that
    starts at ``start`` (empty when ``frames[start]`` is another's), and ``size`` the bytes of
    their payloads (the frame reader's count of what it delivers in one call)."""
    if start < 0:
        raise IndexError("start must be >= 0")
    size, stop = 0, start
    while stop < len(frames) and frames[stop][0] == sid:
        size += len(frames[stop][4])
        stop += 1
    return stop, size


# Headers that make a stored message something other than a plain value: a delete or purge
# marker (KV-Operation, and the server's Nats-Marker-Reason) or bytes stored raw (natskv's codec).
_ENTRY_HEADERS = (b"kv-operation", b"nats-marker-reason", b"natskv-raw")


def plain_header_block(headers: Any) -> bool:
    """Whether a delivery's raw header block (bytes) leaves it a plain value: no status, and none
    of the headers that make an entry a delete or purge marker or raw bytes (header names, at the
    start of a line before its colon, compared without case; values are not looked at). The
    headers a compare-and-set or an atomic batch stores (the expected revision, the batch's id
    and sequence), a TTL and a rollup change nothing in the entry."""
    if type(headers) is not bytes or not headers.startswith(b"NATS/1.0\r\n"):
        return False
    for line in headers[10:].split(b"\n"):
        name, colon, _ = line.partition(b":")
        if colon and b"\r" not in name and name.lower() in _ENTRY_HEADERS:
            return False
    return True


def take_deliveries(
    frames: list[Frame], start: int, consumer: str, next_dseq: int, entry_type: Any, stop_at_caught_up: bool
) -> tuple[list[Any], int]:
    """The run of plain deliveries of a push consumer at ``frames[start:]``, as entries.

    A plain delivery is a stored value: a non-empty payload, a ``$JS.ACK.`` reply (v1 or v2)
    naming ``consumer`` whose consumer sequence is the one expected (``next_dseq``, then one more
    per entry), and no header block or one that says nothing about the entry (see
    :func:`plain_header_block`: a compare-and-set or batch write stores its headers). Each
    becomes ``entry_type(subject, payload, stream_seq, str(timestamp_ns), "PUT", num_pending)``.
    Returns ``(entries, stop)``: ``stop`` is the index of the first frame not taken
    (``len(frames)`` when all were), which the caller handles on its own (a control message, a
    marker's or raw value's headers, another consumer's, a gap, a reply that is no ack subject); with
    ``stop_at_caught_up`` the run also ends after an entry whose ``num_pending`` is 0.
    """
    entries: list[Any] = []
    for index in range(start, len(frames)):
        _, subject, reply, headers, payload = frames[index]
        if not payload or not reply.startswith("$JS.ACK.") or not (headers is None or plain_header_block(headers)):
            return entries, index
        try:
            _, name, _, sseq, dseq, stamp, pending = parse_ack_subject(reply)
        except ValueError:
            return entries, index
        if name != consumer or dseq != next_dseq:
            return entries, index
        next_dseq += 1
        entries.append(entry_type(subject, payload, sseq, str(stamp), "PUT", pending))
        if stop_at_caught_up and pending == 0:
            return entries, index + 1
    return entries, len(frames)


def decode_entries(entries: list[Any], prefix_len: int, sep: str, loads: Any) -> list[tuple[int, str, bool, Any]]:
    """``(revision, key, put, value)`` of each entry (an object with the fields of natskv's
    ``RawEntry``: subject, data, revision, operation, raw_bytes), for a replica to apply.

    ``key`` is ``subject[prefix_len:]`` decoded as :func:`decode_key` does, or left as it is when
    it is not in that encoding (written by another client); ``put`` says whether the operation
    is ``PUT``. ``value`` is None for any other operation; for a put, the payload itself when
    ``raw_bytes`` is set or ``loads`` is None, else ``loads(payload)``, or the payload when that
    raises ValueError (not JSON: written by another client).
    """
    out: list[tuple[int, str, bool, Any]] = []
    for entry in entries:
        token = entry.subject[prefix_len:]
        try:
            key = decode_key(token, sep)
        except ValueError:
            key = token
        put = entry.operation == "PUT"
        value = None
        if put:
            value = entry.data
            if loads is not None and not entry.raw_bytes:
                try:
                    value = loads(value)
                except ValueError:
                    pass
        out.append((entry.revision, key, put, value))
    return out

# ---------------------------------------------------------------------------------------------
# Query filters
# ---------------------------------------------------------------------------------------------

# Value categories. Equality and ordering only ever hold within one category, so True != 1 and
# "1" != 1, while 1 == 1.0.
_BOOL, _STR, _NUM, _NONE, _LIST, _DICT, _OTHER = range(7)


def _category(value: object) -> int:
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, str):
        return _STR
    if isinstance(value, (int, float)):
        return _NUM
    if value is None:
        return _NONE
    if isinstance(value, (list, tuple)):
        return _LIST
    if isinstance(value, dict):
        return _DICT
    return _OTHER


_MAX_DEPTH = 256


def _json_eq(a: Any, b: Any, depth: int = 0) -> bool:
    """Deep equality of JSON-like values, with bools never equal to numbers.

    ``depth`` counts the containers already entered; comparing values nested deeper than
    ``_MAX_DEPTH`` raises RecursionError (the compiled core would otherwise exhaust the C stack).
    """
    kind = _category(a)
    if kind != _category(b):
        return False
    if kind in (_LIST, _DICT):
        if len(a) != len(b):
            return False
        if depth >= _MAX_DEPTH:
            raise RecursionError(
                f"values nested more than {_MAX_DEPTH} levels deep cannot be compared"
            )
        if kind == _LIST:
            return all(_json_eq(x, y, depth + 1) for x, y in zip(a, b, strict=True))
        for key, value in a.items():
            other = dict.get(b, key, _MISSING)
            if other is _MISSING or not _json_eq(value, other, depth + 1):
                return False
        return True
    return bool(a == b)


_MISSING = object()


class _Cond:
    """One operator applied to one field value (``present`` is False when the field is absent)."""

    __slots__ = ()

    def test(self, value: Any, present: bool) -> bool:
        raise NotImplementedError


class _Eq(_Cond):
    __slots__ = ("operand",)

    def __init__(self, operand: Any) -> None:
        self.operand = operand

    def test(self, value: Any, present: bool) -> bool:
        if not present:
            return self.operand is None
        return _json_eq(value, self.operand)


class _In(_Cond):
    __slots__ = ("members",)

    def __init__(self, members: tuple[Any, ...]) -> None:
        self.members = members

    def test(self, value: Any, present: bool) -> bool:
        if not present:
            value = None
        return any(_json_eq(value, member) for member in self.members)


class _Negate(_Cond):
    """``$ne``, ``$nin`` and field-level ``$not``: true when not all inner conditions hold."""

    __slots__ = ("conds",)

    def __init__(self, conds: list[_Cond]) -> None:
        self.conds = conds

    def test(self, value: Any, present: bool) -> bool:
        return not all(cond.test(value, present) for cond in self.conds)


class _Compare(_Cond):
    __slots__ = ("category", "compare", "operand")

    def __init__(self, compare: Callable[[Any, Any], bool], operand: Any) -> None:
        self.compare = compare
        self.operand = operand
        self.category = _category(operand)

    def test(self, value: Any, present: bool) -> bool:
        return present and _category(value) == self.category and self.compare(value, self.operand)


class _Contains(_Cond):
    __slots__ = ("operand",)

    def __init__(self, operand: Any) -> None:
        self.operand = operand

    def test(self, value: Any, present: bool) -> bool:
        if not present:
            return False
        if isinstance(value, str):
            return isinstance(self.operand, str) and self.operand in value
        if isinstance(value, (list, tuple)):
            return any(_json_eq(item, self.operand) for item in value)
        return False


class _StartsWith(_Cond):
    __slots__ = ("operand",)

    def __init__(self, operand: str) -> None:
        self.operand = operand

    def test(self, value: Any, present: bool) -> bool:
        return present and isinstance(value, str) and value.startswith(self.operand)


class _EndsWith(_Cond):
    __slots__ = ("operand",)

    def __init__(self, operand: str) -> None:
        self.operand = operand

    def test(self, value: Any, present: bool) -> bool:
        return present and isinstance(value, str) and value.endswith(self.operand)


class _Regex(_Cond):
    __slots__ = ("regex",)

    def __init__(self, regex: LinearRegex) -> None:
        self.regex = regex

    def test(self, value: Any, present: bool) -> bool:
        return present and isinstance(value, str) and self.regex.matches(value)


class _Exists(_Cond):
    __slots__ = ("wanted",)

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted

    def test(self, value: Any, present: bool) -> bool:
        return present == self.wanted


class _Node:
    """A condition on a whole document (a dict)."""

    __slots__ = ()

    def match(self, doc: Any) -> bool:
        """``doc`` is a dict or a :class:`Record`."""
        raise NotImplementedError


class _Field(_Node):
    __slots__ = ("conds", "path")

    def __init__(self, path: tuple[str, ...], conds: list[_Cond]) -> None:
        self.path = path
        self.conds = conds

    def match(self, doc: Any) -> bool:
        value: Any = doc
        present = True
        for part in self.path:
            if isinstance(value, dict):
                value = dict.get(value, part, _MISSING)
            elif isinstance(value, Record):
                value = value.get(part, _MISSING)
            else:
                value = _MISSING
            if value is _MISSING:
                present = False
                value = None
                break
        return all(cond.test(value, present) for cond in self.conds)


class _And(_Node):
    __slots__ = ("nodes",)

    def __init__(self, nodes: list[_Node]) -> None:
        self.nodes = nodes

    def match(self, doc: Any) -> bool:
        return all(node.match(doc) for node in self.nodes)


class _Or(_Node):
    __slots__ = ("nodes",)

    def __init__(self, nodes: list[_Node]) -> None:
        self.nodes = nodes

    def match(self, doc: Any) -> bool:
        return any(node.match(doc) for node in self.nodes)


class _Not(_Node):
    __slots__ = ("node",)

    def __init__(self, node: _Node) -> None:
        self.node = node

    def match(self, doc: Any) -> bool:
        return not self.node.match(doc)


# Deeper filters are refused at compile time (the compiled core evaluates nodes by C recursion).
_MAX_FILTER_DEPTH = 64
_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}
_FIELD_OPERATORS = frozenset(
    [
        "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$contains",
        "$startswith", "$endswith", "$regex", "$exists", "$not",
    ]
)  # fmt: skip


def _filter_error(path: str, problem: str) -> ValueError:
    where = f" at {path!r}" if path else ""
    return ValueError(f"invalid filter{where}: {problem}")


def _is_operator_dict(spec: object) -> bool:
    return isinstance(spec, dict) and any(isinstance(k, str) and k.startswith("$") for k in spec)


def _compile_op(op: object, arg: Any, path: str, depth: int) -> _Cond:
    if op == "$eq":
        return _Eq(arg)
    if op == "$ne":
        return _Negate([_Eq(arg)])
    if op in _COMPARISONS:
        if _category(arg) not in (_NUM, _STR):
            raise _filter_error(path, f"{op} needs a number or a string, got {type(arg).__name__}")
        return _Compare(_COMPARISONS[op], arg)
    if op in ("$in", "$nin"):
        if not isinstance(arg, (list, tuple)):
            raise _filter_error(path, f"{op} needs a list, got {type(arg).__name__}")
        cond: _Cond = _In(tuple(arg))
        return cond if op == "$in" else _Negate([cond])
    if op == "$contains":
        return _Contains(arg)
    if op in ("$startswith", "$endswith"):
        if not isinstance(arg, str):
            raise _filter_error(path, f"{op} needs a string, got {type(arg).__name__}")
        return _StartsWith(arg) if op == "$startswith" else _EndsWith(arg)
    if op == "$regex":
        return _Regex(_compile_regex(arg, path))
    if op == "$exists":
        if not isinstance(arg, bool):
            raise _filter_error(path, f"$exists needs True or False, got {type(arg).__name__}")
        return _Exists(arg)
    if op == "$not":
        if not _is_operator_dict(arg):
            raise _filter_error(path, "$not on a field needs an operator dict such as {'$gt': 5}")
        return _Negate(_compile_conds(arg, path, depth + 1))
    if op in ("$and", "$or"):
        raise _filter_error(path, f"{op} is only allowed at the top level of a filter")
    raise _filter_error(path, f"unknown operator {op!r}")


def _compile_regex(arg: object, path: str) -> LinearRegex:
    if isinstance(arg, re.Pattern):
        if not isinstance(arg.pattern, str):
            raise _filter_error(path, "$regex needs a str pattern, got a bytes pattern")
    elif not isinstance(arg, str):
        raise _filter_error(path, f"$regex needs a string, got {type(arg).__name__}")
    try:
        return compile_linear(arg)
    except ValueError as exc:
        raise _filter_error(path, str(exc)) from None


def _compile_conds(spec: Any, path: str, depth: int) -> list[_Cond]:
    """The conditions of one field: an operator dict, or a plain value meaning equality."""
    if depth > _MAX_FILTER_DEPTH:
        raise _filter_error(path, f"filter nested more than {_MAX_FILTER_DEPTH} levels deep")
    if not _is_operator_dict(spec):
        return [_Eq(spec)]
    conds = []
    for op, arg in spec.items():
        here = f"{path}.{op}" if isinstance(op, str) else path
        if not isinstance(op, str) or not op.startswith("$"):
            raise _filter_error(here, f"{op!r} mixes a field name with operators")
        conds.append(_compile_op(op, arg, here, depth))
    return conds


def _compile_doc(where: object, path: str, depth: int) -> list[_Node]:
    """The nodes of one filter document (top level, or an item of ``$and`` / ``$or`` / ``$not``)."""
    if depth > _MAX_FILTER_DEPTH:
        raise _filter_error(path, f"filter nested more than {_MAX_FILTER_DEPTH} levels deep")
    if not isinstance(where, dict):
        raise _filter_error(path, f"expected a dict, got {type(where).__name__}")
    nodes: list[_Node] = []
    for key, spec in where.items():
        if not isinstance(key, str):
            raise _filter_error(path, f"field names must be str, got {key!r}")
        here = f"{path}.{key}" if path else key
        if key in ("$and", "$or"):
            if not isinstance(spec, list) or not spec:
                raise _filter_error(here, f"{key} needs a non-empty list of filters")
            subs: list[_Node] = [
                _And(_compile_doc(sub, f"{here}[{i}]", depth + 1)) for i, sub in enumerate(spec)
            ]
            nodes.append(_And(subs) if key == "$and" else _Or(subs))
        elif key == "$not":
            nodes.append(_Not(_And(_compile_doc(spec, here, depth + 1))))
        elif key.startswith("$"):
            if key in _FIELD_OPERATORS:
                raise _filter_error(
                    here, f"{key} needs a field, as in {{'field': {{{key!r}: ...}}}}"
                )
            raise _filter_error(here, f"unknown operator {key!r}")
        else:
            parts = tuple(key.split("."))
            if "" in parts:
                raise _filter_error(here, "empty segment in field path")
            nodes.append(_Field(parts, _compile_conds(spec, here, depth)))
    return nodes


def _top_fields(where: dict[str, Any], into: set[str]) -> None:
    for key, spec in where.items():
        if key in ("$and", "$or"):
            for sub in spec:
                _top_fields(sub, into)
        elif key == "$not":
            _top_fields(spec, into)
        else:
            into.add(key.split(".", 1)[0])


class Filter:
    """A compiled MongoDB-style filter over decoded JSON values.

    Attributes (read-only): ``where`` (the source dict) and ``fields`` (the top-level field
    names it reads, as a frozenset). Immutable and thread-safe.
    """

    __slots__ = ("_fields", "_root", "_where")

    def __init__(self, where: dict[str, Any]) -> None:
        if not isinstance(where, dict):
            raise TypeError(f"where must be a dict, not {type(where).__name__}")
        nodes = _compile_doc(where, "", 0)
        self._root: _Node | None = _And(nodes) if nodes else None
        fields: set[str] = set()
        _top_fields(where, fields)
        self._fields = frozenset(fields)
        self._where = where

    @property
    def where(self) -> dict[str, Any]:
        return self._where

    @property
    def fields(self) -> frozenset[str]:
        return self._fields

    def __repr__(self) -> str:
        return f"Filter({self._where!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return compile_filter, (self._where,)

    def match(self, value: Any) -> bool:
        """True if ``value`` satisfies the filter. Only dicts and :class:`Record` s (a record
        reads as the dict of its stored form) can match a non-empty filter."""
        if self._root is None:
            return True
        return isinstance(value, (dict, Record)) and self._root.match(value)

    def filter(self, values: Iterable[Any]) -> list[int]:
        """The indices of the values that match, in order."""
        return [i for i, value in enumerate(values) if self.match(value)]


def compile_filter(where: dict[str, Any]) -> Filter:
    """Compile a MongoDB-style ``where`` dict, validating all of it up front.

    Field names are dotted paths into nested dicts; a plain value means equality. Operators:
    ``$eq $ne $gt $gte $lt $lte $in $nin $contains $startswith $endswith $regex $exists $not``
    on a field, ``$and $or`` (non-empty lists of filters) and ``$not`` (a filter) at the top.
    An absent field only equals None; comparisons need both sides numbers (bool is not a
    number) or both strings and are simply false otherwise, never raising. Raises ValueError
    naming the path of the first problem (also for filters nested more than 64 levels deep),
    TypeError if ``where`` is not a dict. Matching raises RecursionError only when an equality
    has to compare values nested more than 256 levels deep.
    """
    return Filter(where)


# ---------------------------------------------------------------------------------------------
# Indexes
# ---------------------------------------------------------------------------------------------

# Order keys are tuples whose first item is a rank and whose last item is the value itself, so a
# key can be turned back into its value and keys of different ranks never compare their values.
_RANK_BOOL, _RANK_NUM, _RANK_STR = 0, 1, 2
# A group of primary keys is a plain list until it outgrows this, then a SortedKeyList: inserting
# into a long list costs a memmove per add, and most groups (unique-ish fields) hold one pk.
_GROUP_LIST_MAX = 1024
# Tuple pks nested deeper are refused (the compiled core builds their keys by C recursion).
_MAX_PK_DEPTH = 64


def index_key(value: Any) -> tuple[Any, ...] | None:
    """The order key of a field value, or None when the value is not indexed.

    The order is total over JSON scalars: every bool < every number < every str. Within a kind,
    values compare naturally: ``False < True``; ints and floats by numeric value (``1`` and
    ``1.0`` are the same key, ``True`` is never equal to ``1``); strings by code point. None,
    NaN, dicts, lists and any other type are not indexed. Subclasses of bool/int/float/str
    (enums, for instance) are indexed as their base value. Never raises.

    >>> index_key(True) < index_key(-5) < index_key(2.5) < index_key("")
    True
    >>> index_key(1) == index_key(1.0), index_key(1) == index_key(True), index_key(None)
    (True, False, None)
    """
    kind = type(value)
    if kind is str:
        return (_RANK_STR, value)
    if kind is int:
        return (_RANK_NUM, value)
    if kind is float:
        return (_RANK_NUM, value) if value == value else None
    if kind is bool:
        return (_RANK_BOOL, value)
    if value is None or kind is dict or kind is list:
        return None
    if isinstance(value, str):
        return (_RANK_STR, str.__str__(value))
    if isinstance(value, int):
        return (_RANK_NUM, int.__int__(value))
    if isinstance(value, float):
        number = float.__float__(value)
        return (_RANK_NUM, number) if number == number else None
    return None


def _pk_key(pk: Any) -> tuple[Any, ...]:
    """The order key of a primary key: (type rank, value), total over mixed pk types.

    Ranks: bool < numbers < str < bytes < uuid.UUID < tuple (item by item) < any other hashable
    type, grouped by qualified type name and ordered by the type's own ``<``. Raises ValueError
    for None, NaN or tuples nested more than 64 levels deep, TypeError for an unhashable pk.
    """
    kind = type(pk)
    if kind is int:
        return (_RANK_NUM, pk)
    if kind is str:
        return (_RANK_STR, pk)
    return _pk_key_slow(pk, 0)


def _pk_key_slow(pk: Any, depth: int) -> tuple[Any, ...]:
    if pk is None:
        raise ValueError("a primary key cannot be None")
    if isinstance(pk, bool):
        return (_RANK_BOOL, pk)
    if isinstance(pk, (int, float)):
        if pk != pk:
            raise ValueError("a primary key cannot be NaN")
        return (_RANK_NUM, pk)
    if isinstance(pk, str):
        return (_RANK_STR, pk)
    if isinstance(pk, bytes):
        return (3, pk)
    if isinstance(pk, uuid.UUID):
        return (4, pk)
    if isinstance(pk, tuple):
        if depth >= _MAX_PK_DEPTH:
            raise ValueError("a primary key cannot nest tuples more than 64 levels deep")
        return (5, tuple([_pk_key_slow(item, depth + 1) for item in pk]), pk)
    hash(pk)
    kind = type(pk)
    return (6, f"{kind.__module__}.{kind.__qualname__}", pk)


def _check_limit(limit: object) -> int | None:
    if limit is None:
        return None
    if type(limit) is bool or not isinstance(limit, int):
        raise TypeError(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    return limit


def _bound_key(value: object) -> tuple[Any, ...] | None:
    """The key of a range bound; None for NaN, which no value lies next to."""
    key = index_key(value)
    if key is None:
        if isinstance(value, float):
            return None
        raise TypeError(f"range bounds must be bool, int, float or str, not {type(value).__name__}")
    return key


def _prefix_end(prefix: str) -> str | None:
    """The smallest str above every str starting with ``prefix``; None if there is none."""
    for i in range(len(prefix) - 1, -1, -1):
        code = ord(prefix[i])
        if code < 0x10FFFF:
            return prefix[:i] + chr(code + 1)
    return None


_Bounds = tuple[Any, bool, Any, bool]


def _restore_index(cls: type[Any], args: tuple[Any, ...], entries: list[tuple[Any, Any]]) -> Any:
    """Unpickle an index: a new ``cls(*args)`` holding ``entries`` (value, pk)."""
    index = cls(*args)
    for value, pk in entries:
        index.add(value, pk)
    return index


class _OrderedIndex:
    """What SortedIndex and UniqueIndex share: distinct value keys kept sorted, and the scans.

    ``_values`` holds each distinct key once; ``_map`` maps it to the index's payload (a group of
    pks, or one pk). Subclasses say how a value becomes a key and how a key's pks are taken.
    """

    __slots__ = ("_map", "_values")

    def __init__(self) -> None:
        self._map: dict[tuple[Any, ...], Any] = {}
        self._values = SortedList()

    def _value_key(self, value: Any) -> tuple[Any, ...] | None:
        raise NotImplementedError

    def _args(self) -> tuple[Any, ...]:
        return ()

    def _entries(self) -> list[tuple[Any, Any]]:
        """Every entry as (value, pk), in index order."""
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore_index, (type(self), self._args(), self._entries())

    def _lookup_key(self, value: Any) -> tuple[Any, ...] | None:
        return self._value_key(value)

    def _pks(self, key: tuple[Any, ...]) -> list[Any]:
        raise NotImplementedError

    def _take(self, key: tuple[Any, ...], after: Any, reverse: bool, need: int | None) -> list[Any]:
        raise NotImplementedError

    def eq(self, value: Any) -> list[Any]:
        """The pks holding ``value``, in pk order; [] for a value that is not indexed."""
        key = self._lookup_key(value)
        if key is None or key not in self._map:
            return []
        return self._pks(key)

    def in_(self, values: Iterable[Any]) -> list[Any]:
        """The pks holding any of ``values``, in index order (value order, then pk order).

        Values that are not indexed are ignored; equal values (``1`` and ``1.0``) count once.
        Raises TypeError for a str or bytes (pass a list of values).
        """
        if isinstance(values, (str, bytes)):
            raise TypeError(f"in_ needs an iterable of values, not {type(values).__name__}")
        keys = set()
        for value in values:
            key = self._lookup_key(value)
            if key is not None and key in self._map:
                keys.add(key)
        out: list[Any] = []
        for key in sorted(keys):
            out.extend(self._pks(key))
        return out

    def count_eq(self, value: Any) -> int:
        """How many pks hold ``value`` (0 for a value that is not indexed)."""
        key = self._lookup_key(value)
        if key is None or key not in self._map:
            return 0
        return self._count(key)

    def distinct(self) -> int:
        """The number of distinct indexed values."""
        return len(self._values)

    def min_value(self) -> Any:
        """The smallest indexed value in index order (bool < number < str), or None if empty.

        Of equal values (``1`` and ``1.0``) the one indexed first is returned.
        """
        return self._values[0][-1] if self._values else None

    def max_value(self) -> Any:
        """The largest indexed value in index order, or None if empty."""
        return self._values[-1][-1] if self._values else None

    def _count(self, key: tuple[Any, ...]) -> int:
        raise NotImplementedError

    def position(self, value: Any, pk: Any) -> tuple[Any, Any]:
        """The cursor ``(value, pk)`` of an entry, for ``after=`` in ordered / range / prefix.

        A cursor is plain data: the value (as indexed: subclasses become their base type) and the
        pk. It marks a place in the order whether or not the entry still exists. Raises
        ValueError for a value this index cannot hold, or an invalid pk (see ``add``).
        """
        key = self._cursor_key(value)
        _pk_key(pk)
        return (key[-1], pk)

    def _cursor_key(self, value: Any) -> tuple[Any, ...]:
        key = self._value_key(value)
        if key is None:
            raise ValueError(f"cursor value {value!r} is not indexed (None, NaN or not a scalar)")
        return key

    def _cursor(self, after: object) -> tuple[tuple[Any, ...], Any]:
        if not isinstance(after, (tuple, list)) or len(after) != 2:
            raise ValueError(f"after must be a (value, pk) cursor from position(), not {after!r}")
        key = self._cursor_key(after[0])
        return key, _pk_key(after[1])

    def range(
        self,
        lo: Any = None,
        hi: Any = None,
        lo_inclusive: bool = True,
        hi_inclusive: bool = True,
        reverse: bool = False,
        limit: int | None = None,
        after: Any = None,
    ) -> list[Any]:
        """The pks whose value lies between ``lo`` and ``hi``, in index order (or reversed).

        A None bound is open. A range never crosses kinds: with ``lo=5`` it holds numbers only,
        never strings or bools; bounds of two different kinds give []; a NaN bound gives [].
        With both bounds None it is the whole index. ``after`` is a cursor from ``position()``:
        only entries strictly after it in the scan direction are returned. Raises TypeError for
        a bound that is not bool/int/float/str or a bad limit, ValueError for a negative limit
        or a malformed cursor.
        """
        need = _check_limit(limit)
        bounds = self._bounds(lo, hi, lo_inclusive, hi_inclusive)
        cursor = None if after is None else self._cursor(after)
        if bounds is None or need == 0:
            return []
        return self._walk(bounds, bool(reverse), cursor, need)

    def prefix(
        self, p: str, limit: int | None = None, reverse: bool = False, after: Any = None
    ) -> list[Any]:
        """The pks whose value is a str starting with ``p``, in index order (or reversed).

        ``""`` selects every string. ``after`` as in ``range``. Raises TypeError if ``p`` is not
        a str.
        """
        if not isinstance(p, str):
            raise TypeError(f"prefix must be str, not {type(p).__name__}")
        need = _check_limit(limit)
        p = str.__str__(p)
        end = _prefix_end(p)
        hi = (_RANK_STR + 1,) if end is None else (_RANK_STR, end)
        cursor = None if after is None else self._cursor(after)
        if need == 0:
            return []
        return self._walk(((_RANK_STR, p), True, hi, False), bool(reverse), cursor, need)

    def ordered(
        self, reverse: bool = False, after: Any = None, limit: int | None = None
    ) -> list[Any]:
        """Every pk in index order (value order, then pk order), or reversed.

        ``after`` is a cursor from ``position()``: the scan starts strictly after it, so pages
        taken with the last entry's cursor never repeat or skip an entry that was there all
        along, even while other entries are added or removed. Raises as ``range``.
        """
        need = _check_limit(limit)
        cursor = None if after is None else self._cursor(after)
        if need == 0:
            return []
        return self._walk((None, True, None, True), bool(reverse), cursor, need)

    def _bounds(self, lo: Any, hi: Any, lo_inclusive: bool, hi_inclusive: bool) -> _Bounds | None:
        """Scan bounds as keys; None when nothing can match.

        An open side is closed at the edge of the other bound's kind: ``(rank,)`` sorts before
        every key of that rank and ``(rank + 1,)`` after all of them.
        """
        low = None if lo is None else _bound_key(lo)
        high = None if hi is None else _bound_key(hi)
        if (lo is not None and low is None) or (hi is not None and high is None):
            return None
        lo_inc, hi_inc = bool(lo_inclusive), bool(hi_inclusive)
        if low is None:
            if high is None:
                return None, True, None, True
            return (high[0],), False, high, hi_inc
        if high is None:
            return low, lo_inc, (low[0] + 1,), False
        if low[0] != high[0]:
            return None
        return low, lo_inc, high, hi_inc

    def _walk(
        self,
        bounds: _Bounds,
        reverse: bool,
        cursor: tuple[tuple[Any, ...], Any] | None,
        need: int | None,
    ) -> list[Any]:
        low, lo_inc, high, hi_inc = bounds
        at = None
        if cursor is not None:
            at, after_pk = cursor
            if not reverse:
                if low is None or at > low or (at == low and lo_inc):
                    low, lo_inc = at, True
                else:
                    at = None
            elif high is None or at < high or (at == high and hi_inc):
                high, hi_inc = at, True
            else:
                at = None
        out: list[Any] = []
        for key in self._values.irange(low, high, (lo_inc, hi_inc), reverse):
            # Only the first key can be the cursor's: the scan starts there.
            part = self._take(
                key,
                after_pk if at is not None and key == at else None,
                reverse,
                None if need is None else need - len(out),
            )
            at = None
            out.extend(part)
            if need is not None and len(out) >= need:
                break
        return out


def _group_bisect(group: Any, pk_key: tuple[Any, ...], right: bool) -> int:
    if type(group) is list:
        if right:
            return bisect.bisect_right(group, pk_key, key=_pk_key)
        return bisect.bisect_left(group, pk_key, key=_pk_key)
    position: int = group.bisect_key_right(pk_key) if right else group.bisect_key_left(pk_key)
    return position


class SortedIndex(_OrderedIndex):
    """A secondary index on one field: value -> the pks of the records holding it.

    Entries ``(value, pk)`` are ordered by value (see ``index_key``), then by pk (bool < numbers
    < str < bytes < UUID < tuple < other types, each by its own order: mixed pk types never
    raise; ``1`` and ``"1"`` are different pks). Values that are not indexed (None, NaN, dicts,
    lists) are skipped. Equality is a dict lookup; ranges, prefixes and ordered scans cost
    O(log n + k). A pk may appear under several values (several entries).

    Not thread-safe: the owner (the replica) serializes writers against readers. Raises
    ValueError for a None or NaN pk, TypeError for an unhashable one.
    """

    __slots__ = ("_len",)

    def __init__(self) -> None:
        super().__init__()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"SortedIndex(entries={self._len}, distinct={len(self._values)})"

    def _value_key(self, value: Any) -> tuple[Any, ...] | None:
        return index_key(value)

    def _pks(self, key: tuple[Any, ...]) -> list[Any]:
        return list(self._map[key])

    def _entries(self) -> list[tuple[Any, Any]]:
        return [(key[-1], pk) for key in self._values for pk in self._map[key]]

    def _count(self, key: tuple[Any, ...]) -> int:
        return len(self._map[key])

    def _take(self, key: tuple[Any, ...], after: Any, reverse: bool, need: int | None) -> list[Any]:
        group = self._map[key]
        size = len(group)
        if not reverse:
            start = 0 if after is None else _group_bisect(group, after, True)
            stop = size if need is None else min(size, start + need)
            part: list[Any] = group[start:stop]
            return part
        stop = size if after is None else _group_bisect(group, after, False)
        start = 0 if need is None else max(0, stop - need)
        part = group[start:stop]
        part.reverse()
        return part

    def add(self, value: Any, pk: Any) -> bool:
        """Index ``pk`` under ``value``. False if the entry exists or the value is not indexed."""
        pk_key = _pk_key(pk)
        key = index_key(value)
        if key is None:
            return False
        group = self._map.get(key)
        if group is None:
            self._map[key] = [pk]
            self._values.add(key)
        elif type(group) is list:
            i = bisect.bisect_left(group, pk_key, key=_pk_key)
            if i < len(group) and _pk_key(group[i]) == pk_key:
                return False
            group.insert(i, pk)
            if len(group) > _GROUP_LIST_MAX:
                self._map[key] = SortedKeyList(group, key=_pk_key)
        else:
            i = group.bisect_key_left(pk_key)
            if i < len(group) and _pk_key(group[i]) == pk_key:
                return False
            group.add(pk)
        self._len += 1
        return True

    def remove(self, value: Any, pk: Any) -> bool:
        """Drop the entry ``(value, pk)``. False (no error) if it is not there."""
        pk_key = _pk_key(pk)
        key = index_key(value)
        if key is None:
            return False
        group = self._map.get(key)
        if group is None:
            return False
        i = _group_bisect(group, pk_key, False)
        if i == len(group) or _pk_key(group[i]) != pk_key:
            return False
        del group[i]
        self._len -= 1
        if not group:
            del self._map[key]
            self._values.remove(key)
        return True

    def replace(self, old_value: Any, new_value: Any, pk: Any) -> None:
        """Move ``pk`` from ``old_value`` to ``new_value`` (either may be unindexed)."""
        _pk_key(pk)
        old, new = index_key(old_value), index_key(new_value)
        if old is None or new is None or old != new:
            self.remove(old_value, pk)
        self.add(new_value, pk)

    def clear(self) -> None:
        """Drop every entry."""
        self._map.clear()
        self._values.clear()
        self._len = 0


class UniqueIndex(_OrderedIndex):
    """A unique index: value -> the one pk holding it, with the same ordered scans as SortedIndex.

    Values are ordered like ``index_key`` (None, NaN, dicts and lists are not indexed). With
    ``pk_order=True`` the values are primary keys themselves: any hashable except None, in pk
    order (bool < numbers < str < bytes < UUID < tuple < other types), which is how the replica
    indexes and pages by primary key. ``range`` and ``prefix`` bounds are bool/number/str in both
    modes. Cursors are ``(value, pk)`` like SortedIndex's, so both page the same way.

    Uniqueness is the server's job; this is the in-memory map, and ``add`` raises ValueError when
    a value is already held by another pk. Not thread-safe: the owner serializes access.
    """

    __slots__ = ("_pk_order",)

    def __init__(self, pk_order: bool = False) -> None:
        super().__init__()
        self._pk_order = bool(pk_order)

    @property
    def pk_order(self) -> bool:
        return self._pk_order

    def __len__(self) -> int:
        return len(self._map)

    def __repr__(self) -> str:
        return f"UniqueIndex(entries={len(self._map)}, pk_order={self._pk_order})"

    def _value_key(self, value: Any) -> tuple[Any, ...] | None:
        if not self._pk_order:
            return index_key(value)
        return None if value is None else _pk_key(value)

    def _lookup_key(self, value: Any) -> tuple[Any, ...] | None:
        try:
            return self._value_key(value)
        except (TypeError, ValueError):
            return None

    def _pks(self, key: tuple[Any, ...]) -> list[Any]:
        return [self._map[key]]

    def _args(self) -> tuple[Any, ...]:
        return (self._pk_order,)

    def _entries(self) -> list[tuple[Any, Any]]:
        return [(key[-1], self._map[key]) for key in self._values]

    def _count(self, key: tuple[Any, ...]) -> int:
        return 1

    def _take(self, key: tuple[Any, ...], after: Any, reverse: bool, need: int | None) -> list[Any]:
        pk = self._map[key]
        if after is not None:
            pk_key = _pk_key(pk)
            if (pk_key <= after) if not reverse else (pk_key >= after):
                return []
        return [pk]

    def get(self, value: Any) -> Any:
        """The pk holding ``value``, or None (also for a value that cannot be indexed)."""
        key = self._lookup_key(value)
        return None if key is None else self._map.get(key)

    def add(self, value: Any, pk: Any) -> bool:
        """Map ``value`` to ``pk``. False if already so or the value is not indexed.

        Raises ValueError if another pk holds the value (nothing changes), or for an invalid pk
        (None, NaN), TypeError for an unhashable pk (or value, with ``pk_order``).
        """
        pk_key = _pk_key(pk)
        key = self._value_key(value)
        if key is None:
            return False
        held = self._map.get(key, _MISSING)
        if held is not _MISSING:
            if _pk_key(held) == pk_key:
                return False
            raise ValueError(f"value {value!r} is already held by pk {held!r}, not {pk!r}")
        self._map[key] = pk
        self._values.add(key)
        return True

    def remove(self, value: Any) -> Any:
        """Unmap ``value``; returns the pk that held it, or None (no error) if none did."""
        key = self._lookup_key(value)
        if key is None:
            return None
        pk = self._map.pop(key, _MISSING)
        if pk is _MISSING:
            return None
        self._values.remove(key)
        return pk

    def replace(self, old_value: Any, new_value: Any, pk: Any) -> None:
        """Move ``pk`` from ``old_value`` to ``new_value`` atomically.

        ``old_value`` is freed only if ``pk`` holds it. Raises ValueError, changing nothing, if
        another pk holds ``new_value``.
        """
        pk_key = _pk_key(pk)
        new = self._value_key(new_value)
        if new is not None:
            held = self._map.get(new, _MISSING)
            if held is not _MISSING and _pk_key(held) != pk_key:
                raise ValueError(f"value {new_value!r} is already held by pk {held!r}, not {pk!r}")
        old = self._lookup_key(old_value)
        if old is not None and old != new:
            held = self._map.get(old, _MISSING)
            if held is not _MISSING and _pk_key(held) == pk_key:
                del self._map[old]
                self._values.remove(old)
        if new is not None:
            self.add(new_value, pk)

    def clear(self) -> None:
        """Drop every entry."""
        self._map.clear()
        self._values.clear()


# ---------------------------------------------------------------------------------------------
# Records: a model's stored records, one tuple each
# ---------------------------------------------------------------------------------------------


class _Absent:
    """The value a record holds for a field of its layout that it does not have."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT: Any = _Absent()


class Record(tuple):  # type: ignore[type-arg]
    """One stored record of a model, held in a single object: the tuple
    ``(revision, v1, ..., vn)`` of its values in the order of its layout's field names (made by
    :func:`record_type`), an absent field holding a private marker, followed by a dict of the
    record's other keys when it has any (written by another client, or by an older schema).

    Absent values at the end are left out (a record lacking the layout's last fields is
    shorter), unless the record has other keys.

    To Python code it reads as a read-only mapping of the stored (JSON-decoded) form:
    ``get``, ``[]``, ``in``, ``len``, iteration, ``keys`` / ``values`` / ``items``, equality
    with a dict; :meth:`as_dict` copies it into one, and ``revision`` is its revision. It pickles
    and copies as that dict. ``_core`` reads the values by position. Immutable: safe to share
    between threads.
    """

    __slots__ = ()
    _names: tuple[str, ...] = ()
    _slots: dict[str, int] = {}  # noqa: RUF012 - per layout, set by record_type

    @property
    def revision(self) -> int:
        """The revision of the record."""
        value: int = tuple.__getitem__(self, 0)
        return value

    def _extra(self) -> dict[str, Any] | None:
        if tuple.__len__(self) > len(self._names) + 1:
            extra: dict[str, Any] = tuple.__getitem__(self, -1)
            return extra
        return None

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key`` in the stored form, or ``default``."""
        slot = self._slots.get(key)
        if slot is not None:
            value = _slot(self, slot)
            return default if value is _ABSENT else value
        extra = self._extra()
        return default if extra is None else extra.get(key, default)

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT

    def as_dict(self) -> dict[str, Any]:
        """A new dict of the stored form (layout fields first, in layout order)."""
        held = tuple.__getitem__(self, slice(1, len(self._names) + 1))
        out = {name: value for name, value in zip(self._names, held, strict=False) if value is not _ABSENT}
        extra = self._extra()
        if extra is not None:
            out.update(extra)
        return out

    def __iter__(self) -> Any:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def keys(self) -> Any:
        """The keys of the stored form."""
        return self.as_dict().keys()

    def values(self) -> Any:
        """The values of the stored form."""
        return self.as_dict().values()

    def items(self) -> Any:
        """The ``(key, value)`` pairs of the stored form."""
        return self.as_dict().items()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Record):
            return self.as_dict() == other.as_dict()
        if isinstance(other, dict):
            return self.as_dict() == other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Record({self.as_dict()!r}, revision={self.revision!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (self.as_dict(),)


def record_type(names: Iterable[str]) -> type[Record]:
    """The :class:`Record` class of records whose layout is the field ``names``, in order
    (str, no repeats; TypeError / ValueError otherwise)."""
    layout = tuple(names)
    for name in layout:
        if type(name) is not str:
            raise TypeError(f"field names are str, not {type(name).__name__}")
    if len(set(layout)) != len(layout):
        raise ValueError(f"field names repeat in {layout!r}")
    slots = {name: i for i, name in enumerate(layout, 1)}
    return type("Record", (Record,), {"__slots__": (), "__module__": __name__, "_names": layout, "_slots": slots})


def record_pk(key: str) -> Any:
    """The primary key, in its stored (JSON) form, of a model's record key: ``r:i:<int>`` (the
    int, written exactly as ``str`` writes it), ``r:s:<str>`` (the str), ``r:u:<uuid>`` (the
    UUID's str, in its canonical form); None for any other key."""
    if type(key) is not str:
        raise TypeError(f"a key is a str, not {type(key).__name__}")
    kind, text = key[:4], key[4:]
    if kind == "r:s:":
        return text
    try:
        if kind == "r:i:":
            number = int(text)
            return number if str(number) == text else None
        if kind == "r:u:":
            return text if str(uuid.UUID(text)) == text else None
    except ValueError:
        return None
    return None


def _new_record(cls: type[Record], stored: dict[str, Any], revision: Any,
                shared: list[dict[str, str] | None] | None = None, limit: int = 0) -> Record:
    """The record of ``cls`` holding the dict ``stored`` at ``revision``. With ``shared`` (see
    IndexSet.share: per slot, the str values seen there, or None), a str value seen before in its
    slot is replaced by the object seen first; a slot with more than ``limit`` of them is no
    longer tracked."""
    values = [revision]
    known = width = 0  # width: values held, up to the last present one (all, with other keys)
    for slot, name in enumerate(cls._names, 1):
        value = dict.get(stored, name, _ABSENT)
        if value is not _ABSENT:
            known += 1
            width = slot
            if shared is not None and type(value) is str:
                seen = shared[slot]
                if seen is not None:
                    kept = seen.get(value)
                    if kept is not None:
                        value = kept
                    elif len(seen) < limit:
                        seen[value] = value
                    else:
                        shared[slot] = None
        values.append(value)
    if known < len(stored):
        slots = cls._slots
        values.append({key: value for key, value in stored.items() if key not in slots})
    else:
        del values[width + 1:]
    return tuple.__new__(cls, values)


def _slot(record: Record, slot: int) -> Any:
    """The value at ``slot`` of a record (absent past the end of one cut short)."""
    return tuple.__getitem__(record, slot) if slot < tuple.__len__(record) else _ABSENT


class IndexSet:
    """The records of one model by primary key and the indexes over their fields, kept in step
    one change at a time (the hot path of a model replica).

    ``records`` maps pk -> :class:`Record` (of ``record_type``, whose layout is ``fields``);
    ``unique`` and ``sorted`` map field names to the UniqueIndex / SortedIndex of that field (a
    UniqueIndex with ``pk_order`` for the primary key). All three are the caller's objects,
    updated in place. Records are applied as dicts; a record's pk is ``record[pk_field]``, and
    one without a valid pk (missing, None, NaN, unhashable) is not held. Values an index cannot
    hold are left out of it. ``pk_field`` and the indexed fields must be among ``fields``
    (ValueError). Not thread-safe: the owner serializes access.
    """

    __slots__ = ("_pk", "_pk_slot", "_records", "_share_max", "_shared", "_sorted", "_unique", "deferred",
                 "record_type")

    def __init__(self, pk_field: str, unique: dict[str, UniqueIndex], sorted: dict[str, SortedIndex],
                 records: dict[Any, Record], fields: Iterable[str]) -> None:
        if not isinstance(unique, dict) or not isinstance(sorted, dict) or not isinstance(records, dict):
            raise TypeError("unique, sorted and records must be dicts")
        for name, index in unique.items():
            if not isinstance(index, UniqueIndex):
                raise TypeError(f"unique[{name!r}] must be a UniqueIndex, not {type(index).__name__}")
        for name, ordered in sorted.items():
            if not isinstance(ordered, SortedIndex):
                raise TypeError(f"sorted[{name!r}] must be a SortedIndex, not {type(ordered).__name__}")
        self.record_type = record_type(fields)
        slots = self.record_type._slots
        for name in (pk_field, *unique, *sorted):
            if name not in slots:
                raise ValueError(f"{name!r} is not one of the fields {self.record_type._names!r}")
        self._pk = pk_field
        self._pk_slot = slots[pk_field]
        self._unique = [(slots[name], index) for name, index in unique.items()]
        self._sorted = [(slots[name], ordered) for name, ordered in sorted.items()]
        self._records = records
        self._shared: list[dict[str, str] | None] | None = None
        self._share_max = 0
        self.deferred = False

    def share(self, names: Iterable[str], limit: int = 256) -> None:
        """Hold each repeated str value of the fields ``names`` once: a record applied from now on
        gets the first object seen with that value (a role, a status, the timestamps of one bulk
        write), instead of a copy of its own. A field with more than ``limit`` distinct values
        (names, emails) stops being tracked; names outside the layout are not. Replacing a str
        by an equal one changes nothing a reader can see."""
        if type(limit) is bool or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, not {limit!r}")
        slots = self.record_type._slots
        tracked = {slots[name] for name in names if name in slots}
        self._shared = [{} if slot in tracked else None for slot in range(len(slots) + 1)] if tracked else None
        self._share_max = limit

    def record(self, stored: dict[str, Any], revision: int) -> Record:
        """A record of this set's layout holding the dict ``stored`` (not held, not indexed)."""
        if not isinstance(stored, dict):
            raise TypeError(f"a stored record is a dict, not {type(stored).__name__}")
        return _new_record(self.record_type, stored, revision)

    def defer(self) -> None:
        """Keep only the records up to date from now on, and leave the indexes alone until
        :meth:`rebuild`: a replica's initial load builds them once, in bulk, at its end."""
        self.deferred = True

    def rebuild(self) -> None:
        """Rebuild every index from the records and keep them in step again (``deferred`` is
        False after). Of records claiming one unique value, the one applied last holds it."""
        for _, unique in self._unique:
            unique.clear()
        for _, ordered in self._sorted:
            ordered.clear()
        for pk, record in self._records.items():
            self._index(record, pk)
        self.deferred = False

    def apply(self, old: Any, new: Any, revision: int) -> int:
        """Replace the record ``old`` (a dict or the Record held; only its pk is read) by the
        dict ``new`` (either may be None: an insert, a delete) as of ``revision``. Returns the
        revision the old record was held at, 0 if it was not held.

        Of two records claiming one unique value, the newer change holds it: the server
        guarantees uniqueness, so the older holder's change is on its way.
        """
        old_revision = 0
        if type(old) is dict or isinstance(old, Record):
            old_pk = old.get(self._pk)
            held = self._records.pop(old_pk, None) if _valid_pk(old_pk) else None
            if held is not None:
                old_revision = held.revision
                if not self.deferred:
                    self._unindex(held, old_pk)
        if type(new) is dict:
            new_pk = new.get(self._pk)
            if _valid_pk(new_pk):
                record = _new_record(self.record_type, new, revision, self._shared, self._share_max)
                self._records[new_pk] = record
                if not self.deferred:
                    self._index(record, new_pk)
        return old_revision

    def apply_entries(self, entries: Iterable[Any], prefix_len: int, sep: str, loads: Callable[[bytes], Any],
                      pk_of: Callable[[str], Any], deleted: dict[str, int]) -> int:
        """Apply a run of raw entries (objects with the fields of natskv's ``RawEntry``: subject,
        data, revision, operation, raw_bytes) of a replica of record keys, in one call, as a
        replica applies them one by one; return the highest revision among them (0 for none).

        Each entry's key is ``subject[prefix_len:]`` decoded as :func:`decode_key` does (left as
        it is when not in that encoding); ``pk_of(key)`` is the primary key a record stored under
        it must have, None for a key that holds no record (skipped). An entry at or below the
        revision of the record held under that pk, or of ``deleted.get(key)`` (keys deleted
        ahead of the replica's watch), is one applied already, and skipped. A ``PUT`` whose
        payload is JSON (``loads``, unless ``raw_bytes``) of a dict with that pk replaces the
        record; any other entry deletes it.

        A list of entries is consumed: each of its items is replaced by None once read, so that
        the memory of a long run's payloads is reused as it goes.
        """
        top = 0
        records, pk_field = self._records, self._pk
        consumed = entries if type(entries) is list else None
        for at, entry in enumerate(entries):
            if consumed is not None:
                consumed[at] = None
            revision = entry.revision
            top = max(top, revision)
            token = entry.subject[prefix_len:]
            try:
                key = decode_key(token, sep)
            except ValueError:
                key = token
            pk = pk_of(key)
            if pk is None:
                continue  # not a record key: it holds no record
            held = records.get(pk)
            if held is not None and revision <= held.revision:
                continue  # applied already
            if deleted and revision <= deleted.get(key, 0):
                continue
            put = entry.operation == "PUT"
            if not put and held is None:
                continue
            new = None
            if put and not entry.raw_bytes:
                try:
                    value = loads(entry.data)
                except ValueError:
                    value = None
                if type(value) is dict:
                    stored = value.get(pk_field, _ABSENT)
                    if type(stored) is type(pk) and stored == pk:
                        new = value
            self.apply(held, new, revision)
        return top

    def _unindex(self, record: Record, pk: Any) -> None:
        for slot, unique in self._unique:
            value = _slot(record, slot)
            if value is not None and value is not _ABSENT and unique.get(value) == pk:
                unique.remove(value)
        for slot, ordered in self._sorted:
            value = _slot(record, slot)
            if value is not None and value is not _ABSENT:
                ordered.remove(value, pk)

    def _index(self, record: Record, pk: Any) -> None:
        """Enter ``record`` (held under ``pk``) in every index; a unique value moves to it."""
        for slot, index in self._unique:
            value = _slot(record, slot)
            if value is None or value is _ABSENT:
                continue
            holder = index.get(value)
            if holder != pk:
                if holder is not None:
                    index.remove(value)
                index.add(value, pk)
        for slot, ordered in self._sorted:
            value = _slot(record, slot)
            if value is not None and value is not _ABSENT:
                ordered.add(value, pk)


def _valid_pk(pk: Any) -> bool:
    try:
        _pk_key(pk)
    except (TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Records -> instances
# ---------------------------------------------------------------------------------------------


class RecordBuilder:
    """Turns stored records into instances of a plain Python class.

    A stored record is a :class:`Record` (which carries its revision) or a ``(stored,
    revision)`` pair whose ``stored`` is a JSON-decoded dict or a Record. Each instance's
    ``__dict__`` gets every name of ``fields`` (None when the record lacks it), ``_extra`` (a
    dict of the record's other keys, except those in ``skip``), ``_version`` (the revision) and
    ``_stored`` (the record itself, shared, never modified). ``converters`` are ``(field,
    function)`` pairs applied to non-None values of those fields; the fields named in ``floats``
    get ints (not bools) turned into floats, as JSON writes 1.0 as 1. ``__init__`` is not called.
    Immutable once built: safe to share between threads.
    """

    __slots__ = ("_blank", "_cls", "_converters", "_fields", "_floats", "_skip")

    def __init__(self, cls: type, fields: Iterable[str], skip: Iterable[str] = (),
                 converters: Iterable[tuple[str, Callable[[Any], Any]]] = (), floats: Iterable[str] = ()) -> None:
        if not isinstance(cls, type):
            raise TypeError(f"cls must be a class, not {type(cls).__name__}")
        self._cls = cls
        self._blank = dict.fromkeys(fields)
        self._fields = frozenset(self._blank)
        self._skip = frozenset(skip)
        self._converters = tuple((name, convert) for name, convert in converters)
        for name, convert in self._converters:
            if name not in self._fields or not callable(convert):
                raise ValueError(f"a converter needs a field name and a function, not ({name!r}, {convert!r})")
        self._floats = tuple(floats)
        for name in self._floats:
            if name not in self._fields:
                raise ValueError(f"floats names fields; {name!r} is not one")

    def build(self, records: Iterable[Any]) -> list[Any]:
        """One instance per stored record (a Record, or a ``(stored, revision)`` pair), in order."""
        cls, blank, fields, skip, converters = self._cls, self._blank, self._fields, self._skip, self._converters
        floats = self._floats
        new = object.__new__
        out = []
        for item in records:
            if isinstance(item, Record):
                stored: Any = item
                revision = item.revision
            else:
                stored, revision = item
            if isinstance(stored, (dict, Record)):
                pairs = stored.items()
            else:
                raise TypeError(f"a stored record is a dict, not {type(stored).__name__}")
            values = dict(blank)
            extra = {}
            for key, raw in pairs:
                if key in fields:
                    values[key] = raw
                elif key not in skip:
                    extra[key] = raw
            for name, convert in converters:
                raw = values[name]
                if raw is not None:
                    values[name] = convert(raw)
            for name in floats:
                raw = values[name]
                if type(raw) is int:
                    values[name] = float(raw)
            values["_extra"] = extra
            values["_version"] = revision
            values["_stored"] = stored
            obj: object = new(cls)
            obj.__dict__ = values
            out.append(obj)
        return out
