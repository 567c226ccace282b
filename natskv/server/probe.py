"""Readiness and identity probes of a nats-server, over plain sockets on the caller's thread.

Readiness is nats-server's own verdict: ``GET /healthz`` on its HTTP monitoring port answers 200
once every listener accepts connections and JetStream is enabled (see :func:`healthz` for the
options). The monitoring port cannot say *which* server answers, so identity comes from the
client port: a NATS server greets every connection with one ``INFO {json}`` line naming itself
(:func:`_read_info`). No NATS protocol is spoken beyond reading that line.

These probes import neither ``http.client`` nor ``urllib`` (tens of milliseconds of imports,
and ``ssl`` with them) for a one-line request to loopback.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

# Query strings of GET /healthz (nats-server's monitor.go). The checks run in this order, and
# each option stops after its step:
#   (always)        every listener accepts connections; JetStream, if configured, is enabled
#   js-enabled-only stop there
#   (clustered)     a JetStream meta leader is known and this server is current with it
#   js-server-only  stop there
#   (default)       every stream and consumer this server holds (or, standalone, found in its
#                   store directory) is recovered and current
# A starting node waits for the first step: before a meta leader exists there is nothing else to
# wait for, and a node of a cluster with lost peers must still come up. A cluster waits for the
# second on every node (EmbeddedCluster.wait_jetstream). The default is for operators: one
# stream behind on one node keeps the whole server "unavailable".
HEALTHZ_STARTED = "js-enabled-only=true"
HEALTHZ_JETSTREAM = "js-server-only=true"


def _receive(sock: socket.socket, deadline: float, complete: Callable[[bytearray], bool]) -> bytes:
    """Bytes from ``sock`` until ``complete(data)`` or the peer closes; TimeoutError at the deadline."""
    data = bytearray()
    while not complete(data):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("probe timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _read_info(host: str, port: int, timeout: float) -> dict[str, Any] | None:
    """The ``INFO`` a NATS server at host:port greets a client with, or None (not NATS, no answer).

    Connects, reads one line and closes, without sending anything: the server logs nothing.
    """
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            return _parse_info(_receive(sock, deadline, _line_complete))
    except OSError:
        return None


def _http_get(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes] | None:
    """``GET path`` over HTTP/1.0: (status code, body), or None when nothing answers in time."""
    deadline = time.monotonic() + timeout
    try:
        with _http_request(host, port, path, timeout) as sock:
            return _parse_http(_receive(sock, deadline, _http_response_complete))
    except OSError:
        return None


def _greeting_and_health(
    host: str, port: int, monitor_port: int, query: str, timeout: float
) -> tuple[dict[str, Any] | None, int | None]:
    """The client port's ``INFO`` and the status of ``/healthz?<query>``, asked together.

    The client port opens last while a server starts, so a refused connection there means "not
    yet" at no cost and without a warning in the server's log (each early "not ready" from
    /healthz is one). Once it accepts, /healthz is asked at once, before the greeting is read,
    so the server answers both concurrently: readiness costs no more than the greeting alone.
    """
    deadline = time.monotonic() + timeout
    try:
        client = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None, None
    with client:
        try:
            monitor: socket.socket | None = _http_request(host, monitor_port, f"/healthz?{query}", timeout)
        except OSError:
            monitor = None
        try:
            info = _parse_info(_receive(client, deadline, _line_complete))
        except OSError:
            info = None
    if monitor is None:
        return info, None
    with monitor:
        try:
            answer = _parse_http(_receive(monitor, deadline, _http_response_complete))
        except OSError:
            answer = None
    return info, answer[0] if answer is not None else None


def _http_request(host: str, port: int, path: str, timeout: float) -> socket.socket:
    """A connection to host:port that has sent ``GET path`` (HTTP/1.0: the server closes it after
    its response). Raises OSError."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    except OSError:
        sock.close()
        raise
    return sock


def _line_complete(data: bytearray) -> bool:
    return b"\r\n" in data


def _parse_info(data: bytes) -> dict[str, Any] | None:
    line = data.split(b"\r\n", 1)[0]
    try:
        info = json.loads(line[5:]) if line.startswith(b"INFO ") else None
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def _http_response_complete(data: bytearray) -> bool:
    # Stopping at the Content-Length saves waiting for the server's close (a millisecond on a
    # busy machine).
    head, separator, body = bytes(data).partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return not value.strip().isdigit() or len(body) >= int(value)
    return False  # no length given: the body ends when the server closes


def _parse_http(response: bytes) -> tuple[int, bytes] | None:
    head, _, body = response.partition(b"\r\n\r\n")
    fields = head.split(b"\r\n", 1)[0].split()
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1]), body


def healthz(host: str, monitor_port: int, query: str = HEALTHZ_STARTED, timeout: float = 1.0) -> int | None:
    """The HTTP status of ``/healthz?<query>`` on a monitoring port (200: healthy), None when it
    does not answer. ``query`` is :data:`HEALTHZ_STARTED`, :data:`HEALTHZ_JETSTREAM` or ``""``
    (everything: see the comment above them)."""
    answer = _http_get(host, monitor_port, f"/healthz?{query}" if query else "/healthz", timeout)
    return answer[0] if answer is not None else None


def _monitor_json(host: str, monitor_port: int, path: str, timeout: float = 1.0) -> dict[str, Any]:
    """A monitoring endpoint's JSON object (``/jsz?...``); {} when it does not answer with one."""
    answer = _http_get(host, monitor_port, path, timeout)
    if answer is None or answer[0] != 200:
        return {}
    try:
        report = json.loads(answer[1])
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}
