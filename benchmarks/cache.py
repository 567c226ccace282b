"""The Django cache backend (issue 10): get hit, get miss and set, with and without the near cache,
next to django-redis on a local redis-server when one is installed.

    python benchmarks/cache.py            # about a minute
    python benchmarks/cache.py --quick    # fewer rounds

Starts its own nats-server (or uses ``NATSKV_BENCH_URL``) and, when ``redis-server`` and
django-redis are installed, its own redis-server (AOF everysec, as compare.py's redis section).
Every variant goes through Django's cache API (``cache.get`` / ``cache.set`` on a backend object,
``KEY_PREFIX`` and version included), one thread, the same pickled 127-byte value. Variants run
in alternating rounds and the table shows medians of the per-call times:

C1 get of a key present: natskv with the near cache (target: p50 <= 10 µs), natskv without it,
   django-redis;
C2 get of an absent key: the same three (the near cache does not cache absence: a round trip);
C3 set: the same three.

:func:`cache_rows` returns ``compare.Row`` values, so ``compare.py --only cache`` prints them in its
table. It is a report, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_AS_SCRIPT = __name__ == "__main__"
REPO = Path(__file__).resolve().parent.parent
if _AS_SCRIPT and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import _server  # noqa: E402

_server.ensure_natskv(prefer_checkout=_AS_SCRIPT)

from benchmarks.compare import (  # noqa: E402
    RedisServer,
    Row,
    json_value,
    load,
    print_table,
    progress,
    redis_missing,
)

HIT_TARGET = 10e-6  # seconds: the near cache's get hit p50 (issue 10)


def _django() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(SECRET_KEY="natskv-benchmark")  # noqa: S106 - signs nothing here
        django.setup()


def _timed(op: Callable[[str], Any], keys: list[str], calls: int) -> list[float]:
    samples = []
    clock = time.perf_counter
    for i in range(calls):
        key = keys[i % len(keys)]
        t0 = clock()
        op(key)
        samples.append(clock() - t0)
    return samples


def _variants(url: str, bucket: str, redis_port: int | None) -> dict[str, Any]:
    """name -> a Django cache backend object."""
    _django()
    from natskv.contrib.django import NatsKVCache

    out: dict[str, Any] = {
        "natskv + near cache": NatsKVCache(url, {"OPTIONS": {"bucket": bucket, "near_cache": True}}),
        "natskv": NatsKVCache(url, {"OPTIONS": {"bucket": bucket + "_plain"}}),
    }
    if redis_port is not None:
        from django_redis.cache import RedisCache

        out["django-redis"] = RedisCache(f"redis://127.0.0.1:{redis_port}/0", {})
    return out


def _measure(backends: dict[str, Any], rounds: int, calls: int) -> dict[tuple[str, str], list[float]]:
    value = json_value()
    hits = [f"hit:{i}" for i in range(50)]
    misses = [f"miss:{i}" for i in range(50)]
    for cache in backends.values():
        for key in hits:
            cache.set(key, value, None)
        for key in hits:  # the near cache's entries, like a warm process's
            cache.get(key)
    results: dict[tuple[str, str], list[float]] = {}
    order = list(backends.items())
    for rnd in range(rounds):
        for name, cache in order if rnd % 2 == 0 else list(reversed(order)):
            results.setdefault((name, "get hit"), []).extend(_timed(cache.get, hits, calls))
            results.setdefault((name, "get miss"), []).extend(_timed(cache.get, misses, calls))
            results.setdefault((name, "set"), []).extend(
                _timed(lambda k, c=cache: c.set(k, value, 300), hits, calls)
            )
            for key in hits:
                cache.get(key)
    return results


def cache_rows(url: str, quick: bool) -> list[Row]:
    """C rows: Django cache get hit / miss / set p50 through natskv (with and without the near
    cache) and django-redis."""
    import uuid

    rounds, calls = (6, 300) if quick else (12, 600)
    try:
        import django  # noqa: F401
    except ImportError:
        progress("C django cache: skipped, Django is not installed (pip install -e '.[django]')")
        return []
    missing = redis_missing()
    try:
        import django_redis  # noqa: F401
    except ImportError:
        missing = missing or "django-redis is not installed (pip install -e '.[bench]')"
    bucket = "bench_cache_" + uuid.uuid4().hex[:8]
    progress(f"C django cache: {rounds} alternating rounds of {calls} calls per variant"
             + ("" if missing is None else f" (no django-redis: {missing})"))
    rows: list[Row] = []

    def run(redis_port: int | None) -> None:
        import natskv

        backends = _variants(url, bucket, redis_port)
        try:
            results = _measure(backends, rounds, calls)
        finally:
            client = natskv.connect(url)
            for name in (bucket, bucket + "_plain"):
                client.delete_bucket(name)
            client.close()
        base = {op: statistics.median(results[("django-redis", op)]) for op in ("get hit", "get miss", "set")} \
            if redis_port is not None else {}
        for label, op in (("C1", "get hit"), ("C2", "get miss"), ("C3", "set")):
            for name in backends:
                p50 = statistics.median(results[(name, op)])
                ratio = p50 / base[op] if base else None
                is_target = label == "C1" and name == "natskv + near cache"
                rows.append(Row(
                    f"{label} Django cache {op} p50, {name}", f"{p50 * 1e6:.1f} µs",
                    f"{base[op] * 1e6:.1f} µs django-redis" if base else "",
                    ratio, "<= 10 µs" if is_target else "",
                    (p50 <= HIT_TARGET) if is_target else None,
                ))

    if missing is None:
        with RedisServer() as redis_server:
            run(redis_server.port)
    else:
        run(None)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)
    with _server.running_server() as url:
        rows = cache_rows(url, args.quick)
    print_table(rows)
    print(f"ratio: natskv p50 / django-redis p50 (below 1: natskv is faster). {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
