"""Tests of natskv's core, run against both implementations.

``core`` is parametrized over the compiled ``natskv._core`` and the pure ``natskv._core_py``. The
compiled module is imported directly, never through ``natskv._speedups``: a missing or broken
extension makes these tests ERROR instead of silently testing the pure twin twice. The Hypothesis
parity tests feed both modules the same input and demand the same answer, or the same exception
with the same message.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natskv.wire.kv import RawEntry

REPO = Path(__file__).resolve().parent.parent
ENCODED_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")


def outcome(func: Any, *args: Any) -> tuple[str, Any]:
    """The result of a call, or its exception type and message, for parity comparisons."""
    try:
        return "ok", func(*args)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


def subject_matches(filter_: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` is one or more tokens."""
    wanted = filter_.split(".")
    tokens = subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(wanted) == len(tokens)


def test_both_implementations_export_the_same_names(c_core: ModuleType, py_core: ModuleType) -> None:
    assert c_core.__all__ == py_core.__all__
    for name in py_core.__all__:
        assert hasattr(c_core, name), name


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

KEY_EXAMPLES = [
    ("user:42", ":", "user.42"),
    ("a.b", ":", "a=2Eb"),
    ("", ":", "="),
    ("a::b", ":", "a.=.b"),
    (":a", ":", "=.a"),
    ("a:", ":", "a.="),
    (":", ":", "=.="),
    ("é", ":", "=C3=A9"),
    ("\u0800", ":", "=E0=A0=80"),
    ("😀", ":", "=F0=9F=98=80"),
    ("a b*>=", ":", "a=20b=2A=3E=3D"),
    ("x/y-z_0AZ", ":", "x/y-z_0AZ"),
    ("a\x00", ":", "a=00"),
    ("a:b", "", "a=3Ab"),
    ("a.b", "", "a=2Eb"),
    ("", "", "="),
    ("a/b", "/", "a.b"),
    ("a.b", ".", "a.b"),
    ("a=b", "=", "a.b"),
    ("a-b", "-", "a.b"),
    ("aéb", "é", "a.b"),
]


@pytest.mark.parametrize(("key", "sep", "encoded"), KEY_EXAMPLES)
def test_encode_key_examples(core: ModuleType, key: str, sep: str, encoded: str) -> None:
    assert core.encode_key(key, sep) == encoded
    assert core.decode_key(encoded, sep) == key


def test_default_separator_is_colon(core: ModuleType) -> None:
    assert core.encode_key("user:42") == "user.42"
    assert core.decode_key("user.42") == "user:42"


@pytest.mark.parametrize("bad", [None, b"key", 42, ["a"]])
def test_keys_must_be_str(core: ModuleType, bad: Any) -> None:
    with pytest.raises(TypeError, match="must be str"):
        core.encode_key(bad)
    with pytest.raises(TypeError, match="must be str"):
        core.decode_key(bad)


def test_separator_validation(core: ModuleType) -> None:
    with pytest.raises(ValueError, match="single character"):
        core.encode_key("a", "::")
    with pytest.raises(ValueError, match="single character"):
        core.decode_key("a", "::")
    with pytest.raises(TypeError, match="sep must be str"):
        core.encode_key("a", None)
    with pytest.raises(ValueError, match="single character"):
        core.compile_pattern("a", "ab")


@pytest.mark.parametrize(("key", "position"), [("\ud800", 0), ("ab:c\udfff", 4), ("a:\udc80:b", 2)])
def test_lone_surrogates_are_rejected(core: ModuleType, key: str, position: int) -> None:
    with pytest.raises(ValueError, match=f"lone surrogate .* at position {position}"):
        core.encode_key(key)


def test_surrogate_separator_is_not_encoded(core: ModuleType) -> None:
    assert core.encode_key("a\ud800b", "\ud800") == "a.b"


DECODE_ERRORS = [
    ("", ":", "empty token at position 0"),
    ("a..b", ":", "empty token at position 2"),
    (".a", ":", "empty token at position 0"),
    ("a.", ":", "empty token at position 2"),
    ("=41", ":", "escaped character 'A' must be written literally at position 0"),
    ("a=5F", ":", "escaped character '_' must be written literally at position 1"),
    ("=c3=a9", ":", "malformed escape '=c3' at position 0"),
    ("=ZZ", ":", "malformed escape '=ZZ' at position 0"),
    ("a=", ":", "malformed escape '=' at position 1"),
    ("a=4.b", ":", "malformed escape '=4' at position 1"),
    ("==", ":", "malformed escape '==' at position 0"),
    ("=C3", ":", "invalid UTF-8 in escapes at position 0"),
    ("=C3=41", ":", "invalid UTF-8 in escapes at position 0"),
    ("=20=C3", ":", "invalid UTF-8 in escapes at position 3"),
    ("=C0=80", ":", "invalid UTF-8 in escapes at position 0"),
    ("=ED=A0=80", ":", "invalid UTF-8 in escapes at position 0"),
    ("=F4=90=80=80", ":", "invalid UTF-8 in escapes at position 0"),
    ("=80", ":", "invalid UTF-8 in escapes at position 0"),
    ("=3A", ":", "escaped separator ':' at position 0"),
    ("=2E", ".", "escaped separator '.' at position 0"),
    ("a b", ":", "invalid character ' ' at position 1"),
    ("a*", ":", "invalid character '*' at position 1"),
    ("é", ":", "invalid character 'é' at position 0"),
    ("a.b", "", "invalid character '.' at position 1"),
    ("a-b", "-", "separator character '-' inside a token at position 1"),
    ("=41=ZZ", ":", "malformed escape '=ZZ' at position 3"),
]


@pytest.mark.parametrize(("encoded", "sep", "message"), DECODE_ERRORS)
def test_decode_key_rejects_what_encode_never_produces(
    core: ModuleType, encoded: str, sep: str, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        core.decode_key(encoded, sep)
    assert str(info.value) == f"invalid encoded key {encoded!r}: {message}"


def test_batch_key_functions(core: ModuleType) -> None:
    keys = ["user:42", "a.b", "", "é:x"]
    encoded = core.encode_keys(keys)
    assert encoded == ["user.42", "a=2Eb", "=", "=C3=A9.x"]
    assert core.decode_keys(encoded) == keys
    assert core.encode_keys([], "") == []
    assert core.encode_keys(("a:b",), "") == ["a=3Ab"]
    assert core.decode_keys(["a=3Ab"], "") == ["a:b"]
    with pytest.raises(TypeError):
        core.encode_keys(["a", 1])
    with pytest.raises(ValueError, match="empty token"):
        core.decode_keys(["a", "a..b"])


def test_decode_subjects(core: ModuleType) -> None:
    prefix = "$KV.bucket."
    subjects = [prefix + "user.42", prefix + "=", prefix + "a=2Eb.=C3=A9"]
    assert core.decode_subjects(subjects, len(prefix)) == ["user:42", "", "a.b:é"]
    assert core.decode_subjects([prefix + "a.b"], len(prefix), "/") == ["a/b"]
    with pytest.raises(ValueError, match="empty token"):
        core.decode_subjects(["$KV.bucket."], len(prefix))
    with pytest.raises(ValueError, match="prefix_len"):
        core.decode_subjects([], -1)


def test_long_keys_round_trip(core: ModuleType) -> None:
    key = ("é:" * 500) + "x" * 1000 + "😀"
    encoded = core.encode_key(key)
    assert ENCODED_KEY.match(encoded)
    assert core.decode_key(encoded) == key
    with pytest.raises(ValueError, match="position 3000"):
        core.decode_key("a" * 3000 + "=G0")


SEPARATORS = st.sampled_from([":", "", "/", ".", "=", "-", "é", " ", "a"])


@settings(max_examples=300)
@given(key=st.text(), sep=SEPARATORS)
def test_encode_decode_round_trip(core: ModuleType, key: str, sep: str) -> None:
    encoded = core.encode_key(key, sep)
    assert ENCODED_KEY.match(encoded), encoded
    assert core.decode_key(encoded, sep) == key


@given(key=st.text(alphabet=st.characters(codec=None, categories=["Cs", "Ll", "Po"])), sep=SEPARATORS)
def test_surrogates_raise_value_error(core: ModuleType, key: str, sep: str) -> None:
    has_surrogate = any(0xD800 <= ord(ch) <= 0xDFFF and ch != sep for ch in key)
    if has_surrogate:
        with pytest.raises(ValueError, match="surrogate"):
            core.encode_key(key, sep)
    else:
        assert core.decode_key(core.encode_key(key, sep), sep) == key


ENCODED_PIECES = st.one_of(
    st.sampled_from(list("aZ09_/-.=*é :")),
    st.builds(lambda a, b: f"={a}{b}", st.sampled_from("0123456789ABCDEFaf"), st.sampled_from("0123456789ABCDEFa")),
    st.sampled_from(["=C3=A9", "=F0=9F=98=80", "=E2=82", "=2E", "=3A", "=3D"]),
)
ENCODED_CANDIDATES = st.lists(ENCODED_PIECES, max_size=12).map("".join)


@settings(max_examples=300)
@given(encoded=ENCODED_CANDIDATES, sep=SEPARATORS)
@pytest.mark.slow
def test_decode_accepts_only_canonical_encodings(core: ModuleType, encoded: str, sep: str) -> None:
    try:
        key = core.decode_key(encoded, sep)
    except ValueError:
        return
    assert core.encode_key(key, sep) == encoded


@settings(max_examples=300)
@given(text=st.one_of(ENCODED_CANDIDATES, st.text()), sep=SEPARATORS)
@pytest.mark.slow
def test_key_parity(c_core: ModuleType, py_core: ModuleType, text: str, sep: str) -> None:
    assert outcome(c_core.encode_key, text, sep) == outcome(py_core.encode_key, text, sep)
    assert outcome(c_core.decode_key, text, sep) == outcome(py_core.decode_key, text, sep)


# ---------------------------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------------------------

FILTER_EXAMPLES = [
    ("user:*", ":", "user.>", True),
    ("user:**", ":", "user.>", True),
    ("*", ":", ">", True),
    ("a:b?c", ":", "a.>", False),
    ("user*", ":", ">", False),
    ("lit:x", ":", "lit.x", True),
    ("lit", ":", "lit", True),
    ("", ":", "=", True),
    (":*", ":", "=.>", True),
    ("a:*:c", ":", "a.>", False),
    ("a.b:*", ":", "a=2Eb.>", True),
    ("a\\*b:*", ":", "a=2Ab.>", True),
    ("a\\:b", ":", "a.b", True),
    ("a:[xy]", ":", "a.>", False),
    ("user:*", "", ">", False),
    ("lit:x", "", "lit=3Ax", True),
    ("*", "", ">", True),
    ("a/b/*", "/", "a.b.>", True),
]


@pytest.mark.parametrize(("pattern", "sep", "filter_", "exact"), FILTER_EXAMPLES)
def test_pattern_filter(core: ModuleType, pattern: str, sep: str, filter_: str, exact: bool) -> None:
    compiled = core.compile_pattern(pattern, sep)
    assert compiled.pattern == pattern
    assert compiled.sep == sep
    assert compiled.filter == filter_
    assert compiled.exact is exact
    assert repr(compiled) == f"Pattern({pattern!r}, filter={filter_!r}, exact={exact})"


MATCH_EXAMPLES = [
    ("*", "", True),
    ("*", "a:b:c", True),
    ("?", "", False),
    ("?", "a", True),
    ("?", ":", True),
    ("??", "a", False),
    ("a*b", "a:x:b", True),
    ("a*b", "a:x:bc", False),
    ("a*b*c", "abbbcbc", True),
    ("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", False),
    ("h?llo", "hello", True),
    ("h?llo", "hllo", False),
    ("h*llo", "heeeello", True),
    ("[abc]", "b", True),
    ("[abc]", "d", False),
    ("[a-c]x", "bx", True),
    ("[^abc]", "d", True),
    ("[^abc]", "a", False),
    ("[!abc]", "d", True),
    ("[!abc]", "c", False),
    ("[z-a]", "m", True),
    ("[a-]", "-", True),
    ("[a-]", "b", False),
    ("[\\]]", "]", True),
    ("[\\-]", "-", True),
    ("[a\\-z]", "b", False),
    ("[\\!a]", "!", True),
    ("\\*", "*", True),
    ("\\*", "a", False),
    ("\\?", "?", True),
    ("\\[x]", "[x]", True),
    ("user:*", "user:", True),
    ("user:*", "user", False),
    ("user:*", "users:1", False),
    ("é*", "éa", True),
    ("😀?", "😀x", True),
    ("[😀-😂]", "😁", True),
    ("[😀-😂]", "😃", False),
    ("a\nb", "a\nb", True),
    ("a?b", "a\nb", True),
    ("lit:x", "lit:x", True),
    ("lit:x", "lit:xy", False),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), MATCH_EXAMPLES)
def test_pattern_match(core: ModuleType, pattern: str, key: str, expected: bool) -> None:
    compiled = core.compile_pattern(pattern)
    assert compiled.match(key) is expected
    assert compiled.match_encoded(core.encode_key(key)) is expected
    assert compiled.filter_keys([key, key]) == ([key, key] if expected else [])


PATTERN_ERRORS = [
    ("[abc", "unterminated character class at position 0"),
    ("ab[", "unterminated character class at position 2"),
    ("[^", "unterminated character class at position 0"),
    ("[a-", "unterminated character class at position 0"),
    ("[a\\", "unterminated character class at position 0"),
    ("x[a-\\", "unterminated character class at position 1"),
    ("ab\\", "trailing backslash at position 2"),
    ("[]", "empty character class (write \\] to match ']') at position 0"),
    ("a[^]b", "empty character class (write \\] to match ']') at position 1"),
]


@pytest.mark.parametrize(("pattern", "message"), PATTERN_ERRORS)
def test_malformed_patterns(core: ModuleType, pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        core.compile_pattern(pattern)
    assert str(info.value) == f"invalid pattern {pattern!r}: {message}"


def test_pattern_type_errors(core: ModuleType) -> None:
    with pytest.raises(TypeError, match=r"pattern must be str or re\.Pattern"):
        core.compile_pattern(42)
    with pytest.raises(TypeError, match="bytes regular expression"):
        core.compile_pattern(re.compile(b"x"))
    compiled = core.compile_pattern("*")
    with pytest.raises(TypeError, match="key must be str"):
        compiled.match(b"x")
    with pytest.raises(TypeError):
        compiled.filter_keys(["a", None])
    with pytest.raises(TypeError):
        compiled.match_encoded(None)


def test_regex_patterns(core: ModuleType) -> None:
    regex = re.compile(r"\d+$")
    compiled = core.compile_pattern(regex)
    assert compiled.pattern is regex
    assert compiled.filter == ">"
    assert compiled.exact is False
    assert compiled.match("user:42")
    assert not compiled.match("user:42x")
    assert compiled.match_encoded("user.42")
    assert not compiled.match_encoded("user..42")
    assert compiled.filter_keys(["a:1", "b", "c:22"]) == ["a:1", "c:22"]


def test_match_encoded(core: ModuleType) -> None:
    compiled = core.compile_pattern("user:*")
    assert compiled.match_encoded("user.42")
    assert compiled.match_encoded("user.=")
    assert not compiled.match_encoded("users.42")
    assert not compiled.match_encoded("user..42")
    assert not compiled.match_encoded("user.=41")
    assert not compiled.match_encoded("user")
    assert core.compile_pattern("a.b").match_encoded("a=2Eb")
    assert core.compile_pattern("a/b", "/").match_encoded("a.b")
    assert not core.compile_pattern("a/b", "/").match_encoded("a/b")
    long_key = "user:" + "é" * 400
    assert compiled.match_encoded(core.encode_key(long_key))
    assert core.compile_pattern("*é").match_encoded(core.encode_key(long_key))


def test_filter_keys(core: ModuleType) -> None:
    keys = ["user:1", "user:2", "users:3", "order:1", "user:", "user"]
    assert core.compile_pattern("user:*").filter_keys(keys) == ["user:1", "user:2", "user:"]
    assert core.compile_pattern("*:1").filter_keys(keys) == ["user:1", "order:1"]
    assert core.compile_pattern("*").filter_keys(iter(keys)) == keys
    assert core.compile_pattern("?").filter_keys(keys) == []


KEY_ALPHABET = "ab:.é"
PATTERN_PIECES = st.sampled_from(
    ["a", "b", ":", ".", "é", "*", "?", "[ab]", "[^a]", "[!:]", "[a-b]", "\\*", "\\:", "\\a", "**"]
)
PATTERNS = st.lists(PATTERN_PIECES, max_size=6).map("".join)
KEYS = st.text(alphabet=KEY_ALPHABET, max_size=8)


@st.composite
def pattern_and_key(draw: st.DrawFn) -> tuple[str, str]:
    """A key and a pattern that often matches it: some characters of the key turned into
    wildcards, or an unrelated pattern."""
    key = draw(KEYS)
    if draw(st.booleans()):
        return draw(PATTERNS), key
    out = []
    for ch in key:
        choice = draw(st.sampled_from(["keep", "keep", "one", "star", "class", "drop"]))
        if choice == "keep":
            out.append("\\" + ch if ch in "*?[\\" else ch)
        elif choice == "one":
            out.append("?")
        elif choice == "star":
            out.append("*")
        elif choice == "class":
            out.append(f"[{ch}x]")
    return "".join(out), key


@settings(max_examples=400)
@given(case=pattern_and_key(), sep=st.sampled_from([":", "", "."]))
@pytest.mark.slow
def test_server_filter_never_excludes_a_match(core: ModuleType, case: tuple[str, str], sep: str) -> None:
    pattern, key = case
    compiled = core.compile_pattern(pattern, sep)
    encoded = core.encode_key(key, sep)
    matched = compiled.match(key)
    assert compiled.match_encoded(encoded) is matched
    selected = subject_matches(compiled.filter, encoded)
    if matched:
        assert selected, (pattern, key, compiled.filter, encoded)
    if compiled.exact:
        assert selected is matched, (pattern, key, compiled.filter, encoded)


@settings(max_examples=400)
@given(case=pattern_and_key(), sep=st.sampled_from([":", ""]))
@pytest.mark.slow
def test_pattern_parity(c_core: ModuleType, py_core: ModuleType, case: tuple[str, str], sep: str) -> None:
    pattern, key = case

    def describe(module: ModuleType) -> Any:
        compiled = module.compile_pattern(pattern, sep)
        encoded = module.encode_key(key, sep)
        return (
            compiled.filter,
            compiled.exact,
            compiled.match(key),
            compiled.match_encoded(encoded),
            compiled.filter_keys([key, key + "a", "a" + key]),
        )

    assert outcome(describe, c_core) == outcome(describe, py_core)


def _glob_oracle(py_core: ModuleType, pattern: str) -> re.Pattern[str]:
    """The glob as one backtracking regex: right by construction, exponential on hostile input."""
    return py_core._glob_regex(py_core._parse_glob(pattern))


STAR_HEAVY = st.lists(st.sampled_from(["*", "a", "b", "?", "[ab]", "[^a]", "é", ":"]), max_size=12).map("".join)


@settings(max_examples=400)
@given(
    pattern=st.one_of(STAR_HEAVY, PATTERNS),
    key=st.text(alphabet="ab:é", max_size=24),
    sep=st.sampled_from([":", ""]),
)
@pytest.mark.slow
def test_glob_matchers_agree_with_the_regex_oracle(
    c_core: ModuleType, py_core: ModuleType, pattern: str, key: str, sep: str
) -> None:
    expected = _glob_oracle(py_core, pattern).fullmatch(key) is not None
    for module in (c_core, py_core):
        compiled = module.compile_pattern(pattern, sep)
        assert compiled.match(key) is expected, (module.__name__, pattern, key)
        assert compiled.match_encoded(module.encode_key(key, sep)) is expected


@pytest.mark.parametrize(
    ("pattern", "key"),
    [
        ("*a" * 30 + "*b", "a" * 3000),  # the classic: every star retried at every position
        ("*a?" * 20 + "*[b]", "a" * 3000),
        ("a*" * 25 + "b", "a" * 2999),
        ("*" + "?" * 50 + "*b", "é" * 3000),
    ],
)
def test_hostile_globs_are_linear(core: ModuleType, pattern: str, key: str) -> None:
    compiled = core.compile_pattern(pattern)
    started = time.perf_counter()
    for _ in range(5):
        assert compiled.match(key) is False
        assert compiled.match(key + "b") is True
    assert time.perf_counter() - started < 1.0  # the pure core took 5.2 s for one of these before


HOSTILE_REGEXES = [r"(a+)+$", r"(a|aa)+$", r"(a*)*b", r"^(\w+\s?)*$"]


@pytest.mark.parametrize("regex", HOSTILE_REGEXES)
def test_hostile_regexes_are_linear(core: ModuleType, regex: str) -> None:
    text = "a" * 20000 + "!"
    pattern = core.compile_pattern(re.compile(regex))
    flt = core.compile_filter({"s": {"$regex": regex}})
    started = time.perf_counter()
    assert pattern.match(text) is False
    assert pattern.match_encoded(core.encode_key(text[-2500:])) is False
    assert flt.filter([{"s": text}] * 10) == []
    assert time.perf_counter() - started < 1.0  # Python's re: longer than the universe's age


def test_regex_matching_releases_the_gil(core: ModuleType) -> None:
    """Another thread keeps running while a long match is in progress."""
    import threading

    text = "ab" * 2_000_000 + "!"
    flt = core.compile_filter({"s": {"$regex": r"(a|b|ab)+$"}})
    ticks = [0]
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        time.sleep(0.01)
        before = ticks[0]
        started = time.perf_counter()
        matched = flt.filter([{"s": text}] * 20)
        elapsed = time.perf_counter() - started
        ran = ticks[0] - before
    finally:
        stop.set()
        thread.join()
    assert matched == []
    assert elapsed < 10
    assert ran >= elapsed / 0.0005 / 20, (ran, elapsed)  # the ticker was not starved meanwhile


@pytest.mark.parametrize(
    ("regex", "reason"),
    [
        (r"(a)\1", "invalid escape sequence"),
        (r"(?<=a)b", "invalid perl operator"),
        (r"a(?!b)", "invalid perl operator"),
    ],
)
def test_regexes_re2_cannot_run_are_refused(core: ModuleType, regex: str, reason: str) -> None:
    with pytest.raises(ValueError, match=rf"invalid filter at 's.\$regex': bad regular expression .*{reason}.*RE2"):
        core.compile_filter({"s": {"$regex": regex}})
    with pytest.raises(ValueError, match=reason):
        core.compile_pattern(re.compile(regex))


def test_regex_pattern_flags(core: ModuleType) -> None:
    assert core.compile_pattern(re.compile("^USER", re.IGNORECASE)).match("user:1")
    assert core.compile_pattern(re.compile("^b", re.MULTILINE)).match("a\nb")
    assert not core.compile_pattern(re.compile("a.b")).match("a\nb")
    assert core.compile_pattern(re.compile("a.b", re.DOTALL)).match("a\nb")
    assert core.compile_pattern(re.compile("\\d", re.ASCII)).match("x1")
    with pytest.raises(ValueError, match="RE2 cannot honour"):
        core.compile_pattern(re.compile("a  b", re.VERBOSE))
    flt = core.compile_filter({"s": {"$regex": re.compile("^é", re.IGNORECASE)}})
    assert flt.filter([{"s": "Été"}, {"s": "ete"}]) == [0]


def test_regex_matches_text_with_lone_surrogates(core: ModuleType) -> None:
    """RE2 reads UTF-8, which has no lone surrogates (a str-codec value may hold one): each is
    matched as one U+FFFD."""
    pattern = core.compile_pattern(re.compile("^a.b$"))
    assert pattern.match("a\ud800b")
    assert not pattern.match("a\ud800\ud800b")
    flt = core.compile_filter({"s": {"$regex": "^a.b$"}})
    assert flt.filter([{"s": "a\udfffb"}, {"s": "a\udfff"}]) == [0]


REGEX_PIECES = st.sampled_from(
    ["a", "b", ".", "*", "+", "?", "^", "$", "(a|b)", "[ab]", "[^a]", "\\d", "1", "(", ")", "|"]
)


@settings(max_examples=300)
@given(
    regex=st.lists(REGEX_PIECES, max_size=7).map("".join),
    texts=st.lists(st.text(alphabet="ab1.", max_size=10), max_size=4),
)
@pytest.mark.slow
def test_regex_parity_and_python_agreement(
    c_core: ModuleType, py_core: ModuleType, regex: str, texts: list[str]
) -> None:
    """Both cores give the same answers and errors; where Python's re and RE2 both accept a
    pattern, they agree on texts without newlines (the only place their ``$`` differs)."""
    def describe(module: ModuleType) -> Any:
        flt = module.compile_filter({"s": {"$regex": regex}})
        return flt.filter([{"s": t} for t in texts])

    result = outcome(describe, c_core)
    assert result == outcome(describe, py_core)
    if result[0] == "ok":
        try:
            python = re.compile(regex)
        except re.error:
            return
        assert result[1] == [i for i, t in enumerate(texts) if python.search(t)]


@given(pattern=st.text(alphabet="ab:[]^!-\\*?", max_size=8))
def test_malformed_pattern_parity(c_core: ModuleType, py_core: ModuleType, pattern: str) -> None:
    def describe(module: ModuleType) -> Any:
        compiled = module.compile_pattern(pattern)
        return compiled.filter, compiled.exact, [compiled.match(k) for k in ["", "a", "ab", "a:b", "]", "-"]]

    assert outcome(describe, c_core) == outcome(describe, py_core)


# ---------------------------------------------------------------------------------------------
# Protocol helpers
# ---------------------------------------------------------------------------------------------

HEADER_EXAMPLES = [
    (b"NATS/1.0 404 Message Not Found\r\n\r\n", (404, "Message Not Found", {})),
    (
        b"NATS/1.0 204 EOB\r\nNats-Num-Pending: 0\r\nNats-Last-Sequence: 5\r\n\r\n",
        (204, "EOB", {"Nats-Num-Pending": "0", "Nats-Last-Sequence": "5"}),
    ),
    (
        b"NATS/1.0\r\nNats-Sequence: 7\r\nKV-Operation: DEL\r\n\r\n",
        (0, "", {"Nats-Sequence": "7", "KV-Operation": "DEL"}),
    ),
    (
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 3\r\n\r\n",
        (100, "Idle Heartbeat", {"Nats-Last-Consumer": "3"}),
    ),
    (b"NATS/1.0 503\r\n\r\n", (503, "", {})),
    (b"NATS/1.0", (0, "", {})),
    (b"NATS/1.0  408   Request Timeout  \r\n\r\n", (408, "Request Timeout", {})),
    (b"NATS/1.0\r\nA: 1\r\nA: 2\r\n\r\n", (0, "", {"A": "2"})),
    (b"NATS/1.0\r\na: 1\r\nA: 2\r\n\r\n", (0, "", {"a": "1", "A": "2"})),
    (b"NATS/1.0\r\nno colon here\r\nB:  spaced \t\r\n\r\n", (0, "", {"B": "spaced"})),
    (b"NATS/1.0\r\nK: a:b:c\r\n: nameless\r\nE:\r\n\r\n", (0, "", {"K": "a:b:c", "E": ""})),
    (b"NATS/1.0\nA: 1\nB: 2\n\nignored: x", (0, "", {"A": "1", "B": "2"})),
    (b"NATS/1.0\r\nA: 1", (0, "", {"A": "1"})),
    (b"NATS/1.0\r\nKey: \xc3\xa9\xff\r\n\r\n", (0, "", {"Key": "é\ufffd"})),
]


@pytest.mark.parametrize(("raw", "expected"), HEADER_EXAMPLES)
def test_parse_headers(core: ModuleType, raw: bytes, expected: tuple[int, str, dict[str, str]]) -> None:
    assert core.parse_headers(raw) == expected
    assert core.parse_headers(bytearray(raw)) == expected
    assert core.parse_headers(memoryview(raw)) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not a NATS header block"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "not a NATS header block"),
        (b" NATS/1.0\r\n\r\n", "not a NATS header block"),
        (b"NATS/1.0 abc\r\n\r\n", "malformed NATS status line"),
        (b"NATS/1.0 40x Bad\r\n\r\n", "malformed NATS status line"),
    ],
)
def test_parse_headers_errors(core: ModuleType, raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        core.parse_headers(raw)


def test_parse_headers_type_error(core: ModuleType) -> None:
    with pytest.raises(TypeError):
        core.parse_headers("NATS/1.0\r\n\r\n")
    with pytest.raises(TypeError):
        core.parse_headers(5)


HEADER_BYTES = st.lists(
    st.one_of(
        st.sampled_from([b"NATS/1.0", b" ", b"\r\n", b"\n", b"\r", b":", b"404", b"Name", b"\t", b"\xff", b"\x0b"]),
        st.binary(max_size=4),
    ),
    max_size=12,
).map(b"".join)


@settings(max_examples=300)
@given(body=HEADER_BYTES, prefixed=st.booleans())
@pytest.mark.slow
def test_parse_headers_parity(c_core: ModuleType, py_core: ModuleType, body: bytes, prefixed: bool) -> None:
    raw = b"NATS/1.0" + body if prefixed else body
    assert outcome(c_core.parse_headers, raw) == outcome(py_core.parse_headers, raw)


ENTRY_NAMES = (b"Nats-Subject", b"Nats-Sequence", b"KV-Operation", b"A", b"a", b"Key", b"E", b"Missing")


@pytest.mark.parametrize(("raw", "expected"), HEADER_EXAMPLES)
def test_parse_header_fields_reads_what_parse_headers_reads(
    core: ModuleType, raw: bytes, expected: tuple[int, str, dict[str, str]]
) -> None:
    status, description, headers = expected
    values = tuple(headers.get(name.decode()) for name in ENTRY_NAMES)
    assert core.parse_header_fields(raw, ENTRY_NAMES) == (status, description, values)
    assert core.parse_header_fields(bytearray(raw), ENTRY_NAMES) == (status, description, values)
    assert core.parse_header_fields(raw, ()) == (status, description, ())


def test_parse_header_fields_of_a_direct_get_reply(core: ModuleType) -> None:
    raw = (
        b"NATS/1.0\r\nNats-Stream: KV_b\r\nNats-Subject: $KV.b.k\r\nNats-Sequence: 12\r\n"
        b"Nats-Time-Stamp: 2026-12-01T11:46:07.695940123Z\r\nNats-Sequence:  13 \r\nnats-sequence: 99\r\n\r\n"
    )
    names = (b"Nats-Subject", b"Nats-Sequence", b"Nats-Time-Stamp", b"KV-Operation")
    # A repeated name keeps its last value; names match with their case, as dict keys do.
    assert core.parse_header_fields(raw, names) == (
        0, "", ("$KV.b.k", "13", "2026-12-01T11:46:07.695940123Z", None)
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"", "not a NATS header block"), (b"NATS/1.0 40x Bad\r\n\r\n", "malformed NATS status line")],
)
def test_parse_header_fields_errors(core: ModuleType, raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        core.parse_header_fields(raw, (b"A",))


def test_parse_header_fields_type_errors(core: ModuleType) -> None:
    for names in ([b"A"], ("A",), (b"A", None), b"A"):
        with pytest.raises(TypeError, match="names must be a tuple of bytes"):
            core.parse_header_fields(b"NATS/1.0\r\nA: 1\r\n\r\n", names)
    with pytest.raises(TypeError, match="names must be a tuple of bytes"):
        core.parse_header_fields(b"not even headers", ["A"])  # the names are checked first
    with pytest.raises(TypeError):
        core.parse_header_fields("NATS/1.0\r\n\r\n", (b"A",))
    with pytest.raises(ValueError, match="header names must be ASCII"):
        core.parse_header_fields(b"NATS/1.0\r\n\xff: 1\r\n\r\n", (b"\xff",))


@settings(max_examples=300)
@given(body=HEADER_BYTES, prefixed=st.booleans())
@pytest.mark.slow
def test_parse_header_fields_parity(c_core: ModuleType, py_core: ModuleType, body: bytes, prefixed: bool) -> None:
    raw = b"NATS/1.0" + body if prefixed else body
    names = (b"Name", b"404", b"", b"A")
    assert outcome(c_core.parse_header_fields, raw, names) == outcome(py_core.parse_header_fields, raw, names)


def test_pub_command(core: ModuleType) -> None:
    assert core.pub_command("a.b", "", b"hi", None) == b"PUB a.b 2\r\nhi\r\n"
    assert core.pub_command("a.b", "_INBOX.1", b"", None) == b"PUB a.b _INBOX.1 0\r\n\r\n"
    assert core.pub_command("a", "r", b"x", {}) == b"PUB a r 1\r\nx\r\n"
    block = b"NATS/1.0\r\nNats-TTL: 5s\r\nKV-Operation: DEL\r\n\r\n"
    expected = b"HPUB $KV.b.k %d %d\r\n%shi\r\n" % (len(block), len(block) + 2, block)
    assert core.pub_command("$KV.b.k", "", b"hi", {"Nats-TTL": "5s", "KV-Operation": "DEL"}) == expected
    assert core.pub_command("s", "r", bytearray(b"\r\n"), {"E": ""}) == (
        b"HPUB s r 17 19\r\nNATS/1.0\r\nE: \r\n\r\n\r\n\r\n"
    )
    assert core.pub_command("s", "", memoryview(b"p" * 1000), None).startswith(b"PUB s 1000\r\npp")
    assert core.pub_command("é", "", b"", {"H": "é"}) == (
        b"HPUB \xc3\xa9 19 19\r\nNATS/1.0\r\nH: \xc3\xa9\r\n\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("", "", b"", None), ValueError, "subject must not be empty"),
        (("a b", "", b"", None), ValueError, "must not contain whitespace"),
        (("a", "r\n", b"", None), ValueError, "must not contain whitespace"),
        (("a", "", b"", {"Bad Name": "v"}), ValueError, "invalid header name"),
        (("a", "", b"", {"Bad:Name": "v"}), ValueError, "invalid header name"),
        (("a", "", b"", {"Bad\r\nName": "v"}), ValueError, "invalid header name"),
        (("a", "", b"", {"": "v"}), ValueError, "invalid header name"),
        (("a", "", b"", {"Name": "v\r\nInjected: 1"}), ValueError, "must not contain CR or LF"),
        (("a", "", b"", {"Name": "v\n"}), ValueError, "must not contain CR or LF"),
        ((b"a", "", b"", None), TypeError, "subject must be str"),
        (("a", None, b"", None), TypeError, "reply must be str"),
        (("a", "", "text", None), TypeError, "payload must be bytes"),
        (("a", "", b"", [("A", "b")]), TypeError, "headers must be a dict"),
        (("a", "", b"", {"A": 1}), TypeError, "header names and values must be str"),
    ],
)
def test_pub_command_errors(core: ModuleType, args: tuple[Any, ...], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        core.pub_command(*args)


HEADER_NAMES = st.text(alphabet="ABab-_:é \r", min_size=0, max_size=6)
HEADER_VALUES = st.text(alphabet="ab é:\r\n\t", max_size=6)


@settings(max_examples=300)
@given(
    subject=st.text(alphabet="ab.$é \t", max_size=6),
    reply=st.text(alphabet="ab.\n", max_size=4),
    payload=st.binary(max_size=20),
    headers=st.one_of(st.none(), st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3)),
)
def test_pub_command_parity_and_round_trip(
    c_core: ModuleType,
    py_core: ModuleType,
    subject: str,
    reply: str,
    payload: bytes,
    headers: dict[str, str] | None,
) -> None:
    result = outcome(c_core.pub_command, subject, reply, payload, headers)
    assert result == outcome(py_core.pub_command, subject, reply, payload, headers)
    if result[0] != "ok" or not headers:
        return
    command: bytes = result[1]
    first, _, rest = command.partition(b"\r\n")
    hdr_len, total = (int(x) for x in first.split()[-2:])
    assert len(rest) == total + 2 and rest.endswith(b"\r\n")
    assert rest[hdr_len:total] == payload
    status, description, parsed = c_core.parse_headers(rest[:hdr_len])
    assert (status, description) == (0, "")
    assert parsed == {name.strip(): value.strip(" \t") for name, value in headers.items()}


@settings(max_examples=200)
@given(
    subject_len=st.integers(4070, 4100),
    reply_len=st.integers(0, 30),
    payload_len=st.sampled_from([0, 9, 10, 99_999, 100_000]),
    headers=st.sampled_from([None, {}, {"A": "b"}, {"Nats-TTL": "5s" * 50}]),
    char=st.sampled_from(["s", "é"]),
)
def test_pub_command_line_limit_parity(
    c_core: ModuleType,
    py_core: ModuleType,
    subject_len: int,
    reply_len: int,
    payload_len: int,
    headers: dict[str, str] | None,
    char: str,
) -> None:
    """Both cores refuse the same commands: those whose line after PUB/HPUB (subject, reply,
    sizes) is longer than nats-server's default max_control_line, which would close the
    connection; the accepted ones fit it exactly."""
    subject = char * (subject_len // len(char.encode()))
    args = (subject, "r" * reply_len, b"p" * payload_len, headers)
    result = outcome(c_core.pub_command, *args)
    assert result == outcome(py_core.pub_command, *args)
    assert c_core.MAX_CONTROL_LINE == py_core.MAX_CONTROL_LINE == 4096
    if result[0] == "ok":
        first = result[1].partition(b"\r\n")[0]
        assert len(first.partition(b" ")[2]) <= 4096
    else:
        assert result[0] == "ValueError" and "max_control_line" in result[1]


CREATE = {"Nats-Expected-Last-Subject-Sequence": "0"}


def test_atomic_batch_is_the_batch_messages_pub_commands_joined(core: ModuleType) -> None:
    items = [("u.email.x", b'"r:i:1"', CREATE), ("r.i.1", b'{"a":1}', CREATE), ("r.i.2", b"", None),
             ("r.i.3", bytearray(b"xx"), {})]
    for n in range(1, len(items) + 1):
        expected = b"".join(
            core.pub_command(
                "$KV.b." + token, "_I.last" if seq == n else "_I.first" if seq == 1 else "", bytes(payload),
                {**(headers or {}), "Nats-Batch-Id": "id1", "Nats-Batch-Sequence": str(seq),
                 **({"Nats-Batch-Commit": "1"} if seq == n else {})},
            )
            for seq, (token, payload, headers) in enumerate(items[:n], start=1)
        )
        assert core.atomic_batch("$KV.b.", items[:n], "id1", "_I.first", "_I.last") == expected
    one = core.atomic_batch("p.", [("k", b"v", None)], "id", "_I.first", "_I.last")
    assert one == (b"HPUB p.k _I.last 77 78\r\nNATS/1.0\r\nNats-Batch-Id: id\r\nNats-Batch-Sequence: 1\r\n"
                   b"Nats-Batch-Commit: 1\r\n\r\nv\r\n")
    # Headers dicts that differ between items are each encoded (a cache by identity must not leak).
    mixed = [("a", b"1", {"A": "1"}), ("b", b"2", {"A": "2"}), ("c", b"3", {"A": "2"}), ("d", b"4", None)]
    lines = core.atomic_batch("", mixed, "i", "", "").split(b"\r\n")
    assert [line for line in lines if line.startswith(b"A: ")] == [b"A: 1", b"A: 2", b"A: 2"]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("p.", [], "id", "", ""), ValueError, "at least one message"),
        (("p.", [("k", b"", None)], "", "", ""), ValueError, "invalid batch id"),
        (("p.", [("k", b"", None)], "a\nb", "", ""), ValueError, "invalid batch id"),
        (("p.", [("k", b"", None)], 7, "", ""), TypeError, "batch_id must be str"),
        (("p.", [("k", b"", None)], "id", "r r", ""), ValueError, "must not contain whitespace"),
        (("p.", [("k", b"", None)], "id", "", "r\n"), ValueError, "must not contain whitespace"),
        (("p.", [("k", b"", None), ("a b", b"", None)], "id", "", ""), ValueError, "must not contain whitespace"),
        (("", [("", b"", None)], "id", "", ""), ValueError, "subject must not be empty"),
        (("p.", [(1, b"", None)], "id", "", ""), TypeError, "subject must be str"),
        (("p.", [("k", "text", None)], "id", "", ""), TypeError, "payload must be bytes"),
        (("p.", [("k", b"", [("A", "b")])], "id", "", ""), TypeError, "headers must be a dict"),
        (("p.", [("k", b"", {"A B": "b"})], "id", "", ""), ValueError, "invalid header name"),
        (("p.", [("k", b"", {"A": "b\r\nC: d"})], "id", "", ""), ValueError, "must not contain CR or LF"),
        (("p.", [("k", b"", None, None)], "id", "", ""), ValueError, "not 4 values"),
        (("p.", [("k" * 4095, b"", None)], "id", "", ""), ValueError, "max_control_line"),
    ],
)
def test_atomic_batch_errors(core: ModuleType, args: tuple[Any, ...], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        core.atomic_batch(*args)


@settings(max_examples=200)
@given(
    items=st.lists(
        st.tuples(
            st.text(alphabet="ab.é \t", max_size=5),
            st.binary(max_size=12),
            st.one_of(st.none(), st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=2)),
        ),
        max_size=4,
    ),
    batch_id=st.text(alphabet="ab\r", max_size=3),
    replies=st.tuples(st.text(alphabet="ab. ", max_size=3), st.text(alphabet="ab.", max_size=3)),
)
def test_atomic_batch_parity(
    c_core: ModuleType,
    py_core: ModuleType,
    items: list[tuple[str, bytes, dict[str, str] | None]],
    batch_id: str,
    replies: tuple[str, str],
) -> None:
    args = ("$KV.b.", items, batch_id, *replies)
    assert outcome(c_core.atomic_batch, *args) == outcome(py_core.atomic_batch, *args)


def test_pub_command_line_limit(core: ModuleType) -> None:
    assert core.pub_command("s" * 4094, "", b"x", None).startswith(b"PUB " + b"s" * 4094 + b" 1\r\n")
    with pytest.raises(ValueError, match=r"would be 4097 bytes.*beyond 4096"):
        core.pub_command("s" * 4095, "", b"x", None)
    with pytest.raises(ValueError, match="would be 4097 bytes"):
        core.pub_command("s" * 4000, "r" * 93, b"x" * 10, None)  # "s... r... 10"
    with pytest.raises(ValueError, match="would be 4097 bytes"):
        core.pub_command("s" * 4091, "", b"x", {"A": "b"})  # "s... 18 19"
    assert core.pub_command("s" * 4090, "", b"x", {"A": "b"}).startswith(b"HPUB ")


def test_parse_ack_subject(core: ModuleType) -> None:
    v1 = "$JS.ACK.KV_users.dur.1.22.3.1700000000123456789.0"
    assert core.parse_ack_subject(v1) == ("KV_users", "dur", 1, 22, 3, 1700000000123456789, 0)
    v2 = "$JS.ACK._.ACCHASH.KV_users.dur.2.23.4.1700000000123456789.5"
    assert core.parse_ack_subject(v2) == ("KV_users", "dur", 2, 23, 4, 1700000000123456789, 5)
    assert core.parse_ack_subject(v2 + ".r4nd0m") == ("KV_users", "dur", 2, 23, 4, 1700000000123456789, 5)
    assert core.parse_ack_subject("$JS.ACK.hub.ACC.S.C.1.2.3.4.5") == ("S", "C", 1, 2, 3, 4, 5)
    big = "$JS.ACK.S.C.1.2.3.123456789012345678901234567890.0"
    assert core.parse_ack_subject(big)[5] == 123456789012345678901234567890


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "$JS.ACK.S.C.1.2.3.4",
        "$JS.ACK.S.C.1.2.3.4.5.6",
        "$JS.ACK.d.a.S.C.1.2.3.4.5.6.7",
        "$JS.NAK.S.C.1.2.3.4.5",
        "_INBOX.S.C.1.2.3.4.5.6",
        "$JS.ACK.S.C.1.2.x.4.5",
        "$JS.ACK.S.C.1.2.+3.4.5",
        "$JS.ACK.S.C.1.2.-3.4.5",
        "$JS.ACK.S.C.1.2.٣.4.5",
        "$JS.ACK.S..1.2.3.4.5",
        "$JS.ACK.S.C.1.2.3.4.",
        "$JS.ACK.d.a.S.C.1.2.3.4.5.",
    ],
)
def test_parse_ack_subject_errors(core: ModuleType, reply: str) -> None:
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        core.parse_ack_subject(reply)


def _delivery(dseq: int, pending: int, consumer: str = "C", *, v2: bool = False, payload: bytes = b"v",
              headers: bytes | None = None, sseq: int | None = None) -> tuple[int, str, str, bytes | None, bytes]:
    where = f"_.ACC.S.{consumer}" if v2 else f"S.{consumer}"
    reply = f"$JS.ACK.{where}.1.{sseq or dseq * 10}.{dseq}.17000000000{dseq}.{pending}" + (".tok" if v2 else "")
    return (7, f"$KV.b.k{dseq}", reply, headers, payload)


def _as_tuple(*fields: object) -> tuple[object, ...]:
    return fields


def test_take_deliveries(core: ModuleType) -> None:
    frames = [_delivery(1, 3), _delivery(2, 2, v2=True), _delivery(3, 1), _delivery(4, 0)]
    entries, stop = core.take_deliveries(frames, 0, "C", 1, _as_tuple, False)
    assert stop == 4
    assert entries == [
        ("$KV.b.k1", b"v", 10, "170000000001", "PUT", 3),
        ("$KV.b.k2", b"v", 20, "170000000002", "PUT", 2),
        ("$KV.b.k3", b"v", 30, "170000000003", "PUT", 1),
        ("$KV.b.k4", b"v", 40, "170000000004", "PUT", 0),
    ]
    assert core.take_deliveries(frames, 2, "C", 3, _as_tuple, False) == (entries[2:], 4)
    assert core.take_deliveries([], 0, "C", 1, _as_tuple, False) == ([], 0)
    assert core.take_deliveries(frames, 4, "C", 5, _as_tuple, False) == ([], 4)


def test_take_deliveries_takes_values_whose_headers_say_nothing_about_the_entry(core: ModuleType) -> None:
    # A compare-and-set write, an atomic batch's message and a TTL'd value store their headers;
    # they are still plain values.
    cas = b"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: 0\r\n\r\n"
    batch = b"NATS/1.0\r\nNats-Batch-Id: 94fd51e8\r\nNats-Batch-Sequence: 2\r\nNats-Batch-Commit: 1\r\n\r\n"
    ttl = b"NATS/1.0\r\nNats-TTL: 5s\r\nNats-Rollup: sub\r\n\r\n"
    frames = [_delivery(1, 2, headers=cas), _delivery(2, 1, headers=batch), _delivery(3, 0, headers=ttl)]
    entries, stop = core.take_deliveries(frames, 0, "C", 1, _as_tuple, False)
    assert stop == 3 and [e[2] for e in entries] == [10, 20, 30] and {e[4] for e in entries} == {"PUT"}
    assert core.plain_header_block(cas) and core.plain_header_block(ttl)
    assert not core.plain_header_block("NATS/1.0\r\n\r\n")  # parsed headers go the other way
    assert not core.plain_header_block(b"NATS/1.0 404 No Messages\r\n\r\n")
    assert not core.plain_header_block(b"NATS/1.0")
    # Names are matched whole, at a line's start, without case; values are not looked at.
    assert core.plain_header_block(b"NATS/1.0\r\nX-Note: KV-Operation: DEL\r\n\r\n")
    assert core.plain_header_block(b"NATS/1.0\r\nKV-Operations: x\r\nMy-Natskv-Raw: 1\r\n\r\n")
    assert not core.plain_header_block(b"NATS/1.0\r\nA: 1\r\nnAtS-mArKeR-rEaSoN: MaxAge\r\n\r\n")
    assert not core.plain_header_block(b"NATS/1.0\r\nNATSKV-RAW: 1\r\n\r\n")
    assert core.plain_header_block(b"NATS/1.0\r\nbroken line\r\n\r\n")


def test_take_deliveries_stops_after_the_initial_values(core: ModuleType) -> None:
    frames = [_delivery(1, 1), _delivery(2, 0), _delivery(3, 0)]
    assert core.take_deliveries(frames, 0, "C", 1, _as_tuple, True)[1] == 2
    assert core.take_deliveries(frames, 2, "C", 3, _as_tuple, True)[1] == 3
    assert core.take_deliveries(frames, 0, "C", 1, _as_tuple, False)[1] == 3


@pytest.mark.parametrize(
    "odd",
    [
        _delivery(3, 0, payload=b""),  # a control message (flow control, heartbeat)
        _delivery(3, 0, headers=b"NATS/1.0\r\nKV-Operation: DEL\r\n\r\n"),  # markers: read elsewhere
        _delivery(3, 0, headers=b"NATS/1.0\r\nkv-operation: PURGE\r\nNats-Rollup: sub\r\n\r\n"),
        _delivery(3, 0, headers=b"NATS/1.0\r\nNats-Marker-Reason: MaxAge\r\n\r\n"),
        _delivery(3, 0, headers=b"NATS/1.0\r\nNatskv-Raw: 1\r\n\r\n"),  # bytes stored raw
        _delivery(3, 0, headers=b"NATS/1.0 100 Idle Heartbeat\r\n\r\n"),  # a status line
        _delivery(3, 0, consumer="OLD"),  # a late message from a replaced consumer
        _delivery(4, 0),  # a gap in the consumer sequence
        (7, "$KV.b.k3", "_INBOX.x.y", None, b"v"),  # not an ack subject
        (7, "$KV.b.k3", "", None, b"v"),
        (7, "$KV.b.k3", "$JS.ACK.S.C.1.30.3.x.0", None, b"v"),  # a bad number
        (7, "$KV.b.k3", "$JS.ACK.S.C.1.30.3.4", None, b"v"),  # too few tokens
        (7, "$KV.b.k3", "$JS.ACK.d..S.C.1.30.3.4.0", None, b"v"),  # an empty token
        (7, "$KV.b.k3", "$JS.ACK..C.1.30.3.4.0", None, b"v"),
    ],
)
def test_take_deliveries_stops_at_what_it_does_not_take(core: ModuleType, odd: tuple[Any, ...]) -> None:
    frames = [_delivery(1, 3), _delivery(2, 2), odd, _delivery(3, 0)]
    entries, stop = core.take_deliveries(frames, 0, "C", 1, _as_tuple, False)
    assert stop == 2 and [e[2] for e in entries] == [10, 20]
    assert core.take_deliveries(frames, 2, "C", 3, _as_tuple, False) == ([], 2)


@pytest.mark.parametrize(
    ("reply", "revision", "stamp", "pending"),
    [
        ("$JS.ACK.S.C.1.5.1.007.0", 5, "7", 0),  # numbers as int() reads them
        ("$JS.ACK.S.C.1.5.1.0.0", 5, "0", 0),
        ("$JS.ACK.S.C.1.123456789012345678901.1.2.3", 123456789012345678901, "2", 3),  # beyond 64 bits
        ("$JS.ACK.S.C.1.5.1.123456789012345678901.3", 5, "123456789012345678901", 3),
        ("$JS.ACK.Sé.C.1.5.1.2.3", 5, "2", 3),  # a Latin-1 stream name
        ("$JS.ACK.S€.C.1.5.1.2.3", 5, "2", 3),  # and a wider one
        ("$JS.ACK.dom.acc.S.C.1.5.1.2.3.tok", 5, "2", 3),
    ],
)
def test_take_deliveries_reads_numbers_like_parse_ack_subject(
    core: ModuleType, reply: str, revision: int, stamp: str, pending: int
) -> None:
    frames = [(7, "$KV.b.k", reply, None, b"v")]
    assert core.take_deliveries(frames, 0, "C", 1, _as_tuple, False) == (
        [("$KV.b.k", b"v", revision, stamp, "PUT", pending)], 1)
    assert core.take_deliveries(frames, 0, "Cé", 1, _as_tuple, False) == ([], 0)
    wide = [(7, "$KV.b.k", reply.replace(".C.", ".C€."), None, b"v")]
    assert core.take_deliveries(wide, 0, "C€", 1, _as_tuple, False)[1] == 1


@pytest.mark.parametrize("stamp", ["1796147801583614477", "9999999999999999999", "0001796147801583614477"])
def test_take_deliveries_reads_nanosecond_timestamps(core: ModuleType, stamp: str) -> None:
    # A timestamp in nanoseconds has 19 digits: read like the other numbers (as int() does).
    frames = [(7, "$KV.b.k", f"$JS.ACK.S.C.1.12345678901234567.1.{stamp}.18446744073709551615", None, b"v")]
    assert core.take_deliveries(frames, 0, "C", 1, _as_tuple, False) == (
        [("$KV.b.k", b"v", 12345678901234567, str(int(stamp)), "PUT", 18446744073709551615)], 1)


@dataclasses.dataclass(slots=True)
class _SlottedEntry:
    """natskv's RawEntry's shape: take_deliveries fills such an entry's slots itself."""

    subject: str
    data: bytes
    revision: int
    timestamp: str
    operation: str
    delta: int = 0
    raw_bytes: bool = False


@dataclasses.dataclass(slots=True)
class _CheckedEntry(_SlottedEntry):
    """A subclass (with a __post_init__): its own call makes it."""

    def __post_init__(self) -> None:
        self.timestamp = "checked:" + self.timestamp


@dataclasses.dataclass
class _PlainEntry:
    subject: str
    data: bytes
    revision: int
    timestamp: str
    operation: str
    delta: int = 0
    raw_bytes: bool = False


@pytest.mark.parametrize("entry_type", [RawEntry, _SlottedEntry, _CheckedEntry, _PlainEntry])
def test_take_deliveries_makes_the_entries_their_type_makes(core: ModuleType, entry_type: type) -> None:
    frames = [_delivery(1, 1), _delivery(2, 0, v2=True)]
    entries, stop = core.take_deliveries(frames, 0, "C", 1, entry_type, False)
    expected = [entry_type("$KV.b.k1", b"v", 10, "170000000001", "PUT", 1),
                entry_type("$KV.b.k2", b"v", 20, "170000000002", "PUT", 0)]
    assert stop == 2 and entries == expected
    assert all(type(e) is entry_type and e.raw_bytes is False for e in entries)
    assert [dataclasses.astuple(e) for e in entries] == [dataclasses.astuple(e) for e in expected]
    entries[0].delta = 5  # an ordinary, mutable entry
    assert entries[0].delta == 5


def test_take_deliveries_ignores_an_empty_consumer_name(core: ModuleType) -> None:
    # A feed between two consumers has no name: nothing is its delivery.
    frames = [(7, "$KV.b.k", "$JS.ACK.S..1.2.1.4.0", None, b"v")]
    assert core.take_deliveries(frames, 0, "", 1, _as_tuple, False) == ([], 0)


def test_frames_known(core: ModuleType) -> None:
    frames = [(1, "a", "", None, b""), (3, "b", "", None, b"x"), (1, "c", "r", b"NATS/1.0\r\n\r\n", b"")]
    assert core.frames_known(frames, {1: "h", 3: "h"})
    assert core.frames_known(frames, {1, 3, 4})
    assert not core.frames_known(frames, {1: "h"})
    assert not core.frames_known(frames, {})
    assert core.frames_known([], {})


def test_frames_run(core: ModuleType) -> None:
    frames = [(1, "a", "", None, b"xy"), (1, "b", "", None, b""), (3, "c", "", None, b"zzz"), (1, "d", "", None, b"q")]
    assert core.frames_run(frames, 0, 1) == (2, 2)
    assert core.frames_run(frames, 1, 1) == (2, 0)
    assert core.frames_run(frames, 2, 3) == (3, 3)
    assert core.frames_run(frames, 2, 1) == (2, 0)  # another subscription's frame: an empty run
    assert core.frames_run(frames, 3, 1) == (4, 1)
    assert core.frames_run(frames, 4, 1) == (4, 0)
    assert core.frames_run([], 0, 1) == (0, 0)
    big = 10**30  # subscription ids compare by value
    assert core.frames_run([(big, "a", "", None, b"x"), (10**30, "b", "", None, b"y")], 0, 10**30) == (2, 2)
    with pytest.raises(IndexError, match="start must be >= 0"):
        core.frames_run(frames, -1, 1)


def test_decode_entries(core: ModuleType) -> None:
    import orjson

    from natskv.wire.kv import RawEntry

    entries = [
        RawEntry("$KV.b.user.42", b'{"a": [1, 2]}', 5, "t", "PUT"),
        RawEntry("$KV.b.user.43", b"", 6, "t", "DEL"),
        RawEntry("$KV.b.user.44", b"not json", 7, "t", "PUT"),
        RawEntry("$KV.b.user.45", b"[1]", 8, "t", "PUT", raw_bytes=True),
        RawEntry("$KV.b.user.46", b"", 9, "t", "PURGE"),
        RawEntry("$KV.b.a%zz.b", b"1", 10, "t", "PUT"),  # not natskv's encoding: kept as it is
        RawEntry("$KV.b.x", b"1", 11, "t", "PUT"),
    ]
    assert core.decode_entries(entries, 6, ":", orjson.loads) == [
        (5, "user:42", True, {"a": [1, 2]}),
        (6, "user:43", False, None),
        (7, "user:44", True, b"not json"),
        (8, "user:45", True, b"[1]"),
        (9, "user:46", False, None),
        (10, "a%zz.b", True, 1),
        (11, "x", True, 1),
    ]
    assert core.decode_entries(entries[:1], 6, "", None) == [(5, "user.42", True, b'{"a": [1, 2]}')]
    assert core.decode_entries([], 6, ":", orjson.loads) == []


def test_parse_ack_subject_type_error(core: ModuleType) -> None:
    with pytest.raises(TypeError):
        core.parse_ack_subject(b"$JS.ACK.S.C.1.2.3.4.5")


@given(tokens=st.lists(st.sampled_from(["$JS", "ACK", "S", "_", "1", "22", "x", "", "٣", "007"]), max_size=13))
def test_parse_ack_subject_parity(c_core: ModuleType, py_core: ModuleType, tokens: list[str]) -> None:
    reply = ".".join(tokens)
    assert outcome(c_core.parse_ack_subject, reply) == outcome(py_core.parse_ack_subject, reply)
    shaped = ".".join(["$JS", "ACK", *tokens[:10]])
    assert outcome(c_core.parse_ack_subject, shaped) == outcome(py_core.parse_ack_subject, shaped)


def frame_bytes(sid: int, subject: str, reply: str, headers: bytes | None, payload: bytes) -> bytes:
    """A MSG or HMSG frame as nats-server sends it."""
    target = f"{subject} {sid} {reply + ' ' if reply else ''}".encode()
    if headers is None:
        return b"MSG " + target + str(len(payload)).encode() + b"\r\n" + payload + b"\r\n"
    sizes = f"{len(headers)} {len(headers) + len(payload)}".encode()
    return b"HMSG " + target + sizes + b"\r\n" + headers + payload + b"\r\n"


def test_parse_frames_splits_messages_and_stops_at_other_operations(core: ModuleType) -> None:
    hdr = b"NATS/1.0\r\nKV-Operation: DEL\r\n\r\n"
    wire = (frame_bytes(1, "$KV.b.k", "", None, b"hello") + frame_bytes(22, "a.\u00e9", "_INBOX.x.1", hdr, b"")
            + frame_bytes(3, "s", "r", None, b"MSG 1 2 3\r\n") + b"PING\r\n" + frame_bytes(4, "t", "", None, b"x"))
    frames, used, control = core.parse_frames(bytearray(wire))
    assert frames == [(1, "$KV.b.k", "", None, b"hello"), (22, "a.\u00e9", "_INBOX.x.1", hdr, b""),
                      (3, "s", "r", None, b"MSG 1 2 3\r\n")]  # a payload is never read as protocol
    assert wire[used:].startswith(b"PING\r\n") and control
    assert core.parse_frames(wire[used + 6:]) == ([(4, "t", "", None, b"x")], len(wire) - used - 6, False)
    # Tabs and repeated spaces separate arguments too; an empty HMSG header block reads as None.
    spaced = b"MSG\ta  7\t\t2\r\nab\r\nHMSG a 8 0 1\r\nz\r\n"
    assert core.parse_frames(spaced) == ([(7, "a", "", None, b"ab"), (8, "a", "", None, b"z")], len(spaced), False)


@pytest.mark.parametrize("rest", [b"", b"PI", b"MSG", b"MSG a 1 5", b"MSG a 1 5\r\nhel", b"MSG a 1 5\r\nhello\r",
                                  b"HMSG a 1 r 2 5\r\n"])
def test_parse_frames_waits_for_the_rest_of_a_frame(core: ModuleType, rest: bytes) -> None:
    first = frame_bytes(9, "s", "", None, b"v")
    assert core.parse_frames(first + rest) == ([(9, "s", "", None, b"v")], len(first), False)


@pytest.mark.parametrize("line", [b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR 'x'\r\n", b"INFO {}\r\n", b"BOGUS\r\n"])
def test_parse_frames_hands_other_lines_back(core: ModuleType, line: bytes) -> None:
    assert core.parse_frames(bytearray(line)) == ([], 0, True)


@pytest.mark.parametrize(("wire", "message"), [
    (b"MSG a 1\r\n", "malformed message line b'MSG a 1'"),
    (b"MSG a 1 r x 2\r\n", "malformed message line"),
    (b"MSG a x 1\r\nx\r\n", "bad number b'x'"),
    (b"MSG a 1 -1\r\n", "bad number b'-1'"),
    (b"MSG a 1 1_0\r\n", "bad number b'1_0'"),
    (b"MSG a 1 9999999999999999999\r\n", "bad number"),
    (b"HMSG a 1 5 2\r\nxx\r\n", "header larger than message"),
    (b"MSG a 1 1\r\nxyz", "not followed by CRLF"),
    (b"MSG \xff 1 1\r\nx\r\n", "utf-8"),
])
def test_parse_frames_errors(core: ModuleType, wire: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        core.parse_frames(wire)


def test_parse_frames_type_error(core: ModuleType) -> None:
    with pytest.raises(TypeError, match="bytes or bytearray"):
        core.parse_frames("MSG a 1 0\r\n\r\n")


@given(
    frames=st.lists(st.tuples(
        st.integers(min_value=0, max_value=10**12),
        st.text(st.characters(blacklist_categories=("Z", "C")), min_size=1, max_size=8),
        st.sampled_from(["", "r", "_INBOX.a.b"]),
        st.one_of(st.none(), st.binary(min_size=1, max_size=20)),
        st.binary(max_size=30),
    ), max_size=6),
    cut=st.integers(min_value=0, max_value=400),
    junk=st.binary(max_size=12),
)
@settings(max_examples=300, deadline=None)
@pytest.mark.slow
def test_parse_frames_parity_and_chunking(c_core: ModuleType, py_core: ModuleType, frames: list[Any], cut: int,
                                          junk: bytes) -> None:
    wire = b"".join(frame_bytes(*f) for f in frames)
    # Any prefix of the stream: the complete frames are returned, the rest waits.
    assert outcome(c_core.parse_frames, wire[:cut]) == outcome(py_core.parse_frames, wire[:cut])
    got, used, control = c_core.parse_frames(bytearray(wire))
    assert (got, used, control) == (frames, len(wire), False)
    # Arbitrary bytes after the frames (or instead of them): both cores agree.
    assert outcome(c_core.parse_frames, wire + junk) == outcome(py_core.parse_frames, wire + junk)
    assert outcome(c_core.parse_frames, junk + wire) == outcome(py_core.parse_frames, junk + wire)


# ---------------------------------------------------------------------------------------------
# Query filters
# ---------------------------------------------------------------------------------------------

DOC = {
    "name": "Ann",
    "age": 30,
    "score": 7.5,
    "admin": True,
    "nothing": None,
    "tags": ["a", "b", 3, [1, 2], {"k": 1}],
    "address": {"city": "Oslo", "zip": "0150", "geo": {"lat": 59.9}},
    "email": "ann@example.com",
}

FILTER_CASES = [
    ({}, True),
    ({"name": "Ann"}, True),
    ({"name": "Bob"}, False),
    ({"age": 30}, True),
    ({"age": 30.0}, True),
    ({"admin": 1}, False),
    ({"admin": True}, True),
    ({"age": True}, False),
    ({"age": "30"}, False),
    ({"nothing": None}, True),
    ({"missing": None}, True),
    ({"missing": {"$eq": None}}, True),
    ({"missing": {"$eq": 1}}, False),
    ({"nothing": {"$ne": None}}, False),
    ({"missing": {"$ne": None}}, False),
    ({"missing": {"$ne": 5}}, True),
    ({"age": {"$ne": 30}}, False),
    ({"age": {"$ne": "30"}}, True),
    ({"address.city": "Oslo"}, True),
    ({"address.geo.lat": {"$gt": 59}}, True),
    ({"address.city.x": None}, True),
    ({"address.city.x": {"$exists": False}}, True),
    ({"address": {"city": "Oslo", "zip": "0150", "geo": {"lat": 59.9}}}, True),
    ({"address": {"city": "Oslo"}}, False),
    ({"address": {}}, False),
    ({"tags": ["a", "b", 3, [1, 2], {"k": 1}]}, True),
    ({"tags": ["a", "b", 3, [1, 2], {"k": True}]}, False),
    ({"age": {"$gt": 29}}, True),
    ({"age": {"$gt": 30}}, False),
    ({"age": {"$gte": 30}}, True),
    ({"age": {"$lt": 30.5}}, True),
    ({"age": {"$lte": 29}}, False),
    ({"age": {"$gt": 18, "$lt": 65}}, True),
    ({"age": {"$gt": 18, "$lt": 20}}, False),
    ({"score": {"$gt": 7}}, True),
    ({"score": {"$lt": 7.5}}, False),
    ({"score": {"$lte": 7.5}}, True),
    ({"name": {"$gt": "Al"}}, True),
    ({"name": {"$lt": "Al"}}, False),
    ({"name": {"$gt": 5}}, False),
    ({"age": {"$gt": "a"}}, False),
    ({"admin": {"$gt": 0}}, False),
    ({"nothing": {"$lt": 1}}, False),
    ({"missing": {"$lt": 1}}, False),
    ({"tags": {"$gt": 1}}, False),
    ({"age": {"$in": [1, 30]}}, True),
    ({"age": {"$in": [1, 30.0]}}, True),
    ({"age": {"$in": [1, "30"]}}, False),
    ({"admin": {"$in": [1]}}, False),
    ({"admin": {"$in": [True]}}, True),
    ({"age": {"$in": [True]}}, False),
    ({"missing": {"$in": [None]}}, True),
    ({"missing": {"$in": [1]}}, False),
    ({"tags": {"$in": [["a", "b", 3, [1, 2], {"k": 1}]]}}, True),
    ({"address.city": {"$in": ("Oslo", "Rome")}}, True),
    ({"age": {"$nin": [1, 2]}}, True),
    ({"age": {"$nin": [30]}}, False),
    ({"missing": {"$nin": [1]}}, True),
    ({"missing": {"$nin": [None]}}, False),
    ({"name": {"$contains": "nn"}}, True),
    ({"name": {"$contains": "x"}}, False),
    ({"name": {"$contains": 1}}, False),
    ({"tags": {"$contains": "a"}}, True),
    ({"tags": {"$contains": 3.0}}, True),
    ({"tags": {"$contains": [1, 2]}}, True),
    ({"tags": {"$contains": {"k": 1}}}, True),
    ({"tags": {"$contains": "c"}}, False),
    ({"age": {"$contains": 3}}, False),
    ({"missing": {"$contains": 3}}, False),
    ({"email": {"$startswith": "ann@"}}, True),
    ({"email": {"$endswith": ".com"}}, True),
    ({"email": {"$endswith": ".org"}}, False),
    ({"age": {"$startswith": "3"}}, False),
    ({"email": {"$regex": r"@example\.(com|org)$"}}, True),
    ({"email": {"$regex": re.compile("^ANN", re.I)}}, True),
    ({"email": {"$regex": "^nn"}}, False),
    ({"age": {"$regex": "3"}}, False),
    ({"nothing": {"$exists": True}}, True),
    ({"missing": {"$exists": True}}, False),
    ({"missing": {"$exists": False}}, True),
    ({"age": {"$not": {"$gt": 40}}}, True),
    ({"age": {"$not": {"$gt": 18}}}, False),
    ({"missing": {"$not": {"$gt": 18}}}, True),
    ({"age": {"$not": {"$gt": 18, "$lt": 20}}}, True),
    ({"$and": [{"age": 30}, {"name": "Ann"}]}, True),
    ({"$and": [{"age": 30}, {"name": "Bob"}]}, False),
    ({"$or": [{"age": 31}, {"name": "Ann"}]}, True),
    ({"$or": [{"age": 31}, {"name": "Bob"}]}, False),
    ({"$or": [{}, {"name": "Bob"}]}, True),
    ({"$not": {"name": "Bob"}}, True),
    ({"$not": {"name": "Ann", "age": 30}}, False),
    ({"$not": {}}, False),
    ({"name": "Ann", "$or": [{"age": {"$lt": 18}}, {"admin": True}]}, True),
    ({"$or": [{"$and": [{"age": 30}, {"missing": {"$exists": True}}]}, {"score": 7.5}]}, True),
]


@pytest.mark.parametrize(("where", "expected"), FILTER_CASES)
def test_filter_semantics(core: ModuleType, where: dict[str, Any], expected: bool) -> None:
    compiled = core.compile_filter(where)
    assert compiled.match(DOC) is expected
    assert compiled.filter([DOC, DOC]) == ([0, 1] if expected else [])
    assert compiled.where is where


def test_filter_nan_and_odd_values(core: ModuleType) -> None:
    nan = float("nan")
    doc = {"x": nan, "b": b"raw", "t": (1, 2)}
    assert not core.compile_filter({"x": nan}).match(doc)
    assert not core.compile_filter({"x": {"$in": [nan]}}).match(doc)
    assert not core.compile_filter({"x": {"$gt": 0}}).match(doc)
    assert core.compile_filter({"x": {"$ne": nan}}).match(doc)
    assert core.compile_filter({"b": b"raw"}).match(doc)
    assert core.compile_filter({"b": {"$in": [b"raw"]}}).match(doc)
    assert not core.compile_filter({"b": {"$gt": 1}}).match(doc)
    assert core.compile_filter({"t": [1, 2]}).match(doc)
    assert core.compile_filter({"t": {"$contains": 2}}).match(doc)
    assert core.compile_filter({"x": {"$gt": -1e309}}).match({"x": 10**400})


def test_filter_non_dict_values(core: ModuleType) -> None:
    compiled = core.compile_filter({"a": None})
    assert compiled.filter([None, 5, "a", [1], {"a": None}, {}]) == [4, 5]
    assert not core.compile_filter({"$not": {"a": 1}}).match(5)
    empty = core.compile_filter({})
    assert empty.filter([None, 5, {"a": 1}]) == [0, 1, 2]
    assert empty.fields == frozenset()


def test_filter_fields(core: ModuleType) -> None:
    compiled = core.compile_filter(
        {
            "address.city": "Oslo",
            "age": {"$gt": 1},
            "$or": [{"name": "a"}, {"$and": [{"tags.0": 1}]}],
            "$not": {"email": {"$exists": True}},
        }
    )
    assert compiled.fields == frozenset({"address", "age", "name", "tags", "email"})
    assert isinstance(compiled.fields, frozenset)
    assert repr(core.compile_filter({"a": 1})) == "Filter({'a': 1})"


FILTER_ERRORS = [
    ({"a": {"$foo": 1}}, "invalid filter at 'a.$foo': unknown operator '$foo'"),
    ({"$foo": 1}, "invalid filter at '$foo': unknown operator '$foo'"),
    ({"$gt": 1}, "invalid filter at '$gt': $gt needs a field, as in {'field': {'$gt': ...}}"),
    ({"a": {"$in": 5}}, "invalid filter at 'a.$in': $in needs a list, got int"),
    ({"a": {"$nin": "ab"}}, "invalid filter at 'a.$nin': $nin needs a list, got str"),
    ({"a": {"$gt": None}}, "invalid filter at 'a.$gt': $gt needs a number or a string, got NoneType"),
    ({"a": {"$lte": True}}, "invalid filter at 'a.$lte': $lte needs a number or a string, got bool"),
    ({"a": {"$lt": [1]}}, "invalid filter at 'a.$lt': $lt needs a number or a string, got list"),
    ({"a": {"$startswith": 1}}, "invalid filter at 'a.$startswith': $startswith needs a string, got int"),
    ({"a": {"$endswith": None}}, "invalid filter at 'a.$endswith': $endswith needs a string, got NoneType"),
    ({"a": {"$regex": 5}}, "invalid filter at 'a.$regex': $regex needs a string, got int"),
    (
        {"a": {"$regex": re.compile(b"x")}},
        "invalid filter at 'a.$regex': $regex needs a str pattern, got a bytes pattern",
    ),
    ({"a": {"$exists": 1}}, "invalid filter at 'a.$exists': $exists needs True or False, got int"),
    ({"a": {"$not": 5}}, "invalid filter at 'a.$not': $not on a field needs an operator dict such as {'$gt': 5}"),
    (
        {"a": {"$not": {"b": 1}}},
        "invalid filter at 'a.$not': $not on a field needs an operator dict such as {'$gt': 5}",
    ),
    ({"a": {"$not": {"$gt": None}}}, "invalid filter at 'a.$not.$gt': $gt needs a number or a string, got NoneType"),
    ({"a": {"$or": [{"$gt": 1}]}}, "invalid filter at 'a.$or': $or is only allowed at the top level of a filter"),
    ({"a": {"$gt": 1, "b": 2}}, "invalid filter at 'a.b': 'b' mixes a field name with operators"),
    ({"a": {1: 2, "$gt": 1}}, "invalid filter at 'a': 1 mixes a field name with operators"),
    ({"$and": []}, "invalid filter at '$and': $and needs a non-empty list of filters"),
    ({"$or": {"a": 1}}, "invalid filter at '$or': $or needs a non-empty list of filters"),
    ({"$and": [{"a": 1}, 5]}, "invalid filter at '$and[1]': expected a dict, got int"),
    ({"$or": [{"$and": [{"a": {"$in": 1}}]}]}, "invalid filter at '$or[0].$and[0].a.$in': $in needs a list, got int"),
    ({"$not": [1]}, "invalid filter at '$not': expected a dict, got list"),
    ({"$not": {"a": {"$exists": "yes"}}}, "invalid filter at '$not.a.$exists': $exists needs True or False, got str"),
    ({"a..b": 1}, "invalid filter at 'a..b': empty segment in field path"),
    ({".a": 1}, "invalid filter at '.a': empty segment in field path"),
    ({1: 2}, "invalid filter: field names must be str, got 1"),
]


@pytest.mark.parametrize(("where", "message"), FILTER_ERRORS)
def test_filter_errors(core: ModuleType, where: dict[Any, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        core.compile_filter(where)
    assert str(info.value) == message


def test_filter_bad_regex(core: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"invalid filter at 'a.\$regex': bad regular expression '\('"):
        core.compile_filter({"a": {"$regex": "("}})


def test_filter_needs_a_dict(core: ModuleType) -> None:
    with pytest.raises(TypeError, match="where must be a dict, not list"):
        core.compile_filter([("a", 1)])


def test_filter_operands_are_captured_at_compile_time(core: ModuleType) -> None:
    members = [1, 2]
    compiled = core.compile_filter({"a": {"$in": members}})
    members.append(3)
    assert not compiled.match({"a": 3})


def nested_list(depth: int) -> list[Any]:
    outer: list[Any] = [1]
    inner = outer
    for _ in range(depth):
        inner.append([1])
        inner = inner[1]
    return outer


def test_deeply_nested_values_and_filters(core: ModuleType) -> None:
    assert core.compile_filter({"a": nested_list(200)}).match({"a": nested_list(200)})
    assert core.compile_filter({"a": {"$contains": nested_list(200)}}).match({"a": [nested_list(200)]})
    for where in ({"a": nested_list(10_000)}, {"a": {"$in": [nested_list(10_000)]}}):
        with pytest.raises(RecursionError, match="nested more than 256 levels"):
            core.compile_filter(where).match({"a": nested_list(10_000)})
    where: dict[str, Any] = {"a": 1}
    for _ in range(64):
        where = {"$not": where}
    assert core.compile_filter(where).match({"a": 1})
    with pytest.raises(ValueError, match="filter nested more than 64 levels deep"):
        core.compile_filter({"$or": [where]})
    field: dict[str, Any] = {"$gt": 1}
    for _ in range(10_000):
        field = {"$not": field}
    with pytest.raises(ValueError, match="filter nested more than 64 levels deep"):
        core.compile_filter({"a": field})


def test_compiled_objects_pickle(core: ModuleType) -> None:
    import pickle

    pattern = pickle.loads(pickle.dumps(core.compile_pattern("user:*", "/")))
    assert (pattern.pattern, pattern.sep, pattern.filter) == ("user:*", "/", ">")
    assert pattern.match("user:1")
    where = {"a": {"$in": [1, 2]}}
    compiled = pickle.loads(pickle.dumps(core.compile_filter(where)))
    assert compiled.where == where
    assert compiled.match({"a": 2})


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.0, 1.0, 2.5, -1.5, float("nan"), float("inf")]),
    st.sampled_from(["", "a", "ab", "b", "A", "1"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3)
    ),
    max_leaves=6,
)
DOCS = st.one_of(st.dictionaries(st.sampled_from(["a", "b", "c"]), JSON_VALUES, max_size=3), JSON_SCALARS)
FIELDS = st.sampled_from(["a", "b", "c", "a.b", "a.c", "b.a.c"])
OPERATORS = st.one_of(
    st.tuples(st.sampled_from(["$eq", "$ne", "$contains"]), JSON_VALUES),
    st.tuples(
        st.sampled_from(["$gt", "$gte", "$lt", "$lte"]),
        st.one_of(st.integers(-3, 3), st.floats(-3, 3), st.sampled_from(["", "a", "b"])),
    ),
    st.tuples(st.sampled_from(["$in", "$nin"]), st.lists(JSON_VALUES, max_size=4)),
    st.tuples(st.sampled_from(["$startswith", "$endswith", "$regex"]), st.sampled_from(["", "a", "b", "^a", "b$"])),
    st.tuples(st.just("$exists"), st.booleans()),
)
OPERATOR_DICTS = st.lists(OPERATORS, min_size=1, max_size=2).map(dict)
FIELD_SPECS = st.one_of(
    JSON_VALUES,
    OPERATOR_DICTS,
    OPERATOR_DICTS.map(lambda ops: {"$not": ops}),
)


def _filters(leaf: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda subs: {"$and": subs}),
            st.lists(inner, min_size=1, max_size=3).map(lambda subs: {"$or": subs}),
            inner.map(lambda sub: {"$not": sub}),
        ),
        max_leaves=4,
    )


FILTERS = _filters(st.dictionaries(FIELDS, FIELD_SPECS, max_size=2))


@settings(max_examples=300)
@given(where=FILTERS, docs=st.lists(DOCS, max_size=5))
@pytest.mark.slow
def test_filter_parity(c_core: ModuleType, py_core: ModuleType, where: dict[str, Any], docs: list[Any]) -> None:
    def describe(module: ModuleType) -> Any:
        compiled = module.compile_filter(where)
        return compiled.fields, [compiled.match(doc) for doc in docs], compiled.filter(docs)

    assert outcome(describe, c_core) == outcome(describe, py_core)


@given(
    where=st.dictionaries(
        st.one_of(FIELDS, st.sampled_from(["$and", "$or", "$not", "$gt", "$nope", "a..b"])),
        st.one_of(
            JSON_VALUES,
            st.dictionaries(st.sampled_from(["$gt", "$in", "$not", "$regex", "$exists", "x"]), JSON_VALUES, max_size=2),
        ),
        max_size=2,
    )
)
def test_filter_error_parity(c_core: ModuleType, py_core: ModuleType, where: dict[str, Any]) -> None:
    def describe(module: ModuleType) -> Any:
        compiled = module.compile_filter(where)
        return compiled.fields, compiled.match({"a": 1, "b": {"c": "x"}})

    assert outcome(describe, c_core) == outcome(describe, py_core)


# ---------------------------------------------------------------------------------------------
# The selector
# ---------------------------------------------------------------------------------------------


def run_selector(impl: str | None, prelude: str = "") -> subprocess.CompletedProcess[str]:
    # The child must import the same natskv as this test run: the installed wheel (cibuildwheel)
    # or the source tree with its in-place build.
    import natskv

    natskv_root = str(Path(natskv.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if k != "NATSKV_IMPL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [natskv_root, env.get("PYTHONPATH")]))
    if impl is not None:
        env["NATSKV_IMPL"] = impl
    code = f"{prelude}\nfrom natskv import _speedups\nprint(_speedups.__impl__, _speedups.core.__name__)"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=natskv_root, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("impl", "expected"),
    [
        ("c", "c natskv._core"),
        ("python", "python natskv._core_py"),
        (None, "c natskv._core"),
        ("", "c natskv._core"),
        (" C ", "c natskv._core"),
    ],
)
def test_selector_choices(impl: str | None, expected: str) -> None:
    result = run_selector(impl)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_selector_rejects_unknown_values() -> None:
    result = run_selector("bogus")
    assert result.returncode != 0
    assert "ImportError: NATSKV_IMPL='bogus' is not valid" in result.stderr
    assert "'c'" in result.stderr and "'python'" in result.stderr


BLOCK_COMPILED = "import sys; sys.modules['natskv._core'] = None"


def test_selector_explicit_c_without_the_extension_fails_loudly() -> None:
    result = run_selector("c", BLOCK_COMPILED)
    assert result.returncode != 0
    assert "NATSKV_IMPL=c but the compiled core natskv._core could not be imported" in result.stderr
    assert "NATSKV_IMPL=python" in result.stderr


def test_selector_default_falls_back_to_pure_python() -> None:
    result = run_selector(None, BLOCK_COMPILED)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "python natskv._core_py"

