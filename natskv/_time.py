"""Times as nats-server writes them, read into timezone-aware datetimes (pure, no I/O)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?)(h|m|s|ms|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_timestamp(ts: str) -> datetime:
    """A message time from nats-server: nanoseconds since the epoch as digits (watch deliveries)
    or RFC 3339 with up to nanoseconds (direct gets). UTC, to the microsecond."""
    if ts.isdigit():  # nanoseconds since the epoch (watch deliveries); integer maths keeps µs exact
        seconds, nanos = divmod(int(ts), 1_000_000_000)
        return datetime.fromtimestamp(seconds, tz=timezone.utc).replace(microsecond=nanos // 1000)
    # RFC 3339 with up to nanoseconds: keep microseconds for datetime.
    head, _, frac = ts.rstrip("Z").partition(".")
    micros = int((frac + "000000")[:6]) if frac else 0
    return datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(microsecond=micros, tzinfo=timezone.utc)


def parse_duration(text: str) -> float | None:
    """Seconds of a ``Nats-TTL`` value: a Go duration (``"30s"``, ``"1h30m"``, ``"500ms"``) or
    whole seconds (``"30"``); None for ``"never"`` or anything unreadable (another client's
    header: treated as no expiry rather than failing the caller's call)."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    total, at = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != at:
            return None
        total += float(part.group(1)) * _UNIT_SECONDS[part.group(2)]
        at = part.end()
    return total if at == len(text) and at else None
