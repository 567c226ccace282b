"""ConnectOptions: URL / keyword / environment parsing, validation, and what reaches nats-py."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from natskv.config import ConnectOptions, parse_servers
from natskv.errors import ConfigurationError, NatsKVError
from natskv.server import EmbeddedServer

REPO_ROOT = Path(__file__).resolve().parent.parent


def opts(url: Any = None, env: dict[str, str] | None = None, **kw: Any) -> ConnectOptions:
    """from_args with an explicit (default: empty) environment, so the host's NATS_* never leak in."""
    return ConnectOptions.from_args(url, environ=env or {}, **kw)


def error(url: Any = None, env: dict[str, str] | None = None, **kw: Any) -> str:
    with pytest.raises(ConfigurationError) as caught:
        opts(url, env, **kw)
    return str(caught.value)


@pytest.fixture
def a_file(tmp_path: Path) -> str:
    path = tmp_path / "file.txt"
    path.write_text("x")
    return str(path)


@pytest.fixture(scope="session")
def tls_files() -> dict[str, str]:
    """A self-signed certificate for 127.0.0.1 / localhost and its key, valid until 2126, kept in
    tests/data (made once with: openssl req -x509 -newkey rsa:2048 -nodes -days 36500
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1,DNS:localhost)."""
    data = Path(__file__).resolve().parent / "data"
    return {"cert": str(data / "tls-cert.pem"), "key": str(data / "tls-key.pem")}


# --------------------------------------------------------------------------------------------
# Defaults and the embedded case
# --------------------------------------------------------------------------------------------


def test_defaults() -> None:
    o = opts()
    assert o.servers == () and o.uses_embedded_server
    assert (o.user, o.password, o.token, o.creds, o.nkey_seed) == (None,) * 5
    assert (o.tls_ca, o.tls_cert, o.tls_key, o.tls_hostname) == (None,) * 4
    assert o.name == "natskv"
    assert o.connect_timeout == 5.0 and o.request_timeout == 5.0
    assert o.max_reconnect == -1 and o.reconnect_wait == 2.0
    assert o.drain_timeout == 30.0 and o.ping_interval == 20.0
    assert o.inbox_prefix == "_INBOX"
    assert o == ConnectOptions()


def test_options_are_frozen() -> None:
    o = opts("n1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.name = "other"  # type: ignore[misc]
    assert hash(o) == hash(opts("n1"))


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        opts(connect_timeout=-1)
    with pytest.raises(NatsKVError):
        opts(connect_timeout=-1)


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("nats://n1:4222", ("nats://n1:4222",)),
        ("n1:4222", ("nats://n1:4222",)),
        ("n1", ("nats://n1:4222",)),
        ("nats://n1", ("nats://n1:4222",)),
        ("tls://n1:4443", ("tls://n1:4443",)),
        ("TLS://n1", ("tls://n1:4222",)),
        ("ws://n1:8080", ("ws://n1:8080",)),
        ("wss://n1", ("wss://n1",)),
        ("nats://[::1]:4222", ("nats://[::1]:4222",)),
        ("nats://n1:4222/", ("nats://n1:4222",)),
        ("n1:4222, n2:4223 ,n3", ("nats://n1:4222", "nats://n2:4223", "nats://n3:4222")),
        ("n1,,n2,", ("nats://n1:4222", "nats://n2:4222")),
        ("n1,n1:4222", ("nats://n1:4222",)),
        (["n1", "tls://n2:1"], ("nats://n1:4222", "tls://n2:1")),
        (("n1", "n2,n3"), ("nats://n1:4222", "nats://n2:4222", "nats://n3:4222")),
    ],
)
def test_url_forms(given: Any, expected: tuple[str, ...]) -> None:
    assert opts(given).servers == expected
    assert opts(servers=given).servers == expected


def test_servers_keyword_is_an_alias_but_not_both() -> None:
    assert opts(servers="n1").servers == opts("n1").servers
    assert "not both" in error("n1", servers="n2")


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("http://n1:4222", "scheme"),
        ("redis://n1", "nats://"),
        ("n1:99999", "port"),
        ("n1:abc", "port"),
        ("nats://n1:0", "port"),
        ("nats://n1:-5", "port"),
        ("nats://:4222", "host"),
        ("nats://", "host"),
        ("nats://n1:4222/path", "path"),
        ("nats://n1:4222?x=1", "path"),
        ("nats://:secret@n1", "password"),
        ("nats://n1,ws://n2", "mixed"),
    ],
)
def test_invalid_urls(bad: str, says: str) -> None:
    assert says in error(bad)


def test_invalid_server_types() -> None:
    assert "URL" in error(["n1", 4222])
    assert "servers must be" in error(4222)


def test_empty_url_list_means_embedded() -> None:
    assert opts("").servers == ()
    assert opts([]).servers == ()


def test_error_messages_do_not_leak_url_passwords() -> None:
    message = error("nats://app:hunter2@n1:99999")
    assert "hunter2" not in message and "app:***@" in message
    message = error("http://s3cr3tt0k3n@n1")
    assert "s3cr3tt0k3n" not in message


# --------------------------------------------------------------------------------------------
# Credentials in URLs
# --------------------------------------------------------------------------------------------


def test_url_user_password_move_to_options_and_are_inherited() -> None:
    o = opts("nats://app:secret@n1:4222,n2:4222")
    assert o.servers == ("nats://n1:4222", "nats://n2:4222")
    assert (o.user, o.password, o.token) == ("app", "secret", None)
    kwargs = o.to_nats_kwargs()
    assert kwargs["user"] == "app" and kwargs["password"] == "secret"
    assert kwargs["servers"] == ["nats://n1:4222", "nats://n2:4222"]


def test_credentials_on_a_later_url_apply_to_all() -> None:
    o = opts(["n1", "nats://app:secret@n2"])
    assert (o.user, o.password) == ("app", "secret")
    assert o.servers == ("nats://n1:4222", "nats://n2:4222")


def test_url_token() -> None:
    o = opts("nats://s3cr3t@n1")
    assert (o.token, o.user, o.password) == ("s3cr3t", None, None)
    assert o.to_nats_kwargs()["token"] == "s3cr3t"


def test_url_credentials_are_percent_decoded() -> None:
    o = opts("nats://us%40er:p%3Aa%2Fss@n1")
    assert (o.user, o.password) == ("us@er", "p:a/ss")
    # An unencoded @ in the password still parses (the last @ ends the userinfo).
    assert opts("nats://app:p@ss@n1").password == "p@ss"


def test_url_empty_password_is_a_password() -> None:
    o = opts("nats://app:@n1")
    assert (o.user, o.password) == ("app", "")


def test_different_credentials_in_two_urls_are_rejected() -> None:
    assert "different credentials" in error("nats://a:1@n1,nats://b:2@n2")
    assert opts("nats://a:1@n1,nats://a:1@n2").user == "a"


def test_url_and_keyword_credentials() -> None:
    assert opts("nats://a:1@n1", user="a", password="1").user == "a"  # the same: fine
    assert "keywords" in error("nats://a:1@n1", user="b", password="2")
    assert "keywords" in error("nats://a:1@n1", token="t")
    assert "keywords" in error("nats://tok@n1", user="a", password="1")
    assert "keywords" in error("nats://tok@n1", token="other")


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def test_nats_url_from_the_environment() -> None:
    o = opts(env={"NATS_URL": "nats://app:pw@e1:1,e2:2"})
    assert o.servers == ("nats://e1:1", "nats://e2:2") and o.user == "app"
    assert opts("x1", env={"NATS_URL": "e1"}).servers == ("nats://x1:4222",)
    assert opts(servers=["x1"], env={"NATS_URL": "e1"}).servers == ("nats://x1:4222",)
    assert opts(env={"NATS_URL": "  "}).servers == ()
    assert "NATS_URL" in error(env={"NATS_URL": "http://e1"})


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "envhost:7")
    assert ConnectOptions.from_args().servers == ("nats://envhost:7",)
    monkeypatch.delenv("NATS_URL")
    assert ConnectOptions.from_args().servers == ()


@pytest.mark.parametrize(
    ("env_name", "option"),
    [("NATS_CREDS", "creds"), ("NATS_NKEY", "nkey_seed"), ("NATS_CA", "tls_ca")],
)
def test_file_options_from_the_environment(
    env_name: str, option: str, a_file: str, tmp_path: Path
) -> None:
    assert getattr(opts(env={env_name: a_file}), option) == a_file
    other = tmp_path / "other"
    other.write_text("y")
    assert getattr(opts(env={env_name: a_file}, **{option: str(other)}), option) == str(other)
    message = error(env={env_name: str(tmp_path / "missing")})
    assert env_name in message and "does not exist" in message


def test_cert_and_key_from_the_environment(a_file: str) -> None:
    o = opts(env={"NATS_CERT": a_file, "NATS_KEY": a_file})
    assert o.tls_cert == a_file and o.tls_key == a_file
    assert "tls_key" in error(env={"NATS_CERT": a_file})


# --------------------------------------------------------------------------------------------
# Keyword validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("tiemout", "'timeout'"),
        ("connect_timout", "'connect_timeout'"),
        ("passwrd", "'password'"),
        ("max_reconnects", "'max_reconnect'"),
        ("nkeys_seed", "'nkey_seed'"),
        ("tlsca", "'tls_ca'"),
    ],
)
def test_unknown_option_suggests_the_closest_name(typo: str, suggestion: str) -> None:
    message = error(**{typo: 1})
    assert typo in message and f"did you mean {suggestion}" in message


def test_unknown_option_without_a_close_name_lists_the_valid_ones() -> None:
    message = error(zzz=1)
    assert "'zzz'" in message and "request_timeout" in message and "max_reconnect" in message


@pytest.mark.parametrize(
    "name", ["connect_timeout", "request_timeout", "drain_timeout", "ping_interval", "reconnect_wait"]
)
def test_negative_durations_are_rejected(name: str) -> None:
    message = error(**{name: -0.5})
    assert name in message and "negative" in message
    assert name in error(**{name: "5"})
    assert name in error(**{name: True})
    assert name in error(**{name: float("nan")})
    assert name in error(**{name: float("inf")})
    assert getattr(opts(**{name: 7}), name) == 7


@pytest.mark.parametrize(
    "name", ["connect_timeout", "request_timeout", "drain_timeout", "ping_interval"]
)
def test_zero_is_rejected_where_it_would_mean_never(name: str) -> None:
    assert "greater than 0" in error(**{name: 0})


def test_zero_reconnect_wait_is_allowed() -> None:
    assert opts(reconnect_wait=0).reconnect_wait == 0


def test_max_reconnect() -> None:
    assert opts(max_reconnect=0).max_reconnect == 0
    assert opts(max_reconnect=10).max_reconnect == 10
    assert "max_reconnect" in error(max_reconnect=-2)
    assert "max_reconnect" in error(max_reconnect=1.5)


def test_timeout_alias() -> None:
    assert opts(timeout=2.5).request_timeout == 2.5
    assert "not both" in error(timeout=1, request_timeout=2)
    assert opts(timeout=None, request_timeout=3).request_timeout == 3


def test_none_keywords_count_as_not_given(a_file: str) -> None:
    assert opts(name=None, connect_timeout=None, user=None) == opts()
    assert opts(env={"NATS_CREDS": a_file}, creds=None).creds == a_file


def test_credential_rules(a_file: str) -> None:
    assert "password" in error(user="app")
    assert "user" in error(password="pw")
    assert "token" in error(token="t", user="app", password="pw")
    assert "keep one" in error(creds=a_file, nkey_seed=a_file)
    assert opts(token="t", creds=a_file).token == "t"  # auth callout: both are sent


def test_tls_rules(a_file: str, tmp_path: Path) -> None:
    assert "tls_key" in error(tls_cert=a_file)
    assert "tls_cert" in error(tls_key=a_file)
    for name in ("creds", "nkey_seed", "tls_ca"):
        message = error(**{name: str(tmp_path / "nope.pem")})
        assert name in message and "does not exist" in message
    assert "does not exist" in error(tls_cert=str(tmp_path), tls_key=a_file)  # a directory
    assert opts(creds=tmp_path / "file.txt").creds == a_file  # PathLike is accepted


def test_string_options_must_be_strings() -> None:
    assert "name" in error(name=5)
    assert "user" in error(user=1, password="x")
    assert "inbox_prefix" in error(inbox_prefix="")
    assert "inbox_prefix" in error(inbox_prefix="my inbox")
    assert "inbox_prefix" in error(inbox_prefix="_INBOX.*")


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigurationError):
        ConnectOptions(connect_timeout=-1)
    o = ConnectOptions(servers="nats://a:b@n1")  # type: ignore[arg-type]
    assert o.servers == ("nats://n1:4222",) and o.user == "a"


def test_replace_revalidates() -> None:
    o = opts(name="web")
    embedded = o.replace(servers="nats://127.0.0.1:5555")
    assert embedded.servers == ("nats://127.0.0.1:5555",) and embedded.name == "web"
    with pytest.raises(ConfigurationError):
        o.replace(connect_timeout=-1)


# --------------------------------------------------------------------------------------------
# Output: nats-py keywords, redaction
# --------------------------------------------------------------------------------------------


def test_to_nats_kwargs_names_match_nats_py(a_file: str) -> None:
    from nats.aio.client import Client

    accepted = set(inspect.signature(Client.connect).parameters)
    everything = opts(
        "n1", user="u", password="p", creds=a_file, tls_hostname="h", name="n",
    ).to_nats_kwargs()
    token = opts("n1", token="t", nkey_seed=a_file).to_nats_kwargs()
    assert set(everything) <= accepted and set(token) <= accepted


def test_to_nats_kwargs_values(a_file: str) -> None:
    o = opts(
        "n1,n2", name="web", connect_timeout=1, max_reconnect=3, reconnect_wait=0.5,
        drain_timeout=9, ping_interval=4, inbox_prefix="_MY", creds=a_file,
    )
    assert o.to_nats_kwargs() == {
        "servers": ["nats://n1:4222", "nats://n2:4222"],
        "name": "web",
        "connect_timeout": 1,
        "reconnect_time_wait": 0.5,
        "max_reconnect_attempts": 3,
        "drain_timeout": 9,
        "ping_interval": 4,
        "inbox_prefix": "_MY",
        "allow_reconnect": True,
        "user_credentials": a_file,
    }
    assert opts(nkey_seed=a_file).to_nats_kwargs()["nkeys_seed"] == a_file
    # nats-py reads max_reconnect_attempts=0 as "no limit": "never" must disable reconnects.
    never = opts("n1", max_reconnect=0).to_nats_kwargs()
    assert never["allow_reconnect"] is False and never["max_reconnect_attempts"] == 0
    assert opts("n1").to_nats_kwargs()["max_reconnect_attempts"] == -1
    assert opts().to_nats_kwargs()["servers"] == []  # embedded: the caller fills it in
    assert "tls" not in o.to_nats_kwargs()


def test_tls_context(tls_files: dict[str, str]) -> None:
    o = opts("n1", tls_ca=tls_files["cert"], tls_cert=tls_files["cert"], tls_key=tls_files["key"],
             tls_hostname="localhost")
    kwargs = o.to_nats_kwargs()
    assert isinstance(kwargs["tls"], ssl.SSLContext) and kwargs["tls_hostname"] == "localhost"
    assert kwargs["tls"].verify_mode == ssl.CERT_REQUIRED
    # A tls:// URL alone gets a default, verifying context.
    assert isinstance(opts("tls://n1").to_nats_kwargs()["tls"], ssl.SSLContext)
    assert opts("tls://n1").uses_tls and not opts("n1").uses_tls
    # Files that exist but are not certificates fail when the context is built.
    bad = opts("n1", tls_ca=tls_files["key"])
    with pytest.raises(ConfigurationError, match="TLS"):
        bad.to_nats_kwargs()


def test_repr_and_redacted_hide_secrets() -> None:
    o = opts("nats://app:hunter2@n1", name="web")
    for text in (repr(o), str(o), o.redacted(), f"{o}"):
        assert "hunter2" not in text
        assert "app" in text and "nats://n1:4222" in text and "***" in text
    t = opts(token="s3cr3tt0k3n")
    assert "s3cr3tt0k3n" not in repr(t) and "token='***'" in repr(t)
    assert repr(opts()) == "ConnectOptions(servers=())"


@settings(max_examples=60, deadline=None)
@given(
    password=st.text(min_size=6, max_size=30).filter(lambda s: s.strip() == s and "\x00" not in s),
    user=st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8),
)
@pytest.mark.slow
def test_any_password_round_trips_and_never_shows(password: str, user: str) -> None:
    url = f"nats://{quote(user, safe='')}:{quote(password, safe='')}@host-1:4222,host-2"
    o = ConnectOptions.from_args(url, environ={})
    assert (o.user, o.password) == (user, password)
    without = ConnectOptions.from_args(f"nats://{user}:x@host-1:4222,host-2", environ={})
    assume(password not in repr(without))  # e.g. a password that is a substring of "natskv"
    assert password not in repr(o)


@settings(max_examples=60, deadline=None)
@given(
    hosts=st.lists(
        st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
        min_size=1, max_size=4,
    ),
    ports=st.lists(st.integers(1, 65535), min_size=4, max_size=4),
    scheme=st.sampled_from(["", "nats://", "tls://"]),
)
@pytest.mark.slow
def test_parsing_is_idempotent(hosts: list[str], ports: list[int], scheme: str) -> None:
    text = ",".join(f"{scheme}{host}:{port}" for host, port in zip(hosts, ports, strict=False))  # 1 to 4 hosts, 4 ports
    urls, _, _ = parse_servers(text)
    assert parse_servers(list(urls)) == (urls, None, None)
    assert all(url.startswith(("nats://", "tls://")) for url in urls)


# --------------------------------------------------------------------------------------------
# End to end: the keywords really connect (auth and TLS servers)
# --------------------------------------------------------------------------------------------


def _connects(o: ConnectOptions) -> bool:
    from nats.aio.client import Client

    async def attempt() -> bool:
        kwargs = o.replace(connect_timeout=2, max_reconnect=0).to_nats_kwargs()

        async def quiet(exc: Exception) -> None:
            pass

        nc = Client()
        try:
            await asyncio.wait_for(nc.connect(**kwargs, error_cb=quiet), 10)
        except Exception:
            # nats-py keeps the socket of a refused connection open until close()
            await asyncio.wait_for(nc.close(), 10)
            return False
        await nc.close()
        return True

    return asyncio.run(attempt())


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    args = ["--user", "app", "--pass", "p@ss:w/rd"]
    with EmbeddedServer(data_dir=tmp_path, extra_args=args) as server:
        yield server


def test_user_password_reach_the_server(auth_server: EmbeddedServer) -> None:
    port = auth_server.port
    assert _connects(opts(f"127.0.0.1:{port}", user="app", password="p@ss:w/rd"))
    assert _connects(opts(f"nats://app:{quote('p@ss:w/rd', safe='')}@127.0.0.1:{port}"))
    assert not _connects(opts(f"127.0.0.1:{port}", user="app", password="wrong"))


def test_token_reaches_the_server(tmp_path: Path) -> None:
    with EmbeddedServer(data_dir=tmp_path, extra_args=["--auth", "t0k3n"]) as server:
        assert _connects(opts(f"nats://t0k3n@127.0.0.1:{server.port}"))
        assert _connects(opts(f"127.0.0.1:{server.port}", token="t0k3n"))
        assert not _connects(opts(f"127.0.0.1:{server.port}", token="nope"))


def test_tls_reaches_the_server(tmp_path: Path, tls_files: dict[str, str]) -> None:
    args = ["--tls", "--tlscert", tls_files["cert"], "--tlskey", tls_files["key"]]
    with EmbeddedServer(data_dir=tmp_path, extra_args=args) as server:
        url = f"tls://127.0.0.1:{server.port}"
        trusting = opts(url, tls_ca=tls_files["cert"])
        assert _connects(trusting)
        # The handshake itself (nats-py hangs in close() after a failed TLS connect, so the
        # refusal is checked on a plain socket): NATS sends INFO in clear, then upgrades.
        for options, accepted in ((trusting, True), (opts(url), False)):
            context = options.ssl_context()
            assert context is not None
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                assert raw.makefile("rb").readline().startswith(b"INFO ")
                if accepted:
                    context.wrap_socket(raw, server_hostname="127.0.0.1").close()
                else:
                    with pytest.raises(ssl.SSLCertVerificationError):
                        context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_modules_do_not_import_nats_or_asyncio() -> None:
    # natskv/__init__.py is bypassed on purpose: this checks the modules themselves.
    script = textwrap.dedent(
        f"""
        import sys, types
        package = types.ModuleType("natskv")
        package.__path__ = [{str(REPO_ROOT / "natskv")!r}]
        sys.modules["natskv"] = package
        import natskv.config, natskv.server
        print(sorted(m for m in ("nats", "asyncio", "ssl") if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
