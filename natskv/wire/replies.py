"""Encoding commands and reading replies' headers: protocol bytes in and out, no I/O.

Pure functions, called on the caller's thread for blocking requests and on the loop thread for the
loop's own requests and watch deliveries.
"""

from __future__ import annotations

import copy
from typing import TypeVar

from natskv._speedups import core
from natskv.errors import InvalidArgumentError

E = TypeVar("E", bound=BaseException)

RawReply = tuple[bytes, "bytes | dict[str, str] | None", str]
"""(payload, headers, reply subject): headers are the raw header block, or a parsed dict when the
reply came through nats-py's own message path."""


def encode_command(subject: str, reply: str, payload: bytes, headers: dict[str, str] | None) -> bytes:
    """``_core.pub_command`` with its refusals as natskv errors: a subject or header NATS cannot
    carry, or a protocol line the server would answer by closing the connection (over its
    default max_control_line), fails here, before anything is sent."""
    try:
        return core.pub_command(subject, reply, payload, headers)
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"cannot send a message to {short_subject(subject)}: {exc}") from exc


def encode_batch(prefix: str, items: list[tuple[str, bytes, dict[str, str]]], batch_id: str, first_reply: str,
                 last_reply: str) -> bytes:
    """``_core.atomic_batch`` (every message of an atomic batch publish in one bytes object) with
    its refusals as natskv errors, raised before anything is sent."""
    try:
        return core.atomic_batch(prefix, items, batch_id, first_reply, last_reply)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"cannot send an atomic batch to {short_subject(prefix)}...: {exc}") from exc


def status_of(headers: bytes | dict[str, str] | None) -> int:
    """The inline status code of a reply (0 when it carries none). Cheap: no full header parse."""
    if headers is None:
        return 0
    if type(headers) is dict:
        return int(headers.get("Status", 0) or 0)
    # Raw bytes here (a dict is always nats-py's plain dict). mypy does not narrow the other side
    # of ``type() is``; isinstance would, but costs more on bytes, the common case.
    # b"NATS/1.0 404 ..." : a status reply has a space right after the version.
    if len(headers) > 12 and headers[8] == 32:  # type: ignore[index]
        return int(headers[9:12])  # type: ignore[index]
    return 0


def parse_reply_headers(headers: bytes | dict[str, str] | None) -> tuple[int, str, dict[str, str]]:
    """(status, description, headers) of a reply, whichever path delivered it."""
    if headers is None:
        return 0, "", {}
    if type(headers) is dict:
        h = dict(headers)
        status = int(h.pop("Status", 0) or 0)
        return status, h.pop("Description", ""), h
    return core.parse_headers(headers)  # type: ignore[arg-type]  # raw bytes: see status_of


def fresh_error(error: E) -> E:
    """A copy of a stored error to raise: one instance raised by call after call would collect
    every call's traceback (and be shared between threads). The errors stored here
    (NotConnectedError, AuthenticationError, PermissionDeniedError) are made of one message."""
    copied = copy.copy(error)
    copied.__cause__ = error.__cause__
    return copied.with_traceback(None)


def short_subject(subject: object) -> str:
    """A subject for an error message: repr()'d and cut to a readable length."""
    text = repr(subject)
    return text if len(text) <= 100 else f"{text[:80]}... ({len(str(subject))} characters)"
