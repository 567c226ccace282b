"""natskv.contrib.flask in real Flask, Flask-Caching and Flask-Session, against the real server.

The cache tests check, for our backend, the behaviours that cachelib's and Flask-Caching's own
suites check for every backend (written here from their public contract), with and without the
near cache. Other processes are real: subprocesses, os.fork(), and gunicorn --preload with two
workers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, session
from flask_caching import Cache
from helpers import eventually

import natskv
from natskv.contrib.cache import CacheCodec
from natskv.contrib.flask import NatsKV, NatsKVCache, NatsKVSessionInterface, shared_client
from natskv.errors import ConfigurationError, InvalidArgumentError, NotConnectedError, SerializationError
from natskv.wire import headers as h

CACHE_TYPE = "natskv.contrib.flask.NatsKVCache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_python(code: str, *args: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter; its stdout. It must exit cleanly: natskv closes the
    shared clients (and stops near-cache watches) at exit without a word on stderr."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


@pytest.fixture
def make_cache(nats_url: str, db: natskv.Client, name: str) -> Iterator[Any]:
    """``make_cache(**config) -> (app, cache, backend)``: a Flask app with Flask-Caching on our
    backend, on this test's bucket (deleted afterwards, near-cache watches stopped first)."""
    backends: list[NatsKVCache] = []

    def make(**config: Any) -> tuple[Cache, NatsKVCache]:
        app = Flask(__name__)
        app.config.update(CACHE_TYPE=CACHE_TYPE, CACHE_NATSKV_URL=nats_url, CACHE_NATSKV_BUCKET=name)
        app.config.update(config)
        cache = Cache(app)
        backend = cache.cache
        assert isinstance(backend, NatsKVCache)
        backends.append(backend)
        return cache, backend

    try:
        yield make
    finally:
        for backend in backends:
            if backend._kv is not None:
                backend._kv.close()
        db.delete_bucket(name)


@pytest.fixture(params=[False, True], ids=["server", "near"])
def cache_env(request: pytest.FixtureRequest, make_cache: Any) -> tuple[Cache, NatsKVCache]:
    """A cache without and with the near cache (most behaviours must not differ)."""
    return make_cache(CACHE_NATSKV_NEAR_CACHE=request.param)  # type: ignore[no-any-return]


# -- the extension -------------------------------------------------------------------------------------


def test_extension_shares_one_client_per_configuration(nats_url: str, name: str, db: natskv.Client) -> None:
    first, second = Flask("a"), Flask("b")
    for app in (first, second):
        app.config.update(NATSKV_URL=nats_url, NATSKV_BUCKET=name, NATSKV_OPTIONS={"timeout": 7.0})
    ext = NatsKV(first)
    other = NatsKV()
    other.init_app(second)
    try:
        assert first.extensions["natskv"].client is ext.client
        with second.app_context():
            assert other.client is ext.client  # same settings, same process: one client
            assert other.bucket() is ext.bucket()
        assert ext.client.options.request_timeout == 7.0
        ext.bucket().set("k", {"v": 1})
        assert db.bucket(name).get("k") == {"v": 1}
        assert ext.bucket(name + "_h", history=5).name == name + "_h"
        third = Flask("c")
        third.config.update(NATSKV_URL=nats_url, NATSKV_OPTIONS={"timeout": 8.0})
        assert NatsKV(third).client is not ext.client  # other options: another client
        assert NatsKV(third).bucket().name == "flask"
    finally:
        db.delete_bucket(name)
        db.delete_bucket(name + "_h")


def test_extension_needs_an_app(nats_url: str) -> None:
    ext = NatsKV()
    with Flask("x").app_context(), pytest.raises(ConfigurationError, match="init_app"):
        _ = ext.client


def test_extension_connects_on_first_use_and_checks_settings_at_init() -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"
    app = Flask("x")
    app.config.update(NATSKV_URL=[nowhere], NATSKV_OPTIONS={"connect_timeout": 0.5})
    ext = NatsKV(app)  # no connection yet: a preloading master holds none
    with pytest.raises(NotConnectedError):
        _ = ext.client
    bad = Flask("y")
    bad.config["NATSKV_OPTIONS"] = "timeout=1"
    with pytest.raises(ConfigurationError, match="NATSKV_OPTIONS"):
        NatsKV(bad)
    bad.config.update(NATSKV_OPTIONS={}, NATSKV_URL=42)
    with pytest.raises(ConfigurationError, match="NATSKV_URL"):
        NatsKV(bad)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_extension_client_works_in_a_forked_child(nats_url: str, name: str, db: natskv.Client) -> None:
    app = Flask("x")
    app.config.update(NATSKV_URL=nats_url, NATSKV_BUCKET=name)
    ext = NatsKV(app)
    ext.bucket().set("from", "parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the inherited client must reconnect, not hang
        code = 1
        try:
            bucket = ext.bucket()
            bucket.set("child", bucket.get("from") + ":" + str(os.getpid()))
            code = 0
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    try:
        os.close(write)
        assert os.read(read, 1) == b"\x00"
        assert os.waitpid(pid, 0)[1] == 0
        assert ext.bucket().get("child") == f"parent:{pid}"
        assert ext.client.connected
    finally:
        os.close(read)
        db.delete_bucket(name)


# -- Flask-Caching: the backend's contract --------------------------------------------------------------


def test_factory_reads_the_settings(make_cache: Any, nats_url: str, name: str) -> None:
    cache, backend = make_cache(CACHE_DEFAULT_TIMEOUT=60, CACHE_NATSKV_NEAR_CACHE=True,
                                     CACHE_NATSKV_NEAR_CACHE_SIZE=5, CACHE_NATSKV_NEAR_CACHE_BYTES=4096,
                                     CACHE_NATSKV_SERIALIZER="json",
                                     CACHE_NATSKV_OPTIONS={"timeout": 9.0})
    assert backend.default_timeout == 60
    assert backend.key_prefix == "flask_cache_"
    cache.set("k", [1, 2])
    kv = backend.kv
    assert kv.near is not None and kv.near.max_entries == 5 and kv.near.max_bytes == 4096
    assert kv.bucket.name == name and kv.bucket.codec.name == "json"
    assert kv.bucket._client.options.request_timeout == 9.0
    # NATSKV_URL is the default of CACHE_NATSKV_URL, and CACHE_OPTIONS pass constructor arguments.
    other = Flask("o")
    other.config.update(CACHE_TYPE=CACHE_TYPE, NATSKV_URL=nats_url,
                        CACHE_OPTIONS={"bucket": name, "key_prefix": "x_"})
    backend2 = Cache(other).cache
    assert backend2.kv.bucket._client is shared_client(nats_url)
    assert backend2.key_prefix == "x_" and backend2.kv.bucket.name == name
    with pytest.raises(InvalidArgumentError, match="serializer"):
        make_cache(CACHE_NATSKV_SERIALIZER="yaml")
    with pytest.raises(ConfigurationError, match="NEAR_CACHE_SIZE"):
        make_cache(CACHE_NATSKV_NEAR_CACHE_SIZE=0)
    with pytest.raises(ConfigurationError, match="NEAR_CACHE_BYTES"):
        make_cache(CACHE_NATSKV_NEAR_CACHE_BYTES="64M")


class Point:
    """A picklable value of a user's own class."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x

    __hash__ = None  # type: ignore[assignment]


def test_get_set_and_values_of_any_type(cache_env: Any) -> None:
    cache, _backend = cache_env

    values: dict[str, Any] = {
        "str": "héllo", "bytes": b"\x00\x80raw", "int": 42, "big": 2**80, "neg": -7, "float": 1.5,
        "bool": True, "none": None, "list": [1, "a", None], "tuple": (1, 2), "dict": {"a": {"b": [1]}},
        "set": {1, 2}, "object": Point(3), "empty": "", "date": dt.date(2026, 12, 1),
    }
    for key, value in values.items():
        assert cache.set(key, value) is True
    for key, value in values.items():
        got = cache.get(key)
        assert got == value and type(got) is type(value), key
    assert cache.get("missing") is None
    assert cache.set("str", "again") is True  # overwrite
    assert cache.get("str") == "again"
    # Any str is a key: spaces, dots, wildcards and non-ASCII.
    for key in ("a b", "a.b", "a*>", "ключ", "x" * 200, "/view//path?q=1"):
        cache.set(key, key)
        assert cache.get(key) == key
    with pytest.raises(SerializationError) as failure:
        cache.set("lambda", lambda: 1)
    assert failure.value.__cause__ is not None  # pickle's own error, chained
    assert cache.get("lambda") is None


def test_add(cache_env: Any) -> None:
    cache, _backend = cache_env
    assert cache.add("k", "first") is True
    assert cache.add("k", "second") is False
    assert cache.get("k") == "first"
    cache.delete("k")
    assert cache.add("k", "third") is True
    assert cache.get("k") == "third"
    assert cache.add("gone", 1, timeout=-1) is True  # would be stored, but expires at once
    assert cache.get("gone") is None


def test_delete_and_has(cache_env: Any) -> None:
    cache, _backend = cache_env
    cache.set("k", 0)
    assert cache.has("k") is True
    assert cache.delete("k") is True
    assert cache.has("k") is False and cache.get("k") is None
    assert cache.delete("k") is False
    assert cache.delete("never") is False
    cache.set("falsy", None)  # a stored None is a value: has() says so
    assert cache.has("falsy") is True


def test_many(cache_env: Any) -> None:
    cache, _backend = cache_env
    assert sorted(cache.set_many({"a": 1, "b": [2], "c": "3"})) == ["a", "b", "c"]
    assert cache.get_many("c", "missing", "a", "b") == ["3", None, 1, [2]]
    assert cache.get_dict("a", "missing") == {"a": 1, "missing": None}
    assert cache.get_many() == []
    assert sorted(cache.delete_many("a", "b", "missing")) == ["a", "b", "missing"]
    assert cache.get_many("a", "b", "c") == [None, None, "3"]
    assert cache.delete_many() == []
    assert cache.set_many({"x": 1, "y": 2}, timeout=-1) == ["x", "y"]
    assert cache.get_many("x", "y") == [None, None]


def test_inc_and_dec_are_atomic_and_start_from_zero(cache_env: Any) -> None:
    cache, backend = cache_env
    assert backend.inc("n") == 1
    assert backend.inc("n", 10) == 11
    assert backend.dec("n", 3) == 8
    assert backend.dec("fresh") == -1
    cache.set("set_int", 5)
    assert backend.inc("set_int") == 6
    assert cache.get("set_int") == 6
    cache.set("text", "abc")
    with pytest.raises(InvalidArgumentError):
        backend.inc("text")
    assert cache.get("text") == "abc"


def test_inc_across_threads_is_exact(make_cache: Any) -> None:
    import threading

    cache, backend = make_cache(CACHE_NATSKV_NEAR_CACHE=True)

    def work() -> None:
        for _ in range(25):
            backend.inc("hits")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.get("hits") == 200


@pytest.mark.parametrize("near", [False, True], ids=["server", "near"])
def test_timeouts(make_cache: Any, db: natskv.Client, name: str, near: bool) -> None:
    cache, _backend = make_cache(CACHE_DEFAULT_TIMEOUT=1, CACHE_NATSKV_NEAR_CACHE=near)
    cache.set("default", 1)  # None: the default timeout (1 s)
    cache.set("forever", 1, timeout=0)  # Flask-Caching's 0: never expires (unlike Django's)
    cache.set("short", 1, timeout=1)
    cache.set("delta", 1, timeout=dt.timedelta(seconds=1))
    cache.set("float", 1, timeout=1.5)
    cache.add("added", 1, timeout=1)
    cache.set_many({"m1": 1, "m2": 2}, timeout=1)
    short = ["default", "short", "delta", "float", "added", "m1", "m2"]
    assert all(cache.has(k) for k in [*short, "forever"])
    assert eventually(lambda: not any(cache.has(k) for k in short), timeout=10)
    assert cache.get("forever") == 1  # outlived every 1-second key
    assert db.bucket(name, codec="bytes").get("flask_cache_forever") is not None
    cache.set("forever", 2, timeout=-1)  # negative: gone at once
    assert cache.get("forever") is None
    with pytest.raises(InvalidArgumentError):
        cache.set("bad", 1, timeout="soon")
    with pytest.raises(InvalidArgumentError):
        make_cache(CACHE_DEFAULT_TIMEOUT=None)


def test_a_zero_default_timeout_never_expires(make_cache: Any, db: natskv.Client, name: str) -> None:
    cache, _backend = make_cache(CACHE_DEFAULT_TIMEOUT=0)
    cache.set("k", 1)
    raw = db.bucket(name, codec="bytes")
    found = raw._proto.message(raw._token("flask_cache_k"), 5.0)
    assert found is not None and h.TTL not in found[1]  # stored without a TTL


def test_prefixes_and_clear_keep_the_bucket(make_cache: Any, db: natskv.Client, name: str) -> None:
    one, _backend_one = make_cache(CACHE_KEY_PREFIX="one_")
    two, _backend_two = make_cache(CACHE_KEY_PREFIX="two.*[")
    one.set("k", "1")
    two.set("k", "2")
    assert one.get("k") == "1" and two.get("k") == "2"  # prefixes keep apps apart in one bucket
    raw = db.bucket(name)
    assert sorted(raw.keys()) == ["one_k", "two.*[k"]
    two.set("other", 3)
    assert two.clear() is True  # only its own prefix
    assert two.get("k") is None and two.get("other") is None
    assert one.get("k") == "1"
    # Without a prefix clear() empties the bucket in one purge; the bucket stays usable.
    bare, backend_bare = make_cache(CACHE_KEY_PREFIX="", CACHE_NATSKV_NEAR_CACHE=True)
    bare.set("x", 1)
    assert bare.get("x") == 1
    assert bare.clear() is True
    assert bare.get("x") is None and one.get("k") is None
    assert name in db.buckets()
    bare.set("y", 2)
    assert bare.get("y") == 2
    # A callable prefix is read at each call (cachelib allows it).
    current = ["a_"]
    backend_bare.key_prefix = lambda: current[0]
    bare.set("z", 1)
    current[0] = "b_"
    assert bare.get("z") is None
    current[0] = "a_"
    assert bare.get("z") == 1


def test_json_serializer(make_cache: Any) -> None:
    cache, backend = make_cache(CACHE_NATSKV_SERIALIZER="json")
    cache.set("d", {"a": [1, 2.5, None, "x"]})
    assert cache.get("d") == {"a": [1, 2.5, None, "x"]}
    assert backend.inc("n", 2) == 2
    with pytest.raises(SerializationError):
        cache.set("obj", object())


def test_cached_and_memoize_through_the_test_client(cache_env: Any) -> None:
    cache, backend = cache_env
    app = cache.app
    calls = {"view": 0, "square": 0}

    @app.route("/view")
    @cache.cached(timeout=60)
    def view() -> str:
        calls["view"] += 1
        return f"view {calls['view']}"

    @cache.memoize(timeout=60)
    def square(x: int) -> int:
        calls["square"] += 1
        return x * x

    @app.route("/square/<int:x>")
    def square_view(x: int) -> str:
        return str(square(x))

    client = app.test_client()
    assert client.get("/view").text == "view 1"
    assert client.get("/view").text == "view 1"  # served from the cache
    assert calls["view"] == 1
    assert backend.has("view//view")
    cache.delete("view//view")
    assert client.get("/view").text == "view 2"
    assert [client.get(f"/square/{x}").text for x in (3, 3, 4, 3)] == ["9", "9", "16", "9"]
    assert calls["square"] == 2
    with app.app_context():
        cache.delete_memoized(square, 3)
        assert square(3) == 9
        assert square(4) == 16
    assert calls["square"] == 3
    with app.app_context():
        cache.delete_memoized(square)  # every argument
        square(4)
    assert calls["square"] == 4


def test_memoize_is_answered_from_the_near_cache(make_cache: Any) -> None:
    cache, backend = make_cache(CACHE_NATSKV_NEAR_CACHE=True)
    near = backend.kv.near
    assert near is not None

    @cache.memoize(timeout=60)
    def double(x: int) -> int:
        return 2 * x

    with cache.app.app_context():
        assert double(2) == 4  # computes, stores the version key and the value
        assert double(2) == 4  # enters both in the near cache
        misses = near.misses
        assert [double(2) for _ in range(5)] == [4] * 5
    assert near.misses == misses  # no round trip: the version key and the value are local


def test_delete_many_ignoring_errors(make_cache: Any) -> None:
    cache, backend = make_cache(CACHE_IGNORE_ERRORS=True)
    cache.set("a", 1)
    assert backend.ignore_delete_many_errors is True
    assert cache.delete_many("a", "b") == ["a", "b"]
    _cache2, backend2 = make_cache()
    assert backend2.ignore_delete_many_errors is False


# -- the near cache ---------------------------------------------------------------------------------------

_WRITER = """
import sys
from flask import Flask
from flask_caching import Cache

app = Flask("writer")
app.config.update(CACHE_TYPE="natskv.contrib.flask.NatsKVCache", CACHE_NATSKV_URL=sys.argv[1],
                  CACHE_NATSKV_BUCKET=sys.argv[2], CACHE_NATSKV_NEAR_CACHE=True)
cache = Cache(app)
if sys.argv[3] == "set":
    cache.set(sys.argv[4], sys.argv[5])
elif sys.argv[3] == "delete":
    cache.delete(sys.argv[4])
else:
    cache.clear()
print("done")
"""


def test_near_cache_serves_hits_locally_and_sees_other_processes(make_cache: Any, nats_url: str, name: str) -> None:
    cache, backend = make_cache(CACHE_NATSKV_NEAR_CACHE=True)
    near = backend.kv.near
    assert near is not None
    cache.set("k", "v1")
    cache.set("other", "o")
    hits = near.hits
    assert [cache.get("k") for _ in range(5)] == ["v1"] * 5
    assert near.hits == hits + 5  # answered from process memory
    assert cache.get_many("k", "other") == ["v1", "o"]
    assert near.hits == hits + 7

    run_python(_WRITER, nats_url, name, "set", "k", "v2")
    assert eventually(lambda: cache.get("k") == "v2", timeout=2)
    run_python(_WRITER, nats_url, name, "delete", "k")
    assert eventually(lambda: cache.get("k") is None, timeout=2)
    assert cache.get("other") == "o"
    cache.set("user:42.name", "ann")  # keys with natskv's separator and dots are watched too
    assert cache.get("user:42.name") == "ann"
    run_python(_WRITER, nats_url, name, "set", "user:42.name", "bob")
    assert eventually(lambda: cache.get("user:42.name") == "bob", timeout=2)
    run_python(_WRITER, nats_url, name, "clear")
    assert eventually(lambda: cache.get("other") is None, timeout=2)


# -- Flask-Session ----------------------------------------------------------------------------------------


def _session_app(nats_url: str, name: str, **config: Any) -> Flask:
    app = Flask("sessions")
    app.config.update(SECRET_KEY="test", SESSION_TYPE="natskv", NATSKV_URL=nats_url, SESSION_NATSKV_BUCKET=name)
    app.config.update(config)
    NatsKV(app)

    @app.get("/set/<key>/<value>")
    def set_value(key: str, value: str) -> str:
        session[key] = value
        return "ok"

    @app.get("/get/<key>")
    def get_value(key: str) -> str:
        return str(session.get(key))

    @app.get("/clear")
    def clear() -> str:
        session.clear()
        return "cleared"

    @app.get("/rotate")
    def rotate() -> str:
        app.session_interface.regenerate(session)
        return "rotated"

    return app


@pytest.fixture
def sessions_bucket(db: natskv.Client, name: str) -> Iterator[natskv.Bucket]:
    try:
        yield db.bucket(name, codec="bytes")
    finally:
        db.delete_bucket(name)


def _sid(client: Any) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return str(cookie.value)


def test_session_round_trip_modify_and_clear(nats_url: str, name: str, sessions_bucket: natskv.Bucket) -> None:
    app = _session_app(nats_url, name)
    assert isinstance(app.session_interface, NatsKVSessionInterface)
    client = app.test_client()
    assert client.get("/get/user").text == "None"
    assert client.get_cookie("session") is None  # an untouched session stores nothing
    assert client.get("/set/user/ann").text == "ok"
    sid = _sid(client)
    assert sessions_bucket.get("session:" + sid) is not None
    assert client.get("/get/user").text == "ann"
    client.get("/set/user/bob")
    client.get("/set/cart/3")
    assert client.get("/get/user").text == "bob" and client.get("/get/cart").text == "3"
    assert _sid(client) == sid
    assert client.get("/clear").text == "cleared"
    assert client.get("/get/user").text == "None"
    assert sessions_bucket.get("session:" + sid) is None  # deleted on the server
    assert client.get_cookie("session") is None


def test_session_id_rotation(nats_url: str, name: str, sessions_bucket: natskv.Bucket) -> None:
    app = _session_app(nats_url, name)
    client = app.test_client()
    client.get("/set/user/ann")
    old = _sid(client)
    assert client.get("/rotate").text == "rotated"
    new = _sid(client)
    assert new != old
    assert client.get("/get/user").text == "ann"
    assert sessions_bucket.get("session:" + old) is None
    assert sessions_bucket.get("session:" + new) is not None
    client.set_cookie("session", old)  # the old id opens nothing any more
    assert client.get("/get/user").text == "None"


def test_session_expires_by_ttl(nats_url: str, name: str, sessions_bucket: natskv.Bucket) -> None:
    app = _session_app(nats_url, name, PERMANENT_SESSION_LIFETIME=dt.timedelta(seconds=1))
    client = app.test_client()
    client.get("/set/user/ann")
    sid = _sid(client)
    assert client.get("/get/user").text == "ann"
    assert eventually(lambda: sessions_bucket.get("session:" + sid) is None, timeout=10)
    client.set_cookie("session", sid)  # a client that keeps the cookie past its expiry
    assert client.get("/get/user").text == "None"


def test_session_settings_and_bad_cookies(nats_url: str, name: str, sessions_bucket: natskv.Bucket) -> None:
    app = Flask("explicit")
    app.config["SECRET_KEY"] = "test"
    app.session_interface = NatsKVSessionInterface(app, url=nats_url, bucket=name, key_prefix="s/",
                                                   serialization_format="json", sid_length=16)

    @app.get("/set")
    def set_value() -> str:
        session["n"] = [1, 2]
        return "ok"

    @app.get("/get")
    def get_value() -> str:
        return json.dumps(session.get("n"))

    client = app.test_client()
    client.get("/set")
    sid = _sid(client)
    assert json.loads(sessions_bucket.get("s/" + sid)) == {"_permanent": True, "n": [1, 2]}
    assert client.get("/get").text == "[1, 2]"
    for bogus in ("", "x" * 3000, "a b*>", "..", "\u0000"):
        client.set_cookie("session", bogus)
        response = client.get("/get")
        assert response.status_code == 200 and response.text == "null", bogus


_SESSION_PEER = """
import sys
from flask import Flask, session
from natskv.contrib.cache import CacheCodec
from natskv.contrib.flask import NatsKV

app = Flask("peer")
app.config.update(SECRET_KEY="test", SESSION_TYPE="natskv", NATSKV_URL=sys.argv[1], SESSION_NATSKV_BUCKET=sys.argv[2])
NatsKV(app)

@app.get("/read")
def read():
    return str(session.get("user"))

@app.get("/write")
def write():
    session["user"] = "written-by-peer"
    return "ok"

client = app.test_client()
if sys.argv[3] == "read":
    client.set_cookie("session", sys.argv[4])
    print(client.get("/read").text)
else:
    client.get("/write")
    print(client.get_cookie("session").value)
"""


def test_session_written_in_one_process_is_read_in_another(nats_url: str, name: str,
                                                            sessions_bucket: natskv.Bucket) -> None:
    app = _session_app(nats_url, name)
    client = app.test_client()
    client.get("/set/user/ann")
    assert run_python(_SESSION_PEER, nats_url, name, "read", _sid(client)).strip() == "ann"
    sid = run_python(_SESSION_PEER, nats_url, name, "write").strip()
    client.set_cookie("session", sid)
    assert client.get("/get/user").text == "written-by-peer"


# -- gunicorn --preload with two workers -------------------------------------------------------------------

_GUNICORN_APP = """
import os
from flask import Flask
from flask_caching import Cache
from natskv.contrib.cache import CacheCodec
from natskv.contrib.flask import NatsKV

app = Flask(__name__)
app.config.update(CACHE_TYPE="natskv.contrib.flask.NatsKVCache", CACHE_NATSKV_URL=os.environ["T_URL"],
                  CACHE_NATSKV_BUCKET=os.environ["T_BUCKET"], CACHE_NATSKV_NEAR_CACHE=True,
                  CACHE_DEFAULT_TIMEOUT=0, NATSKV_URL=os.environ["T_URL"], NATSKV_BUCKET=os.environ["T_BUCKET"] + "_x")
ext = NatsKV(app)
cache = Cache(app)
with app.app_context():
    # The master (--preload) connects and starts a near-cache watch: the workers it forks must not
    # reuse that connection, but make their own.
    cache.set("booted", os.getpid())
    ext.bucket().set("master", os.getpid())

@app.get("/get/<key>")
def get(key):
    near = cache.cache.kv.near
    value = cache.get(key)
    return {"pid": os.getpid(), "value": value, "master": ext.bucket().get("master"), "hits": near.hits}

@app.get("/set/<key>/<value>")
def set(key, value):
    cache.set(key, value)
    return {"pid": os.getpid()}
"""


def _http_json(port: int, path: str) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback http
        data: dict[str, Any] = json.loads(response.read())
        return data


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="gunicorn needs fork()")
def test_gunicorn_preload_two_workers_stay_coherent(tmp_path: Path, nats_url: str, name: str,
                                                    db: natskv.Client) -> None:
    (tmp_path / "gapp.py").write_text(_GUNICORN_APP)
    port = free_port()
    env = {**os.environ, "T_URL": nats_url, "T_BUCKET": name}
    gunicorn = Path(sys.executable).with_name("gunicorn")
    log = (tmp_path / "gunicorn.log").open("w")
    proc = subprocess.Popen([str(gunicorn), "--preload", "-w", "2", "-b", f"127.0.0.1:{port}",
                             "--chdir", str(tmp_path), "gapp:app"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            try:
                _http_json(port, "/get/x")
                return True
            except OSError:
                return False

        assert eventually(up, timeout=30, interval=0.1), (tmp_path / "gunicorn.log").read_text()
        master = db.bucket(name + "_x").get("master")
        assert master == proc.pid

        def both_workers(expect: Any) -> set[int]:
            """Ask until both workers have answered ``expect`` (each has then cached it)."""
            seen: set[int] = set()
            pids: set[int] = set()

            def done() -> bool:
                answer = _http_json(port, "/get/k")
                pids.add(answer["pid"])
                assert answer["master"] == master
                if answer["value"] == expect:
                    seen.add(answer["pid"])
                return len(seen) == 2

            assert eventually(done, timeout=20, interval=0.0), (pids, seen)
            return seen

        _http_json(port, "/set/k/v1")
        workers = both_workers("v1")
        assert proc.pid not in workers
        hits = [_http_json(port, "/get/k")["hits"] for _ in range(6)]
        assert max(hits) > 0  # reads come from the workers' near caches
        _http_json(port, "/set/k/v2")  # one worker writes; the other's near cache must drop v1
        assert both_workers("v2") == workers
        db.bucket(name, codec=CacheCodec()).set("flask_cache_k", "v3")  # a write from outside the app
        assert both_workers("v3") == workers
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        db.delete_bucket(name)
        db.delete_bucket(name + "_x")
