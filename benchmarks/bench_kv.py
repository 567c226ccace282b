"""asv: blocking KV calls against a real nats-server (started per benchmark process).

Values are 100 bytes on a ``codec="bytes"`` bucket, so the numbers are the driver's cost and not
JSON's. Every class starts its own server in ``setup`` and stops it in ``teardown``.
"""

from __future__ import annotations

from typing import ClassVar

from . import _server

_server.ensure_natskv()

SINGLE_KEYS = [f"user:{i}" for i in range(100)]


class _KV:
    timeout = 120.0
    bucket = "bench_kv"

    def setup(self, *params: object) -> None:
        self.bench = _server.KVBench(self.bucket)
        self.kv = self.bench.kv
        try:
            self.prepare(*params)
        except BaseException:
            self.bench.close()
            raise

    def prepare(self, *params: object) -> None:
        pass

    def teardown(self, *params: object) -> None:
        # asv calls teardown even after a setup that raised (the server did not start, say).
        bench = getattr(self, "bench", None)
        if bench is not None:
            bench.close()


class Single(_KV):
    """One ``get`` / ``set`` round trip (direct get; publish + PubAck)."""

    def prepare(self) -> None:
        _server.populate(self.kv, SINGLE_KEYS)
        self.i = 0

    def time_get(self) -> None:
        self.i = (self.i + 1) % 100
        self.kv.get(SINGLE_KEYS[self.i])

    def time_get_missing(self) -> None:
        self.kv.get("absent:key")

    def time_set(self) -> None:
        self.i = (self.i + 1) % 100
        self.kv.set(SINGLE_KEYS[self.i], _server.VALUE)


class GetMany(_KV):
    """``get_many`` of n existing keys (batch direct get)."""

    params: ClassVar[list[int]] = [100, 1000]
    param_names: ClassVar[list[str]] = ["n"]

    def prepare(self, n: int) -> None:
        self.keys = [f"item:{i}" for i in range(n)]
        _server.populate(self.kv, self.keys)

    def time_get_many(self, n: int) -> None:
        self.kv.get_many(self.keys)


class SetMany(_KV):
    """``set_many`` of n keys (pipelined publishes, all acks awaited)."""

    params: ClassVar[list[int]] = [100, 1000]
    param_names: ClassVar[list[str]] = ["n"]

    def prepare(self, n: int) -> None:
        self.mapping = {f"item:{i}": _server.VALUE for i in range(n)}

    def time_set_many(self, n: int) -> None:
        self.kv.set_many(self.mapping)


class Keys(_KV):
    """``keys(pattern)`` on a bucket of 10,000 keys: 5,000 ``user:``, 4,900 ``order:``, 100 ``session:``.

    ``session:*`` shows the server-side filter (100 of 10,000 read); ``user:1*`` reads the 5,000
    ``user:`` keys and matches 1,111 on the client; ``*`` reads everything.
    """

    params: ClassVar[list[str]] = ["session:*", "user:1*", "*"]
    param_names: ClassVar[list[str]] = ["pattern"]

    def prepare(self, pattern: str) -> None:
        keys = [f"user:{i}" for i in range(5000)]
        keys += [f"order:{i}" for i in range(4900)]
        keys += [f"session:{i}" for i in range(100)]
        _server.populate(self.kv, keys)

    def time_keys(self, pattern: str) -> None:
        self.kv.keys(pattern)
