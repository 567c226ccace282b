"""Requests sent again until they are answered: the blocking retry loops of the wire path.

They run on the caller's thread and sleep there (``time.sleep``) between attempts; the loop thread
only carries each attempt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from natskv.errors import JetStreamError, NatsKVTimeoutError
from natskv.wire import headers as h
from natskv.wire.jsapi import ERR_DUPLICATE_IN_PROCESS, check_pub_ack
from natskv.wire.mux import CallerMux
from natskv.wire.replies import RawReply, parse_reply_headers, status_of

# A write to a replicated bucket unanswered this long is sent again (deduplicated by its message
# id): far above a healthy acknowledgement (about 1 ms on loopback), and short enough that a
# write follows a newly elected leader within about this long (during an election, writes go
# unanswered). A resend that meets its first copy still being stored just waits for it.
RESEND_AFTER = 0.25
# Backoff between attempts starts here and is capped low: a write should follow a new stream
# leader within a fraction of a second.
FIRST_DELAY = 0.02
MAX_DELAY = 0.25


def request_retrying_on_503(
    mux: CallerMux,
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None,
    timeout: float | None,
    what: str,
    check: Callable[[float], None] | None = None,
    first: RawReply | None = None,
) -> RawReply:
    """A request sent again while it is answered "no responders" (503), until ``timeout``.

    A 503 means no stream took the message (JetStream still starting after a restart, or a
    stream without a leader during an election): nothing was stored, so sending again is safe.
    ``check(timeout)`` runs once, at the first 503, to raise a better error than waiting;
    ``first`` is the reply of a first attempt the caller already made.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    reply = first if first is not None else mux.request(subject, payload, headers, timeout)
    delay = FIRST_DELAY
    if reply[0] or status_of(reply[1]) != 503:
        return reply
    if check is not None:
        check(min(timeout or 1.0, 1.0))
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= delay:
            raise NatsKVTimeoutError(
                f"{what} had no JetStream responder for {timeout} s: "
                "is JetStream enabled and does the stream have a leader? Nothing was stored."
            )
        time.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)
        reply = mux.request(subject, payload, headers, None if deadline is None else deadline - time.monotonic())
        if reply[0] or status_of(reply[1]) != 503:
            return reply


def publish_resending(
    mux: CallerMux,
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None,
    timeout: float | None,
    what: str,
    check: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Publish to a replicated stream and return its PubAck, sending again while no stream
    leader answers, until ``timeout``.

    A stream leader that dies with a write in flight never answers it, and the write may or
    may not have been stored. The message carries a ``Nats-Msg-Id``: the stream's duplicate
    window recognises a resend of a stored message and answers with the original sequence and
    ``"duplicate": true`` (a new leader rebuilds that window from the stored messages), so
    sending it again is safe. Without that, the caller would wait out its whole timeout and
    learn nothing; with it, the write lands soon after a new leader is elected. "No responders"
    (503, no leader during an election) is retried as in request_retrying_on_503; ``check``
    runs at the first one.
    """
    headers = h.with_msg_id(headers, h.new_msg_id())
    deadline = None if timeout is None else time.monotonic() + timeout
    unanswered = checked = False
    delay = FIRST_DELAY
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            if unanswered:
                raise NatsKVTimeoutError(
                    f"a write to {what} was not acknowledged within {timeout} s (its stream leader did not "
                    "answer, and no new one took over in time); it may or may not be stored"
                )
            raise NatsKVTimeoutError(
                f"{what} had no stream leader for {timeout} s (an election that did not end? is JetStream "
                "enabled?). Nothing was stored."
            )
        try:
            wait = RESEND_AFTER if left is None else min(left, RESEND_AFTER)
            data, hdrs, _ = mux.request(subject, payload, headers, wait)
        except NatsKVTimeoutError:
            unanswered = True
            continue
        if not data:
            status, desc, _ = parse_reply_headers(hdrs)
            if status != 503:
                raise JetStreamError(desc or f"unexpected status {status} from {what}", code=status)
            if not checked and check is not None:
                checked = True
                check(min(left or 1.0, 1.0))
        else:
            try:
                return check_pub_ack(data)
            except JetStreamError as exc:
                # The first copy is still being replicated: its outcome comes with a later answer.
                if exc.err_code != ERR_DUPLICATE_IN_PROCESS:
                    raise
        delay = sleep_before_retry(delay, deadline)


def sleep_before_retry(delay: float, deadline: float | None) -> float:
    """Sleep ``delay`` seconds (never past ``deadline``); return the next, doubled delay."""
    left = None if deadline is None else deadline - time.monotonic()
    time.sleep(delay if left is None else max(min(delay, left), 0))
    return min(delay * 2, MAX_DELAY)
