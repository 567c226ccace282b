"""natskv.contrib.django in real Django, against the real server.

The cache tests check, on our backend, the behaviours Django's own cache test suite checks for
every backend (written here from Django's documented cache API). The near cache is checked for
coherence across processes, the session engines through Django's session API, and fork safety
under ``gunicorn --preload`` with two workers.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings

if not settings.configured:
    settings.configure(
        SECRET_KEY="natskv-tests-only",
        INSTALLED_APPS=["django.contrib.sessions"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
        USE_TZ=True,
    )
    django.setup()

from django.contrib.sessions.backends.base import UpdateError
from django.core.cache import CacheKeyWarning, InvalidCacheKey, caches
from django.core.management import call_command
from django.test import override_settings

import natskv
from natskv.contrib.cache import CLEAR_KEY
from natskv.contrib.django import NatsKVCache

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("no pickling")


def backend(nats_url: str, bucket: str, **options: Any) -> NatsKVCache:
    params: dict[str, Any] = {"OPTIONS": {"bucket": bucket, **options.pop("OPTIONS", {})}}
    params.update(options)
    return NatsKVCache(nats_url, params)


@pytest.fixture(params=[False, True], ids=["server", "near"])
def cache(request: pytest.FixtureRequest, nats_url: str, db: natskv.Client, name: str) -> Iterator[NatsKVCache]:
    """A backend on a bucket of this test's own, with and without the near cache."""
    yield backend(nats_url, name, OPTIONS={"near_cache": request.param})
    db.delete_bucket(name)


# -- Django's cache contract -------------------------------------------------------------------------


def test_simple_get_set_and_defaults(cache: NatsKVCache) -> None:
    cache.set("key", "value")
    assert cache.get("key") == "value"
    assert cache.get("missing") is None
    assert cache.get("missing", "default") == "default"
    cache.set("none", None)
    assert cache.get("none", "default") is None  # a stored None is a value
    assert cache.has_key("none") and "none" in cache


def test_values_of_any_picklable_type_round_trip(cache: NatsKVCache) -> None:
    values = {
        "str": "héllo ✓", "bytes": b"\x00\xffbinary", "int": 42, "big": 2**100, "negative": -7,
        "float": 1.5, "bool": True, "list": [1, "a", None], "tuple": (1, 2), "set": {1, 2},
        "dict": {"a": {"b": [1]}}, "datetime": datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc),
        "empty": "", "zero": 0,
    }
    for key, value in values.items():
        cache.set(key, value)
    for key, value in values.items():
        got = cache.get(key)
        assert got == value and type(got) is type(value), key
    assert cache.get_many(list(values)) == values
    with pytest.raises(natskv.SerializationError):
        cache.set("bad", Unpicklable())
    assert cache.get("bad") is None


def test_returned_values_are_copies(cache: NatsKVCache) -> None:
    cache.set("list", [1, 2])
    first = cache.get("list")
    first.append(3)
    assert cache.get("list") == [1, 2]


def test_add_only_stores_absent_keys(cache: NatsKVCache) -> None:
    assert cache.add("a", "first") is True
    assert cache.add("a", "second") is False
    assert cache.get("a") == "first"
    cache.delete("a")
    assert cache.add("a", "third") is True  # deleted counts as absent
    assert cache.add("z", "zero", timeout=0) is True  # would have been stored, but expires at once
    assert cache.get("z") is None


def test_delete_and_delete_many(cache: NatsKVCache) -> None:
    cache.set_many({"a": 1, "b": 2, "c": 3})
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    assert cache.get("a") is None
    cache.delete_many(["b", "c", "never-there"])
    assert cache.get_many(["a", "b", "c"]) == {}
    cache.delete_many([])


def test_get_many_and_set_many(cache: NatsKVCache) -> None:
    assert cache.set_many({"a": 1, "b": [2], "c": "3"}) == []
    assert cache.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": [2], "c": "3"}
    assert cache.get_many(iter(["a"])) == {"a": 1}
    assert cache.get_many([]) == {}
    cache.set_many({"x": 1, "y": 2}, timeout=1)
    assert wait_for(lambda: cache.get_many(["x", "y"]) == {}, 6)
    cache.set_many({"p": 1}, timeout=0)
    assert cache.get("p") is None


def test_incr_and_decr(cache: NatsKVCache) -> None:
    cache.set("n", 1)
    assert cache.incr("n") == 2
    assert cache.incr("n", 10) == 12
    assert cache.decr("n") == 11
    assert cache.decr("n", 20) == -9
    assert cache.get("n") == -9
    with pytest.raises(ValueError, match="not found"):
        cache.incr("missing")
    with pytest.raises(ValueError, match="not found"):
        cache.decr("missing")
    assert cache.get("missing") is None
    cache.set("s", "text")
    with pytest.raises(ValueError):
        cache.incr("s")
    assert cache.get("s") == "text"


def test_incr_keeps_the_expiry(cache: NatsKVCache) -> None:
    cache.set("n", 1, timeout=2)
    assert cache.incr("n") == 2
    assert wait_for(lambda: cache.get("n") is None, 6)


def test_timeouts(cache: NatsKVCache) -> None:
    cache.set("short", "v", timeout=1)
    cache.set("forever", "v", timeout=None)
    cache.set("zero", "v", timeout=0)
    cache.set("negative", "v", timeout=-1)
    cache.set("float", "v", timeout=0.5)
    cache.set("long", "v", timeout=60 * 60 * 24 * 365)
    assert cache.get("zero") is None and cache.get("negative") is None
    assert cache.get("short") == "v" and cache.get("float") == "v"
    assert wait_for(lambda: cache.get("short") is None and cache.get("float") is None, 6)
    assert cache.get("forever") == "v" and cache.get("long") == "v"
    cache.set("zero", "v")
    cache.set("zero", "w", timeout=0)  # replaces and removes
    assert cache.get("zero") is None


def test_default_timeout_from_settings(nats_url: str, db: natskv.Client, name: str) -> None:
    cache = backend(nats_url, name, TIMEOUT=1)
    try:
        cache.set("k", "v")
        assert cache.get("k") == "v"
        assert wait_for(lambda: cache.get("k") is None, 6)
        forever = backend(nats_url, name, TIMEOUT=None)
        forever.set("f", "v")
        time.sleep(1.5)
        assert forever.get("f") == "v"
    finally:
        db.delete_bucket(name)


def test_touch(cache: NatsKVCache) -> None:
    cache.set("k", "v", timeout=1)
    assert cache.touch("k", timeout=None) is True  # now never expires
    time.sleep(1.5)
    assert cache.get("k") == "v"
    assert cache.touch("k", timeout=1) is True
    assert wait_for(lambda: cache.get("k") is None, 6)
    assert cache.touch("missing") is False
    cache.set("z", "v")
    assert cache.touch("z", timeout=0) is True
    assert cache.get("z") is None


def test_get_or_set(cache: NatsKVCache) -> None:
    assert cache.get_or_set("k", "first") == "first"
    assert cache.get_or_set("k", "second") == "first"
    assert cache.get_or_set("c", lambda: "called") == "called"
    assert cache.get_or_set("n", None) is None


def test_clear_empties_the_bucket_and_keeps_it(cache: NatsKVCache) -> None:
    cache.set_many({"a": 1, "b": 2})
    assert cache.get("a") == 1
    cache.clear()
    assert cache.get_many(["a", "b"]) == {}
    assert cache.kv.bucket.keys() == [CLEAR_KEY]  # only the marker that tells near caches
    cache.set("a", 3)
    assert cache.get("a") == 3


def test_versions_and_key_prefix(nats_url: str, db: natskv.Client, name: str) -> None:
    v1 = backend(nats_url, name)
    v2 = backend(nats_url, name, VERSION=2)
    other = backend(nats_url, name, KEY_PREFIX="other")
    custom = backend(nats_url, name, KEY_FUNCTION=lambda key, prefix, version: f"custom-{key}")
    try:
        v1.set("k", "one")
        assert v2.get("k") is None and other.get("k") is None
        assert v1.get("k", version=1) == "one" and v2.get("k", version=1) == "one"
        v2.set("k", "two")
        assert v1.get("k") == "one" and v2.get("k") == "two"
        assert v1.incr_version("k") == 2
        assert v1.get("k") is None and v1.get("k", version=2) == "one"
        assert v1.decr_version("k", version=2) == 1
        assert v1.get("k") == "one"
        with pytest.raises(ValueError):
            v1.incr_version("missing")
        custom.set("k", "c")
        assert "custom-k" in v1.kv.bucket
        v1.set_many({"m": 1}, version=3)
        assert v1.get_many(["m"], version=3) == {"m": 1} and v1.get("m") is None
    finally:
        db.delete_bucket(name)


def test_keys_natskv_accepts_give_no_warnings_and_bad_keys_fail(cache: NatsKVCache) -> None:
    long_key = "x" * 1000  # memcached's limit is 250
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheKeyWarning)
        for key in ("with space", "tab\there", long_key, "ünïcode ✓", "a.b*c>d"):
            cache.set(key, key)
            assert cache.get(key) == key
            cache.validate_key(key)
    with pytest.raises(InvalidCacheKey, match="too long"):
        cache.set("y" * 5000, 1)
    with pytest.raises(InvalidCacheKey):
        cache.get("y" * 5000)
    with pytest.raises(InvalidCacheKey):
        cache.get_many(["ok", "y" * 5000])


def test_async_variants(cache: NatsKVCache) -> None:
    async def scenario() -> list[Any]:
        await cache.aset("a", 1)
        added = await cache.aadd("a", 2)
        got = await cache.aget("a")
        await cache.aset_many({"b": 2, "c": 3})
        many = await cache.aget_many(["a", "b", "c"])
        incremented = await cache.aincr("a", 5)
        touched = await cache.atouch("a", None)
        deleted = await cache.adelete("b")
        has = await cache.ahas_key("b")
        await cache.adelete_many(["c"])
        gone = await cache.aget("c", "gone")
        value = await cache.aget_or_set("d", "dv")
        await cache.aclear()
        cleared = await cache.aget("a")
        return [added, got, many, incremented, touched, deleted, has, gone, value, cleared]

    assert asyncio.run(scenario()) == [False, 1, {"a": 1, "b": 2, "c": 3}, 6, True, True, False, "gone", "dv", None]


def test_close_keeps_the_shared_connection(cache: NatsKVCache, nats_url: str) -> None:
    cache.set("k", 1)
    cache.close()
    assert cache.get("k") == 1
    again = backend(nats_url, cache.kv.bucket.name, OPTIONS={"near_cache": cache.kv.near is not None})
    assert again.kv is cache.kv  # one client, bucket and near cache per process and configuration


def test_options_reach_the_bucket_and_connect(nats_url: str, db: natskv.Client, name: str) -> None:
    cache = backend(nats_url, name, OPTIONS={"storage": "memory", "serializer": "json", "request_timeout": 7,
                                             "history": 3})
    try:
        cache.set("j", {"a": [1, 2]})
        assert db.bucket(name).get(":1:j") == {"a": [1, 2]}  # JSON: readable by any client
        assert db.bucket(name).status().storage == "memory"
        assert db.bucket(name).status().history == 3
        assert cache.kv.bucket._client.options.request_timeout == 7
    finally:
        db.delete_bucket(name)
    with pytest.raises(natskv.ConfigurationError):
        backend(nats_url, name + "x", OPTIONS={"no_such_option": 1}).get("k")
    with pytest.raises(natskv.InvalidArgumentError, match="serializer"):
        backend(nats_url, name + "y", OPTIONS={"serializer": "yaml"}).get("k")


def test_django_cache_handler_uses_the_backend(nats_url: str, db: natskv.Client, name: str) -> None:
    config = {"default": {"BACKEND": "natskv.contrib.django.NatsKVCache", "LOCATION": nats_url,
                          "OPTIONS": {"bucket": name, "near_cache": True}}}
    try:
        with override_settings(CACHES=config):
            from django.core.cache import cache

            cache.set("via-settings", 1)
            assert caches["default"].get("via-settings") == 1
            assert isinstance(caches["default"], NatsKVCache)
    finally:
        db.delete_bucket(name)


# -- the near cache ----------------------------------------------------------------------------------


def test_near_cache_serves_repeated_reads_from_memory(nats_url: str, db: natskv.Client, name: str) -> None:
    cache = backend(nats_url, name, OPTIONS={"near_cache": True})
    try:
        cache.set("k", {"v": 1})
        near = cache.kv.near
        assert near is not None
        sent = db.stats()["out_msgs"]
        before = cache.kv.bucket._client.stats()["out_msgs"]
        for _ in range(100):
            assert cache.get("k") == {"v": 1}
        assert cache.kv.bucket._client.stats()["out_msgs"] == before  # nothing sent for 100 reads
        assert near.hits >= 100
        assert db.stats()["out_msgs"] == sent
    finally:
        db.delete_bucket(name)


def test_near_cache_sees_writes_of_other_clients(nats_url: str, db: natskv.Client, name: str) -> None:
    cache = backend(nats_url, name, OPTIONS={"near_cache": True})
    try:
        cache.set("k", "old")
        assert cache.get("k") == "old"
        other = db.bucket(name, codec=cache.kv.codec)
        other.set(":1:k", "new")
        assert wait_for(lambda: cache.get("k") == "new", 5)
        other.delete(":1:k")
        assert wait_for(lambda: cache.get("k") is None, 5)
        cache.set("e", "short", timeout=1)
        assert cache.get("e") == "short"
        assert wait_for(lambda: cache.get("e") is None, 4)  # expiry honoured locally too
    finally:
        db.delete_bucket(name)


COHERENCE_WORKER = """
    import sys, time
    import django
    from django.conf import settings
    settings.configure(SECRET_KEY="x")
    django.setup()
    from natskv.contrib.django import NatsKVCache
    cache = NatsKVCache(sys.argv[1], {"OPTIONS": {"bucket": sys.argv[2], "near_cache": True}})
    assert cache.get("shared") == "v1"      # now in this process's near cache
    print("cached", flush=True)
    deadline = time.monotonic() + 10
    while cache.get("shared") != "v2" and time.monotonic() < deadline:
        time.sleep(0.005)
    print("saw", cache.get("shared"), flush=True)
    cache.set("shared", "v3")
    sys.stdin.readline()
"""


@pytest.mark.slow
def test_near_caches_of_two_processes_stay_coherent(nats_url: str, db: natskv.Client, name: str) -> None:
    cache = backend(nats_url, name, OPTIONS={"near_cache": True})
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(COHERENCE_WORKER), nats_url, name], cwd=REPO,
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        cache.set("shared", "v1")
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "cached\n"
        assert cache.get("shared") == "v1"
        cache.set("shared", "v2")
        assert proc.stdout.readline() == "saw v2\n"
        assert wait_for(lambda: cache.get("shared") == "v3", 5)  # and the other way
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
        db.delete_bucket(name)
    assert proc.returncode == 0, err


# -- sessions ----------------------------------------------------------------------------------------


@pytest.fixture
def sessions_bucket(nats_url: str, db: natskv.Client, name: str) -> Iterator[str]:
    with override_settings(NATSKV_SESSIONS={"LOCATION": nats_url, "BUCKET": name}):
        yield name
    db.delete_bucket(name)


def test_session_engine_stores_sessions_with_a_ttl(sessions_bucket: str, db: natskv.Client) -> None:
    from natskv.contrib.django.sessions import SessionStore

    session = SessionStore()
    session["user"] = 42
    session.save()
    key = session.session_key
    assert key is not None
    assert SessionStore(key)["user"] == 42
    assert SessionStore().exists(key)
    stored = db.bucket(sessions_bucket)
    assert stored.keys() == [key] and isinstance(stored.get(key), str)  # signed, serialized data
    loaded = SessionStore(key)
    loaded["user"] = 43
    loaded.save()
    assert SessionStore(key)["user"] == 43
    assert SessionStore("no-such-session").load() == {}
    loaded.delete()
    assert not SessionStore().exists(key)
    assert SessionStore(key).load() == {}
    SessionStore.clear_expired()


def test_session_expiry_and_update_of_a_deleted_session(sessions_bucket: str) -> None:
    from natskv.contrib.django.sessions import SessionStore

    session = SessionStore()
    session["a"] = 1
    session.set_expiry(1)
    session.save()
    key = session.session_key
    assert wait_for(lambda: not SessionStore().exists(key), 6)
    session = SessionStore()
    session["a"] = 1
    session.save()
    other = SessionStore(session.session_key)
    other.delete()
    session["a"] = 2
    with pytest.raises(UpdateError):
        session.save()
    tampered = SessionStore()
    tampered["a"] = 1
    tampered.save()
    db_bucket = tampered._kv.bucket
    db_bucket.set(tampered.session_key, "not-signed-data")
    assert SessionStore(tampered.session_key).load() == {}  # refused, not trusted


def test_session_cycle_key_and_flush(sessions_bucket: str) -> None:
    from natskv.contrib.django.sessions import SessionStore

    session = SessionStore()
    session["a"] = 1
    session.save()
    old = session.session_key
    session.cycle_key()
    assert session.session_key != old and not SessionStore().exists(old)
    assert SessionStore(session.session_key)["a"] == 1
    session.flush()
    assert session.session_key is None


@pytest.mark.parametrize("engine", ["django.contrib.sessions.backends.cache",
                                    "django.contrib.sessions.backends.cached_db"])
def test_djangos_cache_session_engines_work_on_the_backend(
    engine: str, nats_url: str, db: natskv.Client, name: str
) -> None:
    import importlib

    config = {"default": {"BACKEND": "natskv.contrib.django.NatsKVCache", "LOCATION": nats_url,
                          "OPTIONS": {"bucket": name}}}
    try:
        with override_settings(CACHES=config, SESSION_ENGINE=engine):
            if engine.endswith("cached_db"):
                call_command("migrate", "sessions", verbosity=0)
            store = importlib.import_module(engine).SessionStore
            session = store()
            session["cart"] = [1, 2]
            session.save()
            key = session.session_key
            assert store(key)["cart"] == [1, 2]
            assert any(key in k for k in db.bucket(name))
            session.delete()
            assert store(key).load() == {}
    finally:
        db.delete_bucket(name)


# -- gunicorn --preload ------------------------------------------------------------------------------

DJANGO_APP = '''
import os
import django
from django.conf import settings

settings.configure(
    SECRET_KEY="x", ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"],
    CACHES={"default": {"BACKEND": "natskv.contrib.django.NatsKVCache", "LOCATION": os.environ["NATS_URL"],
                        "OPTIONS": {"bucket": os.environ["CACHE_BUCKET"], "near_cache": True}}},
)
django.setup()

from django.core.cache import cache
from django.core.wsgi import get_wsgi_application
from django.http import HttpResponse
from django.urls import path

cache.set("preloaded", "by the master")  # the master connects before forking the workers


def read(request):
    return HttpResponse(f"{os.getpid()} {cache.get(request.GET['k'])} {cache.get('preloaded')}")


def write(request):
    cache.set(request.GET["k"], request.GET["v"])
    return HttpResponse(f"{os.getpid()} ok")


urlpatterns = [path("read", read), path("write", write)]
application = get_wsgi_application()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback URL of the test's own
        text: str = response.read().decode()
        return text


@pytest.mark.slow
def test_gunicorn_preload_workers_share_a_coherent_cache(
    nats_url: str, db: natskv.Client, name: str, tmp_path: Path
) -> None:
    (tmp_path / "djapp.py").write_text(DJANGO_APP)
    port = free_port()
    env = dict(ENV, NATS_URL=nats_url, CACHE_BUCKET=name, PYTHONPATH=f"{tmp_path}{os.pathsep}{ENV['PYTHONPATH']}")
    gunicorn = Path(sys.executable).with_name("gunicorn")
    proc = subprocess.Popen([str(gunicorn), "--preload", "-w", "2", "-b", f"127.0.0.1:{port}", "djapp:application"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _answers(base + "/read?k=x"), 20), "gunicorn did not start"
        fetch(base + "/write?k=color&v=red")

        def every_worker_reads(expected: str) -> set[str]:
            """Ask until both workers have answered (the kernel picks the worker of each
            connection, and may keep picking one for a while); every answer must be ``expected``."""
            pids: set[str] = set()
            deadline = time.monotonic() + 20
            while len(pids) < 2 and time.monotonic() < deadline:
                pid, value, preloaded = fetch(base + "/read?k=color").split(" ", 2)
                assert (value, preloaded) == (expected, "by the master")
                pids.add(pid)
            return pids

        assert len(every_worker_reads("red")) == 2, "one worker answered every request for 20 s"
        fetch(base + "/write?k=color&v=blue")
        time.sleep(0.2)  # the watch's delivery to the other worker: milliseconds
        # Both workers had "red" in their near caches: both now answer "blue", never "red".
        assert len(every_worker_reads("blue")) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        db.delete_bucket(name)


def _answers(url: str) -> bool:
    try:
        fetch(url)
        return True
    except OSError:
        return False


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())
