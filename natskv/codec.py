"""Value codecs: how Python values become message payloads and back.

The default :class:`JSONCodec` stores values as JSON (orjson). ``bytes`` given to a JSON bucket are
stored untouched and marked with a header, so they read back as the same ``bytes`` (``b""``
included). Values written by other NATS clients without that header are decoded as JSON, and
returned as ``bytes`` when they are not JSON.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import orjson

from natskv.errors import InvalidArgumentError, SerializationError

RAW_HEADER = "Natskv-Raw"


class Codec(Protocol):
    """Turns values into payload bytes and back. Implementations must be thread-safe."""

    name: str

    def encode(self, value: Any) -> bytes:
        """Encode ``value``; raise :class:`SerializationError` if it cannot be stored."""
        ...

    def decode(self, data: bytes) -> Any:
        """Decode a stored payload."""
        ...


class JSONCodec:
    """JSON via orjson: dicts, lists, str, int, float, bool, None, datetime, UUID, dataclasses."""

    name = "json"
    _options = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY

    def encode(self, value: Any) -> bytes:
        try:
            payload = orjson.dumps(value, option=self._options)
        except TypeError as exc:
            raise SerializationError(
                f"cannot store a value of type {type(value).__name__} as JSON ({exc}); "
                "convert it to JSON types, pass bytes, or give the bucket another codec"
            ) from exc
        # orjson writes NaN and infinities as null, which would read back as None. Only a
        # payload holding a null can hide one, so the common case pays for one byte search
        # (find, not `in`: on bytes, `in` first tries the needle as an int and pays for an error).
        if payload.find(b"null") >= 0:
            where = non_finite_path(value)
            if where is not None:
                raise SerializationError(
                    f"cannot store {where[1]!r} at {where[0]} as JSON (it has no NaN or infinity); "
                    "store None, a string, or a finite number instead"
                )
        return payload

    def decode(self, data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return data  # not written as JSON (another client): hand back the bytes


def non_finite_path(value: Any, root: str = "value") -> tuple[str, float] | None:
    """``(where, number)`` of the first NaN or infinity inside a JSON-able value, or None.

    Looks where orjson looks: dict keys and values, lists, tuples, dataclass fields and numpy
    arrays or scalars (through ``tolist()``). ``where`` reads like ``value['a'][0]``.
    """
    found = _non_finite(value, 0)
    if found is None:
        return None
    number, steps = found
    return root + "".join(reversed(steps)), number


_PLAIN = frozenset({str, int, bool, type(None), bytes})  # types that can hold no float


def _non_finite(value: Any, depth: int) -> tuple[float, list[str]] | None:
    # The path is built only on the way out of a hit, and plain members are skipped without a
    # call: a clean value costs one pass and no string work.
    kind = type(value)
    if kind is float or isinstance(value, float):
        return None if math.isfinite(value) else (value, [])
    if kind in _PLAIN or depth > 256:  # deeper than orjson's own nesting limit: orjson refuses it
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if type(k) is not str and isinstance(k, float) and not math.isfinite(k):
                return k, [" (a key)"]
            if type(v) in _PLAIN:
                continue
            found = _non_finite(v, depth + 1)
            if found is not None:
                found[1].append(f"[{k!r}]")
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if type(v) in _PLAIN:
                continue
            found = _non_finite(v, depth + 1)
            if found is not None:
                found[1].append(f"[{i}]")
                return found
        return None
    fields = getattr(kind, "__dataclass_fields__", None)
    if fields is not None:
        return _non_finite({name: getattr(value, name) for name in fields}, depth)
    if hasattr(value, "dtype") and callable(getattr(value, "tolist", None)):
        return _non_finite(value.tolist(), depth)
    return None


class BytesCodec:
    """Values are ``bytes`` (or ``bytearray`` / ``memoryview``), stored untouched."""

    name = "bytes"

    def encode(self, value: Any) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        raise SerializationError(f"this bucket stores bytes; got {type(value).__name__}")

    def decode(self, data: bytes) -> Any:
        return data


class StrCodec:
    """Values are ``str``, stored as UTF-8."""

    name = "str"

    def encode(self, value: Any) -> bytes:
        if isinstance(value, str):
            return value.encode("utf-8", "surrogatepass")
        raise SerializationError(f"this bucket stores str; got {type(value).__name__}")

    def decode(self, data: bytes) -> Any:
        return data.decode("utf-8", "surrogatepass")


CODECS: dict[str, Codec] = {"json": JSONCodec(), "bytes": BytesCodec(), "str": StrCodec()}


def get_codec(codec: str | Codec | None) -> Codec:
    """A codec by name (``"json"``, ``"bytes"``, ``"str"``) or any object with encode/decode."""
    if codec is None:
        return CODECS["json"]
    if isinstance(codec, str):
        try:
            return CODECS[codec]
        except KeyError:
            raise InvalidArgumentError(
                f"unknown codec {codec!r}; use one of {sorted(CODECS)} or a Codec object"
            ) from None
    if not (callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))):
        raise InvalidArgumentError("a codec needs encode(value) -> bytes and decode(bytes) -> value methods")
    return codec
