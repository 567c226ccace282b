"""The connection to NATS: nats-py's client, the request multiplexer and the JetStream API.

Everything here runs on natskv's loop thread except the methods documented as "any thread", which
hand work to the loop through the :class:`~natskv.aio.mux.Multiplexer` and block the caller.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import nats
import orjson
from nats.aio.client import Client as NatsClient

from natskv.aio.mux import Multiplexer, parse_reply_headers
from natskv.config import ConnectOptions
from natskv.errors import (
    BucketNotFoundError,
    ConfigurationError,
    FeatureNotSupportedError,
    JetStreamError,
    NatsKVError,
    NatsKVTimeoutError,
    NotConnectedError,
    PayloadTooLargeError,
    PermissionDeniedError,
)

log = logging.getLogger("natskv")

# JetStream API levels (reported in $JS.API.INFO) and the server versions that introduced them.
API_LEVEL_TTL = 1  # per-message TTL, batch direct get (2.11)
API_LEVEL_ATOMIC = 2  # atomic batch publish, counters (2.12)
LEVEL_VERSIONS = {API_LEVEL_TTL: "2.11", API_LEVEL_ATOMIC: "2.12"}

ERR_STREAM_NOT_FOUND = 10059
_DENIED_SUBJECT = re.compile(r'publish to "([^"]+)"', re.IGNORECASE)
ERR_MESSAGE_TOO_LARGE = 10054
ERR_JETSTREAM_NOT_ENABLED = (10039, 10076)


class Connection:
    """One nats-py connection plus what natskv keeps per connection."""

    def __init__(self, options: ConnectOptions, servers: list[str]) -> None:
        self.options = options
        self.servers = servers
        self.nc: NatsClient | None = None
        self.mux: Multiplexer | None = None
        self.api_level = 0
        self.server_version = ""
        self.max_payload = 1 << 20
        self.reconnects = 0
        self._permission_errors: list[tuple[float, str]] = []
        # Called on the loop thread after every reconnect (watch consumers resume through this).
        self.on_reconnect: list[Callable[[], Any]] = []
        self.on_disconnect: list[Callable[[], Any]] = []
        # Watch feeds shared by the watchers of this connection, by (stream, filter, policy).
        self.feeds: dict[tuple[str, str, str], Any] = {}

    # -- lifecycle (loop thread) -------------------------------------------------------------

    async def connect(self) -> None:
        kwargs = self.options.to_nats_kwargs()
        kwargs["servers"] = self.servers
        kwargs.update(
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        # nats-py retries an initial connection as often as a reconnect (forever by default);
        # a first connection either works within the connect timeout per server or fails.
        budget = self.options.connect_timeout * max(1, len(self.servers)) + 1.0
        try:
            self.nc = await asyncio.wait_for(nats.connect(**kwargs), budget)
        except Exception as exc:
            why = f"no connection within {budget:g} s" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise NotConnectedError(
                f"could not connect to NATS at {', '.join(self.servers)}: {why or type(exc).__name__}; "
                "check the URL, credentials and that nats-server is running"
            ) from exc
        loop = asyncio.get_running_loop()
        self.mux = Multiplexer(self.nc, loop, self.options.inbox_prefix)
        try:
            await self.mux.start()
            await self._read_server_info()
        except BaseException:
            await self.nc.close()
            raise

    async def _read_server_info(self) -> None:
        assert self.nc is not None
        self.max_payload = self.nc.max_payload
        self.server_version = str(self.nc._server_info.get("version", ""))
        if not self.nc._server_info.get("jetstream", False):
            raise FeatureNotSupportedError("JetStream (server started without -js)", "2.2", self.server_version)
        info = await self.js_api("INFO", None, timeout=self.options.request_timeout)
        self.api_level = int(info.get("api", {}).get("level", 0))

    async def close(self, drain: bool = True) -> None:
        nc = self.nc
        if self.mux is not None:
            self.mux.close()
        if nc is None or nc.is_closed:
            return
        try:
            if drain and nc.is_connected:
                await nc.drain()
            else:
                await nc.close()
        except Exception:  # noqa: BLE001 - closing must not fail
            log.debug("natskv: error while closing the connection", exc_info=True)
            await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc)
        if "permissions violation" in text.lower():
            self._permission_errors.append((time.monotonic(), text))
            del self._permission_errors[:-20]
            # 'permissions violation for publish to "<subject>"': fail the calls waiting on it now
            # instead of letting them time out.
            match = _DENIED_SUBJECT.search(text)
            if match and self.mux is not None:
                subject = match.group(1)
                self.mux.fail_subject(
                    subject,
                    PermissionDeniedError(
                        f"the NATS user may not publish to {subject!r}; grant it in the server's authorization settings"
                    ),
                )
        log.debug("natskv: nats error: %s", text)

    async def _on_disconnected(self) -> None:
        if self.nc is not None and not (self.nc.is_closed or self.nc.is_draining):
            log.info("natskv: disconnected from NATS; reconnecting")
        for cb in list(self.on_disconnect):
            cb()

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        assert self.nc is not None
        log.info("natskv: reconnected to %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")
        try:
            await self._read_server_info()
        except NatsKVError:
            log.warning("natskv: could not read JetStream info after reconnect", exc_info=True)
        for cb in list(self.on_reconnect):
            try:
                cb()
            except Exception:  # noqa: BLE001
                log.exception("natskv: error in reconnect handler")

    # -- features ----------------------------------------------------------------------------

    def require(self, level: int, feature: str) -> None:
        """Raise FeatureNotSupportedError when the server's API level is below ``level``."""
        if self.api_level < level:
            raise FeatureNotSupportedError(feature, LEVEL_VERSIONS.get(level, "a newer version"), self.server_version)

    # -- errors --------------------------------------------------------------------------------

    def permission_error(self, subject: str) -> PermissionDeniedError | None:
        """A recent permissions violation that names ``subject``, if the server reported one."""
        now = time.monotonic()
        for at, text in reversed(self._permission_errors):
            if now - at < 30 and subject in text:
                return PermissionDeniedError(
                    f"the NATS user may not use {subject!r} ({text}); grant it in the server's authorization settings"
                )
        return None

    # -- JetStream API -----------------------------------------------------------------------

    async def js_api(self, api: str, payload: dict[str, Any] | None, timeout: float | None = None) -> dict[str, Any]:
        """Call ``$JS.API.<api>`` from the loop thread and return the decoded answer."""
        assert self.nc is not None
        subject = "$JS.API." + api
        body = orjson.dumps(payload) if payload is not None else b""
        try:
            msg = await self.nc.request(subject, body, timeout=timeout or self.options.request_timeout)
        except nats.errors.NoRespondersError as exc:
            raise FeatureNotSupportedError("JetStream (no JetStream responders)", "2.2", self.server_version) from exc
        except nats.errors.TimeoutError as exc:
            raise self.permission_error(subject) or NatsKVTimeoutError(
                f"JetStream did not answer {subject} within {timeout} s; is the server up and JetStream enabled?"
            ) from exc
        except nats.errors.ConnectionClosedError as exc:
            raise NotConnectedError("the connection is closed; create a new client with natskv.connect()") from exc
        return check_api_reply(api, msg.data)

    def js_api_blocking(self, api: str, payload: dict[str, Any] | None, timeout: float | None) -> dict[str, Any]:
        """Call ``$JS.API.<api>`` from any thread but the loop thread (through the multiplexer)."""
        assert self.mux is not None
        subject = "$JS.API." + api
        body = orjson.dumps(payload) if payload is not None else b""
        try:
            data, headers, _ = self.mux.request(subject, body, None, timeout)
        except NatsKVTimeoutError as exc:
            raise self.permission_error(subject) or exc from None
        status, desc, _ = parse_reply_headers(headers)
        if status == 503:
            raise FeatureNotSupportedError("JetStream (no JetStream responders)", "2.2", self.server_version)
        return check_api_reply(api, data)


def check_api_reply(api: str, data: bytes) -> dict[str, Any]:
    """Decode a JetStream API answer; raise the matching natskv error when it carries one."""
    try:
        reply = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise JetStreamError(f"malformed JetStream answer to {api}: {data[:200]!r}") from exc
    err = reply.get("error")
    if err:
        code, err_code, desc = err.get("code", 0), err.get("err_code", 0), err.get("description", "")
        if err_code == ERR_STREAM_NOT_FOUND:
            raise BucketNotFoundError(f"{desc} ({api}); create the bucket first with client.bucket(name)")
        if err_code == ERR_MESSAGE_TOO_LARGE:
            raise PayloadTooLargeError(f"{desc}: the value is larger than the bucket or server allows")
        if err_code in ERR_JETSTREAM_NOT_ENABLED:
            raise ConfigurationError(f"JetStream is not enabled for this account: {desc}")
        raise JetStreamError(desc, code=code, err_code=err_code)
    return reply
