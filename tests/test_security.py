"""Security on real servers: TLS without downgrade, every auth mode, permissions, no leaked secrets.

Each server is configured by a file the test writes (``nats-server -c``). The one fake server (a
socket that sends a plaintext INFO) shows what a client sends to a server without TLS.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest
from helpers import wait_until
from jwt_helpers import Identity, Operator, write_creds

import natskv
from natskv import AuthenticationError, EmbeddedServer, Field, Model, NotConnectedError, PermissionDeniedError
from natskv.errors import NatsKVError

DATA = Path(__file__).parent / "data"
CERT, KEY = str(DATA / "tls-cert.pem"), str(DATA / "tls-key.pem")
PASSWORD = "s3cret-Pa55word"
TOKEN = "t0ken-Secret-42"
FAST = 1.5  # "at once": well under the 5 s request timeout a hang would take


def start_server(tmp_path: Path, name: str, config: str) -> EmbeddedServer:
    conf = tmp_path / f"{name}.conf"
    conf.write_text(config)
    return EmbeddedServer(data_dir=tmp_path / name, extra_args=["-c", str(conf)]).start()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[object]:
    started: list[EmbeddedServer] = []

    def make(name: str, config: str) -> EmbeddedServer:
        server = start_server(tmp_path, name, config)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """(exception raised by fn, seconds it took)."""
    began = time.monotonic()
    with pytest.raises(NatsKVError) as info:
        fn(*args, **kwargs)
    return info.value, time.monotonic() - began


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


class PlaintextServer:
    """Accepts connections, sends an INFO without TLS (asking for auth), records every byte."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        info = (
            b'INFO {"server_id":"FAKE","version":"2.15.1","proto":1,"headers":true,"max_payload":1048576,'
            b'"auth_required":true}\r\n'
        )
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(info)
                conn.settimeout(2.0)
                try:
                    while chunk := conn.recv(65536):
                        self.received += chunk
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    "url, options",
    [
        ("tls://127.0.0.1:{port}", {}),
        ("nats://127.0.0.1:{port}", {"tls_ca": CERT}),
    ],
    ids=["tls-url", "tls-option"],
)
def test_tls_is_never_downgraded(url: str, options: dict[str, str]) -> None:
    fake = PlaintextServer()
    try:
        error, took = timed(
            natskv.connect, url.format(port=fake.port), user="app", password=PASSWORD, connect_timeout=2, **options
        )
        time.sleep(0.2)  # anything the client might still send after the error
    finally:
        fake.close()
    assert isinstance(error, NotConnectedError)
    assert "does not offer TLS" in str(error) and took < FAST
    assert fake.connections == 1
    assert PASSWORD.encode() not in fake.received and b"CONNECT" not in fake.received


@pytest.mark.slow
def test_tls_connection_and_no_eof_warning(server_factory, caplog: pytest.LogCaptureFixture) -> None:
    server = server_factory(
        "tls",
        f'tls {{ cert_file: "{CERT}", key_file: "{KEY}" }}\n'
        f"authorization {{ user: app, password: {PASSWORD} }}\n",
    )
    url = server.url.replace("nats://", "tls://")
    with caplog.at_level(logging.DEBUG):
        with natskv.connect(url, user="app", password=PASSWORD, tls_ca=CERT, reconnect_wait=0.1) as db:
            kv = db.bucket("tls")
            kv.set("k", "v")
            assert kv.get("k") == "v"
            assert db._conn.mux._fd == -1  # TLS: no caller thread writes around the transport
            server.restart()  # reconnects upgrade to TLS too
            assert wait_until(lambda: kv.get("k", timeout=1) == "v", 10)
            assert db._conn.mux._fd == -1
            # A plaintext impostor on the same port never sees the password on reconnect.
            server.stop()
            fake = PlaintextServer(server.port)
            try:
                assert wait_until(lambda: fake.connections >= 2, 10)
            finally:
                fake.close()
            assert PASSWORD.encode() not in fake.received and b"CONNECT" not in fake.received
            server.start()
            assert wait_until(lambda: kv.get("k", timeout=1) == "v", 10)
        # The server closing its side after our close is the EOF that used to log the warning.
        time.sleep(0.3)
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]
    # A nats:// URL to a server requiring TLS upgrades too, verified against the system trust
    # store, which does not know this self-signed certificate: a quick, named failure.
    error, took = timed(natskv.connect, server.url, user="app", password=PASSWORD, connect_timeout=2)
    assert isinstance(error, NotConnectedError) and "TLS handshake failed" in str(error) and took < FAST


@pytest.mark.slow
def test_tls_handshake_first(tmp_path: Path) -> None:
    conf = tmp_path / "first.conf"
    conf.write_text(f'tls {{ cert_file: "{CERT}", key_file: "{KEY}", handshake_first: true }}\n')
    # The server answers nothing before the TLS handshake, so EmbeddedServer's INFO probe cannot
    # see it: wait for its log line instead.
    server = EmbeddedServer(data_dir=tmp_path / "first", extra_args=["-c", str(conf)])
    server.launch()
    try:
        assert server.log_file is not None
        assert wait_until(lambda: "Server is ready" in server.log_file.read_text(), 10)  # type: ignore[union-attr]
        url = server.url.replace("nats://", "tls://")
        with natskv.connect(url, tls_ca=CERT, tls_handshake_first=True) as db:
            kv = db.bucket("first")
            kv.set("k", 1)
            assert kv.get("k") == 1
            assert db._conn.mux._fd == -1  # TLS: no caller thread writes around the transport
        # Without the option the client waits for an INFO that never comes.
        error, took = timed(natskv.connect, url, tls_ca=CERT, connect_timeout=1)
        assert isinstance(error, NotConnectedError) and "connect_timeout=1" in str(error) and took < 3
    finally:
        server.stop()


def test_tls_options_are_checked_before_connecting() -> None:
    import inspect

    from nats.aio.client import Client as NatsPy

    options = natskv.ConnectOptions.from_args("n1", tls_ca=CERT, tls_handshake_first=True)
    assert options.uses_tls and set(options.to_nats_kwargs()) <= set(inspect.signature(NatsPy.connect).parameters)
    assert options.to_nats_kwargs()["tls_handshake_first"] is True
    assert natskv.ConnectOptions.from_args("n1", tls_hostname="n1").uses_tls  # any TLS option
    with pytest.raises(natskv.ConfigurationError, match="wss://"):
        natskv.ConnectOptions.from_args("ws://n1:80", tls_ca=CERT)
    with pytest.raises(natskv.ConfigurationError, match="True or False"):
        natskv.ConnectOptions.from_args("n1", tls_handshake_first="yes")


# --------------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------------

NKEY_USER = Identity.new(nkeys.PREFIX_BYTE_USER)
NKEY_STRANGER = Identity.new(nkeys.PREFIX_BYTE_USER)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """Password users, one of them limited to the buckets 'mine' (all) and 'shared' (read), and
    an nkey user."""
    tmp = tmp_path_factory.mktemp("auth")
    server = start_server(tmp, "auth", AUTH_CONFIG)
    yield server
    server.stop()


def bucket_permissions(bucket: str, write: bool = True) -> list[str]:
    """What a natskv user publishes to use ``bucket`` (README "Security" lists the same)."""
    stream = f"KV_{bucket}"
    read = [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]
    writes = [
        f"$KV.{bucket}.>",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.UPDATE.{stream}",
        f"$JS.API.STREAM.DELETE.{stream}",
        f"$JS.API.STREAM.INFO.KVC_{bucket}",
        f"$JS.API.STREAM.CREATE.KVC_{bucket}",
        f"$JS.API.STREAM.UPDATE.KVC_{bucket}",
        f"$JS.API.STREAM.DELETE.KVC_{bucket}",
        f"$JS.API.STREAM.MSG.GET.KVC_{bucket}",
        f"$KVC.{bucket}.>",
    ]
    return read + (writes if write else [])


def _quoted(subjects: list[str]) -> str:
    return ", ".join(f'"{s}"' for s in subjects)


AUTH_CONFIG = f"""
authorization {{
  users: [
    {{ user: admin, password: {PASSWORD} }}
    {{ user: limited, password: {PASSWORD}, permissions: {{
        publish: {{ allow: [ "$JS.API.INFO", "$JS.API.STREAM.INFO.*", "$JS.API.STREAM.NAMES",
                             {_quoted(bucket_permissions("mine") + bucket_permissions("shared", write=False))} ] }}
        subscribe: {{ allow: [ "_INBOX.>" ] }}
    }} }}
    {{ user: noinbox, password: {PASSWORD}, permissions: {{ subscribe: {{ deny: [ "_INBOX.>" ] }} }} }}
    {{ user: nowatch, password: {PASSWORD}, permissions: {{ subscribe: {{ allow: [ "_INBOX.*.*" ] }} }} }}
    {{ nkey: {NKEY_USER.public} }}
  ]
}}
"""


def test_password_and_nkey_auth(auth_server: EmbeddedServer, tmp_path: Path) -> None:
    with natskv.connect(auth_server.url, user="admin", password=PASSWORD) as db:
        db.bucket("pw").set("k", 1)
    seed = tmp_path / "user.nk"
    seed.write_bytes(NKEY_USER.seed)
    with natskv.connect(auth_server.url, nkey_seed=str(seed)) as db:
        assert db.bucket("pw").get("k") == 1


@pytest.mark.parametrize("max_reconnect", [-1, 0])
def test_wrong_credentials_fail_fast(auth_server: EmbeddedServer, tmp_path: Path, max_reconnect: int) -> None:
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(NKEY_STRANGER.seed)
    cases = [
        {"user": "admin", "password": "wrong"},
        {"user": "nobody", "password": PASSWORD},
        {"token": "not-a-token"},
        {"nkey_seed": str(stranger)},
        {},
    ]
    for options in cases:
        error, took = timed(natskv.connect, auth_server.url, max_reconnect=max_reconnect, connect_timeout=3, **options)
        assert isinstance(error, AuthenticationError), (options, error)
        assert isinstance(error, NotConnectedError) and isinstance(error, PermissionDeniedError)
        assert "Authorization Violation" in str(error) and took < FAST, (options, took)


def test_token_auth(server_factory) -> None:
    server = server_factory("token", f"authorization {{ token: {TOKEN} }}\n")
    with natskv.connect(server.url, token=TOKEN) as db:
        db.bucket("tok").set("k", 1)
    with natskv.connect(f"nats://{TOKEN}@127.0.0.1:{server.port}") as db:
        assert db.bucket("tok").get("k") == 1
    error, took = timed(natskv.connect, server.url, token="wrong")
    assert isinstance(error, AuthenticationError) and "Authorization Violation" in str(error) and took < FAST


def test_refused_port_says_so_at_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        error, took = timed(natskv.connect, f"nats://127.0.0.1:{port}")
        assert isinstance(error, NotConnectedError) and "connection refused" in str(error) and took < FAST
        two = f"nats://127.0.0.1:{port},nats://127.0.0.1:{port + 1 if port < 65535 else port - 1}"
        error, took = timed(natskv.connect, two, reconnect_wait=0.1)
        assert "connection refused" in str(error) and took < FAST


def test_revoked_user_surfaces_on_next_call(tmp_path: Path) -> None:
    conf = tmp_path / "reload.conf"
    # A reload may not change the server name: give it in the file too.
    users = "{{ user: admin, password: {p} }}, {{ user: temp, password: {p} }}"
    conf.write_text(f"server_name: reload\nauthorization {{ users: [ {users.format(p=PASSWORD)} ] }}\n")
    server = EmbeddedServer(data_dir=tmp_path / "reload", name="reload", extra_args=["-c", str(conf)]).start()
    try:
        db = natskv.connect(server.url, user="temp", password=PASSWORD, reconnect_wait=0.1)
        kv = db.bucket("revoke")
        kv.set("k", 1)
        conf.write_text(
            f"server_name: reload\nauthorization {{ users: [ {{ user: admin, password: {PASSWORD} }} ] }}\n"
        )
        assert server.pid is not None
        os.kill(server.pid, signal.SIGHUP)  # config reload: 'temp' is gone
        assert wait_until(lambda: not db.connected, 5)
        for call in (lambda: kv.get("k"), lambda: kv.set("k", 2), kv.watch):
            error, took = timed(call)
            assert isinstance(error, AuthenticationError) and "Authorization Violation" in str(error) and took < FAST
        # natskv kept reconnecting: with the user back, the same client works again.
        conf.write_text(f"server_name: reload\nauthorization {{ users: [ {users.format(p=PASSWORD)} ] }}\n")
        os.kill(server.pid, signal.SIGHUP)
        assert wait_until(lambda: kv.get("k") == 1, 5)
        db.close()
    finally:
        server.stop()


INFO = (
    b'INFO {"server_id":"FAKE","version":"2.15.1","proto":1,"headers":true,"max_payload":1048576,'
    b'"jetstream":true}\r\n'
)


def _after_pong(extra: bytes):  # type: ignore[no-untyped-def]
    def behave(conn: socket.socket) -> None:
        conn.sendall(INFO)
        received = b""
        while b"PING\r\n" not in received:
            received += conn.recv(65536) or b"PING\r\n"
        conn.sendall(b"PONG\r\n" + extra)
        time.sleep(0.2)

    return behave


def _send(data: bytes):  # type: ignore[no-untyped-def]
    def behave(conn: socket.socket) -> None:
        conn.sendall(data)
        time.sleep(0.2)

    return behave


@pytest.mark.parametrize(
    "behave",
    [
        _after_pong(b"-ERR 'Some Server Error'\r\n"),  # was nats.errors.ConnectionClosedError
        _after_pong(b""),  # then hangs up
        _send(b"HELLO\r\n"),  # not NATS
        _send(b"INFO {broken\r\n"),
        _send(INFO.replace(b'"jetstream":true', b'"tls_required":true')),  # then no TLS
    ],
    ids=["err-after-connect", "closed-after-connect", "not-nats", "bad-info", "tls-then-nothing"],
)
@pytest.mark.parametrize("max_reconnect", [-1, 0])
def test_connect_raises_only_natskv_errors(behave, max_reconnect: int) -> None:  # type: ignore[no-untyped-def]
    sock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                try:
                    behave(conn)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        error, took = timed(
            natskv.connect, f"nats://127.0.0.1:{sock.getsockname()[1]}", connect_timeout=1, timeout=1,
            max_reconnect=max_reconnect,
        )
    finally:
        sock.close()
    assert isinstance(error, NatsKVError) and took < 5  # timed() fails on anything else


# --------------------------------------------------------------------------------------------
# Operator mode: JWT creds
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def operator_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("operator")
    op = Operator()
    account = op.account("APP")
    creds = {}
    for name, pub in [
        ("full", None),
        ("one_bucket", {"allow": ["$JS.API.INFO", *bucket_permissions("only")]}),
    ]:
        user = Identity.new(nkeys.PREFIX_BYTE_USER)
        sub = {"allow": ["_INBOX.>"]} if pub else None
        creds[name] = write_creds(tmp / f"{name}.creds", op.user_jwt(account, name, user, pub=pub, sub=sub), user)
    # A user signed by an account the server does not know.
    rogue = Identity.new(nkeys.PREFIX_BYTE_USER)
    creds["rogue"] = write_creds(
        tmp / "rogue.creds", op.user_jwt(Identity.new(nkeys.PREFIX_BYTE_ACCOUNT), "rogue", rogue), rogue
    )
    expiring = Identity.new(nkeys.PREFIX_BYTE_USER)
    server = start_server(tmp, "op", op.server_config())
    yield {"server": server, "creds": creds, "op": op, "account": account, "expiring": expiring, "tmp": tmp}
    server.stop()


def test_operator_mode_creds(operator_env: dict) -> None:
    server, creds = operator_env["server"], operator_env["creds"]
    with natskv.connect(server.url, creds=str(creds["full"])) as db:
        kv = db.bucket("opbucket")
        kv.set("k", {"v": 1})
        assert kv.get("k") == {"v": 1}
        db.bucket("other").set("k", 2)
    error, took = timed(natskv.connect, server.url, creds=str(creds["rogue"]))
    assert isinstance(error, AuthenticationError) and "Authorization Violation" in str(error) and took < FAST


def test_operator_user_limited_to_one_bucket(operator_env: dict) -> None:
    server, creds = operator_env["server"], operator_env["creds"]
    with natskv.connect(server.url, creds=str(creds["one_bucket"])) as db:
        kv = db.bucket("only")
        kv.set("a", 1)
        assert kv.get_many(["a"]) == {"a": 1} and kv.keys() == ["a"]
        error, took = timed(db.bucket, "elsewhere")
        assert isinstance(error, PermissionDeniedError) and "STREAM.INFO.KV_elsewhere" in str(error)
        assert took < FAST


@pytest.mark.slow
def test_expired_user_jwt_surfaces_on_next_call(operator_env: dict) -> None:
    op, account, user, tmp = operator_env["op"], operator_env["account"], operator_env["expiring"], operator_env["tmp"]
    creds = write_creds(tmp / "short.creds", op.user_jwt(account, "short", user, expires=time.time() + 2), user)
    db = natskv.connect(operator_env["server"].url, creds=str(creds), reconnect_wait=0.1)
    try:
        kv = db.bucket("expiring")
        kv.set("k", 1)
        assert wait_until(lambda: not db.connected, 6)
        error, took = timed(kv.get, "k")
        assert isinstance(error, AuthenticationError) and "expired" in str(error) and took < FAST
    finally:
        db.close()
    error, _ = timed(natskv.connect, operator_env["server"].url, creds=str(creds))
    assert isinstance(error, AuthenticationError)


# --------------------------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(auth_server: EmbeddedServer) -> Iterator[natskv.Client]:
    with natskv.connect(auth_server.url, user="admin", password=PASSWORD) as db:
        db.bucket("theirs").set("secret", "admin-only")
        db.bucket("shared").set("s:1", "hello")
        yield db


@pytest.fixture(scope="module")
def limited(auth_server: EmbeddedServer, admin: natskv.Client) -> Iterator[natskv.Client]:
    with natskv.connect(auth_server.url, user="limited", password=PASSWORD) as db:
        yield db


def test_limited_user_can_use_its_bucket(limited: natskv.Client) -> None:
    """Everything natskv does on a bucket works with the permissions README lists."""
    kv = limited.bucket("mine", history=5)
    assert kv.set("a", 1) > 0
    kv.set_many({"b": 2, "c": 3})
    assert kv.get_many(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}
    assert kv.keys() == ["a", "b", "c"]
    kv.set("a", 10)
    assert [e.value for e in kv.history("a")] == [1, 10]
    kv.commit([("set", "d", 4), ("delete", "c")])
    with kv.watch() as w:
        first = w.get(timeout=5)
        assert first is not None and first.key in "abd"

    class Mine(Model):
        __bucket__ = "mine"
        id = Field(int, primary_key=True, generated="autoincrement")
        name = Field(str)

    limited.register(Mine)
    made = Mine.create(name="x")
    assert Mine.get(made.id).name == "x"
    assert "mine" in limited.buckets()
    assert limited.delete_bucket("mine")


def _denied_calls(kv: natskv.Bucket) -> dict[str, object]:
    return {
        "get": lambda: kv.get("secret"),
        "set": lambda: kv.set("k", 1),
        "set_many": lambda: kv.set_many({"k1": 1, "k2": 2}),
        "get_many": lambda: kv.get_many(["secret", "k1"]),
        "keys": kv.keys,
        "history": lambda: kv.history("secret"),
        "watch": kv.watch,
        "commit": lambda: kv.commit([("set", "k1", 1), ("set", "k2", 2)]),
        "delete": lambda: kv.delete("secret"),
    }


def test_every_call_on_a_forbidden_bucket_is_denied_at_once(limited: natskv.Client, admin: natskv.Client) -> None:
    before = admin.bucket("theirs").status().last_revision
    kv = limited.bucket("theirs", create=False)  # stream info is allowed, nothing else
    for what, call in _denied_calls(kv).items():
        error, took = timed(call)
        assert isinstance(error, PermissionDeniedError), (what, error)
        assert "theirs" in str(error) and took < FAST, (what, took)
    assert admin.bucket("theirs").keys() == ["secret"]
    assert admin.bucket("theirs").status().last_revision == before  # nothing was written

    class Theirs(Model):
        __bucket__ = "theirs"
        id = Field(str, primary_key=True)

    error, took = timed(limited.register, Theirs)
    assert isinstance(error, PermissionDeniedError) and took < FAST
    error, took = timed(limited.bucket, "brand_new")  # creating a bucket is denied too
    assert isinstance(error, PermissionDeniedError) and took < FAST


def test_read_only_bucket_refuses_model_writes(limited: natskv.Client, admin: natskv.Client) -> None:
    def note_model() -> type[Model]:
        class Note(Model):
            __bucket__ = "shared"
            id = Field(str, primary_key=True)
            text = Field(str)

        return Note

    AdminNote, Note = admin.register(note_model()), limited.register(note_model())
    AdminNote.create(id="n1", text="from admin")
    assert wait_until(lambda: Note.get("n1") is not None, 5)  # reads are allowed
    before = admin.bucket("shared").status().last_revision
    error, took = timed(Note.create, id="n2", text="nope")
    assert isinstance(error, PermissionDeniedError) and took < FAST
    kv = limited.bucket("shared", create=False)
    for what in ("set", "set_many", "commit"):
        error, took = timed(_denied_calls(kv)[what])  # type: ignore[operator]
        assert isinstance(error, PermissionDeniedError) and took < FAST, what
    assert admin.bucket("shared").status().last_revision == before


def test_denied_inbox_subscription_fails_fast(auth_server: EmbeddedServer, admin: natskv.Client) -> None:
    error, took = timed(natskv.connect, auth_server.url, user="noinbox", password=PASSWORD, timeout=5)
    assert isinstance(error, PermissionDeniedError) and "subscribe" in str(error) and took < FAST
    # Replies (_INBOX.<id>.<token>) allowed, a watch's own inbox (_INBOX.<id>) not.
    with natskv.connect(auth_server.url, user="nowatch", password=PASSWORD, timeout=5) as db:
        kv = db.bucket("shared")
        assert kv.get("s:1") == "hello"
        error, took = timed(kv.watch)
        assert isinstance(error, PermissionDeniedError) and "subscribe" in str(error) and took < FAST
        assert kv.get("s:1") == "hello"  # the client keeps working


# --------------------------------------------------------------------------------------------
# Secrets stay secret
# --------------------------------------------------------------------------------------------


def _chain(error: BaseException) -> str:
    parts = []
    seen: BaseException | None = error
    while seen is not None:
        parts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.mark.slow
def test_credentials_stay_out_of_errors_repr_logs_and_cli(
    auth_server: EmbeddedServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "Wr0ng-" + PASSWORD
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for options in ({"user": "admin", "password": wrong}, {"token": wrong}):
            error, _ = timed(natskv.connect, auth_server.url, **options)
            seen.append(_chain(error))
        error, _ = timed(natskv.connect, f"nats://admin:{wrong}@127.0.0.1:{auth_server.port}")
        seen.append(_chain(error))
        seed = tmp_path / "stranger.nk"
        seed.write_bytes(NKEY_STRANGER.seed)
        error, _ = timed(natskv.connect, auth_server.url, nkey_seed=str(seed))
        seen.append(_chain(error))
        opts = natskv.ConnectOptions.from_args(f"nats://admin:{PASSWORD}@127.0.0.1:{auth_server.port}")
        seen += [repr(opts), str(opts)]
        db = natskv.connect(f"nats://admin:{PASSWORD}@127.0.0.1:{auth_server.port}")
        seen += [repr(db), repr(db.stats())]
        db.close()
    seen += [record.getMessage() + repr(record.args) for record in caplog.records]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    for url in (f"nats://admin:{wrong}@127.0.0.1:{auth_server.port}", f"nats://{wrong}@127.0.0.1:{auth_server.port}"):
        result = subprocess.run(
            [sys.executable, "-m", "natskv", "--url", url, "get", "k"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert result.returncode != 0
        seen += [result.stdout, result.stderr]
        assert "Authorization Violation" in result.stderr
    text = "\n".join(seen)
    assert "Authorization Violation" in text  # the checks saw the errors ...
    assert wrong not in text and PASSWORD not in text  # ... and no secret
    assert NKEY_STRANGER.seed.decode() not in text
