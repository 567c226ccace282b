# cython: language_level=3, freethreading_compatible = True
# cython: boundscheck=False, wraparound=False, cdivision=True
"""The compiled core of natskv: the same API and behaviour as ``natskv._core_py``.

``natskv._core_py`` is the documented reference; this module mirrors it name for name, including
exception types and messages, and exists only to be fast: key coding and glob matching are C
loops over the string's own buffer (Py_UCS1/2/4), and a filter is a tree of cdef nodes whose
operators are resolved once, at compile time. No I/O, no NATS, no asyncio. Every object here but
the indexes (SortedIndex, UniqueIndex: mutable, their owner serializes access) is immutable once
built, so it is safe to share between threads (also on free-threaded Python). Import it through
``natskv._speedups``.
"""

import re
import uuid

from natskv._regex import compile_linear

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Copy, PyDict_GetItem, PyDict_Next, PyDict_SetItem
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport Py_EQ, Py_GE, Py_GT, Py_LE, Py_LT, PyObject, PyObject_RichCompareBool
from cpython.object cimport PyTypeObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_SET_ITEM
from cpython.unicode cimport (
    Py_UCS1,
    Py_UCS2,
    PyUnicode_1BYTE_DATA,
    PyUnicode_1BYTE_KIND,
    PyUnicode_2BYTE_KIND,
    PyUnicode_4BYTE_KIND,
    PyUnicode_Compare,
    PyUnicode_DATA,
    PyUnicode_DecodeUTF8,
    PyUnicode_FromKindAndData,
    PyUnicode_FromOrdinal,
    PyUnicode_KIND,
    PyUnicode_New,
)
from libc.string cimport memchr, memcmp, memcpy

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

ctypedef fused uchar:
    Py_UCS1
    Py_UCS2
    Py_UCS4

cdef enum:
    CH_TAB = 9
    CH_LF = 10
    CH_CR = 13
    CH_SPACE = 32
    CH_DOT = 46
    CH_COLON = 58
    CH_EQ = 61
    NO_SEP = 0x110000          # not a code point: "no hierarchy separator"
    STACK_CHARS = 256          # keys up to this length are decoded without a heap buffer
    STACK_RAW = 86             # STACK_CHARS // 3 + 1: escaped bytes of such a key

# Characters a key token keeps literally ([A-Za-z0-9_/-]) and the value of each uppercase hex digit.
cdef unsigned char _LIT[128]
cdef signed char _HEXVAL[128]
cdef const char* _HEX = b"0123456789ABCDEF"


cdef void _init_tables() noexcept:
    cdef int c
    for c in range(128):
        _LIT[c] = (
            (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c == 95 or c == 47 or c == 45
        )
        if 48 <= c <= 57:
            _HEXVAL[c] = c - 48
        elif 65 <= c <= 70:
            _HEXVAL[c] = c - 55
        else:
            _HEXVAL[c] = -1


_init_tables()


cdef inline bint _is_lit(Py_UCS4 c) noexcept nogil:
    return c < 128 and _LIT[c]


cdef long _sep_char(object sep) except -2:
    """The separator as a code point, NO_SEP for ""; validates like _check_sep."""
    if not isinstance(sep, str):
        raise TypeError(f"sep must be str, not {type(sep).__name__}")
    cdef Py_ssize_t n = len(<str>sep)
    if n == 0:
        return NO_SEP
    if n > 1:
        raise ValueError(f"sep must be a single character or '', not {sep!r}")
    return <long>(<str>sep)[0]


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

cdef Py_ssize_t _encoded_len(const uchar* s, Py_ssize_t n, Py_UCS4 sep) noexcept nogil:
    """Length of the encoding, or -1 - i when s[i] is a lone surrogate."""
    cdef Py_ssize_t i, total = 0
    cdef bint empty = True
    cdef unsigned int c
    for i in range(n):
        c = s[i]
        if c == sep:
            total += 2 if empty else 1
            empty = True
            continue
        empty = False
        if c < 128:
            total += 1 if _LIT[c] else 3
        elif c < 0x800:
            total += 6
        elif c < 0x10000:
            if 0xD800 <= c <= 0xDFFF:
                return -1 - i
            total += 9
        else:
            total += 12
    if empty:
        total += 1
    return total


cdef inline Py_ssize_t _put_escape(Py_UCS1* out, Py_ssize_t o, unsigned int byte) noexcept nogil:
    out[o] = CH_EQ
    out[o + 1] = _HEX[byte >> 4]
    out[o + 2] = _HEX[byte & 15]
    return o + 3


cdef void _encode_into(const uchar* s, Py_ssize_t n, Py_UCS4 sep, Py_UCS1* out) noexcept nogil:
    cdef Py_ssize_t i, o = 0
    cdef bint empty = True
    cdef unsigned int c
    for i in range(n):
        c = s[i]
        if c == sep:
            if empty:
                out[o] = CH_EQ
                o += 1
            out[o] = CH_DOT
            o += 1
            empty = True
            continue
        empty = False
        if c < 128:
            if _LIT[c]:
                out[o] = <Py_UCS1>c
                o += 1
            else:
                o = _put_escape(out, o, c)
        elif c < 0x800:
            o = _put_escape(out, o, 0xC0 | (c >> 6))
            o = _put_escape(out, o, 0x80 | (c & 0x3F))
        elif c < 0x10000:
            o = _put_escape(out, o, 0xE0 | (c >> 12))
            o = _put_escape(out, o, 0x80 | ((c >> 6) & 0x3F))
            o = _put_escape(out, o, 0x80 | (c & 0x3F))
        else:
            o = _put_escape(out, o, 0xF0 | (c >> 18))
            o = _put_escape(out, o, 0x80 | ((c >> 12) & 0x3F))
            o = _put_escape(out, o, 0x80 | ((c >> 6) & 0x3F))
            o = _put_escape(out, o, 0x80 | (c & 0x3F))
    if empty:
        out[o] = CH_EQ


cdef str _encode(object key, Py_UCS4 sep):
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")
    cdef Py_ssize_t n = len(<str>key)
    cdef unsigned int kind = PyUnicode_KIND(key)
    cdef void* data = PyUnicode_DATA(key)
    cdef Py_ssize_t total
    if kind == PyUnicode_1BYTE_KIND:
        total = _encoded_len(<const Py_UCS1*>data, n, sep)
    elif kind == PyUnicode_2BYTE_KIND:
        total = _encoded_len(<const Py_UCS2*>data, n, sep)
    else:
        total = _encoded_len(<const Py_UCS4*>data, n, sep)
    if total < 0:
        position = -1 - total
        raise ValueError(
            f"key has a lone surrogate {key[position]!r} at position {position}, which UTF-8 cannot"
            " encode; keys must be valid Unicode text"
        )
    cdef str out = PyUnicode_New(total, 127)
    cdef Py_UCS1* buf = PyUnicode_1BYTE_DATA(out)
    if kind == PyUnicode_1BYTE_KIND:
        _encode_into(<const Py_UCS1*>data, n, sep, buf)
    elif kind == PyUnicode_2BYTE_KIND:
        _encode_into(<const Py_UCS2*>data, n, sep, buf)
    else:
        _encode_into(<const Py_UCS4*>data, n, sep, buf)
    return out


cdef enum DecodeError:
    E_EMPTY = 1
    E_MALFORMED
    E_UTF8
    E_ESCAPED_SEP
    E_ESCAPED_LITERAL
    E_SEP_IN_TOKEN
    E_INVALID


cdef struct DecodeFailure:
    int code
    Py_ssize_t pos
    Py_UCS4 ch


cdef inline Py_ssize_t _fail(
    DecodeFailure* err, int code, Py_ssize_t pos, Py_UCS4 ch
) noexcept nogil:
    err.code = code
    err.pos = pos
    err.ch = ch
    return -1


cdef inline bint _is_hex(Py_UCS4 c) noexcept nogil:
    return c < 128 and _HEXVAL[c] >= 0


cdef Py_ssize_t _decode_into(
    const uchar* s, Py_ssize_t n, Py_UCS4 sep, Py_UCS4* out, unsigned char* raw, DecodeFailure* err
) noexcept nogil:
    """Decode s into out (capacity n); raw is scratch space for n // 3 + 1 bytes.

    Returns the decoded length, or -1 with *err set. The checks run in the same order as
    _core_py's: escape syntax of a whole run of escapes first, then its UTF-8, character by
    character, each decoded character being validated before the next one is decoded.
    """
    cdef Py_ssize_t i = 0, o = 0, start, m, k, need, t
    cdef bint has_sep = sep != NO_SEP
    cdef bint token_empty = True
    cdef unsigned int c, cp, b0, lo, hi, b
    while i < n:
        c = s[i]
        if c == CH_DOT and has_sep:
            if token_empty:
                return _fail(err, E_EMPTY, i, 0)
            out[o] = sep
            o += 1
            token_empty = True
            i += 1
            continue
        if c == CH_EQ:
            if token_empty and (i + 1 == n or (has_sep and s[i + 1] == CH_DOT)):
                token_empty = False  # a lone "=" is the empty token
                i += 1
                continue
            token_empty = False
            start = i
            m = 0
            while i < n and s[i] == CH_EQ:
                if i + 2 >= n or not _is_hex(s[i + 1]) or not _is_hex(s[i + 2]):
                    return _fail(err, E_MALFORMED, i, 0)
                raw[m] = <unsigned char>(_HEXVAL[s[i + 1]] * 16 + _HEXVAL[s[i + 2]])
                m += 1
                i += 3
            k = 0
            while k < m:
                b0 = raw[k]
                lo = 0x80
                hi = 0xBF
                if b0 < 0x80:
                    need = 0
                    cp = b0
                elif 0xC2 <= b0 <= 0xDF:
                    need = 1
                    cp = b0 & 0x1F
                elif 0xE0 <= b0 <= 0xEF:
                    need = 2
                    cp = b0 & 0x0F
                    if b0 == 0xE0:
                        lo = 0xA0
                    elif b0 == 0xED:
                        hi = 0x9F
                elif 0xF0 <= b0 <= 0xF4:
                    need = 3
                    cp = b0 & 0x07
                    if b0 == 0xF0:
                        lo = 0x90
                    elif b0 == 0xF4:
                        hi = 0x8F
                else:
                    return _fail(err, E_UTF8, start + 3 * k, 0)
                if k + need >= m:
                    return _fail(err, E_UTF8, start + 3 * k, 0)
                for t in range(1, need + 1):
                    b = raw[k + t]
                    if t == 1:
                        if b < lo or b > hi:
                            return _fail(err, E_UTF8, start + 3 * k, 0)
                    elif b < 0x80 or b > 0xBF:
                        return _fail(err, E_UTF8, start + 3 * k, 0)
                    cp = (cp << 6) | (b & 0x3F)
                if cp == sep:
                    return _fail(err, E_ESCAPED_SEP, start + 3 * k, cp)
                if _is_lit(cp):
                    return _fail(err, E_ESCAPED_LITERAL, start + 3 * k, cp)
                out[o] = cp
                o += 1
                k += need + 1
            continue
        token_empty = False
        if c == sep:
            return _fail(err, E_SEP_IN_TOKEN, i, c)
        if not _is_lit(c):
            return _fail(err, E_INVALID, i, c)
        out[o] = c
        o += 1
        i += 1
    if token_empty:
        return _fail(err, E_EMPTY, n, 0)
    return o


cdef Py_ssize_t _decode_buffer(
    str encoded, Py_ssize_t start, Py_UCS4 sep, Py_UCS4* out, unsigned char* raw, DecodeFailure* err
) noexcept:
    """Decode encoded[start:] (start <= len(encoded)) into out; see _decode_into."""
    cdef Py_ssize_t n = len(encoded) - start
    cdef unsigned int kind = PyUnicode_KIND(encoded)
    cdef char* data = <char*>PyUnicode_DATA(encoded) + start * kind
    if kind == PyUnicode_1BYTE_KIND:
        return _decode_into(<const Py_UCS1*>data, n, sep, out, raw, err)
    if kind == PyUnicode_2BYTE_KIND:
        return _decode_into(<const Py_UCS2*>data, n, sep, out, raw, err)
    return _decode_into(<const Py_UCS4*>data, n, sep, out, raw, err)


cdef object _decode_error(str encoded, DecodeFailure* err, Py_UCS4 sep):
    cdef Py_ssize_t pos = err.pos
    cdef Py_ssize_t end
    cdef str reason
    if err.code == E_EMPTY:
        reason = "empty token"
    elif err.code == E_MALFORMED:
        end = min(pos + 3, len(encoded))
        if sep != NO_SEP:
            dot = encoded.find(".", pos, end)
            if dot >= 0:
                end = dot
        reason = f"malformed escape {encoded[pos:end]!r}"
    elif err.code == E_UTF8:
        reason = "invalid UTF-8 in escapes"
    elif err.code == E_ESCAPED_SEP:
        reason = f"escaped separator {chr(err.ch)!r}"
    elif err.code == E_ESCAPED_LITERAL:
        reason = f"escaped character {chr(err.ch)!r} must be written literally"
    elif err.code == E_SEP_IN_TOKEN:
        reason = f"separator character {chr(err.ch)!r} inside a token"
    else:
        reason = f"invalid character {chr(err.ch)!r}"
    return ValueError(f"invalid encoded key {encoded!r}: {reason} at position {pos}")


cdef str _decode(object encoded, Py_UCS4 sep, Py_ssize_t start=0):
    """Decode encoded[start:]; start > len(encoded) decodes "" like a slice would."""
    if not isinstance(encoded, str):
        raise TypeError(f"encoded key must be str, not {type(encoded).__name__}")
    cdef Py_ssize_t n = len(<str>encoded)
    if start > n:
        start = n
    n -= start
    cdef Py_UCS4 out_stack[STACK_CHARS]
    cdef unsigned char raw_stack[STACK_RAW]
    cdef Py_UCS4* out = out_stack
    cdef unsigned char* raw = raw_stack
    cdef DecodeFailure err
    cdef Py_ssize_t length
    if n > STACK_CHARS:
        out = <Py_UCS4*>PyMem_Malloc(n * sizeof(Py_UCS4) + n // 3 + 1)
        if out == NULL:
            raise MemoryError()
        raw = <unsigned char*>(out + n)
    try:
        length = _decode_buffer(<str>encoded, start, sep, out, raw, &err)
        if length < 0:
            raise _decode_error((<str>encoded)[start:], &err, sep)
        return PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, out, length)
    finally:
        if out != out_stack:
            PyMem_Free(out)


def encode_key(key, sep=":"):
    """Encode any str into a NATS KV key, reversibly. See natskv._core_py.encode_key."""
    return _encode(key, <Py_UCS4>_sep_char(sep))


def decode_key(encoded, sep=":"):
    """Decode a key produced by encode_key (strictly). See natskv._core_py.decode_key."""
    return _decode(encoded, <Py_UCS4>_sep_char(sep))


def encode_keys(keys, sep=":"):
    """[encode_key(k, sep) for k in keys] in one call."""
    cdef Py_UCS4 c_sep = <Py_UCS4>_sep_char(sep)
    return [_encode(key, c_sep) for key in keys]


def decode_keys(encoded, sep=":"):
    """[decode_key(e, sep) for e in encoded] in one call."""
    cdef Py_UCS4 c_sep = <Py_UCS4>_sep_char(sep)
    return [_decode(item, c_sep) for item in encoded]


def decode_subjects(subjects, Py_ssize_t prefix_len, sep=":"):
    """Decode s[prefix_len:] of each subject. See natskv._core_py.decode_subjects."""
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, not {prefix_len}")
    cdef Py_UCS4 c_sep = <Py_UCS4>_sep_char(sep)
    return [_decode(subject, c_sep, prefix_len) for subject in subjects]


# ---------------------------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------------------------

_STAR = ("star",)
_ONE = ("one",)


def _bad_pattern(pattern, reason, position):
    return ValueError(f"invalid pattern {pattern!r}: {reason} at position {position}")


def _parse_class(str pattern, Py_ssize_t start):
    cdef Py_ssize_t n = len(pattern)
    cdef Py_ssize_t j = start + 1
    negated = j < n and pattern[j] in "^!"
    if negated:
        j += 1
    ranges = []
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


def _parse_glob(str pattern):
    elements = []
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if not elements or elements[len(elements) - 1] is not _STAR:
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


def _glob_filter(elements, str sep):
    current = []
    tokens = [current]
    for element in elements:
        if sep and element == ("lit", sep):
            current = []
            tokens.append(current)
        else:
            current.append(element)
    literal = []
    for token in tokens:
        if any(element[0] != "lit" for element in token):
            break
        literal.append("".join(element[1] for element in token))
    if len(literal) == len(tokens):
        return encode_key(sep.join(literal), sep), True
    rest = tokens[len(literal):]
    exact = len(rest) == 1 and rest[0] == [_STAR]
    return ".".join([encode_key(token, "") for token in literal] + [">"]), exact


cdef enum GlobOp:
    G_LIT
    G_ONE
    G_STAR
    G_CLASS
    G_NCLASS


cdef struct GOp:
    int op
    Py_UCS4 ch          # G_LIT: the character
    Py_ssize_t first    # G_CLASS / G_NCLASS: ranges[first:last] holds (low, high) pairs
    Py_ssize_t last


cdef inline bint _op_match(const GOp* op, const Py_UCS4* ranges, Py_UCS4 c) noexcept nogil:
    if op.op == G_LIT:
        return c == op.ch
    if op.op == G_ONE:
        return True
    cdef Py_ssize_t r = op.first
    cdef bint found = False
    while r < op.last:
        if ranges[r] <= c <= ranges[r + 1]:
            found = True
            break
        r += 2
    return found != (op.op == G_NCLASS)


cdef bint _glob(
    const GOp* ops, Py_ssize_t m, const Py_UCS4* ranges, const uchar* s, Py_ssize_t n
) noexcept nogil:
    """Match s against the program: greedy stars, backtracking to the most recent star only.

    Every element but a star consumes exactly one character, so retrying from the last star is
    enough to find a match when there is one; the worst case is O(len(s) * len(ops)).
    """
    cdef Py_ssize_t pi = 0, si = 0, star_pi = -1, star_si = 0
    cdef const GOp* op
    while si < n:
        if pi < m:
            op = &ops[pi]
            if op.op == G_STAR:
                if pi + 1 == m:
                    return True
                star_pi = pi
                star_si = si
                pi += 1
                continue
            if _op_match(op, ranges, s[si]):
                pi += 1
                si += 1
                continue
        if star_pi < 0:
            return False
        pi = star_pi + 1
        star_si += 1
        si = star_si
    while pi < m and ops[pi].op == G_STAR:
        pi += 1
    return pi == m


cdef class Pattern:
    """A compiled key pattern: a matcher over decoded keys plus a NATS subject filter.

    See natskv._core_py.Pattern. Attributes: pattern, sep, filter, exact (read-only).
    """

    cdef readonly object pattern
    cdef readonly str sep
    cdef readonly str filter
    cdef readonly bint exact
    cdef object _search         # LinearRegex.matches for a regex pattern, else None
    cdef Py_UCS4 _sep
    cdef GOp* _ops
    cdef Py_ssize_t _nops
    cdef Py_UCS4* _ranges
    cdef Py_ssize_t _min_len    # characters a match needs at least (elements but stars)
    cdef bint _has_star

    def __cinit__(self, pattern, sep=":"):
        self._sep = <Py_UCS4>_sep_char(sep)
        self.sep = sep
        self.pattern = pattern
        if isinstance(pattern, re.Pattern):
            if not isinstance(pattern.pattern, str):
                raise TypeError("a bytes regular expression cannot match str keys; use a str one")
            self._search = compile_linear(pattern).matches
            self.filter = ">"
            self.exact = False
            return
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be str or re.Pattern, not {type(pattern).__name__}")
        elements = _parse_glob(pattern)
        self.filter, self.exact = _glob_filter(elements, sep)
        self._compile(elements)

    cdef _compile(self, list elements):
        cdef Py_ssize_t nranges = 0, i, r = 0
        for element in elements:
            if element[0] == "class":
                nranges += 2 * len(element[2])
        self._ops = <GOp*>PyMem_Malloc((len(elements) + 1) * sizeof(GOp))
        self._ranges = <Py_UCS4*>PyMem_Malloc((nranges + 1) * sizeof(Py_UCS4))
        if self._ops == NULL or self._ranges == NULL:
            raise MemoryError()
        self._nops = len(elements)
        for i, element in enumerate(elements):
            kind = element[0]
            self._ops[i].ch = 0
            self._ops[i].first = 0
            self._ops[i].last = 0
            if kind == "lit":
                self._ops[i].op = G_LIT
                self._ops[i].ch = ord(element[1])
            elif kind == "one":
                self._ops[i].op = G_ONE
            elif kind == "star":
                self._ops[i].op = G_STAR
                self._has_star = True
            else:
                self._ops[i].op = G_NCLASS if element[1] else G_CLASS
                self._ops[i].first = r
                for low, high in element[2]:
                    self._ranges[r] = ord(low)
                    self._ranges[r + 1] = ord(high)
                    r += 2
                self._ops[i].last = r
            if kind != "star":
                self._min_len += 1

    def __dealloc__(self):
        PyMem_Free(self._ops)
        PyMem_Free(self._ranges)

    def __repr__(self):
        return f"Pattern({self.pattern!r}, filter={self.filter!r}, exact={self.exact})"

    def __reduce__(self):
        return compile_pattern, (self.pattern, self.sep)

    cdef inline bint _match_chars(self, unsigned int kind, const void* data, Py_ssize_t n) noexcept:
        if n < self._min_len or (not self._has_star and n != self._min_len):
            return False
        if kind == PyUnicode_1BYTE_KIND:
            return _glob(self._ops, self._nops, self._ranges, <const Py_UCS1*>data, n)
        if kind == PyUnicode_2BYTE_KIND:
            return _glob(self._ops, self._nops, self._ranges, <const Py_UCS2*>data, n)
        return _glob(self._ops, self._nops, self._ranges, <const Py_UCS4*>data, n)

    cdef bint _match(self, object key) except -1:
        if not isinstance(key, str):
            raise TypeError(f"key must be str, not {type(key).__name__}")
        if self._search is not None:
            return self._search(key)
        return self._match_chars(PyUnicode_KIND(key), PyUnicode_DATA(key), len(<str>key))

    def match(self, key):
        """True if the decoded key matches. Raises TypeError for a non-str key."""
        return self._match(key)

    def match_encoded(self, encoded):
        """True if the encoded key matches; False if it is not a valid encoded key."""
        if not isinstance(encoded, str):
            raise TypeError(f"encoded key must be str, not {type(encoded).__name__}")
        cdef Py_ssize_t n = len(<str>encoded)
        cdef Py_UCS4 out_stack[STACK_CHARS]
        cdef unsigned char raw_stack[STACK_RAW]
        cdef Py_UCS4* out = out_stack
        cdef unsigned char* raw = raw_stack
        cdef DecodeFailure err
        cdef Py_ssize_t length
        if n > STACK_CHARS:
            out = <Py_UCS4*>PyMem_Malloc(n * sizeof(Py_UCS4) + n // 3 + 1)
            if out == NULL:
                raise MemoryError()
            raw = <unsigned char*>(out + n)
        try:
            length = _decode_buffer(<str>encoded, 0, self._sep, out, raw, &err)
            if length < 0:
                return False
            if self._search is not None:
                key = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, out, length)
                return self._search(key)
            return self._match_chars(PyUnicode_4BYTE_KIND, out, length)
        finally:
            if out != out_stack:
                PyMem_Free(out)

    def filter_keys(self, keys):
        """The keys (decoded) that match, in order. Raises TypeError for a non-str key."""
        cdef list result = []
        for key in keys:
            if self._match(key):
                result.append(key)
        return result


def compile_pattern(pattern, sep=":"):
    """Compile a Redis KEYS-style glob or a re.Pattern. See natskv._core_py.compile_pattern."""
    return Pattern(pattern, sep)


# ---------------------------------------------------------------------------------------------
# Protocol helpers
# ---------------------------------------------------------------------------------------------

cdef inline bint _is_ws(unsigned char c) noexcept nogil:
    return c == CH_SPACE or c == CH_TAB or c == CH_LF or c == CH_CR or c == 11 or c == 12


cdef inline str _text(const char* p, Py_ssize_t start, Py_ssize_t end):
    return PyUnicode_DecodeUTF8(<char*>p + start, end - start, b"replace")


cdef tuple _header_block(object raw, tuple names):
    # One pass over a header block. names None: (status, description, {name: value}); else
    # (status, description, (value of names[0] or None, ...)) without building the others.
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"raw must be bytes, not {type(raw).__name__}")
    cdef bytes data = raw if type(raw) is bytes else bytes(raw)
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n < 5 or memcmp(p, b"NATS/", 5) != 0:
        raise ValueError(f"not a NATS header block: {data[:32]!r}")
    cdef const char* nl = <const char*>memchr(p, CH_LF, n)
    cdef Py_ssize_t line_end = (nl - p) if nl != NULL else n
    cdef Py_ssize_t e = line_end, i = 0, code_start, code_end, status = 0, k
    cdef str description = ""
    while e > 0 and p[e - 1] == CH_CR:
        e -= 1
    while i < e and not _is_ws(p[i]):
        i += 1
    while i < e and _is_ws(p[i]):
        i += 1
    while e > i and _is_ws(p[e - 1]):
        e -= 1
    if i < e:
        code_start = i
        while i < e and not _is_ws(p[i]):
            if not (48 <= p[i] <= 57):
                first = data[:line_end].rstrip(b"\r")
                raise ValueError(f"malformed NATS status line: {first!r}")
            i += 1
        code_end = i
        if code_end - code_start <= 18:
            for k in range(code_start, code_end):
                status = status * 10 + (p[k] - 48)
            status_obj = status
        else:
            status_obj = int(data[code_start:code_end])
        while i < e and _is_ws(p[i]):
            i += 1
        if i < e:
            description = _text(p, i, e)
    else:
        status_obj = 0
    cdef dict headers = None
    cdef list values = None
    cdef Py_ssize_t wanted = 0, w
    cdef bytes name_b
    if names is None:
        headers = {}
    else:
        wanted = PyTuple_GET_SIZE(names)
        values = [None] * wanted
    cdef Py_ssize_t pos = line_end + 1, le, colon_at, ns, ne, vs, ve
    cdef const char* colon
    while nl != NULL and pos <= n:
        nl = <const char*>memchr(p + pos, CH_LF, n - pos)
        le = (nl - p) if nl != NULL else n
        e = le
        while e > pos and p[e - 1] == CH_CR:
            e -= 1
        if e == pos:
            break
        colon = <const char*>memchr(p + pos, CH_COLON, e - pos)
        if colon != NULL:
            colon_at = colon - p
            ns = pos
            ne = colon_at
            while ns < ne and _is_ws(p[ns]):
                ns += 1
            while ne > ns and _is_ws(p[ne - 1]):
                ne -= 1
            if ne > ns:
                vs = colon_at + 1
                ve = e
                while vs < ve and _is_ws(p[vs]):
                    vs += 1
                while ve > vs and _is_ws(p[ve - 1]):
                    ve -= 1
                if headers is not None:
                    headers[_text(p, ns, ne)] = _text(p, vs, ve)
                else:
                    for w in range(wanted):
                        name_b = <bytes>PyTuple_GET_ITEM(names, w)
                        if PyBytes_GET_SIZE(name_b) == ne - ns and memcmp(PyBytes_AS_STRING(name_b), p + ns, ne - ns) == 0:
                            values[w] = _text(p, vs, ve)  # a repeated name keeps its last value
                            break
        pos = le + 1
    if headers is not None:
        return status_obj, description, headers
    return status_obj, description, tuple(values)


def parse_headers(raw):
    """Parse a NATS header block. See natskv._core_py.parse_headers."""
    return _header_block(raw, None)


def parse_header_fields(raw, names):
    """The status, description and the values of some headers. See natskv._core_py.parse_header_fields."""
    if type(names) is not tuple:
        raise TypeError("names must be a tuple of bytes")
    for name in <tuple>names:
        if type(name) is not bytes:
            raise TypeError("names must be a tuple of bytes")
    for name in <tuple>names:
        if not (<bytes>name).isascii():
            raise ValueError(f"header names must be ASCII, not {name!r}")
    return _header_block(raw, <tuple>names)


cdef bint _has_any(str text, str chars):
    for ch in chars:
        if ch in text:
            return True
    return False


cdef bytes _check_token(str what, object value, bint allow_empty):
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if not allow_empty and len(<str>value) == 0:
        raise ValueError(f"{what} must not be empty")
    if _has_any(value, " \t\r\n"):
        raise ValueError(f"{what} {value!r} must not contain whitespace")
    return (<str>value).encode("utf-8")


cdef inline Py_ssize_t _put(char* buf, Py_ssize_t o, const char* src, Py_ssize_t k) noexcept nogil:
    memcpy(buf + o, src, k)
    return o + k


cdef inline Py_ssize_t _digits(Py_ssize_t v) noexcept nogil:
    cdef Py_ssize_t d = 1
    while v >= 10:
        v //= 10
        d += 1
    return d


cdef inline Py_ssize_t _put_int(char* buf, Py_ssize_t o, Py_ssize_t v) noexcept nogil:
    cdef Py_ssize_t d = _digits(v)
    cdef Py_ssize_t j = o + d
    while True:
        j -= 1
        buf[j] = <char>(48 + v % 10)
        v //= 10
        if v == 0:
            break
    return o + d


# See natskv._core_py.MAX_CONTROL_LINE.
MAX_CONTROL_LINE = 4096
cdef Py_ssize_t _MAX_LINE = MAX_CONTROL_LINE


def _line_too_long(Py_ssize_t length):
    return (
        f"subject and reply subject too long: the protocol line would be {length} bytes and nats-server "
        f"closes the connection beyond {MAX_CONTROL_LINE} (its max_control_line); use a shorter subject"
    )


cdef int _check_header(object name, object value) except -1:
    """Refuse a header NATS cannot carry: names and values are str, a name is non-empty without
    spaces, colons, tabs or line breaks, a value has no CR or LF."""
    if not isinstance(name, str) or not isinstance(value, str):
        raise TypeError(
            f"header names and values must be str, got {type(name).__name__}: "
            f"{type(value).__name__}"
        )
    if len(<str>name) == 0 or _has_any(name, " \t\r\n:"):
        raise ValueError(
            f"invalid header name {name!r}: it must be non-empty, without spaces, colons,"
            " tabs or line breaks"
        )
    if _has_any(value, "\r\n"):
        raise ValueError(f"invalid value for header {name!r}: it must not contain CR or LF")
    return 0


def pub_command(subject, reply, payload, headers):
    """Build a PUB or HPUB client protocol command. See natskv._core_py.pub_command."""
    cdef bytes subject_b = _check_token("subject", subject, False)
    cdef bytes reply_b = _check_token("reply", reply, True)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
    cdef bytes payload_b = payload if type(payload) is bytes else bytes(payload)
    if headers is not None and not isinstance(headers, dict):
        raise TypeError(f"headers must be a dict or None, not {type(headers).__name__}")
    cdef list parts = []
    cdef Py_ssize_t hdr_len = 0
    if headers:
        hdr_len = 12  # "NATS/1.0\r\n" and the closing "\r\n"
        for name, value in (<dict>headers).items():
            _check_header(name, value)
            name_b = (<str>name).encode("utf-8")
            value_b = (<str>value).encode("utf-8")
            parts.append(name_b)
            parts.append(value_b)
            hdr_len += len(<bytes>name_b) + len(<bytes>value_b) + 4
    cdef Py_ssize_t ns = len(subject_b), nr = len(reply_b), np = len(payload_b)
    cdef Py_ssize_t args = ns + (nr + 1 if nr else 0) + 1
    if hdr_len:
        args += _digits(hdr_len) + 1 + _digits(hdr_len + np)
    else:
        args += _digits(np)
    if args > _MAX_LINE:
        raise ValueError(_line_too_long(args))
    cdef Py_ssize_t total = ns + np + 2 + 2 + 1  # subject, payload, two CRLFs, one space
    if nr:
        total += nr + 1
    if hdr_len:
        total += 5 + _digits(hdr_len) + 1 + _digits(hdr_len + np) + hdr_len
    else:
        total += 4 + _digits(np)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* buf = PyBytes_AS_STRING(out)
    cdef Py_ssize_t o
    if hdr_len:
        o = _put(buf, 0, b"HPUB ", 5)
    else:
        o = _put(buf, 0, b"PUB ", 4)
    o = _put(buf, o, PyBytes_AS_STRING(subject_b), ns)
    if nr:
        buf[o] = CH_SPACE
        o = _put(buf, o + 1, PyBytes_AS_STRING(reply_b), nr)
    buf[o] = CH_SPACE
    o += 1
    if hdr_len:
        o = _put_int(buf, o, hdr_len)
        buf[o] = CH_SPACE
        o = _put_int(buf, o + 1, hdr_len + np)
        o = _put(buf, o, b"\r\nNATS/1.0\r\n", 12)
        for i in range(0, len(parts), 2):
            o = _put(buf, o, PyBytes_AS_STRING(<bytes>parts[i]), len(<bytes>parts[i]))
            o = _put(buf, o, b": ", 2)
            o = _put(buf, o, PyBytes_AS_STRING(<bytes>parts[i + 1]), len(<bytes>parts[i + 1]))
            o = _put(buf, o, b"\r\n", 2)
        o = _put(buf, o, b"\r\n", 2)
    else:
        o = _put_int(buf, o, np)
        o = _put(buf, o, b"\r\n", 2)
    o = _put(buf, o, PyBytes_AS_STRING(payload_b), np)
    _put(buf, o, b"\r\n", 2)
    return out


cdef bytes _own_headers(dict headers):
    """The header lines of ``headers`` ("Name: value\\r\\n" each), checked as pub_command checks them."""
    cdef list lines = []
    for name, value in headers.items():
        _check_header(name, value)
        lines.append((<str>name).encode("utf-8") + b": " + (<str>value).encode("utf-8") + b"\r\n")
    return b"".join(lines)


def atomic_batch(str prefix, list items, batch_id, str first_reply, str last_reply):
    """The protocol commands of one atomic batch publish. See natskv._core_py.atomic_batch.

    Two passes over the items: the first checks them and sizes the output (an item's own header
    lines are encoded once per distinct headers dict: the items of a batch usually share one),
    the second writes every command into one bytes object."""
    cdef Py_ssize_t n = len(items), i, seq, total = 0, o, np, ns, nr, hdr_len, args
    if n == 0:
        raise ValueError("an atomic batch holds at least one message")
    if not isinstance(batch_id, str):
        raise TypeError(f"batch_id must be str, not {type(batch_id).__name__}")
    if len(<str>batch_id) == 0 or _has_any(batch_id, "\r\n"):
        raise ValueError(f"invalid batch id {batch_id!r}: it must be non-empty, without CR or LF")
    cdef bytes prefix_b = prefix.encode("utf-8")
    cdef bytes first_b = _check_token("reply", first_reply, True)
    cdef bytes last_b = _check_token("reply", last_reply, True)
    cdef bytes id_line = b"Nats-Batch-Id: " + (<str>batch_id).encode("utf-8") + b"\r\nNats-Batch-Sequence: "
    cdef Py_ssize_t nid = len(id_line)
    cdef list subjects = [None] * n
    cdef list payloads = [None] * n
    cdef list owns = [None] * n
    cdef object last_headers = None
    cdef bytes own = b"", reply_b, payload_b, subject_b
    cdef tuple item
    for i in range(n):
        item = <tuple?>items[i]
        if len(item) != 3:
            raise ValueError(f"an item is (subject token, payload, headers), not {len(item)} values")
        token, payload, headers = item
        if not isinstance(token, str):
            raise TypeError(f"subject must be str, not {type(token).__name__}")
        subject_b = _check_token("subject", prefix + <str>token, False)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        payload_b = payload if type(payload) is bytes else bytes(payload)
        if headers is not None and not isinstance(headers, dict):
            raise TypeError(f"headers must be a dict or None, not {type(headers).__name__}")
        if headers is not last_headers:
            own = _own_headers(<dict>headers) if headers else b""
            last_headers = headers
        seq = i + 1
        # "NATS/1.0\r\n", own lines, id and sequence lines, [commit line], closing "\r\n"
        hdr_len = 10 + len(own) + nid + _digits(seq) + 2 + (22 if seq == n else 0) + 2
        reply_b = last_b if seq == n else first_b if seq == 1 else b""
        ns = len(subject_b)
        nr = len(reply_b)
        np = len(payload_b)
        args = ns + (nr + 1 if nr else 0) + 1 + _digits(hdr_len) + 1 + _digits(hdr_len + np)
        if args > _MAX_LINE:
            raise ValueError(_line_too_long(args))
        total += 5 + args + 2 + hdr_len + np + 2  # "HPUB ", the arguments, CRLF, headers, payload, CRLF
        subjects[i] = subject_b
        payloads[i] = payload_b
        owns[i] = own
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* buf = PyBytes_AS_STRING(out)
    o = 0
    for i in range(n):
        seq = i + 1
        subject_b = <bytes>subjects[i]
        payload_b = <bytes>payloads[i]
        own = <bytes>owns[i]
        reply_b = last_b if seq == n else first_b if seq == 1 else b""
        hdr_len = 10 + len(own) + nid + _digits(seq) + 2 + (22 if seq == n else 0) + 2
        np = len(payload_b)
        o = _put(buf, o, b"HPUB ", 5)
        o = _put(buf, o, PyBytes_AS_STRING(subject_b), len(subject_b))
        if len(reply_b):
            buf[o] = CH_SPACE
            o = _put(buf, o + 1, PyBytes_AS_STRING(reply_b), len(reply_b))
        buf[o] = CH_SPACE
        o = _put_int(buf, o + 1, hdr_len)
        buf[o] = CH_SPACE
        o = _put_int(buf, o + 1, hdr_len + np)
        o = _put(buf, o, b"\r\nNATS/1.0\r\n", 12)
        o = _put(buf, o, PyBytes_AS_STRING(own), len(own))
        o = _put(buf, o, PyBytes_AS_STRING(id_line), nid)
        o = _put_int(buf, o, seq)
        o = _put(buf, o, b"\r\n", 2)
        if seq == n:
            o = _put(buf, o, b"Nats-Batch-Commit: 1\r\n", 22)
        o = _put(buf, o, b"\r\n", 2)
        o = _put(buf, o, PyBytes_AS_STRING(payload_b), np)
        o = _put(buf, o, b"\r\n", 2)
    assert o == total
    return out


cdef object _ack_number(str reply, str token):
    cdef Py_ssize_t n = len(token), i
    cdef long long value = 0
    cdef unsigned int c
    if n == 0:
        raise ValueError(f"not a JetStream ack subject: {reply!r} (bad number {token!r})")
    for i in range(n):
        c = token[i]
        if c < 48 or c > 57:
            raise ValueError(f"not a JetStream ack subject: {reply!r} (bad number {token!r})")
        value = value * 10 + (c - 48)
    if n > 18:  # may not fit in 64 bits
        return int(token)
    return value


def parse_ack_subject(reply):
    """Parse a JetStream ack reply subject (v1 or v2). See natskv._core_py.parse_ack_subject."""
    if not isinstance(reply, str):
        raise TypeError(f"reply must be str, not {type(reply).__name__}")
    cdef list tokens = (<str>reply).split(".")
    cdef Py_ssize_t count = len(tokens)
    if (count != 9 and count != 11 and count != 12) or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    for token in tokens:
        if len(<str>token) == 0:
            raise ValueError(f"not a JetStream ack subject: {reply!r} (empty token)")
    cdef Py_ssize_t base = 2 if count == 9 else 4
    return (
        tokens[base],
        tokens[base + 1],
        _ack_number(reply, tokens[base + 2]),
        _ack_number(reply, tokens[base + 3]),
        _ack_number(reply, tokens[base + 4]),
        _ack_number(reply, tokens[base + 5]),
        _ack_number(reply, tokens[base + 6]),
    )


def frames_known(list frames, sids):
    """Whether the subscription id of every frame is in sids. See natskv._core_py.frames_known."""
    for frame in frames:
        if (<tuple>frame)[0] not in sids:
            return False
    return True


def frames_run(list frames, Py_ssize_t start, sid):
    """(stop, size) of the run of frames of subscription sid at frames[start:]. See
    natskv._core_py.frames_run."""
    cdef Py_ssize_t stop = start, count = len(frames), size = 0
    cdef tuple frame
    if start < 0:
        raise IndexError("start must be >= 0")
    while stop < count:
        frame = <tuple>frames[stop]
        if frame[0] is not sid and frame[0] != sid:
            break
        size += len(frame[4])
        stop += 1
    return stop, size


cdef int _ack_fields(str reply, str consumer, unsigned long long* numbers, Py_ssize_t* stamp) except -2:
    """Read an ack subject naming ``consumer`` in place: 1 with ``numbers`` (num_delivered,
    stream_seq, consumer_seq, timestamp_ns, num_pending) and the timestamp's ``stamp`` span set;
    0 for another consumer's, or for anything parse_ack_subject refuses; -1 when only
    parse_ack_subject can tell (a number beyond 19 digits, a subject not in Latin-1). Up to 19
    digits always fit in 64 unsigned bits: a timestamp in nanoseconds has 19 (until 2286)."""
    cdef Py_ssize_t n = len(reply), i, ndots = 0, ntok, base, k, a, b, clen
    cdef Py_ssize_t dots[12]
    cdef const Py_UCS1* p
    cdef unsigned long long value
    if PyUnicode_KIND(reply) != PyUnicode_1BYTE_KIND:
        return -1
    p = PyUnicode_1BYTE_DATA(reply)
    if n < 8 or memcmp(p, b"$JS.ACK.", 8) != 0:
        return 0
    for i in range(n):
        if p[i] == 46:
            if ndots == 12:
                return 0
            dots[ndots] = i
            ndots += 1
    ntok = ndots + 1
    if ntok != 9 and ntok != 11 and ntok != 12:
        return 0
    for k in range(ntok):  # no empty token
        a = 0 if k == 0 else dots[k - 1] + 1
        b = dots[k] if k < ndots else n
        if b <= a:
            return 0
    base = 2 if ntok == 9 else 4
    a, b = dots[base] + 1, dots[base + 1]
    clen = len(consumer)
    if (b - a != clen or PyUnicode_KIND(consumer) != PyUnicode_1BYTE_KIND
            or memcmp(p + a, PyUnicode_1BYTE_DATA(consumer), clen) != 0):
        return 0
    for k in range(5):
        a = dots[base + 1 + k] + 1
        b = dots[base + 2 + k] if base + 2 + k < ndots else n
        if b - a > 19:
            return -1  # may not fit in 64 bits
        value = 0
        for i in range(a, b):
            if p[i] < 48 or p[i] > 57:
                return 0
            value = value * 10 + (p[i] - 48)
        numbers[k] = value
    stamp[0] = dots[base + 4] + 1  # the timestamp, followed by num_pending
    stamp[1] = dots[base + 5]
    return 1


# take_deliveries makes an entry per message. Calling a dataclass runs its generated __init__ (a
# Python frame and seven attribute stores): for natskv's RawEntry (a dataclass with slots and
# these fields in this order) the entry is allocated and its slots filled here instead, the
# same object the call would make.
_ENTRY_FIELDS = ("subject", "data", "revision", "timestamp", "operation", "delta", "raw_bytes")

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
        int type
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    PyObject* PyType_GenericAlloc(PyTypeObject* kind, Py_ssize_t items) except NULL
    void PyObject_GC_UnTrack(void* op)

cdef dict _entry_layouts = {}  # entry type -> tuple of its slots' offsets, or None (call it)


cdef object _entry_layout(object entry_type):
    """The offsets of entry_type's slots in _ENTRY_FIELDS order, when an instance made by
    filling them is the one entry_type(...) makes; else None."""
    import dataclasses
    import types

    if not isinstance(entry_type, type) or not dataclasses.is_dataclass(entry_type):
        return None
    cls = <type>entry_type
    fields = dataclasses.fields(cls)
    if (tuple(f.name for f in fields) != _ENTRY_FIELDS or not cls.__dataclass_params__.init
            or any(not f.init for f in fields) or hasattr(cls, "__post_init__")
            or tuple(getattr(cls, "__slots__", ())) != _ENTRY_FIELDS or len(cls.__mro__) != 2
            or type(cls) is not type or cls.__new__ is not object.__new__
            or fields[5].default != 0 or type(fields[5].default) is not int
            or fields[6].default is not False):
        return None
    offsets = []
    for name in _ENTRY_FIELDS:
        descriptor = cls.__dict__.get(name)
        if type(descriptor) is not types.MemberDescriptorType:
            return None
        member = (<PyMemberDescrObject*><PyObject*>descriptor).d_member
        if member.type != 16:  # T_OBJECT_EX, what __slots__ makes
            return None
        offsets.append(member.offset)
    return tuple(offsets)


cdef object _new_entry(object entry_type, tuple layout, object subject, object payload, object sseq,
                       object stamp, object pending):
    """entry_type(subject, payload, sseq, stamp, "PUT", pending), made by filling its slots."""
    cdef PyObject* raw = PyType_GenericAlloc(<PyTypeObject*>entry_type, 0)
    entry = <object>raw
    Py_DECREF(entry)  # <object> took a reference of its own
    # Its fields are strs, bytes, ints and a bool: it can be in no cycle, so the collector need
    # not visit it (as CPython leaves such tuples alone). A replica's initial load holds many
    # such entries between the socket and the records, and each young-generation pass would.
    PyObject_GC_UnTrack(raw)
    _set_slot(raw, layout[0], subject)
    _set_slot(raw, layout[1], payload)
    _set_slot(raw, layout[2], sseq)
    _set_slot(raw, layout[3], stamp)
    _set_slot(raw, layout[4], "PUT")
    _set_slot(raw, layout[5], pending)
    _set_slot(raw, layout[6], False)
    return entry


cdef inline void _set_slot(PyObject* raw, object offset, object value):
    # The slot is empty (just allocated): it takes a reference of its own.
    Py_INCREF(value)
    (<PyObject**>((<char*>raw) + <Py_ssize_t>offset))[0] = <PyObject*>value


cdef bint _names_entry_header(const unsigned char* name, Py_ssize_t n):
    # Whether a header name is KV-Operation, Nats-Marker-Reason or Natskv-Raw, case aside.
    cdef const char* want
    cdef Py_ssize_t i
    cdef unsigned char c
    if n == 12:
        want = b"kv-operation"
    elif n == 18:
        want = b"nats-marker-reason"
    elif n == 10:
        want = b"natskv-raw"
    else:
        return False
    for i in range(n):
        c = name[i]
        if 65 <= c <= 90:  # A-Z
            c += 32
        if c != <unsigned char>want[i]:
            return False
    return True


cpdef bint plain_header_block(object headers):
    """Whether a delivery's raw header block leaves it a plain value.

    See natskv._core_py.plain_header_block: the same results.
    """
    cdef const unsigned char* buf
    cdef Py_ssize_t size, i, start
    if type(headers) is not bytes:
        return False
    size = PyBytes_GET_SIZE(headers)
    buf = <const unsigned char*>PyBytes_AS_STRING(headers)
    if size < 10 or memcmp(buf, b"NATS/1.0\r\n", 10) != 0:
        return False
    i = 10
    while i < size:
        start = i
        while i < size and buf[i] != 58 and buf[i] != 13:  # ':' ends the name, '\r' the line
            i += 1
        if i < size and buf[i] == 58 and _names_entry_header(buf + start, i - start):
            return False
        while i < size and buf[i] != 10:  # to the end of the line
            i += 1
        i += 1
    return True


def take_deliveries(list frames, Py_ssize_t start, str consumer, long long next_dseq, entry_type,
                    bint stop_at_caught_up):
    """The run of plain deliveries of a push consumer at frames[start:], as entries.

    See natskv._core_py.take_deliveries: the same results.
    """
    cdef list entries = []
    cdef Py_ssize_t index, count = len(frames)
    cdef tuple frame
    cdef str reply
    cdef object payload, sseq, stamp, pending
    cdef unsigned long long numbers[5]
    cdef Py_ssize_t span[2]
    cdef int found
    cdef object layout
    if len(consumer) == 0:
        return entries, start
    try:
        layout = _entry_layouts[entry_type]
    except KeyError:
        layout = _entry_layouts[entry_type] = _entry_layout(entry_type)
    except TypeError:  # not hashable: called
        layout = None
    for index in range(start, count):
        frame = <tuple>frames[index]
        payload = frame[4]
        if not payload or not (frame[3] is None or plain_header_block(frame[3])):
            return entries, index
        reply = <str>frame[2]
        found = _ack_fields(reply, consumer, numbers, span)
        if found == 1:
            if next_dseq < 0 or numbers[2] != <unsigned long long>next_dseq:
                return entries, index
            sseq, pending = numbers[1], numbers[4]
            if reply[span[0]] == "0" and span[1] - span[0] > 1:
                stamp = str(numbers[3])
            else:
                stamp = reply[span[0]:span[1]]
        elif found == 0:
            return entries, index
        else:
            try:
                _, name, _, sseq, dseq, stamp, pending = parse_ack_subject(reply)
            except ValueError:
                return entries, index
            if name != consumer or dseq != next_dseq:
                return entries, index
            stamp = str(stamp)
        next_dseq += 1
        if layout is not None:
            entries.append(_new_entry(entry_type, <tuple>layout, frame[1], payload, sseq, stamp, pending))
        else:
            entries.append(entry_type(frame[1], payload, sseq, stamp, "PUT", pending))
        if stop_at_caught_up and pending == 0:
            return entries, index + 1
    return entries, count


def decode_entries(entries, Py_ssize_t prefix_len, sep, loads):
    """(revision, key, put, value) of each entry, for a replica to apply.

    See natskv._core_py.decode_entries: the same results.
    """
    cdef Py_UCS4 c_sep = <Py_UCS4>_sep_char(sep)
    cdef list out = []
    cdef str subject
    cdef bint put
    for entry in entries:
        subject = entry.subject
        try:
            key = _decode(subject, c_sep, prefix_len)
        except ValueError:
            key = subject[prefix_len:]
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


cdef inline bint _is_space(unsigned char c) noexcept nogil:
    return c == 32 or c == 9 or c == 11 or c == 12 or c == 13 or c == 10


cdef long long _frame_number(const unsigned char* p, Py_ssize_t start, Py_ssize_t stop,
                             Py_ssize_t line_start, Py_ssize_t line_end) except -1:
    cdef long long value = 0
    cdef Py_ssize_t i
    cdef bint valid = 0 < stop - start <= 18
    if valid:
        for i in range(start, stop):
            if p[i] < 48 or p[i] > 57:
                valid = False
                break
            value = value * 10 + (p[i] - 48)
    if not valid:
        line = PyBytes_FromStringAndSize(<const char*>p + line_start, min(line_end - line_start, 80))
        token = PyBytes_FromStringAndSize(<const char*>p + start, min(stop - start, 20))
        raise ValueError(f"malformed message line {line!r} (bad number {token!r})")
    return value


cdef Py_ssize_t _find_crlf(const unsigned char* p, Py_ssize_t pos, Py_ssize_t size) noexcept nogil:
    cdef const unsigned char* hit
    while pos < size - 1:
        hit = <const unsigned char*>memchr(p + pos, 13, size - 1 - pos)
        if hit == NULL:
            return -1
        pos = hit - p
        if p[pos + 1] == 10:
            return pos
        pos += 1
    return -1


def parse_frames(buf):
    """Split the complete MSG / HMSG frames at the front of a NATS protocol buffer.

    See natskv._core_py.parse_frames: the same results and errors.
    """
    cdef const unsigned char* p
    cdef Py_ssize_t size
    if type(buf) is bytearray:
        p = <const unsigned char*>PyByteArray_AS_STRING(buf)
        size = PyByteArray_GET_SIZE(buf)
    elif type(buf) is bytes:
        p = <const unsigned char*>PyBytes_AS_STRING(buf)
        size = PyBytes_GET_SIZE(buf)
    elif isinstance(buf, (bytes, bytearray)):
        return parse_frames(bytes(buf))
    else:
        raise TypeError(f"buf must be bytes or bytearray, not {type(buf).__name__}")
    cdef list frames = []
    cdef Py_ssize_t pos = 0, end, i, count, start, op_len
    cdef Py_ssize_t tok_start[6]
    cdef Py_ssize_t tok_stop[6]
    cdef bint headed
    cdef long long sid, total, header_size
    while pos < size:
        if size - pos >= 4 and p[pos] == 77 and p[pos + 1] == 83 and p[pos + 2] == 71 and (p[pos + 3] == 32 or p[pos + 3] == 9):
            headed, op_len = False, 3  # "MSG"
        elif (size - pos >= 5 and p[pos] == 72 and p[pos + 1] == 77 and p[pos + 2] == 83 and p[pos + 3] == 71
              and (p[pos + 4] == 32 or p[pos + 4] == 9)):
            headed, op_len = True, 4  # "HMSG"
        else:  # another operation, or the start of one not yet received
            return frames, pos, _find_crlf(p, pos, size) >= 0
        end = _find_crlf(p, pos, size)
        if end < 0:
            return frames, pos, False
        # Tokens after the operation, split on whitespace (at most 5 are valid).
        count = 0
        i = pos + op_len
        while i < end:
            while i < end and _is_space(p[i]):
                i += 1
            if i >= end:
                break
            if count == 6:
                count += 1
                break
            tok_start[count] = i
            while i < end and not _is_space(p[i]):
                i += 1
            tok_stop[count] = i
            count += 1
        if count != (4 if not headed else 5) and count != (3 if not headed else 4):
            line = PyBytes_FromStringAndSize(<const char*>p + pos, min(end - pos, 80))
            raise ValueError(f"malformed message line {line!r}")
        sid = _frame_number(p, tok_start[1], tok_stop[1], pos, end)
        total = _frame_number(p, tok_start[count - 1], tok_stop[count - 1], pos, end)
        header_size = _frame_number(p, tok_start[count - 2], tok_stop[count - 2], pos, end) if headed else 0
        if header_size > total:
            line = PyBytes_FromStringAndSize(<const char*>p + pos, min(end - pos, 80))
            raise ValueError(f"malformed message line {line!r} (header larger than message)")
        start = end + 2
        if start + total + 2 > size:
            return frames, pos, False
        if p[start + total] != 13 or p[start + total + 1] != 10:
            line = PyBytes_FromStringAndSize(<const char*>p + pos, min(end - pos, 80))
            raise ValueError(f"message of {total} bytes not followed by CRLF after {line!r}")
        subject = PyUnicode_DecodeUTF8(<const char*>p + tok_start[0], tok_stop[0] - tok_start[0], NULL)
        if count == (5 if headed else 4):
            reply = PyUnicode_DecodeUTF8(<const char*>p + tok_start[2], tok_stop[2] - tok_start[2], NULL)
        else:
            reply = ""
        headers = PyBytes_FromStringAndSize(<const char*>p + start, header_size) if header_size else None
        payload = PyBytes_FromStringAndSize(<const char*>p + start + header_size, total - header_size)
        frames.append((sid, subject, reply, headers, payload))
        pos = start + total + 2
    return frames, pos, False


# ---------------------------------------------------------------------------------------------
# Query filters
# ---------------------------------------------------------------------------------------------

cdef enum Category:
    K_BOOL
    K_STR
    K_NUM
    K_NONE
    K_LIST
    K_DICT
    K_OTHER

cdef object _MISSING = object()
cdef enum:
    _MAX_DEPTH = 256
_TOO_DEEP = "values nested more than 256 levels deep cannot be compared"


cdef int _category_slow(object value):
    if isinstance(value, bool):
        return K_BOOL
    if isinstance(value, str):
        return K_STR
    if isinstance(value, (int, float)):
        return K_NUM
    if value is None:
        return K_NONE
    if isinstance(value, (list, tuple)):
        return K_LIST
    if isinstance(value, dict):
        return K_DICT
    return K_OTHER


cdef inline int _category(object value):
    cdef type t = type(value)
    if t is str:
        return K_STR
    if t is int or t is float:
        return K_NUM
    if t is bool:
        return K_BOOL
    if value is None:
        return K_NONE
    if t is dict:
        return K_DICT
    if t is list or t is tuple:
        return K_LIST
    return _category_slow(value)


cdef bint _json_eq(object a, object b, int depth) except -1:
    """Deep equality of JSON-like values, with bools never equal to numbers (as _core_py).

    depth counts the containers already entered; past _MAX_DEPTH it raises RecursionError
    instead of exhausting the C stack.
    """
    cdef int kind = _category(a)
    cdef Py_ssize_t i, n
    if kind != _category(b):
        return False
    if kind == K_STR:
        if type(a) is str and type(b) is str:
            return (<str>a) == (<str>b)
        return bool(a == b)
    if kind == K_NUM:
        if type(a) is float and type(b) is float:
            return (<double>a) == (<double>b)
        return bool(a == b)
    if kind == K_NONE:
        return True
    if kind == K_BOOL:
        return a is b
    if kind == K_LIST:
        n = len(a)
        if n != len(b):
            return False
        if depth >= _MAX_DEPTH:
            raise RecursionError(_TOO_DEEP)
        for i in range(n):
            if not _json_eq(a[i], b[i], depth + 1):
                return False
        return True
    if kind == K_DICT:
        if len(a) != len(b):
            return False
        if depth >= _MAX_DEPTH:
            raise RecursionError(_TOO_DEEP)
        for key, value in (<dict>a).items():
            other = (<dict>b).get(key, _MISSING)
            if other is _MISSING or not _json_eq(value, other, depth + 1):
                return False
        return True
    return bool(a == b)


cdef class _Cond:
    """One operator applied to one field value (present is False when the field is absent)."""

    cdef bint test(self, object value, bint present) except -1:
        raise NotImplementedError


cdef class _Eq(_Cond):
    cdef object operand

    def __init__(self, operand):
        self.operand = operand

    cdef bint test(self, object value, bint present) except -1:
        if not present:
            return self.operand is None
        return _json_eq(value, self.operand, 0)


cdef class _In(_Cond):
    cdef frozenset strs
    cdef frozenset nums
    cdef bint has_true, has_false, has_none
    cdef tuple others           # lists, dicts and other objects: compared one by one

    def __init__(self, tuple members):
        strs = []
        nums = []
        others = []
        for member in members:
            kind = _category(member)
            if kind == K_STR:
                strs.append(member)
            elif kind == K_NUM:
                if member == member:  # NaN equals nothing, not even itself
                    nums.append(member)
            elif kind == K_BOOL:
                if member:
                    self.has_true = True
                else:
                    self.has_false = True
            elif kind == K_NONE:
                self.has_none = True
            else:
                others.append(member)
        self.strs = frozenset(strs)
        self.nums = frozenset(nums)
        self.others = tuple(others)

    cdef bint test(self, object value, bint present) except -1:
        if not present:
            return self.has_none
        cdef int kind = _category(value)
        if kind == K_STR:
            return value in self.strs
        if kind == K_NUM:
            return value in self.nums
        if kind == K_BOOL:
            return self.has_true if value is True else self.has_false
        if kind == K_NONE:
            return self.has_none
        for member in self.others:
            if _json_eq(value, member, 0):
                return True
        return False


cdef class _Negate(_Cond):
    cdef tuple conds

    def __init__(self, conds):
        self.conds = tuple(conds)

    cdef bint test(self, object value, bint present) except -1:
        for cond in self.conds:
            if not (<_Cond>cond).test(value, present):
                return True
        return False


cdef class _Compare(_Cond):
    cdef int op
    cdef int category
    cdef object operand
    cdef bint is_float
    cdef double number

    def __init__(self, int op, operand):
        self.op = op
        self.operand = operand
        self.category = _category(operand)
        self.is_float = type(operand) is float
        if self.is_float:
            self.number = operand

    cdef bint test(self, object value, bint present) except -1:
        if not present or _category(value) != self.category:
            return False
        cdef double x
        if self.is_float and type(value) is float:
            x = value
            if self.op == Py_GT:
                return x > self.number
            if self.op == Py_GE:
                return x >= self.number
            if self.op == Py_LT:
                return x < self.number
            return x <= self.number
        return PyObject_RichCompareBool(value, self.operand, self.op)


cdef class _Contains(_Cond):
    cdef object operand
    cdef bint operand_is_str

    def __init__(self, operand):
        self.operand = operand
        self.operand_is_str = isinstance(operand, str)

    cdef bint test(self, object value, bint present) except -1:
        if not present:
            return False
        cdef int kind = _category(value)
        if kind == K_STR:
            return self.operand_is_str and self.operand in value
        if kind == K_LIST:
            for item in value:
                if _json_eq(item, self.operand, 0):
                    return True
        return False


cdef class _StartsWith(_Cond):
    cdef str operand

    def __init__(self, str operand):
        self.operand = operand

    cdef bint test(self, object value, bint present) except -1:
        return present and isinstance(value, str) and (<str>value).startswith(self.operand)


cdef class _EndsWith(_Cond):
    cdef str operand

    def __init__(self, str operand):
        self.operand = operand

    cdef bint test(self, object value, bint present) except -1:
        return present and isinstance(value, str) and (<str>value).endswith(self.operand)


cdef class _Regex(_Cond):
    cdef object search

    def __init__(self, regex):
        self.search = regex.matches

    cdef bint test(self, object value, bint present) except -1:
        return present and isinstance(value, str) and self.search(value)


cdef class _Exists(_Cond):
    cdef bint wanted

    def __init__(self, bint wanted):
        self.wanted = wanted

    cdef bint test(self, object value, bint present) except -1:
        return present == self.wanted


cdef class _Node:
    """A condition on a whole document: a dict (``slots`` None), or a Record whose layout's
    slots (field name -> position) are ``slots``."""

    cdef bint match(self, object doc, dict slots) except -1:
        raise NotImplementedError


cdef class _Field(_Node):
    cdef tuple path
    cdef object key             # path[0], the whole path when it has one part
    cdef bint nested
    cdef tuple conds

    def __init__(self, tuple path, conds):
        self.path = path
        self.key = path[0]
        self.nested = len(path) > 1
        self.conds = tuple(conds)

    cdef bint match(self, object doc, dict slots) except -1:
        cdef object value
        cdef bint present
        if slots is None:
            value = (<dict>doc).get(self.key, _MISSING)
        else:
            value = _record_value(doc, slots, self.key, _MISSING)
        cdef Py_ssize_t i
        if self.nested:
            for i in range(1, len(self.path)):
                if value is _MISSING:
                    break
                if isinstance(value, dict):
                    value = (<dict>value).get(self.path[i], _MISSING)
                else:
                    value = _MISSING
        present = value is not _MISSING
        if not present:
            value = None
        for cond in self.conds:
            if not (<_Cond>cond).test(value, present):
                return False
        return True


cdef class _And(_Node):
    cdef tuple nodes

    def __init__(self, nodes):
        self.nodes = tuple(nodes)

    cdef bint match(self, object doc, dict slots) except -1:
        for node in self.nodes:
            if not (<_Node>node).match(doc, slots):
                return False
        return True


cdef class _Or(_Node):
    cdef tuple nodes

    def __init__(self, nodes):
        self.nodes = tuple(nodes)

    cdef bint match(self, object doc, dict slots) except -1:
        for node in self.nodes:
            if (<_Node>node).match(doc, slots):
                return True
        return False


cdef class _Not(_Node):
    cdef _Node node

    def __init__(self, _Node node):
        self.node = node

    cdef bint match(self, object doc, dict slots) except -1:
        return not self.node.match(doc, slots)


cdef _Node _all_of(list nodes):
    """An _And of nodes, or the node itself when there is only one (one less call per match)."""
    if len(nodes) == 1:
        return nodes[0]
    return _And(nodes)


# Deeper filters are refused at compile time: nodes are evaluated by C recursion.
_MAX_FILTER_DEPTH = 64
_COMPARISONS = {"$gt": Py_GT, "$gte": Py_GE, "$lt": Py_LT, "$lte": Py_LE}
_FIELD_OPERATORS = frozenset(
    [
        "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$contains",
        "$startswith", "$endswith", "$regex", "$exists", "$not",
    ]
)


def _filter_error(path, problem):
    where = f" at {path!r}" if path else ""
    return ValueError(f"invalid filter{where}: {problem}")


cdef bint _is_operator_dict(object spec):
    if not isinstance(spec, dict):
        return False
    for key in spec:
        if isinstance(key, str) and (<str>key).startswith("$"):
            return True
    return False


cdef _Cond _compile_op(object op, object arg, str path, int depth):
    if op == "$eq":
        return _Eq(arg)
    if op == "$ne":
        return _Negate([_Eq(arg)])
    if op in _COMPARISONS:
        if _category(arg) not in (K_NUM, K_STR):
            raise _filter_error(path, f"{op} needs a number or a string, got {type(arg).__name__}")
        return _Compare(_COMPARISONS[op], arg)
    if op == "$in" or op == "$nin":
        if not isinstance(arg, (list, tuple)):
            raise _filter_error(path, f"{op} needs a list, got {type(arg).__name__}")
        cond = _In(tuple(arg))
        return cond if op == "$in" else _Negate([cond])
    if op == "$contains":
        return _Contains(arg)
    if op == "$startswith" or op == "$endswith":
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
    if op == "$and" or op == "$or":
        raise _filter_error(path, f"{op} is only allowed at the top level of a filter")
    raise _filter_error(path, f"unknown operator {op!r}")


cdef object _compile_regex(object arg, str path):
    if isinstance(arg, re.Pattern):
        if not isinstance(arg.pattern, str):
            raise _filter_error(path, "$regex needs a str pattern, got a bytes pattern")
    elif not isinstance(arg, str):
        raise _filter_error(path, f"$regex needs a string, got {type(arg).__name__}")
    try:
        return compile_linear(arg)
    except ValueError as exc:
        raise _filter_error(path, str(exc)) from None


cdef list _compile_conds(object spec, str path, int depth):
    if depth > _MAX_FILTER_DEPTH:
        raise _filter_error(path, f"filter nested more than {_MAX_FILTER_DEPTH} levels deep")
    if not _is_operator_dict(spec):
        return [_Eq(spec)]
    conds = []
    for op, arg in (<dict>spec).items():
        here = f"{path}.{op}" if isinstance(op, str) else path
        if not isinstance(op, str) or not (<str>op).startswith("$"):
            raise _filter_error(here, f"{op!r} mixes a field name with operators")
        conds.append(_compile_op(op, arg, here, depth))
    return conds


cdef list _compile_doc(object where, str path, int depth):
    if depth > _MAX_FILTER_DEPTH:
        raise _filter_error(path, f"filter nested more than {_MAX_FILTER_DEPTH} levels deep")
    if not isinstance(where, dict):
        raise _filter_error(path, f"expected a dict, got {type(where).__name__}")
    cdef list nodes = []
    for key, spec in (<dict>where).items():
        if not isinstance(key, str):
            raise _filter_error(path, f"field names must be str, got {key!r}")
        here = f"{path}.{key}" if path else key
        if key == "$and" or key == "$or":
            if not isinstance(spec, list) or not spec:
                raise _filter_error(here, f"{key} needs a non-empty list of filters")
            subs = [
                _all_of(_compile_doc(sub, f"{here}[{i}]", depth + 1)) for i, sub in enumerate(spec)
            ]
            nodes.append(_And(subs) if key == "$and" else _Or(subs))
        elif key == "$not":
            nodes.append(_Not(_all_of(_compile_doc(spec, here, depth + 1))))
        elif (<str>key).startswith("$"):
            if key in _FIELD_OPERATORS:
                raise _filter_error(
                    here, f"{key} needs a field, as in {{'field': {{{key!r}: ...}}}}"
                )
            raise _filter_error(here, f"unknown operator {key!r}")
        else:
            parts = tuple((<str>key).split("."))
            if "" in parts:
                raise _filter_error(here, "empty segment in field path")
            nodes.append(_Field(parts, _compile_conds(spec, here, depth)))
    return nodes


cdef void _top_fields(dict where, set into) except *:
    for key, spec in where.items():
        if key == "$and" or key == "$or":
            for sub in spec:
                _top_fields(sub, into)
        elif key == "$not":
            _top_fields(spec, into)
        else:
            into.add((<str>key).split(".", 1)[0])


cdef class Filter:
    """A compiled MongoDB-style filter over decoded JSON values. See natskv._core_py.Filter.

    Attributes: where (the source dict) and fields (top-level field names), read-only.
    """

    cdef readonly object where
    cdef readonly frozenset fields
    cdef _Node _root            # None for the empty filter, which matches everything

    def __cinit__(self, where):
        if not isinstance(where, dict):
            raise TypeError(f"where must be a dict, not {type(where).__name__}")
        nodes = _compile_doc(where, "", 0)
        self._root = _all_of(nodes) if nodes else None
        cdef set fields = set()
        _top_fields(where, fields)
        self.fields = frozenset(fields)
        self.where = where

    def __repr__(self):
        return f"Filter({self.where!r})"

    def __reduce__(self):
        return compile_filter, (self.where,)

    cdef inline bint _match(self, object value) except -1:
        if self._root is None:
            return True
        if type(value) is dict:
            return self._root.match(value, None)
        if isinstance(value, Record):
            return self._root.match(value, type(value)._slots)
        return isinstance(value, dict) and self._root.match(value, None)

    def match(self, value):
        """True if value satisfies the filter. Only dicts and Records can match a non-empty filter."""
        return self._match(value)

    def filter(self, values):
        """The indices of the values that match, in order."""
        cdef list result = []
        cdef Py_ssize_t i = 0
        cdef object layout = None  # the Record class last seen, and its slots
        cdef dict slots = None
        cdef bint hit
        for value in values:
            kind = type(value)
            if self._root is None:
                hit = True
            elif kind is layout:
                hit = self._root.match(value, slots)
            elif kind is dict:
                hit = self._root.match(value, None)
            elif isinstance(value, Record):
                layout, slots = kind, kind._slots
                hit = self._root.match(value, slots)
            else:
                hit = isinstance(value, dict) and self._root.match(value, None)
            if hit:
                result.append(i)
            i += 1
        return result


def compile_filter(where):
    """Compile a MongoDB-style where dict. See natskv._core_py.compile_filter."""
    return Filter(where)


# ---------------------------------------------------------------------------------------------
# Indexes
# ---------------------------------------------------------------------------------------------
# The same order keys as natskv._core_py: tuples (rank, value) for field values, (rank, pk) or
# longer for primary keys, the value always last. Scans and bisects compare them with C fast paths
# for same-rank str/int/float/bool and fall back to Python's own tuple comparison, which defines
# the order. Index objects are mutable and not locked: their owner serializes access. Bounds
# checks stay on here, so misuse from several threads raises instead of reading freed memory.

cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX

cdef enum:
    _LOAD = 512                 # a _Chunks chunk is split in two when it passes 2 * _LOAD keys
    _GROUP_LIST_MAX = 1024      # a group longer than this becomes a _Chunks (as in _core_py)
    _MAX_PK_DEPTH = 64          # tuple pks nested deeper are refused (C recursion)

cdef object _UUID = uuid.UUID


cdef object _index_key(object value):
    cdef type kind = type(value)
    cdef double number
    if kind is str:
        return (2, value)
    if kind is int:
        return (1, value)
    if kind is float:
        number = value
        return (1, value) if number == number else None
    if kind is bool:
        return (0, value)
    if value is None or kind is dict or kind is list:
        return None
    if isinstance(value, str):
        return (2, str.__str__(value))
    if isinstance(value, int):
        return (1, int.__int__(value))
    if isinstance(value, float):
        value = float.__float__(value)
        number = value
        return (1, value) if number == number else None
    return None


def index_key(value):
    """The order key of a field value, or None when it is not indexed.

    bool < numbers < str; 1 and 1.0 share a key, True never equals 1; None, NaN, dicts, lists
    and other types are not indexed. See natskv._core_py.index_key.
    """
    return _index_key(value)


cdef object _pk_key(object pk):
    cdef type kind = type(pk)
    if kind is int:
        return (1, pk)
    if kind is str:
        return (2, pk)
    return _pk_key_slow(pk, 0)


cdef object _pk_key_slow(object pk, int depth):
    if pk is None:
        raise ValueError("a primary key cannot be None")
    if isinstance(pk, bool):
        return (0, pk)
    if isinstance(pk, (int, float)):
        if pk != pk:
            raise ValueError("a primary key cannot be NaN")
        return (1, pk)
    if isinstance(pk, str):
        return (2, pk)
    if isinstance(pk, bytes):
        return (3, pk)
    if isinstance(pk, _UUID):
        return (4, pk)
    if isinstance(pk, tuple):
        if depth >= _MAX_PK_DEPTH:
            raise ValueError("a primary key cannot nest tuples more than 64 levels deep")
        return (5, tuple([_pk_key_slow(item, depth + 1) for item in pk]), pk)
    hash(pk)
    kind = type(pk)
    return (6, f"{kind.__module__}.{kind.__qualname__}", pk)


def _pk_sort_key(pk):
    return _pk_key(pk)


cdef int _sort_pks(list pks) except -1:
    """Sort distinct pks in place in pk order (a plain sort when they are all ints or all str)."""
    cdef type kind
    if len(pks) < 2:
        return 0
    kind = type(pks[0])
    if kind is int or kind is str:
        for pk in pks:
            if type(pk) is not kind:
                pks.sort(key=_pk_sort_key)
                return 0
        pks.sort()
    else:
        pks.sort(key=_pk_sort_key)
    return 0


cdef inline int _check_pk(object pk) except -1:
    cdef type kind = type(pk)
    if kind is not int and kind is not str:
        _pk_key_slow(pk, 0)
    return 0


cdef inline object _last(object key):
    """The value a stored key stands for (see _value_skey)."""
    if type(key) is tuple:
        return (<tuple>key)[len(<tuple>key) - 1]
    return key


# The indexes store keys more compactly than index_key's tuples: a number or a str is kept as
# itself (a 100,000-record replica saves a 72-byte tuple per entry of each unique index), and
# only the other kinds keep a tuple whose first item is their rank: bools ``(0, value)`` and,
# with pk_order, bytes, UUIDs, tuples and other types as _pk_key gives them. A dict still tells
# ``True`` from ``1`` (a tuple never equals a number) and holds ``1`` and ``1.0`` as one key.
# Scan bounds use the one-item tuples ``(rank,)``, before every key of that rank.

cdef object _value_skey(object value):
    """The stored key of a field value, or None when it is not indexed (as _index_key)."""
    cdef type kind = type(value)
    cdef double number
    if kind is str or kind is int:
        return value
    if kind is float:
        number = value
        return value if number == number else None
    if kind is bool:
        return (0, value)
    if value is None or kind is dict or kind is list:
        return None
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        value = float.__float__(value)
        number = value
        return value if number == number else None
    return None


cdef object _pk_skey(object pk):
    """The stored key of a primary key (pk_order): raises as _pk_key."""
    cdef type kind = type(pk)
    if kind is int or kind is str:
        return pk
    key = _pk_key_slow(pk, 0)
    if (<tuple>key)[0] == 1 or (<tuple>key)[0] == 2:
        return pk
    return key


cdef inline int _skey_rank(object key) except -2:
    if type(key) is tuple:
        return (<tuple>key)[0]
    return 2 if isinstance(key, str) else 1


cdef inline int _same_kind_cmp(object x, object y, type kind) except -3:
    """Compare two values of one type by that type's own order when it is a str, int, float or
    bool: -1, 0 or 1; -2 for any other type (the caller falls back)."""
    cdef double p, q
    if kind is str:
        return PyUnicode_Compare(x, y)
    if kind is int:
        return _int_cmp(x, y)
    if kind is float:
        p = x
        q = y
        return (p > q) - (p < q)
    if kind is bool:
        return (x is True) - (y is True)
    return -2


cdef int _skey_cmp(object a, object b) except -2:
    """Compare two stored keys: -1, 0 or 1, in index_key's order."""
    cdef type kind = type(a)
    cdef int ra, rb, c
    if kind is type(b) and kind is not bool:  # bools are stored as (0, b): never bare
        c = _same_kind_cmp(a, b, kind)
        if c != -2:
            return c
    ra = _skey_rank(a)
    rb = _skey_rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if kind is tuple or type(b) is tuple:
        # Of one rank, a tuple beside a bare value is a (rank,) bound, which sorts first.
        if kind is not tuple:
            return 1 if PyTuple_GET_SIZE(b) == 1 else _rich_cmp((ra, a), b)
        if type(b) is not tuple:
            return -1 if PyTuple_GET_SIZE(a) == 1 else _rich_cmp(a, (rb, b))
        return _key_cmp(a, b)
    if ra == 2:
        return PyUnicode_Compare(a, b)
    return _rich_cmp(a, b)


cdef object _skey_sort_key(object key):
    if type(key) is tuple:
        return key
    return (2, key) if isinstance(key, str) else (1, key)


def _skey_order(key):
    return _skey_sort_key(key)


cdef list _sorted_skeys(object keys):
    """The stored keys sorted in index order (a plain sort when all are str or all int)."""
    cdef list out = list(keys)
    cdef type kind
    if len(out) < 2:
        return out
    kind = type(out[0])
    if kind is int or kind is str:
        for key in out:
            if type(key) is not kind:
                out.sort(key=_skey_order)
                return out
        out.sort()
    else:
        out.sort(key=_skey_order)
    return out


cdef int _rich_cmp(object a, object b) except -2:
    if PyObject_RichCompareBool(a, b, Py_LT):
        return -1
    if PyObject_RichCompareBool(a, b, Py_EQ):
        return 0
    return 1


cdef inline int _int_cmp(object a, object b) except -2:
    cdef int over_a = 0
    cdef int over_b = 0
    cdef long long x = PyLong_AsLongLongAndOverflow(a, &over_a)
    cdef long long y = PyLong_AsLongLongAndOverflow(b, &over_b)
    if over_a or over_b:
        return _rich_cmp(a, b)
    return (x > y) - (x < y)


cdef int _key_cmp(object a, object b) except -2:
    """Compare two order keys: -1, 0 or 1, exactly as Python compares the tuples."""
    cdef object x, y
    cdef type kind
    cdef int c
    if (
        PyTuple_GET_SIZE(a) == 2
        and PyTuple_GET_SIZE(b) == 2
        and PyTuple_GET_ITEM(a, 0) == PyTuple_GET_ITEM(b, 0)  # ranks are cached small ints
    ):
        x = <object>PyTuple_GET_ITEM(a, 1)
        y = <object>PyTuple_GET_ITEM(b, 1)
        kind = type(x)
        if kind is type(y):
            c = _same_kind_cmp(x, y, kind)
            if c != -2:
                return c
    return _rich_cmp(a, b)


cdef int _pk_cmp(object a, object b) except -2:
    """Compare two primary keys in pk order."""
    cdef type kind = type(a)
    if kind is type(b):
        if kind is int:
            return _int_cmp(a, b)
        if kind is str:
            return PyUnicode_Compare(a, b)
    return _key_cmp(_pk_key(a), _pk_key(b))


@cython.boundscheck(True)
cdef Py_ssize_t _bisect(list seq, object key, bint right, bint pks) except -1:
    """Where ``key`` goes in the sorted ``seq``: before equal items, or after them if right."""
    cdef Py_ssize_t lo = 0
    cdef Py_ssize_t hi = len(seq)
    cdef Py_ssize_t mid
    cdef int c
    while lo < hi:
        mid = (lo + hi) >> 1
        c = _pk_cmp(seq[mid], key) if pks else _skey_cmp(seq[mid], key)
        if c < 0 or (right and c == 0):
            lo = mid + 1
        else:
            hi = mid
    return lo


@cython.final
@cython.boundscheck(True)
cdef class _Chunks:
    """A sorted sequence kept as chunks of at most 2 * _LOAD keys, with optional payloads.

    ``keys`` holds non-empty sorted lists whose concatenation is the sequence; ``maxes[i]`` is the
    last key of ``keys[i]``; ``items`` (None without payloads) is parallel to ``keys``. A position
    is (chunk, offset), chunk == len(keys) being the end. With ``pks`` the keys are raw primary
    keys in pk order, otherwise order-key tuples. Inserting costs O(log n + _LOAD) and never
    shifts more than one chunk, where one flat list would shift half the index.
    """

    cdef list keys
    cdef list items
    cdef list maxes
    cdef Py_ssize_t size
    cdef bint pks

    def __cinit__(self):
        self.keys = []
        self.maxes = []
        self.items = None
        self.size = 0
        self.pks = False

    cdef inline int cmp(self, object a, object b) except -2:
        return _pk_cmp(a, b) if self.pks else _skey_cmp(a, b)

    cdef int locate(self, object key, bint right, Py_ssize_t* chunk, Py_ssize_t* offset) except -1:
        cdef Py_ssize_t ci = _bisect(self.maxes, key, right, self.pks)
        chunk[0] = ci
        offset[0] = 0 if ci == len(self.maxes) else _bisect(self.keys[ci], key, right, self.pks)
        return 0

    cdef int fill(self, list ordered) except -1:
        """Load sorted, distinct keys into an empty instance without payloads."""
        cdef Py_ssize_t i, n = len(ordered)
        cdef list chunk
        for i in range(0, n, _LOAD):
            chunk = ordered[i:i + _LOAD]
            self.keys.append(chunk)
            self.maxes.append(chunk[len(chunk) - 1])
        self.size = n
        return 0

    cdef int fill_items(self, list ordered, list payloads) except -1:
        """Load sorted, distinct keys with their payloads into an empty instance with payloads."""
        cdef Py_ssize_t i, n = len(ordered)
        cdef list chunk
        for i in range(0, n, _LOAD):
            chunk = ordered[i:i + _LOAD]
            self.keys.append(chunk)
            self.maxes.append(chunk[len(chunk) - 1])
            self.items.append(payloads[i:i + _LOAD])
        self.size = n
        return 0

    cdef bint insert(self, object key, object item) except -1:
        """Insert ``key`` (with ``item``); False, changing nothing, if an equal key is there."""
        cdef Py_ssize_t ci, j, half
        cdef Py_ssize_t n = len(self.maxes)
        cdef list chunk, payloads, upper
        if n == 0:
            self.keys.append([key])
            self.maxes.append(key)
            if self.items is not None:
                self.items.append([item])
            self.size = 1
            return True
        ci = _bisect(self.maxes, key, False, self.pks)
        if ci == n:
            ci = n - 1
            chunk = self.keys[ci]
            j = len(chunk)
        else:
            chunk = self.keys[ci]
            j = _bisect(chunk, key, False, self.pks)
            if self.cmp(chunk[j], key) == 0:
                return False
        chunk.insert(j, key)
        if self.items is not None:
            (<list>self.items[ci]).insert(j, item)
        if j == len(chunk) - 1:
            self.maxes[ci] = key
        self.size += 1
        if len(chunk) > 2 * _LOAD:
            half = len(chunk) >> 1
            upper = chunk[half:]
            del chunk[half:]
            self.keys.insert(ci + 1, upper)
            self.maxes[ci] = chunk[half - 1]
            self.maxes.insert(ci + 1, upper[len(upper) - 1])
            if self.items is not None:
                payloads = self.items[ci]
                self.items.insert(ci + 1, payloads[half:])
                del payloads[half:]
        return True

    cdef object pop(self, object key, object missing):
        """Remove ``key``; its payload (None without payloads), or ``missing`` if absent."""
        cdef Py_ssize_t ci, j
        cdef list chunk
        cdef object item = None
        ci = _bisect(self.maxes, key, False, self.pks)
        if ci == len(self.maxes):
            return missing
        chunk = self.keys[ci]
        j = _bisect(chunk, key, False, self.pks)
        if self.cmp(chunk[j], key) != 0:
            return missing
        del chunk[j]
        if self.items is not None:
            item = (<list>self.items[ci]).pop(j)
        self.size -= 1
        if not chunk:
            del self.keys[ci]
            del self.maxes[ci]
            if self.items is not None:
                del self.items[ci]
        elif j == len(chunk):
            self.maxes[ci] = chunk[j - 1]
        return item

    cdef int set_item(self, object key, object item) except -1:
        """Replace the payload of ``key``, which must be present."""
        cdef Py_ssize_t ci, j
        self.locate(key, False, &ci, &j)
        (<list>self.items[ci])[j] = item
        return 0

    cdef list all_keys(self):
        cdef list out = []
        for chunk in self.keys:
            out.extend(<list>chunk)
        return out

    cdef int emit(
        self, list out, Py_ssize_t ci, Py_ssize_t j, bint reverse, Py_ssize_t need
    ) except -1:
        """Append keys to ``out`` until it holds ``need`` items (need < 0: no limit).

        Forwards from position (ci, j); in reverse, the keys before that position, downwards.
        """
        cdef list chunk
        cdef Py_ssize_t stop
        if not reverse:
            while ci < len(self.keys):
                chunk = self.keys[ci]
                stop = len(chunk)
                if need >= 0 and stop - j > need - len(out):
                    stop = j + need - len(out)
                while j < stop:
                    out.append(chunk[j])
                    j += 1
                if need >= 0 and len(out) >= need:
                    return 0
                ci += 1
                j = 0
            return 0
        while True:
            if j == 0:
                ci -= 1
                if ci < 0:
                    return 0
                j = len(<list>self.keys[ci])
            chunk = self.keys[ci]
            j -= 1
            out.append(chunk[j])
            if need >= 0 and len(out) >= need:
                return 0


cdef _Chunks _new_chunks(bint pks, bint payloads):
    cdef _Chunks chunks = _Chunks()
    chunks.pks = pks
    if payloads:
        chunks.items = []
    return chunks


cdef Py_ssize_t _check_limit(object limit) except -2:
    """The limit as a count, -1 for none."""
    if limit is None:
        return -1
    if type(limit) is bool or not isinstance(limit, int):
        raise TypeError(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    if limit >= PY_SSIZE_T_MAX:
        return -1
    return limit


cdef object _bound_key(object value):
    key = _value_skey(value)
    if key is None:
        if isinstance(value, float):
            return None
        raise TypeError(f"range bounds must be bool, int, float or str, not {type(value).__name__}")
    return key


cdef object _prefix_end(str prefix):
    cdef Py_ssize_t i
    cdef Py_UCS4 ch
    cdef long code
    for i in range(len(prefix) - 1, -1, -1):
        ch = prefix[i]
        code = ch
        if code < 0x10FFFF:
            return prefix[:i] + PyUnicode_FromOrdinal(code + 1)
    return None


def _restore_index(cls, args, entries):
    """Unpickle an index: a new cls(*args) holding entries (value, pk)."""
    index = cls(*args)
    for value, pk in entries:
        index.add(value, pk)
    return index


@cython.boundscheck(True)
cdef class _OrderedIndex:
    """What SortedIndex and UniqueIndex share. See natskv._core_py._OrderedIndex.

    ``_map`` maps each distinct key to the payload (a group of pks, or one pk); ``_values`` keeps
    the same keys sorted with the same payloads, so scans never go back to the dict. Lookups go
    through ``_payload``: a UniqueIndex with pk_order leaves ``_map`` empty and bisects ``_values``.
    """

    cdef dict _map
    cdef _Chunks _values

    def __cinit__(self):
        self._map = {}
        self._values = _new_chunks(False, True)

    cdef object _value_key(self, object value):
        raise NotImplementedError

    cdef object _lookup_key(self, object value):
        return self._value_key(value)

    cdef object _payload(self, object key):
        """The payload held under ``key``, or _MISSING."""
        return self._map.get(key, _MISSING)

    cdef tuple _args(self):
        return ()

    def __reduce__(self):
        cdef list entries = []
        cdef list pks = []
        for chunk, payloads in zip(self._values.keys, self._values.items):
            for key, payload in zip(<list>chunk, <list>payloads):
                del pks[:]
                self._take(pks, payload, None, False, -1)
                value = _last(key)
                for pk in pks:
                    entries.append((value, pk))
        return _restore_index, (type(self), self._args(), entries)

    cdef Py_ssize_t _count(self, object payload) except -1:
        raise NotImplementedError

    cdef int _take(
        self, list out, object payload, object after, bint reverse, Py_ssize_t need
    ) except -1:
        raise NotImplementedError

    cdef list _pks(self, object payload):
        raise NotImplementedError

    cdef int _bulk(self, list values, list pks) except -1:
        """Fill the empty index with entries (values[i], pks[i]), in the order they were applied."""
        raise NotImplementedError

    def eq(self, value):
        """The pks holding value, in pk order; [] for a value that is not indexed."""
        key = self._lookup_key(value)
        if key is not None:
            payload = self._payload(key)
            if payload is not _MISSING:
                return self._pks(payload)
        return []

    def in_(self, values):
        """The pks holding any of values, in index order. See natskv._core_py."""
        cdef set keys = set()
        cdef list out = []
        if isinstance(values, (str, bytes)):
            raise TypeError(f"in_ needs an iterable of values, not {type(values).__name__}")
        for value in values:
            key = self._lookup_key(value)
            if key is not None and self._payload(key) is not _MISSING:
                keys.add(key)
        for key in _sorted_skeys(keys):
            self._take(out, self._payload(key), None, False, -1)
        return out

    def count_eq(self, value):
        """How many pks hold value (0 for a value that is not indexed)."""
        key = self._lookup_key(value)
        if key is None:
            return 0
        payload = self._payload(key)
        return 0 if payload is _MISSING else self._count(payload)

    def distinct(self):
        """The number of distinct indexed values."""
        return self._values.size

    def min_value(self):
        """The smallest indexed value in index order, or None if empty."""
        if not self._values.keys:
            return None
        return _last((<list>self._values.keys[0])[0])

    def max_value(self):
        """The largest indexed value in index order, or None if empty."""
        cdef list chunk
        if not self._values.keys:
            return None
        chunk = self._values.keys[len(self._values.keys) - 1]
        return _last(chunk[len(chunk) - 1])

    def position(self, value, pk):
        """The cursor (value, pk) of an entry, for after= in ordered / range / prefix."""
        key = self._cursor_key(value)
        _check_pk(pk)
        return (_last(key), pk)

    cdef object _cursor_key(self, object value):
        key = self._value_key(value)
        if key is None:
            raise ValueError(f"cursor value {value!r} is not indexed (None, NaN or not a scalar)")
        return key

    cdef tuple _cursor(self, object after):
        if not isinstance(after, (tuple, list)) or len(after) != 2:
            raise ValueError(f"after must be a (value, pk) cursor from position(), not {after!r}")
        key = self._cursor_key(after[0])
        pk = after[1]
        _check_pk(pk)
        return (key, pk)

    def range(
        self,
        lo=None,
        hi=None,
        bint lo_inclusive=True,
        bint hi_inclusive=True,
        bint reverse=False,
        limit=None,
        after=None,
    ):
        """The pks whose value lies between lo and hi, in index order. See natskv._core_py."""
        cdef Py_ssize_t need = _check_limit(limit)
        cdef object low = None
        cdef object high = None
        if lo is not None:
            low = _bound_key(lo)
        if hi is not None:
            high = _bound_key(hi)
        cursor = None if after is None else self._cursor(after)
        if (lo is not None and low is None) or (hi is not None and high is None) or need == 0:
            return []
        if low is None and high is None:
            return self._walk(None, True, None, True, reverse, cursor, need)
        if low is None:
            return self._walk((_skey_rank(high),), False, high, hi_inclusive, reverse, cursor, need)
        if high is None:
            return self._walk(low, lo_inclusive, (_skey_rank(low) + 1,), False, reverse, cursor, need)
        if _skey_rank(low) != _skey_rank(high):
            return []
        return self._walk(low, lo_inclusive, high, hi_inclusive, reverse, cursor, need)

    def prefix(self, p, limit=None, bint reverse=False, after=None):
        """The pks whose value is a str starting with p, in index order. See natskv._core_py."""
        if not isinstance(p, str):
            raise TypeError(f"prefix must be str, not {type(p).__name__}")
        cdef Py_ssize_t need = _check_limit(limit)
        cdef str text = str.__str__(p)
        end = _prefix_end(text)
        high = (3,) if end is None else end
        cursor = None if after is None else self._cursor(after)
        if need == 0:
            return []
        return self._walk(text, True, high, False, reverse, cursor, need)

    def ordered(self, bint reverse=False, after=None, limit=None):
        """Every pk in index order, or reversed, strictly after the cursor after. See _core_py."""
        cdef Py_ssize_t need = _check_limit(limit)
        cursor = None if after is None else self._cursor(after)
        if need == 0:
            return []
        return self._walk(None, True, None, True, reverse, cursor, need)

    cdef list _walk(
        self,
        object low,
        bint lo_inc,
        object high,
        bint hi_inc,
        bint reverse,
        object cursor,
        Py_ssize_t need,
    ):
        cdef list out = []
        cdef list chunk, payloads
        cdef _Chunks values = self._values
        cdef Py_ssize_t ci, j
        cdef int c
        cdef object at = None
        cdef object after_pk = None
        if cursor is not None:
            at, after_pk = cursor
            if not reverse:
                if low is None or _skey_cmp(at, low) > 0 or (lo_inc and _skey_cmp(at, low) == 0):
                    low, lo_inc = at, True
                else:
                    at = None
            elif high is None or _skey_cmp(at, high) < 0 or (hi_inc and _skey_cmp(at, high) == 0):
                high, hi_inc = at, True
            else:
                at = None
        if not reverse:
            if low is None:
                ci = j = 0
            else:
                values.locate(low, not lo_inc, &ci, &j)
            while ci < len(values.keys):
                chunk = values.keys[ci]
                payloads = values.items[ci]
                while j < len(chunk):
                    key = chunk[j]
                    if high is not None:
                        c = _skey_cmp(key, high)
                        if c > 0 or (c == 0 and not hi_inc):
                            return out
                    # Only the first key can be the cursor's: the scan starts there.
                    if at is not None and _skey_cmp(key, at) == 0:
                        self._take(out, payloads[j], after_pk, False, need)
                    else:
                        self._take(out, payloads[j], None, False, need)
                    at = None
                    if need >= 0 and len(out) >= need:
                        return out
                    j += 1
                ci += 1
                j = 0
            return out
        if high is None:
            ci = len(values.keys)
            j = 0
        else:
            values.locate(high, hi_inc, &ci, &j)
        while True:
            if j == 0:
                ci -= 1
                if ci < 0:
                    return out
                j = len(<list>values.keys[ci])
            chunk = values.keys[ci]
            payloads = values.items[ci]
            j -= 1
            key = chunk[j]
            if low is not None:
                c = _skey_cmp(key, low)
                if c < 0 or (c == 0 and not lo_inc):
                    return out
            if at is not None and _skey_cmp(key, at) == 0:
                self._take(out, payloads[j], after_pk, True, need)
            else:
                self._take(out, payloads[j], None, True, need)
            at = None
            if need >= 0 and len(out) >= need:
                return out


@cython.boundscheck(True)
cdef class SortedIndex(_OrderedIndex):
    """A secondary index on one field: value -> the pks of the records holding it, ordered.

    Same API and behaviour as natskv._core_py.SortedIndex. Not thread-safe: the owner
    serializes writers against readers.
    """

    cdef Py_ssize_t _len

    def __len__(self):
        return self._len

    def __repr__(self):
        return f"SortedIndex(entries={self._len}, distinct={len(self._map)})"

    cdef object _value_key(self, object value):
        return _value_skey(value)

    cdef list _pks(self, object group):
        if type(group) is list:
            return (<list>group)[:]
        return (<_Chunks>group).all_keys()

    cdef Py_ssize_t _count(self, object group) except -1:
        if type(group) is list:
            return len(<list>group)
        return (<_Chunks>group).size

    cdef int _take(
        self, list out, object group, object after, bint reverse, Py_ssize_t need
    ) except -1:
        cdef list pks
        cdef _Chunks chunks
        cdef Py_ssize_t start, stop, i, ci, j
        if type(group) is list:
            pks = group
            if not reverse:
                start = 0 if after is None else _bisect(pks, after, True, True)
                stop = len(pks)
                if need >= 0 and stop - start > need - len(out):
                    stop = start + need - len(out)
                for i in range(start, stop):
                    out.append(pks[i])
            else:
                stop = len(pks) if after is None else _bisect(pks, after, False, True)
                start = 0
                if need >= 0 and stop - start > need - len(out):
                    start = stop - (need - len(out))
                for i in range(stop - 1, start - 1, -1):
                    out.append(pks[i])
            return 0
        chunks = group
        if after is not None:
            chunks.locate(after, not reverse, &ci, &j)
        elif reverse:
            ci = len(chunks.keys)
            j = 0
        else:
            ci = j = 0
        return chunks.emit(out, ci, j, reverse, need)

    def add(self, value, pk):
        """Index pk under value. False if the entry exists or the value is not indexed."""
        return self._add(value, pk)

    cdef bint _add(self, object value, object pk) except -1:
        cdef list pks
        cdef _Chunks chunks
        cdef Py_ssize_t j
        _check_pk(pk)
        key = _value_skey(value)
        if key is None:
            return False
        group = self._map.get(key)
        if group is None:
            pks = [pk]
            self._map[key] = pks
            self._values.insert(key, pks)
        elif type(group) is list:
            pks = group
            j = _bisect(pks, pk, False, True)
            if j < len(pks) and _pk_cmp(pks[j], pk) == 0:
                return False
            pks.insert(j, pk)
            if len(pks) > _GROUP_LIST_MAX:
                chunks = _new_chunks(True, False)
                chunks.fill(pks)
                self._map[key] = chunks
                self._values.set_item(key, chunks)
        elif not (<_Chunks>group).insert(pk, None):
            return False
        self._len += 1
        return True

    def remove(self, value, pk):
        """Drop the entry (value, pk). False (no error) if it is not there."""
        return self._remove(value, pk)

    cdef bint _remove(self, object value, object pk) except -1:
        cdef list pks
        cdef Py_ssize_t j
        cdef bint empty
        _check_pk(pk)
        key = _value_skey(value)
        if key is None:
            return False
        group = self._map.get(key)
        if group is None:
            return False
        if type(group) is list:
            pks = group
            j = _bisect(pks, pk, False, True)
            if j == len(pks) or _pk_cmp(pks[j], pk) != 0:
                return False
            del pks[j]
            empty = not pks
        else:
            if (<_Chunks>group).pop(pk, _MISSING) is _MISSING:
                return False
            empty = (<_Chunks>group).size == 0
        self._len -= 1
        if empty:
            del self._map[key]
            self._values.pop(key, _MISSING)
        return True

    def replace(self, old_value, new_value, pk):
        """Move pk from old_value to new_value (either may be unindexed)."""
        _check_pk(pk)
        old = _value_skey(old_value)
        new = _value_skey(new_value)
        if old is None or new is None or _skey_cmp(old, new) != 0:
            self._remove(old_value, pk)
        self._add(new_value, pk)

    cdef int _bulk(self, list values, list pks) except -1:
        # One pass groups the pks by key, then each group and the keys are sorted once: far
        # cheaper than inserting entry by entry when a replica loads a whole bucket.
        cdef dict groups = {}
        cdef list group, keys, payloads
        cdef _Chunks chunks
        cdef Py_ssize_t i, n = len(values)
        for i in range(n):
            key = _value_skey(values[i])
            if key is None:
                continue
            group = groups.get(key)
            if group is None:
                groups[key] = [pks[i]]
            else:
                group.append(pks[i])
        keys = _sorted_skeys(groups)
        payloads = []
        for key in keys:
            group = groups[key]
            _sort_pks(group)
            self._len += len(group)
            if len(group) > _GROUP_LIST_MAX:
                chunks = _new_chunks(True, False)
                chunks.fill(group)
                payloads.append(chunks)
                self._map[key] = chunks
            else:
                payloads.append(group)
                self._map[key] = group
        self._values.fill_items(keys, payloads)
        return 0

    def clear(self):
        """Drop every entry."""
        self._map.clear()
        self._values = _new_chunks(False, True)
        self._len = 0


cdef bint _ascending_pks(list values, list pks) except -1:
    """Whether values[i] is an int equal to the int pks[i] for every i, in strictly ascending order."""
    cdef Py_ssize_t i, n = len(values)
    cdef object value, pk, previous = None
    if n != len(pks):
        return False
    for i in range(n):
        value = values[i]
        pk = pks[i]
        if type(value) is not int or type(pk) is not int or _int_cmp(value, pk) != 0:
            return False
        if previous is not None and _int_cmp(previous, value) >= 0:
            return False
        previous = value
    return True


@cython.boundscheck(True)
cdef class UniqueIndex(_OrderedIndex):
    """A unique index: value -> the one pk holding it, with SortedIndex's ordered scans.

    Same API and behaviour as natskv._core_py.UniqueIndex (pk_order=True: the values are
    primary keys, in pk order). Not thread-safe: the owner serializes access.
    """

    cdef readonly bint pk_order

    def __init__(self, pk_order=False):
        self.pk_order = bool(pk_order)

    cdef tuple _args(self):
        return (bool(self.pk_order),)

    def __len__(self):
        return self._values.size

    def __repr__(self):
        return f"UniqueIndex(entries={self._values.size}, pk_order={bool(self.pk_order)})"

    cdef object _value_key(self, object value):
        if not self.pk_order:
            return _value_skey(value)
        return None if value is None else _pk_skey(value)

    cdef object _lookup_key(self, object value):
        try:
            return self._value_key(value)
        except (TypeError, ValueError):
            return None

    cdef object _payload(self, object key):
        # With pk_order the replica's records already map every pk: a second hash table here
        # would cost about 50 bytes a record, so the sorted chunks answer lookups (O(log n)).
        cdef Py_ssize_t ci, j
        cdef _Chunks values = self._values
        if not self.pk_order:
            return self._map.get(key, _MISSING)
        values.locate(key, False, &ci, &j)
        if ci < len(values.keys) and _skey_cmp((<list>values.keys[ci])[j], key) == 0:
            return (<list>values.items[ci])[j]
        return _MISSING

    cdef list _pks(self, object pk):
        return [pk]

    cdef Py_ssize_t _count(self, object pk) except -1:
        return 1

    cdef int _take(
        self, list out, object pk, object after, bint reverse, Py_ssize_t need
    ) except -1:
        cdef int c
        if after is not None:
            c = _pk_cmp(pk, after)
            if (c <= 0) if not reverse else (c >= 0):
                return 0
        out.append(pk)
        return 0

    def get(self, value):
        """The pk holding value, or None (also for a value that cannot be indexed)."""
        key = self._lookup_key(value)
        if key is None:
            return None
        pk = self._payload(key)
        return None if pk is _MISSING else pk

    def add(self, value, pk):
        """Map value to pk: False if already so or not indexed, ValueError if another pk has it."""
        _check_pk(pk)
        key = self._value_key(value)
        if key is None:
            return False
        held = self._payload(key)
        if held is not _MISSING:
            if _pk_cmp(held, pk) == 0:
                return False
            raise ValueError(f"value {value!r} is already held by pk {held!r}, not {pk!r}")
        if not self.pk_order:
            self._map[key] = pk
        self._values.insert(key, pk)
        return True

    def remove(self, value):
        """Unmap value; returns the pk that held it, or None (no error) if none did."""
        key = self._lookup_key(value)
        if key is None:
            return None
        pk = self._values.pop(key, _MISSING)
        if pk is _MISSING:
            return None
        if not self.pk_order:
            del self._map[key]
        return pk

    def replace(self, old_value, new_value, pk):
        """Move pk from old_value to new_value atomically. See natskv._core_py.UniqueIndex."""
        _check_pk(pk)
        new = self._value_key(new_value)
        if new is not None:
            held = self._payload(new)
            if held is not _MISSING and _pk_cmp(held, pk) != 0:
                raise ValueError(f"value {new_value!r} is already held by pk {held!r}, not {pk!r}")
        old = self._lookup_key(old_value)
        if old is not None and (new is None or _skey_cmp(old, new) != 0):
            held = self._payload(old)
            if held is not _MISSING and _pk_cmp(held, pk) == 0:
                self._values.pop(old, _MISSING)
                if not self.pk_order:
                    del self._map[old]
        if new is not None:
            self.add(new_value, pk)

    cdef int _bulk(self, list values, list pks) except -1:
        # A later entry takes a value from an earlier one, as apply() does one change at a time.
        cdef dict held = {} if self.pk_order else self._map
        cdef Py_ssize_t i, n = len(values)
        cdef list keys
        if self.pk_order and _ascending_pks(values, pks):
            # A replica's records by primary key, loaded in pk order (the usual order of a
            # bucket's keys): each value is its own pk, and they are distinct and sorted already.
            self._values.fill_items(values, pks)
            return 0
        for i in range(n):
            value = values[i]
            try:
                key = self._value_key(value)
            except (TypeError, ValueError):
                continue
            if key is not None:
                held[key] = pks[i]
        keys = _sorted_skeys(held)
        self._values.fill_items(keys, [held[key] for key in keys])
        return 0

    def clear(self):
        """Drop every entry."""
        self._map.clear()
        self._values = _new_chunks(False, True)


# ---------------------------------------------------------------------------------------------
# Records: a model's stored records, one tuple each
# ---------------------------------------------------------------------------------------------

cdef extern from "Python.h":
    ctypedef struct PyTupleObject:
        PyObject* ob_item[1]
    PyObject* _PyObject_GC_NewVar(PyTypeObject* kind, Py_ssize_t items) except NULL
    void PyObject_GC_Track(void* op)


cdef object _alloc_record(object cls, Py_ssize_t size):
    """An empty (all NULL) tuple of the Record class cls with size items, not yet tracked by
    the collector. Allocated at its exact size: tp_alloc (PyType_GenericAlloc) adds room for
    one more item, which puts a 6-field record in the next 16-byte size class."""
    cdef PyObject* raw = _PyObject_GC_NewVar(<PyTypeObject*>cls, size)
    cdef Py_ssize_t i
    for i in range(size):
        (<PyTupleObject*>raw).ob_item[i] = NULL
    record = <object>raw
    Py_DECREF(record)  # <object> took a reference of its own
    return record


class _Absent:
    """The value a record holds for a field of its layout that it does not have."""

    __slots__ = ()

    def __repr__(self):
        return "<absent>"


cdef object _ABSENT = _Absent()


cdef inline object _record_value(object record, dict slots, object key, object default):
    """The value of ``key`` in a Record whose layout's slots are ``slots``, or ``default``."""
    cdef PyObject* slot = PyDict_GetItem(slots, key)
    cdef object value
    cdef Py_ssize_t size = PyTuple_GET_SIZE(record), at
    if slot is not NULL:
        at = <Py_ssize_t><object>slot
        if at >= size:  # past the end of a record cut short: absent
            return default
        value = <object>PyTuple_GET_ITEM(record, at)
        return default if value is _ABSENT else value
    if size > len(slots) + 1:  # the trailing dict of keys outside the layout
        return (<dict>PyTuple_GET_ITEM(record, size - 1)).get(key, default)
    return default


class Record(tuple):
    """One stored record of a model in a single object: the tuple ``(revision, v1, ..., vn)``
    (plus a dict of keys outside the layout). Reads as a read-only mapping of the stored form.
    See natskv._core_py.Record."""

    __slots__ = ()
    _names = ()
    _slots = {}

    @property
    def revision(self):
        """The revision of the record."""
        return <object>PyTuple_GET_ITEM(self, 0)

    def get(self, key, default=None):
        """The value of key in the stored form, or default."""
        return _record_value(self, type(self)._slots, key, default)

    def __getitem__(self, key):
        value = _record_value(self, type(self)._slots, key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key):
        return _record_value(self, type(self)._slots, key, _ABSENT) is not _ABSENT

    def as_dict(self):
        """A new dict of the stored form (layout fields first, in layout order)."""
        cdef tuple names = type(self)._names
        cdef dict out = {}
        cdef Py_ssize_t i, n = len(names)
        cdef object value
        for i in range(min(n, PyTuple_GET_SIZE(self) - 1)):
            value = <object>PyTuple_GET_ITEM(self, i + 1)
            if value is not _ABSENT:
                out[names[i]] = value
        if PyTuple_GET_SIZE(self) > n + 1:
            out.update(<dict>PyTuple_GET_ITEM(self, n + 1))
        return out

    def __iter__(self):
        return iter(self.as_dict())

    def __len__(self):
        return len(self.as_dict())

    def keys(self):
        """The keys of the stored form."""
        return self.as_dict().keys()

    def values(self):
        """The values of the stored form."""
        return self.as_dict().values()

    def items(self):
        """The (key, value) pairs of the stored form."""
        return self.as_dict().items()

    def __eq__(self, other):
        if isinstance(other, Record):
            return self.as_dict() == other.as_dict()
        if isinstance(other, dict):
            return self.as_dict() == other
        return NotImplemented

    def __ne__(self, other):
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None

    def __repr__(self):
        return f"Record({self.as_dict()!r}, revision={self.revision!r})"

    def __reduce__(self):
        return dict, (self.as_dict(),)


def record_type(names):
    """The Record class of records whose layout is the field names, in order. See
    natskv._core_py.record_type."""
    layout = tuple(names)
    for name in layout:
        if type(name) is not str:
            raise TypeError(f"field names are str, not {type(name).__name__}")
    if len(set(layout)) != len(layout):
        raise ValueError(f"field names repeat in {layout!r}")
    slots = {name: i for i, name in enumerate(layout, 1)}
    return type("Record", (Record,), {"__slots__": (), "__module__": __name__, "_names": layout, "_slots": slots})


cdef object _record_pk(str key):
    cdef Py_ssize_t n = len(key), i, start = 5
    cdef Py_UCS4 kind, c
    if n < 4 or key[0] != u"r" or key[1] != u":" or key[3] != u":":
        return None
    kind = key[2]
    if kind == u"s":
        return key[4:]
    if kind == u"i":
        # exactly as str() writes an int: ASCII digits, no "+", no leading zero, no "-0"
        if n == 4 or (key[4] == u"-" and n == 5):
            return None
        if key[4] != u"-":
            start = 4
        if key[start] == u"0" and (n > start + 1 or start == 5):
            return None
        for i in range(start, n):
            c = key[i]
            if c < u"0" or c > u"9":
                return None
        return int(key[4:])
    if kind == u"u":
        text = key[4:]
        try:
            return text if str(uuid.UUID(text)) == text else None
        except ValueError:
            return None
    return None


def record_pk(key):
    """The primary key (stored form) of a model's record key, None for any other key. See
    natskv._core_py.record_pk."""
    if type(key) is not str:
        raise TypeError(f"a key is a str, not {type(key).__name__}")
    return _record_pk(key)


cdef object _new_record(object cls, dict stored, object revision, list shared, Py_ssize_t limit):
    """The record of cls holding the dict stored at revision; see natskv._core_py._new_record."""
    cdef tuple names = cls._names
    cdef Py_ssize_t n = len(names), i, known = 0
    cdef PyObject* raw
    cdef list values = [_ABSENT] * n
    cdef dict extra = None
    for i in range(n):
        raw = PyDict_GetItem(stored, names[i])
        if raw is not NULL:
            values[i] = <object>raw
            known += 1
    if known < len(stored):
        slots = cls._slots
        extra = {key: item for key, item in stored.items() if key not in slots}
    return _assemble_record(cls, values, extra, revision, shared, limit)


cdef object _assemble_record(object cls, list values, dict extra, object revision, list shared, Py_ssize_t limit):
    """The record of cls holding values (one per layout name, _ABSENT where absent) and the
    dict extra of the keys outside the layout (None: no such key) at revision. Repeated str
    values of the fields tracked in shared are replaced by the first object seen with that value."""
    cdef Py_ssize_t n = len(values), i
    cdef PyObject* kept
    cdef object value, seen
    cdef bint containers = False
    cdef type kind
    cdef Py_ssize_t width = 0  # values held: up to the last present one, or all with extra keys
    if extra is not None:
        width = n
    else:
        for i in range(n - 1, -1, -1):
            if values[i] is not _ABSENT:
                width = i + 1
                break
    record = _alloc_record(cls, n + 2 if extra is not None else width + 1)
    Py_INCREF(revision)
    PyTuple_SET_ITEM(record, 0, revision)
    for i in range(width):
        value = values[i]
        if value is not _ABSENT:
            if shared is not None and type(value) is str:
                seen = shared[i + 1]
                if seen is not None:
                    kept = PyDict_GetItem(<dict>seen, value)
                    if kept is not NULL:
                        value = <object>kept
                    elif len(<dict>seen) < limit:
                        PyDict_SetItem(<dict>seen, value, value)
                    else:
                        shared[i + 1] = None
            kind = type(value)
            if not (kind is str or kind is int or kind is float or kind is bool or value is None):
                containers = True
        Py_INCREF(value)
        PyTuple_SET_ITEM(record, i + 1, value)
    if extra is not None:
        Py_INCREF(extra)
        PyTuple_SET_ITEM(record, n + 1, extra)
        containers = True
    # Like CPython's own tuples, a record of strs and numbers only is left to reference
    # counting: it can be in no cycle, and the collector's full passes need not visit it.
    if containers or type(revision) is not int:
        PyObject_GC_Track(<PyObject*>record)
    return record


# ---------------------------------------------------------------------------------------------
# A record's JSON straight into a Record (IndexSet.apply_entries, with orjson's loads)
# ---------------------------------------------------------------------------------------------
#
# A replica's initial load decodes one JSON object per record. Parsing it with orjson builds a
# dict (and a key string per field) only for _new_record to read it back into a Record; this
# reads the flat objects records are made of (strings without escapes, numbers, true, false,
# null) straight into the record's values. Anything else (an escape, a nested value, a number
# that needs more care, malformed JSON) is declined, and orjson parses that payload as before:
# the results are the same either way (tests/test_core_index.py compares them).

cdef extern from "Python.h":
    double PyOS_string_to_double(const char* s, char** endptr, PyObject* overflow_exception) except? -1.0

cdef extern from "math.h":
    bint isinf(double x) nogil

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object text)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)

try:
    from orjson import loads as _orjson_loads
except ImportError:  # natskv depends on orjson; without it the fast decoder is never used
    _orjson_loads = None

cdef object _DECLINED = object()  # _json_record's answer when orjson has to parse the payload


cdef inline Py_ssize_t _json_space(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (p[i] == 32 or p[i] == 10 or p[i] == 13 or p[i] == 9):
        i += 1
    return i


cdef inline Py_ssize_t _json_string_end(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The index of the quote that ends the string whose text starts at i; -1 when the string
    has an escape or a control character, or does not end (declined)."""
    cdef const unsigned char* hit
    cdef Py_ssize_t k
    hit = <const unsigned char*>memchr(p + i, 34, n - i)
    if hit == NULL:
        return -1
    for k in range(i, hit - p):
        if p[k] == 92 or p[k] < 32:
            return -1
    return hit - p


cdef inline bint _is_digit(unsigned char c) noexcept nogil:
    return 48 <= c <= 57


cdef inline Py_ssize_t _digit_run(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Where the run of digits starting at ``i`` ends; -1 when there is no digit at ``i``."""
    if i >= n or not _is_digit(p[i]):
        return -1
    while i < n and _is_digit(p[i]):
        i += 1
    return i


cdef double _POWERS_OF_TEN[16]
for _k in range(16):
    _POWERS_OF_TEN[_k] = 10.0 ** _k  # exact


cdef object _json_number(const unsigned char* p, Py_ssize_t* at, Py_ssize_t n):
    """The JSON number at at[0] (moved past it) as orjson reads it, or _DECLINED: an int of up
    to 18 digits, or a float that is finite."""
    cdef Py_ssize_t i = at[0], start = at[0], digits, k, int_end
    cdef bint negative = False, is_float = False
    cdef long long value = 0
    cdef char text[48]
    cdef double number
    if i < n and p[i] == 45:  # "-"
        negative = True
        i += 1
    digits = i
    if i >= n:
        return _DECLINED
    if p[i] == 48:  # a leading "0" stands alone
        i += 1
    else:
        i = _digit_run(p, i, n)
        if i < 0:
            return _DECLINED
    if i - digits > 18:
        return _DECLINED
    for k in range(digits, i):
        value = value * 10 + (p[k] - 48)
    int_end = i
    if i < n and p[i] == 46:  # "."
        i = _digit_run(p, i + 1, n)
        if i < 0:
            return _DECLINED
        is_float = True
        # Up to 15 digits in all and no exponent: the digits as an integer and the power of ten
        # are doubles exactly, and their quotient is correctly rounded (IEEE division), which is
        # what strtod (and orjson) give. The other floats go to strtod.
        if (int_end - digits) + (i - int_end - 1) <= 15 and not (i < n and (p[i] == 101 or p[i] == 69)):
            for k in range(int_end + 1, i):
                value = value * 10 + (p[k] - 48)
            number = <double>value / _POWERS_OF_TEN[i - int_end - 1]
            at[0] = i
            return -number if negative else number
    if i < n and (p[i] == 101 or p[i] == 69):  # "e" / "E"
        i += 1
        if i < n and (p[i] == 43 or p[i] == 45):
            i += 1
        i = _digit_run(p, i, n)
        if i < 0:
            return _DECLINED
        is_float = True
    at[0] = i
    if not is_float:
        return -value if negative else value
    if i - start >= 48:
        return _DECLINED
    memcpy(text, p + start, i - start)
    text[i - start] = 0
    number = PyOS_string_to_double(text, NULL, NULL)  # correctly rounded, as orjson's
    if isinf(number):
        return _DECLINED  # orjson refuses it
    return number


cdef object _json_value(const unsigned char* p, Py_ssize_t* at, Py_ssize_t n):
    """The scalar JSON value at at[0] (moved past it), or _DECLINED."""
    cdef Py_ssize_t i = at[0], end
    cdef unsigned char c
    if i >= n:
        return _DECLINED
    c = p[i]
    if c == 34:  # a string
        end = _json_string_end(p, i + 1, n)
        if end < 0:
            return _DECLINED
        try:
            value = PyUnicode_DecodeUTF8(<const char*>p + i + 1, end - i - 1, NULL)
        except UnicodeDecodeError:
            return _DECLINED  # orjson refuses it too: let it say so
        at[0] = end + 1
        return value
    if c == 45 or _is_digit(c):
        return _json_number(p, at, n)
    if c == 116 and n - i >= 4 and memcmp(p + i, b"true", 4) == 0:
        at[0] = i + 4
        return True
    if c == 102 and n - i >= 5 and memcmp(p + i, b"false", 5) == 0:
        at[0] = i + 5
        return False
    if c == 110 and n - i >= 4 and memcmp(p + i, b"null", 4) == 0:
        at[0] = i + 4
        return None
    return _DECLINED  # an array, an object, or not JSON


cdef object _utf8_or_none(str name):
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        return None


cdef object _json_record(IndexSet owner, object data, object revision, object pk):
    """What a put of the JSON ``data`` at revision stores under pk in owner: its Record, or None
    when ``data`` is no record of pk (a dict with another pk, or an invalid one), or _DECLINED
    when orjson has to read it (see above)."""
    cdef const unsigned char* p
    cdef Py_ssize_t n, i, end, slot, count, guess = 0, length, k, key_start, key_length
    cdef tuple names = owner._names_utf8
    cdef object value, name, last
    cdef dict extra = None
    cdef list shared = owner._shared
    cdef list last_shared = owner._last_shared
    cdef unsigned long long fresh = 0  # slots holding a str made here
    if type(data) is not bytes:
        return _DECLINED
    p = <const unsigned char*>PyBytes_AS_STRING(data)
    n = PyBytes_GET_SIZE(data)
    count = len(names)
    cdef list values = [_ABSENT] * count
    i = _json_space(p, 0, n)
    if i >= n or p[i] != 123:  # "{"
        return _DECLINED
    i = _json_space(p, i + 1, n)
    if i < n and p[i] == 125:  # "}"
        i += 1
    else:
        while True:
            if i >= n or p[i] != 34:
                return _DECLINED
            end = _json_string_end(p, i + 1, n)
            if end < 0:
                return _DECLINED
            # The field: most often the next one of the layout (records are written in its order).
            length = end - i - 1
            slot = -1
            if guess < count:
                name = names[guess]
                if (name is not None and PyBytes_GET_SIZE(name) == length
                        and memcmp(PyBytes_AS_STRING(name), p + i + 1, length) == 0):
                    slot = guess
            if slot < 0:
                for k in range(count):
                    name = names[k]
                    if (name is not None and PyBytes_GET_SIZE(name) == length
                            and memcmp(PyBytes_AS_STRING(name), p + i + 1, length) == 0):
                        slot = k
                        break
            key_start, key_length = i + 1, length
            i = _json_space(p, end + 1, n)
            if i >= n or p[i] != 58:  # ":"
                return _DECLINED
            i = _json_space(p, i + 1, n)
            value = _DECLINED
            if slot >= 0 and i < n and p[i] == 34:
                # A str of a shared field, most often the one the last record held there: that
                # object is what _assemble_record would pick (the first seen with that value).
                last = last_shared[slot]
                if last is not None and shared[slot + 1] is not None:
                    end = _json_string_end(p, i + 1, n)
                    length = PyUnicode_GET_LENGTH(<str>last)
                    if (end - i - 1 == length
                            and memcmp(PyUnicode_1BYTE_DATA(<str>last), p + i + 1, length) == 0):
                        value = last
                        i = end + 1
            if value is _DECLINED:
                value = _json_value(p, &i, n)
                if value is _DECLINED:
                    return _DECLINED
                if slot >= 0 and slot < 64 and type(value) is str:
                    fresh |= (<unsigned long long>1) << slot
            if slot >= 0:
                values[slot] = value
                guess = slot + 1
            else:
                try:
                    key = PyUnicode_DecodeUTF8(<const char*>p + key_start, key_length, NULL)
                except UnicodeDecodeError:
                    return _DECLINED
                if extra is None:
                    extra = {}
                extra[key] = value
            i = _json_space(p, i, n)
            if i < n and p[i] == 44:  # ","
                i = _json_space(p, i + 1, n)
                continue
            if i < n and p[i] == 125:  # "}"
                i += 1
                break
            return _DECLINED
    if _json_space(p, i, n) != n:
        return _DECLINED  # something after the object
    value = values[owner._pk_slot - 1]
    if value is _ABSENT or type(value) is not type(pk) or value != pk or not _valid_pk(value):
        return None
    # The record's primary key is the very object it is held under: an int or a str less per record.
    values[owner._pk_slot - 1] = pk
    record = _assemble_record(owner.record_type, values, extra, revision, shared, owner._share_max)
    if shared is not None and fresh:
        for slot in range(min(count, 64)):
            if fresh & ((<unsigned long long>1) << slot) and shared[slot + 1] is not None:
                value = <object>PyTuple_GET_ITEM(record, slot + 1)
                last_shared[slot] = value if PyUnicode_IS_ASCII(value) else None
    return record


cdef inline object _slot_value(object record, Py_ssize_t slot):
    """A record's value at slot for an index: None when absent."""
    cdef object value
    if slot >= PyTuple_GET_SIZE(record):
        return None
    value = <object>PyTuple_GET_ITEM(record, slot)
    return None if value is _ABSENT else value


cdef inline object _entry_field(object entry, object layout, Py_ssize_t at, str name):
    """The field name (_ENTRY_FIELDS[at]) of entry, read from its slot when layout (its type's
    slot offsets, see _entry_layout) is known."""
    cdef PyObject* value
    if layout is not None:
        value = (<PyObject**>((<char*><PyObject*>entry) + <Py_ssize_t>(<tuple>layout)[at]))[0]
        if value is not NULL:
            return <object>value
    return getattr(entry, name)


cdef object _int_record_pk(str subject, Py_ssize_t prefix_len):
    """The int primary key of a record whose subject ends in ``r.i.<digits>`` (an int of up to
    18 digits as str() writes it: decode_key makes it ``r:i:<digits>``, which record_pk reads
    as that int); None for any other subject (decoded the long way)."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(subject), i, start = prefix_len + 4
    cdef const Py_UCS1* p
    cdef long long value = 0
    if PyUnicode_KIND(subject) != PyUnicode_1BYTE_KIND or prefix_len < 0 or n - start < 1 or n - start > 18:
        return None
    p = PyUnicode_1BYTE_DATA(subject)
    if memcmp(p + prefix_len, b"r.i.", 4) != 0 or (p[start] == 48 and n - start > 1):
        return None
    for i in range(start, n):
        if p[i] < 48 or p[i] > 57:
            return None
        value = value * 10 + (p[i] - 48)
    return value


@cython.final
cdef class IndexSet:
    """The records of one model by primary key (Records) and the indexes over their fields,
    kept in step one change at a time. Same API and behaviour as natskv._core_py.IndexSet. Not
    thread-safe: the owner serializes access.
    """

    cdef object _pk
    cdef Py_ssize_t _pk_slot
    cdef tuple _unique          # ((slot, UniqueIndex), ...)
    cdef tuple _sorted          # ((slot, SortedIndex), ...)
    cdef dict _records
    cdef list _shared           # None, or per slot: the str values seen there (None: not tracked)
    cdef Py_ssize_t _share_max
    cdef readonly bint deferred
    cdef readonly object record_type
    cdef tuple _names_utf8      # the layout's names, encoded (_json_record compares keys to them)
    cdef list _last_shared      # per slot: the shared str a record last held there (ASCII), or None

    def __init__(self, pk_field, unique, sorted, records, fields):
        if not isinstance(unique, dict) or not isinstance(sorted, dict) or not isinstance(records, dict):
            raise TypeError("unique, sorted and records must be dicts")
        for name, index in unique.items():
            if not isinstance(index, UniqueIndex):
                raise TypeError(f"unique[{name!r}] must be a UniqueIndex, not {type(index).__name__}")
        for name, index in sorted.items():
            if not isinstance(index, SortedIndex):
                raise TypeError(f"sorted[{name!r}] must be a SortedIndex, not {type(index).__name__}")
        self.record_type = record_type(fields)
        slots = self.record_type._slots
        for name in (pk_field, *unique, *sorted):
            if name not in slots:
                raise ValueError(f"{name!r} is not one of the fields {self.record_type._names!r}")
        self._pk = pk_field
        self._pk_slot = slots[pk_field]
        # A name that is no valid UTF-8 (a lone surrogate) matches no key of valid JSON: None.
        self._names_utf8 = tuple(_utf8_or_none(name) for name in self.record_type._names)
        self._last_shared = [None] * len(self._names_utf8)
        self._unique = tuple((slots[name], index) for name, index in unique.items())
        self._sorted = tuple((slots[name], index) for name, index in sorted.items())
        self._records = records
        self._shared = None
        self._share_max = 0
        self.deferred = False

    def share(self, names, limit=256):
        """Hold each repeated str value of the fields ``names`` once. See natskv._core_py.IndexSet.share."""
        if type(limit) is bool or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, not {limit!r}")
        slots = self.record_type._slots
        tracked = {slots[name] for name in names if name in slots}
        self._shared = [{} if slot in tracked else None for slot in range(len(slots) + 1)] if tracked else None
        self._share_max = limit
        self._last_shared = [None] * len(self._names_utf8)

    def record(self, stored, revision):
        """A record of this set's layout holding the dict stored (not held, not indexed)."""
        if not isinstance(stored, dict):
            raise TypeError(f"a stored record is a dict, not {type(stored).__name__}")
        return _new_record(self.record_type, stored, revision, None, 0)

    def defer(self):
        """Keep only the records up to date from now on, and leave the indexes alone until
        :meth:`rebuild` (a replica's initial load). See natskv._core_py.IndexSet.defer."""
        self.deferred = True

    def rebuild(self):
        """Rebuild every index from the records in bulk and keep them in step again."""
        cdef list records = list(self._records.values())
        cdef list pks = list(self._records)
        cdef list values
        cdef Py_ssize_t slot
        cdef _OrderedIndex index
        for indexes in (self._unique, self._sorted):
            for entry in <tuple>indexes:
                slot = (<tuple>entry)[0]
                index = <_OrderedIndex>(<tuple>entry)[1]
                index.clear()
                values = [_slot_value(record, slot) for record in records]
                index._bulk(values, pks)
        self.deferred = False

    def apply(self, old, new, revision):
        """Replace the record old (a dict or the Record held) by the dict new (either may be
        None) as of revision; return the revision the old record was held at, 0 if it was not
        held. See natskv._core_py.IndexSet.apply."""
        return self._apply(old, new, revision)

    def apply_entries(self, entries, Py_ssize_t prefix_len, sep, loads, pk_of, dict deleted):
        """Apply a run of raw entries of record keys in one call (a list is consumed); return
        the highest revision among them (0 for none). See natskv._core_py.IndexSet.apply_entries."""
        cdef Py_UCS4 c_sep = <Py_UCS4>_sep_char(sep)
        cdef object top = 0, revision, held, new, value, pk
        cdef str subject
        cdef bint put
        cdef dict records = self._records
        cdef PyObject* raw
        cdef list consumed = entries if type(entries) is list else None
        cdef Py_ssize_t at = -1
        # orjson's own loads: payloads are read into Records here (the same results, faster).
        cdef bint fast = loads is _orjson_loads and loads is not None
        cdef bint int_keys = pk_of is record_pk and c_sep == u":"
        cdef object entry_type = None, layout = None  # the last entry's type, its slots (RawEntry)
        for entry in entries:
            at += 1
            if consumed is not None:
                # Let go of each entry once read: its payload's memory is reused for the records
                # that follow, instead of the whole run's staying allocated until the end.
                consumed[at] = None
            if type(entry) is not entry_type:
                entry_type = type(entry)
                layout = _entry_layouts.get(entry_type)
            revision = _entry_field(entry, layout, 2, "revision")
            if revision > top:
                top = revision
            subject = _entry_field(entry, layout, 0, "subject")
            # The key of an int primary key read in place (most records' keys), when nothing
            # else needs the key itself; any other is decoded first.
            pk = _int_record_pk(subject, prefix_len) if int_keys and not deleted else None
            if pk is None:
                try:
                    key = _decode(subject, c_sep, prefix_len)
                except ValueError:
                    key = subject[prefix_len:]
                pk = _record_pk(key) if pk_of is record_pk else pk_of(key)
                if pk is None:
                    continue  # not a record key: it holds no record
            raw = PyDict_GetItem(records, pk)
            held = None if raw is NULL else <object>raw
            if held is not None and revision <= <object>PyTuple_GET_ITEM(held, 0):
                continue  # applied already
            if deleted and revision <= deleted.get(key, 0):
                continue
            put = _entry_field(entry, layout, 4, "operation") == "PUT"
            if not put and held is None:
                continue
            new = None
            if put and not _entry_field(entry, layout, 6, "raw_bytes"):
                data = _entry_field(entry, layout, 1, "data")
                if fast:
                    record = _json_record(self, data, revision, pk)
                    if record is not _DECLINED:
                        self._unhold(held)
                        if record is not None:
                            self._hold(record, pk)
                        continue
                try:
                    value = loads(data)
                except ValueError:
                    value = None
                if type(value) is dict:
                    raw = PyDict_GetItem(<dict>value, self._pk)
                    if raw is not NULL and type(<object>raw) is type(pk) and <object>raw == pk:
                        new = value
            self._apply(held, new, revision)
        return top

    cdef object _apply(self, object old, object new, object revision):
        cdef object old_revision = self._unhold(old), new_pk
        if type(new) is dict:
            new_pk = (<dict>new).get(self._pk)
            if _valid_pk(new_pk):
                self._hold(_new_record(self.record_type, <dict>new, revision, self._shared, self._share_max), new_pk)
        return old_revision

    cdef object _unhold(self, object old):
        """Drop the record old (a dict or the Record held) and its index entries; return the
        revision it was held at, 0 if it was not held."""
        cdef object old_revision = 0, held, value, old_pk
        cdef UniqueIndex unique
        cdef SortedIndex ordered
        cdef Py_ssize_t slot
        if old is not None and (type(old) is dict or isinstance(old, Record)):
            old_pk = old.get(self._pk)
            held = self._records.pop(old_pk, None) if _valid_pk(old_pk) else None
            if held is not None:
                old_revision = <object>PyTuple_GET_ITEM(held, 0)
                if not self.deferred:
                    for entry in self._unique:
                        slot = (<tuple>entry)[0]
                        unique = <UniqueIndex>(<tuple>entry)[1]
                        value = _slot_value(held, slot)
                        if value is not None and unique.get(value) == old_pk:
                            unique.remove(value)
                    for entry in self._sorted:
                        slot = (<tuple>entry)[0]
                        ordered = <SortedIndex>(<tuple>entry)[1]
                        value = _slot_value(held, slot)
                        if value is not None:
                            ordered._remove(value, old_pk)
        return old_revision

    cdef void _hold(self, object record, object new_pk) except *:
        """Hold record under new_pk (a valid pk) and index it."""
        cdef object value, holder
        cdef UniqueIndex unique
        cdef SortedIndex ordered
        cdef Py_ssize_t slot
        self._records[new_pk] = record
        if self.deferred:
            return
        for entry in self._unique:
            slot = (<tuple>entry)[0]
            unique = <UniqueIndex>(<tuple>entry)[1]
            value = _slot_value(record, slot)
            if value is None:
                continue
            holder = unique.get(value)
            if holder != new_pk:
                if holder is not None:
                    unique.remove(value)
                unique.add(value, new_pk)
        for entry in self._sorted:
            slot = (<tuple>entry)[0]
            ordered = <SortedIndex>(<tuple>entry)[1]
            value = _slot_value(record, slot)
            if value is not None:
                ordered._add(value, new_pk)


cdef bint _valid_pk(object pk):
    try:
        _check_pk(pk)
    except (TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Records -> instances
# ---------------------------------------------------------------------------------------------

cdef extern from "Python.h":
    int PyObject_GenericSetDict(object obj, object value, void* context) except -1
    int PyObject_GenericSetAttr(object obj, object name, object value) except -1

cdef object _object_new = object.__new__


@cython.final
cdef class RecordBuilder:
    """Turns stored records (Records, or (stored dict or Record, revision) pairs) into instances
    of a plain Python class. See natskv._core_py.RecordBuilder.

    Each instance's ``__dict__`` gets every name of ``fields`` (None when the record lacks it),
    ``_extra`` (a dict of the record's other keys, except those in ``skip``), ``_version`` (the
    revision) and ``_stored`` (the record itself, shared, never modified). ``converters`` are
    ``(field, function)`` pairs applied to non-None values of those fields; the fields named in
    ``floats`` get ints (not bools) turned into floats, as JSON writes 1.0 as 1. ``__init__`` is
    not called. Immutable once built (its per-layout plans are a cache): safe to share between
    threads.
    """

    cdef object _cls
    cdef tuple _floats
    cdef dict _blank
    cdef frozenset _fields
    cdef frozenset _skip
    cdef tuple _converters
    cdef tuple _names
    cdef tuple _skip_names
    cdef bint _instance_dict
    cdef tuple _plan
    cdef dict _layouts          # Record class -> (slots of the fields, (name, slot) of the others)

    def __init__(self, cls, fields, skip=(), converters=(), floats=()):
        if not isinstance(cls, type):
            raise TypeError(f"cls must be a class, not {type(cls).__name__}")
        self._cls = cls
        self._blank = dict.fromkeys(fields)
        self._fields = frozenset(self._blank)
        self._skip = frozenset(skip)
        self._names = tuple(self._blank)
        self._skip_names = tuple(n for n in self._skip if n not in self._fields)
        # Instances of a plain class have a dict of their own to fill; others (a class with
        # __slots__ and __dict__, say) get one assigned.
        self._instance_dict = cls.__dictoffset__ != 0

        self._converters = tuple((name, convert) for name, convert in converters)
        for name, convert in self._converters:
            if name not in self._fields or not callable(convert):
                raise ValueError(f"a converter needs a field name and a function, not ({name!r}, {convert!r})")
        self._floats = tuple(floats)
        for name in self._floats:
            if name not in self._fields:
                raise ValueError(f"floats names fields; {name!r} is not one")
        converter_of = dict(self._converters)
        self._plan = tuple((name, converter_of.get(name), name in self._floats) for name in self._names)
        self._layouts = {}

    cdef int _extras(self, dict stored, dict extra) except -1:
        cdef Py_ssize_t pos = 0
        cdef PyObject* key
        cdef PyObject* raw
        while PyDict_Next(stored, &pos, &key, &raw):
            if <object>key not in self._fields and <object>key not in self._skip:
                PyDict_SetItem(extra, <object>key, <object>raw)
        return 0

    cdef tuple _layout(self, object kind):
        """How records of the Record class kind map to this builder: per field (name, slot (0:
        outside the layout), converter, to_float), the (name, slot) of the layout's other kept
        names, and the record width without its dict of keys outside the layout."""
        cdef tuple layout = <tuple>self._layouts.get(kind)
        if layout is None:
            slots = kind._slots
            layout = (
                tuple((name, slots.get(name, 0), convert, to_float) for name, convert, to_float in self._plan),
                tuple((name, slot) for name, slot in slots.items()
                      if name not in self._fields and name not in self._skip),
                len(slots) + 1,
            )
            self._layouts[kind] = layout
        return layout

    cdef object _record_value(self, object record, Py_ssize_t slot, object name, dict outside,
                              object convert, bint to_float):
        cdef object value
        if slot:
            if slot >= PyTuple_GET_SIZE(record):
                return None
            value = <object>PyTuple_GET_ITEM(record, slot)
            if value is _ABSENT:
                return None
        elif outside is not None:
            value = outside.get(name)
        else:
            return None
        if convert is not None and value is not None:
            return convert(value)
        if to_float and type(value) is int:
            return float(value)
        return value

    cdef object _from_record(self, object record, object revision):
        """An instance of a Record (see build)."""
        cdef tuple layout = self._layout(type(record))
        cdef Py_ssize_t width = <Py_ssize_t>layout[2]
        cdef dict outside = <dict>PyTuple_GET_ITEM(record, width) if PyTuple_GET_SIZE(record) > width else None
        cdef dict extra = {}
        cdef dict values
        cdef object obj = _object_new(self._cls), value
        for name, slot_obj in <tuple>layout[1]:
            if <Py_ssize_t>slot_obj >= PyTuple_GET_SIZE(record):
                continue
            value = <object>PyTuple_GET_ITEM(record, <Py_ssize_t>slot_obj)
            if value is not _ABSENT:
                PyDict_SetItem(extra, name, value)
        if outside is not None:
            self._extras(outside, extra)
        if self._instance_dict:
            for name, slot_obj, convert, to_float in <tuple>layout[0]:
                PyObject_GenericSetAttr(obj, name, self._record_value(
                    record, <Py_ssize_t>slot_obj, name, outside, convert, to_float))
            PyObject_GenericSetAttr(obj, "_extra", extra)
            PyObject_GenericSetAttr(obj, "_version", revision)
            PyObject_GenericSetAttr(obj, "_stored", record)
            return obj
        values = {}
        for name, slot_obj, convert, to_float in <tuple>layout[0]:
            PyDict_SetItem(values, name, self._record_value(
                record, <Py_ssize_t>slot_obj, name, outside, convert, to_float))
        values["_extra"] = extra
        values["_version"] = revision
        values["_stored"] = record
        PyObject_GenericSetDict(obj, values, NULL)
        return obj

    def build(self, records):
        """One instance per stored record (a Record, or a (stored, revision) pair), in order."""
        cdef list out = []
        cdef dict values, extra, stored
        cdef Py_ssize_t known
        cdef PyObject* raw
        cdef object cls = self._cls, obj, revision, value, name, convert
        cdef bint to_float
        cdef tuple skip = self._skip_names
        cdef bint instance_dict = self._instance_dict
        cdef tuple plan = self._plan
        for item in records:
            if isinstance(item, Record):
                stored_obj = item
                revision = <object>PyTuple_GET_ITEM(item, 0)
            else:
                stored_obj, revision = item
            if isinstance(stored_obj, Record):
                out.append(self._from_record(stored_obj, revision))
                continue
            obj = _object_new(cls)
            extra = {}
            if type(stored_obj) is not dict:
                if not isinstance(stored_obj, dict):
                    raise TypeError(f"a stored record is a dict, not {type(stored_obj).__name__}")
            stored = <dict>stored_obj
            known = 0
            if instance_dict:
                # Set as attributes, in one fixed order: a plain class keeps them in the
                # instance's own compact storage, faster to fill and smaller than a dict.
                for name, convert, to_float in plan:
                    raw = PyDict_GetItem(stored, name)
                    if raw is NULL:
                        value = None
                    else:
                        known += 1
                        value = <object>raw
                        if convert is not None and value is not None:
                            value = convert(value)
                        elif to_float and type(value) is int:
                            value = float(value)
                    PyObject_GenericSetAttr(obj, name, value)
                for name in skip:
                    if PyDict_GetItem(stored, name) is not NULL:
                        known += 1
                if known < len(stored):  # keys that are neither fields nor skipped: in _extra
                    self._extras(stored, extra)
                PyObject_GenericSetAttr(obj, "_extra", extra)
                PyObject_GenericSetAttr(obj, "_version", revision)
                PyObject_GenericSetAttr(obj, "_stored", stored)
                out.append(obj)
                continue
            values = {}
            for name in self._names:
                raw = PyDict_GetItem(stored, name)
                if raw is NULL:
                    PyDict_SetItem(values, name, None)
                else:
                    PyDict_SetItem(values, name, <object>raw)
                    known += 1
            for name in skip:
                if PyDict_GetItem(stored, name) is not NULL:
                    known += 1
            if known < len(stored):  # keys that are neither fields nor skipped: kept in _extra
                self._extras(stored, extra)
            for name, convert in self._converters:
                value = values[name]
                if value is not None:
                    values[name] = convert(value)
            for name in self._floats:
                value = values[name]
                if type(value) is int:
                    values[name] = float(value)
            values["_extra"] = extra
            values["_version"] = revision
            values["_stored"] = stored_obj
            PyObject_GenericSetDict(obj, values, NULL)
            out.append(obj)
        return out
