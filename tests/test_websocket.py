"""natskv over a websocket (ws://) connection to a real nats-server's websocket listener.

nats-py's websocket transport has no stream writer of its own, so natskv's direct writes must
fall back to nats-py's flusher there (before that fix every request timed out).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import natskv
from natskv.server import EmbeddedServer, _free_ports


@pytest.fixture(scope="module")
def ws_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory: Path = tmp_path_factory.mktemp("ws-server")
    port = _free_ports("127.0.0.1", 1)[0]
    conf = directory / "ws.conf"
    conf.write_text(f"websocket {{ host: 127.0.0.1, port: {port}, no_tls: true }}\n")
    server = EmbeddedServer(data_dir=directory, extra_args=["-c", str(conf)])
    server.start()
    try:
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.stop()


def test_kv_calls_watches_and_commits_work_over_a_websocket(ws_url: str) -> None:
    with natskv.connect(ws_url, timeout=5) as db:
        kv = db.bucket("over_ws", history=2)
        revisions = kv.set_many({f"k{i}": i for i in range(50)})
        assert len(revisions) == 50 and kv.get("k49") == 49
        assert kv.update("k1", "one", revision=revisions["k1"]) > revisions["k49"]
        assert kv.get_many(["k1", "k2"]) == {"k1": "one", "k2": 2}
        assert len(kv.keys("k*")) == 50
        kv.commit([("set", "a", 1), ("create", "b", 2)])
        with kv.watch("a") as watcher:
            change = watcher.get(timeout=5)
            assert change is not None and (change.key, change.value) == ("a", 1)
            kv.set("a", 3)
            assert watcher.get(timeout=5).initial_done
            change = watcher.get(timeout=5)
            assert change is not None and change.value == 3
        db.delete_bucket("over_ws")
