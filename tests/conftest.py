"""Fixtures shared by every test: real nats-servers, never mocks.

A missing nats-server binary fails the fixtures (and so the tests) with a ServerError saying how to
install it: the suite never skips for lack of a server.
"""

from __future__ import annotations

import importlib
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import settings

import natskv
from natskv.server import EmbeddedServer, find_server_binary, server_version

# Property tests check behaviour, not speed: hypothesis's 200 ms deadline per example fails them
# on a loaded machine (CI's 2 cores) for no fault of the code. Speed lives in benchmarks/.
settings.register_profile("natskv", deadline=None)
settings.load_profile("natskv")

# Environment that would point a client at some other server or credentials.
_CLIENT_ENV = ("NATS_URL", "NATS_CREDS", "NATS_NKEY", "NATS_CA", "NATS_CERT", "NATS_KEY")


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        binary = find_server_binary()
        server = f"{'.'.join(map(str, server_version(binary)))} ({binary})"
    except Exception as exc:  # the header must never break the run; the fixtures will fail
        server = f"unavailable: {exc}"
    try:
        import natskv._speedups as speedups

        impl = str(speedups.__impl__)
    except Exception as exc:
        impl = f"unavailable: {type(exc).__name__}: {exc}"
    return [f"nats-server: {server}", f"natskv._speedups.__impl__: {impl}"]


@pytest.fixture(scope="session", autouse=True)
def natskv_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Isolate the session from the developer's machine.

    ``NATSKV_DATA_DIR`` points at a temporary directory, so ``natskv.connect()`` with no URL starts
    its shared server there and not in the user's data dir, and ``NATS_URL`` & co. are removed.
    The shared server of that directory, if a test started one, is stopped at the end.
    """
    directory = tmp_path_factory.mktemp("natskv-data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NATSKV_DATA_DIR", str(directory))
        for name in _CLIENT_ENV:
            patch.delenv(name, raising=False)
        try:
            yield directory
        finally:
            EmbeddedServer.stop_shared(directory)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One nats-server (JetStream, loopback, free port) for the whole session. Do not stop it."""
    server = EmbeddedServer(data_dir=tmp_path_factory.mktemp("nats-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedServer) -> str:
    """The session server's URL, ``nats://127.0.0.1:<port>``."""
    return nats_server.url


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own, free to stop and restart (file storage in ``tmp_path``)."""
    server = EmbeddedServer(data_dir=tmp_path / "nats-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


_bucket_seq = itertools.count()


@pytest.fixture(scope="module")
def db(nats_url: str) -> Iterator[natskv.Client]:
    """One client per test module, connected to the session's server."""
    client = natskv.connect(nats_url, timeout=10.0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A bucket name unique to this test (valid: letters, digits, '_' and '-')."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:48] + f"_{next(_bucket_seq)}"



IMPLS = {"c": "natskv._core", "python": "natskv._core_py"}


@pytest.fixture(scope="session", params=sorted(IMPLS))
def core(request: pytest.FixtureRequest) -> ModuleType:
    """Each core in turn. The compiled one is imported directly: missing, it errors, never skips."""
    return importlib.import_module(IMPLS[request.param])


@pytest.fixture(scope="session")
def c_core() -> ModuleType:
    return importlib.import_module("natskv._core")


@pytest.fixture(scope="session")
def py_core() -> ModuleType:
    return importlib.import_module("natskv._core_py")


@pytest.fixture
def kv(db: natskv.Client, name: str, request: pytest.FixtureRequest) -> Iterator[natskv.Bucket]:
    """A bucket unique to this test, deleted afterwards: history 10, or the options of a
    ``@pytest.mark.bucket(...)`` mark on the test or its module."""
    mark = request.node.get_closest_marker("bucket")
    bucket = db.bucket(name, **(mark.kwargs if mark is not None else {"history": 10}))
    try:
        yield bucket
    finally:
        db.delete_bucket(name)
