"""The model layer above the client: the registry behind db.register & co, the import graph,
timeout= on every model write, and the glob rules of db.on() patterns."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import eventually

import natskv
from natskv import Field, InvalidArgumentError, Model
from natskv.models.registry import ModelRegistry
from natskv.server import EmbeddedServer

# -- the registry ---------------------------------------------------------------------------------


def test_client_imports_no_model_module_and_models_import_no_client() -> None:
    code = (
        "import sys\n"
        "import natskv.client\n"
        "assert not [m for m in sys.modules if m.startswith('natskv.models')], 'client imported models'\n"
        "del sys.modules['natskv.client']\n"
        "for m in ('registry', 'model', 'store', 'planner', 'live', 'transaction', 'attributes'):\n"
        "    __import__('natskv.models.' + m)\n"
        "assert 'natskv.client' not in sys.modules, 'a model module imported natskv.client'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_each_client_has_its_own_registry(nats_url: str, name: str) -> None:
    with natskv.connect(nats_url) as a, natskv.connect(nats_url) as b:
        assert a._registry is None  # no model call yet: no registry, no event bus

        class Note(Model):
            __bucket__ = name
            id = Field(int, primary_key=True)
            text = Field(str, index=True)

        try:
            assert a.register(Note) is Note
            registry = a._models()
            assert isinstance(registry, ModelRegistry) and registry is a._models() and registry.client is a
            assert a.get_model("Note") is Note
            with pytest.raises(InvalidArgumentError, match="no model 'Note' is registered; registered: none"):
                b.get_model("Note")
            assert b._models() is not registry
            Dyn = b.define("Dyn", {"id": {"type": "INTEGER", "primaryKey": True}, "text": "STRING"},
                           indexes=["text"], bucket=name)
            assert b.get_model("Dyn") is Dyn and Dyn._fields["text"].index
            with pytest.raises(InvalidArgumentError, match="no model 'Dyn'"):
                a.get_model("Dyn")
            Note.create(id=1, text="x")
            assert eventually(lambda: Dyn.get(1) is not None) and Dyn.get(1).text == "x"
            with a.transaction() as tx:
                tx.save(Note(id=2, text="y"))
            assert a.run_transaction(lambda tx: tx.get(Note, 2).text) == "y"
            with pytest.raises(InvalidArgumentError, match="another client"), b.transaction() as tx:
                tx.get(Note, 1)
        finally:
            a.delete_bucket(name)
        # delete_bucket unregisters the bucket's models from that client's registry
        with pytest.raises(InvalidArgumentError, match="no model 'Note'"):
            a.get_model("Note")
        with pytest.raises(InvalidArgumentError, match="not registered"):
            Note.count()


# -- timeout= on model writes ------------------------------------------------------------------------


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (Linux: /proc; elsewhere a short wait)."""
    tasks = f"/proc/{pid}/task"
    if not os.path.isdir(tasks):
        time.sleep(0.2)
        return True
    states = []
    for task in os.listdir(tasks):
        try:
            with open(f"{tasks}/{task}/stat") as stat:
                states.append(stat.read().rpartition(")")[2].split()[0])
        except OSError:
            continue  # a thread that ended meanwhile
    return all(state in ("T", "t") for state in states)


@pytest.fixture
def paused(fresh_server: EmbeddedServer) -> Iterator[Callable[[bool], None]]:
    """pause(True) stops the test's own nats-server process (SIGSTOP): requests then get no reply
    until pause(False). The server is resumed before it is stopped."""
    pid = fresh_server.pid
    assert pid is not None
    state = {"stopped": False}

    def pause(stop: bool) -> None:
        os.kill(pid, signal.SIGSTOP if stop else signal.SIGCONT)
        state["stopped"] = stop
        if stop:
            # kill() returns before every thread of the server has stopped: one still running
            # could answer the next request (seen on a busy machine).
            assert eventually(lambda: _all_threads_stopped(pid)), "the server did not stop"

    try:
        yield pause
    finally:
        if state["stopped"]:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP (POSIX)")
@pytest.mark.slow
def test_every_model_write_honours_its_timeout(fresh_server: EmbeddedServer, paused: Callable[[bool], None]) -> None:
    # The client's default is long: a write that ignored its timeout= would take 30 s, not 0.3.
    with natskv.connect(fresh_server.url, timeout=30.0) as db:
        class Item(Model):
            __bucket__ = "write_timeouts"
            id = Field(int, primary_key=True, generated="autoincrement")
            tag = Field(str, unique=True)

        db.register(Item)
        kept = Item.create(tag="a")
        other = Item.create(tag="b")

        def save(t: float) -> None:
            kept.tag = "c"
            kept.save(timeout=t)

        def commit(t: float) -> None:
            with db.transaction() as tx:
                other.tag = "d"
                tx.save(other)
                tx.commit(timeout=t)

        writes: dict[str, Callable[[float], object]] = {
            "create": lambda t: Item.create(tag="e", timeout=t),
            "bulk_create": lambda t: Item.bulk_create([{"tag": "f"}], timeout=t),
            "get_or_create": lambda t: Item.get_or_create(tag="g", timeout=t),
            "save": save,
            "delete": lambda t: other.delete(timeout=t),
            "update": lambda t: Item.update({"tag": "h"}, where={"tag": "b"}, timeout=t),
            "destroy": lambda t: Item.destroy(tag="b", timeout=t),
            "commit": commit,
        }
        paused(True)
        for what, write in writes.items():
            started = time.monotonic()
            with pytest.raises(natskv.NatsKVTimeoutError):
                write(0.3)
            assert time.monotonic() - started < 5.0, f"{what} did not honour timeout=0.3"
        paused(False)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP (POSIX)")
def test_a_model_write_without_timeout_waits_the_clients_default(fresh_server: EmbeddedServer,
                                                                   paused: Callable[[bool], None]) -> None:
    with natskv.connect(fresh_server.url, timeout=0.5) as db:
        class Thing(Model):
            __bucket__ = "default_timeouts"
            id = Field(int, primary_key=True)

        db.register(Thing, timeout=30.0)
        Thing.create(id=1)
        paused(True)
        started = time.monotonic()
        with pytest.raises(natskv.NatsKVTimeoutError):
            Thing.create(id=2)
        assert 0.4 < time.monotonic() - started < 5.0
        paused(False)


def test_model_writes_refuse_a_bad_timeout_before_writing(db: natskv.Client, name: str) -> None:
    class Row(Model):
        __bucket__ = name
        id = Field(int, primary_key=True)

    db.register(Row)
    try:
        row = Row.create(id=1)
        before = db.bucket(name).status().last_revision
        for bad in (0, -1, "1", True):
            for write in (functools.partial(row.save, timeout=bad), functools.partial(row.delete, timeout=bad),
                          functools.partial(Row.update, {"id": 1}, timeout=bad),
                          functools.partial(Row.destroy, timeout=bad),
                          functools.partial(Row.bulk_create, [{"id": 2}], timeout=bad),
                          functools.partial(db.transaction, timeout=bad)):
                with pytest.raises(InvalidArgumentError, match="timeout"):
                    write()
            with db.transaction() as tx:
                tx.save(Row(id=3))
                with pytest.raises(InvalidArgumentError, match="timeout"):
                    tx.commit(timeout=bad)
                tx.rollback()
        assert db.bucket(name).status().last_revision == before
    finally:
        db.delete_bucket(name)


# -- db.on() patterns: the glob rules of keys ---------------------------------------------------------


def test_db_on_patterns_follow_the_key_glob(db: natskv.Client, name: str) -> None:
    bucket = "ev_" + name  # starts with "e": the patterns below rely on it

    class Ev(Model):
        __bucket__ = bucket
        id = Field(int, primary_key=True)
        n = Field(int)

    db.register(Ev)
    heard: dict[str, list[str]] = {}
    lock = threading.Lock()

    def listen(pattern: str) -> Callable[[], None]:
        heard[pattern] = []

        def callback(event: Any) -> None:
            with lock:
                heard[pattern].append(event.type)

        return db.on(pattern, callback)

    patterns = {
        "[^x]*.inserted": ["inserted"],  # ^ negates, as in kv.keys() (fnmatch read it as a literal ^)
        "[!e]*": [],                      # ! negates too
        f"e?{bucket[2:]}.[iu]*": ["inserted", "updated"],
        "*.ins\\erted": ["inserted"],     # a backslash escapes (fnmatch kept it as a literal \)
        "*": ["inserted", "updated", "deleted"],
        f"{bucket}.deleted": ["deleted"],
    }
    offs = [listen(p) for p in patterns]
    try:
        e = Ev.create(id=1, n=1)
        e.n = 2
        e.save()
        e.delete()
        assert eventually(lambda: len(heard["*"]) == 3)
        time.sleep(0.1)  # the dispatcher runs handlers in order: the others are in by now
        assert heard == patterns
    finally:
        for off in offs:
            off()
        db.delete_bucket(bucket)
    for bad in ("[abc", "abc\\", ""):
        with pytest.raises(InvalidArgumentError, match="pattern"):
            db.on(bad, lambda event: None)
