"""Where a call's time goes: client CPU and server CPU per operation, natskv next to redis-py.

``compare.py`` measures wall time; on a 2-core machine that cannot tell the client's share from
the server's. This script counts CPU seconds instead: the benchmark process's own
(``time.process_time``, every thread of it) and the server process's (``/proc/<pid>/stat``,
user + system), over many calls, divided by the number of calls. A server's CPU per operation is
the floor no client can go below; when it alone exceeds the other side's whole wall time, the
gap is the server's, not natskv's.

Rows (each a median of ``--rounds`` rounds, the two sides alternating):

- ``get``: one key, 127-byte JSON value (natskv ``Bucket.get`` vs redis-py ``GET`` + ``orjson.loads``);
- ``get_many``: 1,000 keys in one call (``Bucket.get_many`` vs ``MGET``);
- ``set``: one key (``Bucket.set`` vs ``SET``; redis with AOF ``everysec``).

Run: ``python -m benchmarks.floors`` (``--quick`` for fewer calls). Linux only (``/proc``); the
redis side is skipped with a notice when redis-server or redis-py is missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

import natskv
from benchmarks.compare import RedisServer, json_value, redis_client, redis_missing
from natskv.server import EmbeddedServer

BATCH = 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(call: Callable[[], Any], calls: int, server_pid: int) -> tuple[float, float, float]:
    """(wall, client CPU, server CPU) per call, in microseconds, over ``calls`` calls."""
    server0, client0, wall0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    for _ in range(calls):
        call()
    wall = time.perf_counter() - wall0
    client = time.process_time() - client0
    server = cpu_seconds(server_pid) - server0
    return wall / calls * 1e6, client / calls * 1e6, server / calls * 1e6


def natskv_calls(kv: natskv.Bucket, doc: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    keys = [f"fl:{i}" for i in range(BATCH)]
    kv.set_many(dict.fromkeys(keys, doc))
    return {
        "get": lambda: kv.get("fl:7"),
        "get_many": lambda: kv.get_many(keys),
        "set": lambda: kv.set("fl:w", doc),
    }


def redis_calls(r: Any, doc: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    payload = orjson.dumps(doc)
    keys = [f"fl:{i}" for i in range(BATCH)]
    r.mset(dict.fromkeys(keys, payload))
    loads = orjson.loads
    return {
        "get": lambda: loads(r.get("fl:7")),
        "get_many": lambda: [loads(v) for v in r.mget(keys) if v is not None],
        "set": lambda: r.set("fl:w", payload),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    calls = {"get": 500, "get_many": 20, "set": 300} if args.quick else {"get": 3000, "get_many": 100, "set": 2000}
    doc = json_value()
    sides: dict[str, tuple[dict[str, Callable[[], Any]], int]] = {}
    with EmbeddedServer() as server:
        client = natskv.connect(server.url)
        try:
            kv = client.bucket("floors")
            assert server.pid is not None
            sides["natskv"] = (natskv_calls(kv, doc), server.pid)
            missing = redis_missing()
            redis_ctx = RedisServer() if missing is None else None
            if redis_ctx is not None:
                redis_ctx.__enter__()
                r = redis_client(redis_ctx.port)
                assert redis_ctx.proc is not None
                sides["redis-py"] = (redis_calls(r, doc), redis_ctx.proc.pid)
            else:
                print(f"redis side skipped: {missing}", file=sys.stderr)
            try:
                print(f"{'op':<9} {'side':<8} {'wall µs':>9} {'client CPU µs':>14} {'server CPU µs':>14}")
                for op, n in calls.items():
                    results: dict[str, list[tuple[float, float, float]]] = {side: [] for side in sides}
                    for fns, _ in sides.values():
                        fns[op]()  # warm
                    for round_no in range(args.rounds):
                        order = list(sides) if round_no % 2 == 0 else list(reversed(sides))
                        for name in order:
                            fns, pid = sides[name]
                            results[name].append(measure(fns[op], n, pid))
                    for name, rows in results.items():
                        wall, cpu, srv = (statistics.median(col) for col in zip(*rows, strict=True))
                        print(f"{op:<9} {name:<8} {wall:>9,.1f} {cpu:>14,.1f} {srv:>14,.1f}")
            finally:
                if redis_ctx is not None:
                    redis_ctx.__exit__(None, None, None)
            client.delete_bucket("floors")
        finally:
            client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
