"""The connection to NATS: nats-py's client, the request multiplexer and the JetStream API.

Everything here runs on natskv's loop thread: connecting, reconnect and error callbacks, the
loop's own JetStream API calls. A JetStream API call from the caller's thread is
:func:`natskv.wire.jsapi.call`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import ParseResult

import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.transport import TcpTransport

from natskv.aio.mux import Multiplexer
from natskv.config import ConnectOptions
from natskv.errors import (
    AuthenticationError,
    FeatureNotSupportedError,
    NatsKVError,
    NotConnectedError,
    PermissionDeniedError,
)
from natskv.wire import jsapi
from natskv.wire.jsapi import LEVEL_VERSIONS

log = logging.getLogger("natskv")

# 'Permissions Violation for Publish to "<subject>"' / '... for Subscription to "<subject>"'
_DENIED = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.IGNORECASE)
# What nats-server says when it refuses or withdraws a client's credentials.
_AUTH_REASONS = ("authorization violation", "authentication expired", "authentication revoked")


class _TLSUnavailable(nats.errors.Error):
    """The server's INFO offers no TLS although TLS was asked for. Raised before CONNECT, so the
    credentials are never sent in plaintext."""

    def __str__(self) -> str:
        return "the server does not offer TLS"


class _ConnectFailed(Exception):
    """Ends nats-py's first-connection retry loop once every server was tried (see
    Connection._on_error); deliberately not a nats error, so nats-py does not catch it."""


class _TLSTransport(TcpTransport):
    """nats-py's TCP transport with a correct TLS upgrade.

    ``loop.start_tls()`` never calls ``connection_made()`` on the protocol it is given, so
    nats-py's ``StreamReaderProtocol`` does not know it runs over TLS: at every EOF it returns True
    from ``eof_received()`` and asyncio logs "returning true from eof_received() has no effect when
    using ssl" (nats-io/nats.py#574), and its reader never gets the transport for flow control.
    Calling ``connection_made()`` with the TLS transport, as asyncio's own
    ``StreamWriter.start_tls()`` does, fixes both. A failed handshake (an untrusted certificate)
    closes the TCP connection but tells only the TLS layer, so nats-py would wait forever for
    the plain stream to close: the new protocol is told instead, and nats-py's close returns.
    """

    async def connect_tls(
        self, uri: str | ParseResult, ssl_context: ssl.SSLContext, buffer_size: int, connect_timeout: int
    ) -> None:
        assert self._io_writer is not None, "connect() must come first"
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        hostname = uri if isinstance(uri, str) else uri.hostname
        plain = self._io_writer.transport
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(plain, protocol, ssl_context, server_hostname=hostname), connect_timeout
            )
        except BaseException:
            protocol.connection_lost(None)
            self._io_reader, self._io_writer = reader, asyncio.StreamWriter(plain, protocol, reader, loop)
            raise
        if transport is None:  # the peer closed the connection during the handshake
            raise ConnectionResetError("the server closed the connection during the TLS handshake")
        protocol.connection_made(transport)
        self._io_reader, self._io_writer = reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class _NatsClient(NatsClient):
    """nats-py's client with two safety fixes natskv relies on (nats-py 2.16 internals).

    * ``require_tls``: nats-py upgrades to TLS only when the server's INFO says ``tls_required``,
      so a ``tls://`` URL would send the credentials in plaintext to a server without TLS. Here
      the INFO is checked before CONNECT is written: a server offering TLS (required or
      available) is upgraded to, one without it is refused.
    * the TLS upgrade goes through :class:`_TLSTransport`.
    """

    require_tls = False

    async def _connect_to_server(self, s: Any) -> None:
        await super()._connect_to_server(s)
        if type(self._transport) is TcpTransport:
            # nats-py builds its transport itself and keeps it for every reconnect; same fields.
            self._transport.__class__ = _TLSTransport

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        # wss:// and handshake-first connections are TLS before the INFO arrives.
        already_tls = self.options["tls_handshake_first"] or (
            self._current_server is not None and self._current_server.uri.scheme == "wss"
        )
        if initial_connection and self.require_tls and not already_tls:
            if not (info.get("tls_required") or info.get("tls_available")):
                raise _TLSUnavailable()
            info["tls_required"] = True  # nats-py's signal to upgrade before CONNECT
        await super()._process_info(info, initial_connection)


def _is_auth_error(exc: BaseException | None) -> bool:
    if isinstance(exc, nats.errors.AuthorizationError):
        return True
    text = str(exc).lower() if exc is not None else ""
    return any(reason in text for reason in _AUTH_REASONS)


def _server_reason(exc: BaseException) -> str:
    """The server's own words for an error nats-py raised ("Authorization Violation", ...)."""
    if isinstance(exc, nats.errors.AuthorizationError):
        return "Authorization Violation"  # nats-py replaces the server's text with its own
    text = str(exc)
    if text.startswith("nats: "):
        text = text[len("nats: ") :]
    return text.strip().strip("'") or type(exc).__name__


def _connect_reason(exc: BaseException, timeout: float) -> str:
    """Why one attempt to reach a server failed, in words a user can act on."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is nats-server running, and on this port?)"
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within connect_timeout={timeout:g} s"
    if isinstance(exc, _TLSUnavailable):
        return (
            "the server does not offer TLS, but TLS was asked for (a tls:// URL or a tls_* option); "
            "nothing was sent. Enable TLS on the server, or use a nats:// URL without TLS options"
        )
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "the server closed the connection while connecting"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return _server_reason(exc)


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
        # Errors of the attempts of the first connection (None once it is made).
        self._connect_errors: list[Exception] | None = None
        # Subscriptions the server refused (exact, or lower-cased when nats-py lower-cased them).
        self.denied_subscriptions: set[str] = set()
        # The last few distinct errors nats-py reported: why reconnecting failed, if it gives up.
        self._recent_errors: list[BaseException] = []
        # Called on the loop thread after every reconnect (watch consumers resume through this).
        self.on_reconnect: list[Callable[[], Any]] = []
        self.on_disconnect: list[Callable[[], Any]] = []
        # Called on the loop thread with the error once nats-py closed the connection for good
        # (watch feeds hand it to their watchers and replicas).
        self.on_closed: list[Callable[[NatsKVError], Any]] = []
        # Watch feeds shared by the watchers of this connection, by (stream, filter, policy).
        self.feeds: dict[tuple[str, str, str], Any] = {}
        # By replicated stream: the highest revision this connection wrote; a read answered by a
        # replica behind it is asked again (read-your-writes; see KVProtocol._get_after_write).
        self.written: dict[str, tuple[int, str]] = {}  # (revision, subject) of the last write

    # -- lifecycle (loop thread) -------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, trying each server once; raise a natskv error naming why each one failed.

        nats-py retries a first connection as often as a reconnect (forever by default), so a
        wrong password or a closed port would only show as a timeout. Here its error callback
        counts the failed attempts and ends the connect once every server was tried.
        """
        kwargs = self.options.to_nats_kwargs()
        kwargs["servers"] = self.servers
        kwargs.update(
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
        )
        nc = _NatsClient()
        nc.require_tls = self.options.uses_tls
        self.nc = nc
        attempts: list[Exception] = []
        self._connect_errors = attempts
        budget = self.options.connect_timeout * max(1, len(self.servers)) + 1.0
        try:
            await asyncio.wait_for(nc.connect(**kwargs), budget)
        except BaseException as exc:
            self._connect_errors = None
            await self._discard(nc)
            if not isinstance(exc, Exception):
                raise
            raise self._connect_error(exc, attempts) from (exc.__cause__ if isinstance(exc, _ConnectFailed) else exc)
        self._connect_errors = None
        loop = asyncio.get_running_loop()
        self.mux = Multiplexer(self.nc, loop, self.options.inbox_prefix)
        self.mux.on_permission_violation = self._permission_violation
        try:
            await self.mux.start()
            await self._read_server_info()
        except BaseException as exc:
            await self._discard(nc)
            if isinstance(exc, NatsKVError) or not isinstance(exc, Exception):
                raise
            # The server closed the new connection at once (e.g. credentials it accepted, then
            # found expired): nats-py says "connection closed".
            raise self._closed_error() from exc

    def _connect_error(self, exc: Exception, attempts: list[Exception]) -> NatsKVError:
        where = ", ".join(self.servers)
        causes = attempts or [exc]
        auth = [c for c in causes if _is_auth_error(c)]
        if auth:
            return AuthenticationError(
                f"NATS at {where} refused the credentials: {_server_reason(auth[-1])}; check the "
                "user/password, token, nkey or creds file and the server's authorization settings"
            )
        if isinstance(exc, asyncio.TimeoutError) and not attempts:
            why = f"no connection within {self.options.connect_timeout * max(1, len(self.servers)) + 1.0:g} s"
        else:
            why = "; ".join(dict.fromkeys(_connect_reason(c, self.options.connect_timeout) for c in causes))
        return NotConnectedError(f"could not connect to NATS at {where}: {why}")

    @staticmethod
    async def _discard(nc: NatsClient) -> None:
        try:
            await nc.close()
        except Exception:
            log.debug("natskv: error while discarding a failed connection", exc_info=True)

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
        except Exception:
            log.debug("natskv: error while closing the connection", exc_info=True)
            await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        attempts = self._connect_errors
        if attempts is not None:
            # First connection (see connect()): stop once every server has failed once.
            attempts.append(exc)
            if len(attempts) >= max(1, len(self.servers)):
                raise _ConnectFailed() from exc
            return
        text = str(exc)
        self._note_error(exc)
        if "permissions violation" in text.lower():
            self._permission_violation(text)
        elif _is_auth_error(exc) and self.mux is not None:
            if self.mux.refused is None:
                log.warning("natskv: NATS refuses the credentials while reconnecting: %s", _server_reason(exc))
            self.mux.refuse(
                AuthenticationError(
                    f"NATS no longer accepts the credentials: {_server_reason(exc)} (natskv keeps "
                    "reconnecting); fix the credentials or the server's authorization settings"
                )
            )
        log.debug("natskv: nats error: %s", text)

    def _permission_violation(self, text: str) -> None:
        """Fail the calls the server just refused, at once instead of at their timeout.

        ``text`` is the server's error; nats-py's own parser lower-cases it, natskv's frame reader
        does not. NATS subjects are case-sensitive, so a lower-cased subject matches without case
        only when it came lower-cased. Loop thread only.
        """
        match = _DENIED.search(text)
        if match is None or self.mux is None:
            return
        kind, subject = match.group(1).lower(), match.group(2)
        exact = text != text.lower()
        if kind == "subscription":
            self.denied_subscriptions.add(subject if exact else subject.lower())
            denied = PermissionDeniedError(
                f"the NATS user may not subscribe to {subject!r}; grant it in the server's "
                "authorization settings (natskv subscribes to its inbox prefix, _INBOX by default)"
            )
            self.mux.fail_replies_to(subject, denied, exact)
            return

        def error(sent: str) -> PermissionDeniedError:
            return PermissionDeniedError(
                f"the NATS user may not publish to {sent!r}: the server dropped the message; grant "
                "it in the server's authorization settings"
            )

        self.mux.fail_subject(subject, error, exact)

    def subscription_denied(self, subject: str) -> PermissionDeniedError | None:
        """The error for a subscription to ``subject`` the server refused, if it did."""
        if subject in self.denied_subscriptions or subject.lower() in self.denied_subscriptions:
            return PermissionDeniedError(
                f"the NATS user may not subscribe to {subject!r}; grant it in the server's authorization settings"
            )
        return None

    def _note_error(self, exc: BaseException) -> None:
        recent = [e for e in self._recent_errors if str(e) != str(exc)]
        self._recent_errors = [*recent[-2:], exc]

    async def _on_closed(self) -> None:
        # nats-py closes for good (no reconnect) when the server withdraws the credentials, on
        # some other server errors, and when reconnect attempts run out.
        if self.mux is not None and not self.mux.closed:
            error = self._closed_error()
            log.error("natskv: %s", error)
            self.mux.refused = None  # "natskv keeps reconnecting" is over: the closed error says why
            self.mux.close(error)
            for cb in list(self.on_closed):
                try:
                    cb(error)
                except Exception:
                    log.exception("natskv: error in a connection-closed handler")

    def _closed_error(self) -> NatsKVError:
        nc = self.nc
        cause: BaseException | None = nc.last_error if nc is not None else None
        gave_up = ""
        if isinstance(cause, nats.errors.NoServersError):
            # nats-py gave up reconnecting; the attempts' own errors say why they failed.
            gave_up = (
                f"no server could be reached in max_reconnect={self.options.max_reconnect} attempts; last errors: "
            )
            gave_up += ", ".join(_server_reason(e) for e in self._recent_errors) or "none"
            cause = next((e for e in reversed(self._recent_errors) if _is_auth_error(e)), cause)
        if _is_auth_error(cause):
            assert cause is not None
            return AuthenticationError(
                f"NATS closed the connection because it no longer accepts the credentials: "
                f"{gave_up or _server_reason(cause)}; "
                "renew the credentials and create a new client with natskv.connect()"
            )
        why = gave_up or (_server_reason(cause) if cause is not None else "")
        if self.options.max_reconnect == 0:
            why = f"{why}; max_reconnect=0 allows no reconnect" if why else "max_reconnect=0 allows no reconnect"
        return NotConnectedError(
            f"the connection to NATS was closed{f' ({why})' if why else ''} and will not reconnect; "
            "create a new client with natskv.connect()"
        )

    async def _on_disconnected(self) -> None:
        if self.nc is not None and not (self.nc.is_closed or self.nc.is_draining):
            log.info("natskv: disconnected from NATS; reconnecting")
        for cb in list(self.on_disconnect):
            cb()

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        assert self.nc is not None and self.mux is not None
        self.mux.refused = None
        log.info("natskv: reconnected to %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")
        try:
            await self._read_server_info()
        except NatsKVError:
            log.warning("natskv: could not read JetStream info after reconnect", exc_info=True)
        for cb in list(self.on_reconnect):
            try:
                cb()
            except Exception:
                log.exception("natskv: error in reconnect handler")

    # -- features ----------------------------------------------------------------------------

    def require(self, level: int, feature: str) -> None:
        """Raise FeatureNotSupportedError when the server's API level is below ``level``."""
        if self.api_level < level:
            raise FeatureNotSupportedError(feature, LEVEL_VERSIONS.get(level, "a newer version"), self.server_version)

    # -- JetStream API -----------------------------------------------------------------------

    async def js_api(self, api: str, payload: dict[str, Any] | None, timeout: float | None = None) -> dict[str, Any]:
        """Call ``$JS.API.<api>`` from the loop thread and return the decoded answer.

        Goes through the multiplexer like every other request, so a permissions violation fails
        it at once."""
        assert self.mux is not None
        body = orjson.dumps(payload) if payload is not None else b""
        reply = await self.mux.request_async("$JS.API." + api, body, None, timeout or self.options.request_timeout)
        return jsapi.api_reply(api, reply, self.server_version)
