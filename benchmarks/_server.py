"""A nats-server for a benchmark run, and the natskv client that talks to it.

asv runs every benchmark in a forked child that leaves with ``os._exit`` (no atexit handlers), so
a benchmark starts its server in ``setup`` and stops it in ``teardown`` through :class:`KVBench`;
``compare.py`` uses :func:`running_server` as a context manager. Either way the server is a fresh
``natskv.EmbeddedServer`` on loopback with a temporary store, deleted when it stops.

``NATSKV_BENCH_URL`` points the benchmarks at an existing server instead (nothing is started or
stopped then; buckets named ``bench_*`` / ``cmp_*`` are created and deleted on it).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import natskv

REPO = Path(__file__).resolve().parent.parent
VALUE = b"v" * 100  # the 100-byte value every KV benchmark stores


def ensure_natskv(prefer_checkout: bool = False) -> None:
    """Make ``import natskv`` work.

    asv's virtualenv environments have natskv installed. ``asv run --python=same`` does not install
    anything, so fall back to this checkout (build it in place first:
    ``python setup.py build_ext --inplace``). With ``prefer_checkout`` the checkout always wins
    (``compare.py`` measures the tree it lives in).
    """
    if prefer_checkout:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        return
    try:
        import natskv  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def running_server() -> Iterator[str]:
    """Yield the URL of a server that runs for the duration of the ``with`` block."""
    url = os.environ.get("NATSKV_BENCH_URL")
    if url:
        yield url
        return
    from natskv import EmbeddedServer

    with EmbeddedServer() as server:
        yield server.url


def start_server() -> tuple[str, Any]:
    """Start a server; return its URL and the handle to pass to :func:`stop_server`."""
    url = os.environ.get("NATSKV_BENCH_URL")
    if url:
        return url, None
    from natskv import EmbeddedServer

    server = EmbeddedServer().start()
    return server.url, server


def stop_server(server: Any) -> None:
    if server is not None:
        server.stop()


def populate(kv: natskv.Bucket, keys: list[str], value: bytes = VALUE, chunk: int = 1000) -> None:
    """Store ``value`` under every key, ``chunk`` keys per pipelined ``set_many``."""
    for i in range(0, len(keys), chunk):
        kv.set_many(dict.fromkeys(keys[i : i + chunk], value))


class KVBench:
    """A server, a natskv client and one bucket (``codec="bytes"``), for one benchmark process."""

    def __init__(self, bucket: str) -> None:
        import natskv

        self.server: Any = None
        self.client: natskv.Client | None = None
        self.bucket_name = bucket
        try:
            url, self.server = start_server()
            self.client = natskv.connect(url, name="natskv-bench")
            self.client.delete_bucket(bucket)  # a clean bucket even on a reused server
            self.kv = self.client.bucket(bucket, codec="bytes")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete the bucket, close the client, stop the server. Safe to call twice."""
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):  # clean-up must not mask the benchmark's error
                client.delete_bucket(self.bucket_name)
            client.close()
        server, self.server = self.server, None
        stop_server(server)
