"""Connection options: one frozen dataclass built from URLs, keywords and the environment.

``ConnectOptions.from_args`` is what ``natskv.connect(...)`` calls. It accepts the forms people
already use with other NATS clients::

    ConnectOptions.from_args()                                   # NATS_URL, or the embedded server
    ConnectOptions.from_args("nats://app:secret@n1:4222,n2:4222", name="web")
    ConnectOptions.from_args(servers=["n1:4222", "tls://n2:4222"], token="t0k3n")

Every problem is reported before any socket is opened, as a ``ConfigurationError`` saying what to
fix. This module imports neither ``nats`` nor ``asyncio`` so the CLI starts quickly; ``ssl`` is
imported only when a TLS context is actually built.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from natskv.errors import ConfigurationError

if TYPE_CHECKING:
    import ssl

__all__ = ["ConnectOptions", "parse_servers"]

_SCHEMES = ("nats", "tls", "ws", "wss")
_DEFAULT_PORT = 4222
_MASK = "***"

# Keyword aliases accepted by from_args: alias -> canonical field name.
_ALIASES = {"timeout": "request_timeout"}

# Options naming a file, the environment variable that can supply each, and what it is.
_FILE_OPTIONS = {
    "creds": ("NATS_CREDS", "credentials file"),
    "nkey_seed": ("NATS_NKEY", "nkey seed file"),
    "tls_ca": ("NATS_CA", "TLS CA certificate file"),
    "tls_cert": ("NATS_CERT", "TLS client certificate file"),
    "tls_key": ("NATS_KEY", "TLS client key file"),
}

# Durations in seconds: these must be > 0 (zero would mean "give up at once" or "never")...
_POSITIVE = ("connect_timeout", "request_timeout", "drain_timeout", "ping_interval", "bucket_sweep_every")
# ... and these >= 0.
_NON_NEGATIVE = ("reconnect_wait",)


def _split_server_text(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _bad_url(raw: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"invalid server URL {_redact_url(raw)!r}: {why}")


def _parse_url(raw: str) -> tuple[str, str | None, str | None]:
    """Return (url without credentials, username, password) for one server URL.

    ``n1:4222`` becomes ``nats://n1:4222``; a nats/tls URL without a port gets 4222. Userinfo is
    percent-decoded; a username without a password is a token, as in every NATS client.
    """
    text = raw.strip()
    if not text:
        raise ConfigurationError("empty server URL: give a URL such as nats://127.0.0.1:4222")
    if "://" not in text:
        text = "nats://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise _bad_url(raw, "the port must be a number from 1 to 65535") from exc
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise _bad_url(
            raw,
            f"scheme {parts.scheme!r} is not supported; use one of "
            + ", ".join(s + "://" for s in _SCHEMES),
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _bad_url(raw, "write it as scheme://[user:password@]host:port, with no path or query")
    host = parts.hostname
    if not host:
        raise _bad_url(raw, "no host name; write it as nats://host:port")
    if port == 0:
        raise _bad_url(raw, "the port must be a number from 1 to 65535")
    if port is None and scheme in ("nats", "tls"):
        port = _DEFAULT_PORT
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if user is None and password:
        raise _bad_url(raw, "a password is given without a user name")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return urlunsplit((scheme, netloc, "", "", "")), user, password


def parse_servers(
    value: str | Sequence[str] | None,
) -> tuple[tuple[str, ...], str | None, str | None]:
    """Split and normalize server URLs; return (urls without credentials, user, password).

    ``value`` is a comma-separated string or a list/tuple of URLs (items may hold commas too).
    Credentials written in a URL (``user:pass@`` or ``token@``, where ``user`` comes back with
    ``password`` None) apply to every URL; URLs that carry none inherit them, and two URLs with
    different credentials are an error. Raises ConfigurationError for an invalid URL or a mix of
    websocket and plain URLs (nats-py cannot mix them).
    """
    if value is None:
        return (), None, None
    if isinstance(value, str):
        items = _split_server_text(value)
    elif isinstance(value, (list, tuple)):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise ConfigurationError(
                    f"server URLs must be strings, got {type(item).__name__}: pass URLs such as "
                    "'nats://127.0.0.1:4222'"
                )
            items.extend(_split_server_text(item))
    else:
        raise ConfigurationError(
            f"servers must be a URL string or a list of URL strings, got {type(value).__name__}"
        )
    urls: list[str] = []
    auth: tuple[str, str | None] | None = None
    for item in items:
        url, user, password = _parse_url(item)
        if user is not None:
            if auth is not None and auth != (user, password):
                raise ConfigurationError(
                    "server URLs carry different credentials: one connection uses one identity; "
                    "write the credentials in one URL (the others inherit them) or pass user= "
                    "and password= / token="
                )
            auth = (user, password)
        if url not in urls:
            urls.append(url)
    if len({urlsplit(url).scheme in ("ws", "wss") for url in urls}) > 1:
        raise ConfigurationError(
            "websocket (ws://, wss://) and plain (nats://, tls://) server URLs cannot be mixed "
            "in one connection: use one kind"
        )
    if auth is None:
        return tuple(urls), None, None
    return tuple(urls), auth[0], auth[1]


def _redact_url(url: str) -> str:
    """Hide the password (or a bare token) in a URL given by the user, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    auth = f"{user}:{_MASK}" if colon else _MASK  # a lone userinfo part is a token
    return f"{scheme}{sep}{auth}@{host}"


@dataclass(frozen=True, repr=False)
class ConnectOptions:
    """Everything needed to open a connection, validated on construction.

    ``servers`` holds full URLs without credentials; empty means "no URL given", and the client
    then uses the embedded server. Credentials written in a URL are moved into ``user`` /
    ``password`` (or ``token`` for ``token@host``); giving different ones as keywords is an error.
    Any TLS option, or a ``tls://`` / ``wss://`` URL, makes TLS mandatory: a server that does not
    offer it is refused before anything is sent. ``tls_handshake_first=True`` starts the TLS
    handshake before the server's INFO (for servers with ``handshake_first`` in their ``tls``
    block). ``request_timeout`` is natskv's own default for every blocking call;
    ``bucket_keep_alive`` (None: off) starts the client's bucket manager with that ``keep_alive``
    and ``bucket_sweep_every`` (see :meth:`natskv.Client.bucket_manager`); the other durations
    (seconds) go to nats-py. ``max_reconnect=-1`` means reconnect forever. ``repr()`` and
    ``redacted()`` never show passwords or tokens.

    Raises ConfigurationError (a ValueError) for anything invalid.
    """

    servers: tuple[str, ...] = ()
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: str | None = None
    nkey_seed: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_hostname: str | None = None
    tls_handshake_first: bool = False
    name: str | None = "natskv"
    connect_timeout: float = 5.0
    request_timeout: float = 5.0
    max_reconnect: int = -1
    reconnect_wait: float = 2.0
    drain_timeout: float = 30.0
    ping_interval: float = 20.0
    inbox_prefix: str = "_INBOX"
    bucket_keep_alive: float | None = None
    bucket_sweep_every: float = 60.0

    def __post_init__(self) -> None:
        urls, url_user, url_password = parse_servers(self.servers)
        object.__setattr__(self, "servers", urls)
        if url_user is not None:
            self._adopt_url_credentials(url_user, url_password)
        for name in _FILE_OPTIONS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{name} must be a file path, got {type(value).__name__}")
        self._validate()

    def _adopt_url_credentials(self, user: str, password: str | None) -> None:
        # Credentials move out of the URLs into the keyword fields: nats-py sends URL userinfo
        # without percent-decoding it, and URLs without secrets are safe to log.
        if password is None:
            if self.user is not None or self.token not in (None, user):
                raise ConfigurationError(
                    "a token is given in a server URL and different credentials as keywords: "
                    "keep one of the two"
                )
            object.__setattr__(self, "token", user)
        else:
            if self.token is not None or self.user not in (None, user) or self.password not in (
                None,
                password,
            ):
                raise ConfigurationError(
                    "user:password is given in a server URL and different credentials as "
                    "keywords: keep one of the two"
                )
            object.__setattr__(self, "user", user)
            object.__setattr__(self, "password", password)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The option names accepted as keywords (``from_args`` also takes ``timeout``)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_args(
        cls,
        url_or_servers: str | Sequence[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> ConnectOptions:
        """Build options from a URL string / list of URLs, keywords and the environment.

        ``servers=`` is an alias of the positional argument and ``timeout=`` of
        ``request_timeout``. With no URL at all, ``NATS_URL`` is used; ``NATS_CREDS``,
        ``NATS_NKEY``, ``NATS_CA``, ``NATS_CERT`` and ``NATS_KEY`` fill the matching options when
        they are not given. A keyword passed as None counts as not given. When no URL is found,
        ``servers`` is empty: the client uses the embedded server. ``environ`` replaces
        ``os.environ`` (for tests).

        Raises ConfigurationError naming the problem: an unknown option (with the closest valid
        name), a value out of range, conflicting credentials, a missing file or a bad URL.
        """
        env = os.environ if environ is None else environ
        valid = cls.option_names()
        for key in options:
            if key not in valid and key not in _ALIASES:
                close = difflib.get_close_matches(key, [*valid, *_ALIASES], n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else "valid options: " + ", ".join(valid)
                raise ConfigurationError(f"unknown connect option {key!r}: {hint}")
        for alias, canonical in _ALIASES.items():
            if alias in options:
                value = options.pop(alias)
                if value is not None and options.get(canonical) is not None:
                    raise ConfigurationError(
                        f"give {alias}= or {canonical}=, not both: they are the same option"
                    )
                if value is not None:
                    options[canonical] = value
        servers_kw = options.pop("servers", None)
        if url_or_servers is not None and servers_kw is not None:
            raise ConfigurationError("give the server URLs positionally or as servers=, not both")
        source = url_or_servers if url_or_servers is not None else servers_kw
        if source is None and env.get("NATS_URL", "").strip():
            try:
                parse_servers(env["NATS_URL"])
            except ConfigurationError as exc:
                raise ConfigurationError(f"environment variable NATS_URL: {exc}") from exc
            source = env["NATS_URL"]
        for name, (env_name, what) in _FILE_OPTIONS.items():
            env_value = env.get(env_name, "").strip()
            if options.get(name) is None and env_value:
                if not os.path.isfile(env_value):
                    raise ConfigurationError(
                        f"environment variable {env_name} names a {what} that does not exist: "
                        f"{env_value!r}; fix the path or unset {env_name}"
                    )
                options[name] = env_value
        kwargs = {key: value for key, value in options.items() if value is not None}
        # __post_init__ takes a URL string or list too and turns it into the tuple the field holds.
        return cls(servers=source if source is not None else (), **kwargs)  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> ConnectOptions:
        """A validated copy with some options changed, e.g. ``opts.replace(servers=url)``."""
        return dataclasses.replace(self, **changes)

    # -- validation --------------------------------------------------------------------------

    def _validate(self) -> None:
        for name in _POSITIVE + _NON_NEGATIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigurationError(
                    f"{name} must be a number of seconds, got {value!r}"
                )
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigurationError(f"{name} must be a finite number of seconds, got {value!r}")
            if value < 0:
                raise ConfigurationError(f"{name} cannot be negative, got {value!r}")
            if name in _POSITIVE and value == 0:
                raise ConfigurationError(f"{name} must be greater than 0 seconds, got {value!r}")
        keep_alive = self.bucket_keep_alive
        if keep_alive is not None and (
            isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float))
            or not 0 < keep_alive < float("inf")
        ):
            raise ConfigurationError(
                f"bucket_keep_alive must be a positive number of seconds (None: keep buckets open), got {keep_alive!r}"
            )
        if isinstance(self.max_reconnect, bool) or not isinstance(self.max_reconnect, int):
            raise ConfigurationError(
                f"max_reconnect must be an integer (-1 = unlimited), got {self.max_reconnect!r}"
            )
        if self.max_reconnect < -1:
            raise ConfigurationError(
                f"max_reconnect must be -1 (reconnect forever), 0 (never) or a positive count, "
                f"got {self.max_reconnect}"
            )
        for name in ("user", "password", "token", "tls_hostname", "name", "inbox_prefix"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{name} must be a string, got {type(value).__name__}")
        if not self.inbox_prefix or any(c.isspace() for c in self.inbox_prefix) or any(
            c in self.inbox_prefix for c in "*>"
        ):
            raise ConfigurationError(
                f"inbox_prefix must be a non-empty subject without spaces or wildcards, "
                f"got {self.inbox_prefix!r}"
            )
        if not isinstance(self.tls_handshake_first, bool):
            raise ConfigurationError(
                f"tls_handshake_first must be True or False, got {self.tls_handshake_first!r}"
            )
        if self.uses_tls and any(urlsplit(url).scheme == "ws" for url in self.servers):
            raise ConfigurationError(
                "TLS options are given with a ws:// URL, which never uses TLS: write wss:// instead"
            )
        if self.user is not None and self.password is None:
            raise ConfigurationError(
                "user is set but password is not: pass password= too (or use token= alone)"
            )
        if self.password is not None and self.user is None:
            raise ConfigurationError("password is set but user is not: pass user= too")
        if self.token is not None and self.user is not None:
            raise ConfigurationError(
                "both token and user/password are set: a NATS connection uses one; keep one"
            )
        if self.creds is not None and self.nkey_seed is not None:
            raise ConfigurationError(
                "both creds and nkey_seed are set: a .creds file already holds the nkey seed; "
                "keep one"
            )
        if self.tls_cert is not None and self.tls_key is None:
            raise ConfigurationError("tls_cert is set but tls_key is not: pass the client key too")
        if self.tls_key is not None and self.tls_cert is None:
            raise ConfigurationError(
                "tls_key is set but tls_cert is not: pass the client certificate too"
            )
        for name, (_env_name, what) in _FILE_OPTIONS.items():
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigurationError(
                    f"{name}: the {what} {path!r} does not exist (or is not a file); fix the path"
                )

    # -- output ------------------------------------------------------------------------------

    @property
    def uses_embedded_server(self) -> bool:
        """True when no server URL was given: the client should start/find the embedded server."""
        return not self.servers

    @property
    def uses_tls(self) -> bool:
        """True when the connection must be TLS (a TLS option or a tls:// / wss:// URL)."""
        return bool(self.tls_ca or self.tls_cert or self.tls_hostname or self.tls_handshake_first) or any(
            urlsplit(url).scheme in ("tls", "wss") for url in self.servers
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """Build the TLS context from tls_ca / tls_cert / tls_key; None when TLS is not asked for.

        A ``tls://`` URL without a CA option uses the system trust store. Raises
        ConfigurationError when a certificate or key cannot be loaded.
        """
        if not self.uses_tls:
            return None
        import ssl

        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
            if self.tls_cert is not None:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"could not load the TLS files (tls_ca={self.tls_ca!r}, tls_cert={self.tls_cert!r}, "
                f"tls_key={self.tls_key!r}): {exc}"
            ) from exc
        return context

    def to_nats_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect(...)`` (``nats.aio.client.Client.connect``).

        ``servers`` is empty in the embedded case: the caller fills in the embedded server's URL
        (or builds the options with ``opts.replace(servers=server.url)``). Callbacks (error_cb,
        reconnected_cb, ...) are the caller's to add. Raises ConfigurationError when the TLS files
        cannot be loaded.

        nats-py reads ``max_reconnect_attempts=0`` as "no limit", so ``max_reconnect=0`` (never
        reconnect) is sent as ``allow_reconnect=False``. With reconnects allowed nats-py also
        retries the *first* connection until the attempts run out, forever for -1: bound the
        ``nats.connect`` call with the caller's own timeout.
        """
        kwargs: dict[str, Any] = {
            "servers": list(self.servers),
            "name": self.name,
            "connect_timeout": self.connect_timeout,
            "reconnect_time_wait": self.reconnect_wait,
            "max_reconnect_attempts": self.max_reconnect,
            "drain_timeout": self.drain_timeout,
            "ping_interval": self.ping_interval,
            "inbox_prefix": self.inbox_prefix,
            "allow_reconnect": self.max_reconnect != 0,
        }
        if self.user is not None:
            kwargs["user"] = self.user
            kwargs["password"] = self.password
        if self.token is not None:
            kwargs["token"] = self.token
        if self.creds is not None:
            kwargs["user_credentials"] = self.creds
        if self.nkey_seed is not None:
            kwargs["nkeys_seed"] = self.nkey_seed
        context = self.ssl_context()
        if context is not None:
            kwargs["tls"] = context
        if self.tls_hostname is not None:
            kwargs["tls_hostname"] = self.tls_hostname
        if self.tls_handshake_first:
            kwargs["tls_handshake_first"] = True
        return kwargs

    def redacted(self) -> str:
        """A one-line description for logs: the non-default options, passwords and tokens hidden."""
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "servers" and value == f.default:
                continue
            if f.name == "servers":
                value = tuple(_redact_url(url) for url in value)
            elif f.name in ("password", "token") and value is not None:
                value = _MASK
            shown.append(f"{f.name}={value!r}")
        return f"ConnectOptions({', '.join(shown)})"

    __repr__ = redacted

    def __str__(self) -> str:
        return self.redacted()
