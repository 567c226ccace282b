"""Times as nats-server writes them, read into timezone-aware datetimes (pure, no I/O)."""

from __future__ import annotations

from datetime import datetime, timezone


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
