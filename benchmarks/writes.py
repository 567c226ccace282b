"""Model writes (issue 9, target 5): concurrent ``create`` and ``bulk_create``, with the raw floor.

    python benchmarks/writes.py            # full run, about 2 minutes
    python benchmarks/writes.py --quick    # fewer and shorter rounds, bulk of 10,000 only

Starts its own nats-server (or uses ``NATSKV_BENCH_URL``) and measures, in alternating rounds:

W1 ``Model.create`` of the 6-field benchmark model (one unique field: each create is an atomic
   batch of two messages, the unique marker and the record, both with a compare-and-set "must not
   exist" check) from 1, 4 and 16 threads on one client: creates/s, the ratio to one thread, and
   the process CPU time per create;
W2 the same batches (same subjects, headers and payload sizes) published with plain nats-py from
   1, 4 and 16 asyncio tasks on one connection: first message a plain publish, the commit a
   request. This is the protocol's own ceiling on this machine, with no natskv code in the way;
W3 ``bulk_create`` of 10,000 and (full run) 100,000 new records, one call: records/s, checked
   afterwards through the writing client's replica and a second client;
W4 the server's floor for W3: the same batches (500 records, each a unique marker and the record,
   "must not exist" checks), encoded before the clock starts and written to a plain socket, four
   in flight.

:func:`write_rows` returns ``compare.Row`` values, so ``compare.py`` can add them to its table.
It measures the natskv of this checkout when run as a script. It is a report, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

_AS_SCRIPT = __name__ == "__main__"
REPO = Path(__file__).resolve().parent.parent
if _AS_SCRIPT and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import _server  # noqa: E402

_server.ensure_natskv(prefer_checkout=_AS_SCRIPT)

import natskv  # noqa: E402
from benchmarks.bench_models import make_model  # noqa: E402
from benchmarks.compare import Row, load, model_row, print_table, progress, spread  # noqa: E402

THREADS = (1, 4, 16)
WANT_RATIO = 8.0  # 16 threads vs one (issue 9)
WANT_BULK = 20_000  # records/s


def _new_rows(ids: itertools.count[int], n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        row = model_row(next(ids))
        del row["_created_at"], row["_updated_at"]
        rows.append(row)
    return rows


def create_rate(model: type[Any], ids: itertools.count[int], threads: int, seconds: float) -> tuple[float, float]:
    """Creates per second from ``threads`` threads for about ``seconds``, and process CPU seconds
    per create. Each thread draws its rows up front (the measured loop only creates)."""
    per_thread = max(50, int(seconds * 4000 / threads))  # more than a thread can create in time
    batches = [_new_rows(ids, per_thread) for _ in range(threads)]
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def work(i: int) -> None:
        create = model.create
        rows = batches[i]
        clock = time.perf_counter
        start.wait()
        end = stop_at[0]
        n = 0
        for row in rows:
            create(row)
            n += 1
            if clock() >= end:
                break
        counts[i] = n

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    done = sum(counts)
    return done / elapsed, cpu / max(done, 1)


class RawBatches:
    """Atomic batches of the create's shape, published with plain nats-py on a private loop."""

    def __init__(self, url: str, stream: str, subject_prefix: str) -> None:
        import nats

        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url, name="natskv-writes-raw"))
        self.stream = stream
        self.prefix = subject_prefix

    def rate(self, ids: itertools.count[int], tasks: int, seconds: float) -> float:
        """Batches committed per second by ``tasks`` concurrent tasks for about ``seconds``."""
        import orjson

        nc = self.nc
        prefix = self.prefix

        async def one(end: float) -> int:
            n = 0
            while time.perf_counter() < end:
                i = next(ids)
                row = model_row(i)
                record_key = f"r.i.{i}"
                marker = prefix + f"u.email.{uuid.uuid4().hex}"  # same length class as an encoded email
                batch = uuid.uuid4().hex
                await nc.publish(marker, orjson.dumps(f"r:i:{i}"), headers={
                    "Nats-Expected-Last-Subject-Sequence": "0",
                    "Nats-Batch-Id": batch, "Nats-Batch-Sequence": "1",
                })
                reply = await nc.request(prefix + record_key, orjson.dumps(row), timeout=10.0, headers={
                    "Nats-Expected-Last-Subject-Sequence": "0",
                    "Nats-Batch-Id": batch, "Nats-Batch-Sequence": "2", "Nats-Batch-Commit": "1",
                })
                if b'"seq"' not in reply.data:
                    raise RuntimeError(f"raw batch failed: {reply.data!r} {reply.headers}")
                n += 1
            return n

        async def go() -> float:
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(one(t0 + seconds) for _ in range(tasks)))
            return sum(counts) / (time.perf_counter() - t0)

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.nc.close())
        finally:
            self.loop.close()


def measure_creates(url: str, client: natskv.Client, rounds: int, seconds: float) -> list[Row]:
    bucket = "wr_create"
    client.delete_bucket(bucket)
    model = client.register(make_model(bucket), timeout=60.0)
    kv = client.bucket(bucket)
    kv.commit([("set", "wr:probe", 1)])  # turns allow_atomic on for the raw side too
    raw = RawBatches(url, f"KV_{bucket}", f"$KV.{bucket}.")
    ids = itertools.count(1)
    raw_ids = itertools.count(10_000_000)
    rates: dict[int, list[float]] = {t: [] for t in THREADS}
    cpus: dict[int, list[float]] = {t: [] for t in THREADS}
    raw_rates: dict[int, list[float]] = {t: [] for t in THREADS}
    progress(f"W1/W2 create from {'/'.join(map(str, THREADS))} threads vs raw nats-py batches "
             f"({rounds} rounds x {seconds:.2f} s each)")
    try:
        create_rate(model, ids, 4, 0.3)  # warm-up
        raw.rate(raw_ids, 4, 0.3)
        for r in range(rounds):
            order = THREADS if r % 2 == 0 else tuple(reversed(THREADS))
            for t in order:
                gc.collect()
                rate, cpu = create_rate(model, ids, t, seconds)
                rates[t].append(rate)
                cpus[t].append(cpu)
                gc.collect()
                raw_rates[t].append(raw.rate(raw_ids, t, seconds))
        created = next(ids) - 1
        if model.count() > created or not model.exists(id=1):
            raise RuntimeError("the replica lost creates")
    finally:
        raw.close()
        client.delete_bucket(bucket)
    rows = []
    one, raw_one = statistics.median(rates[1]), statistics.median(raw_rates[1])
    for t in THREADS:
        m, rm = statistics.median(rates[t]), statistics.median(raw_rates[t])
        ratio = m / one
        per_round = [a / b for a, b in zip(rates[t], rates[1], strict=True)]
        target = f">= {WANT_RATIO:.1f}x" if t == 16 else "report"
        rows.append(Row(
            f"W1  Model.create (1 unique), {t:>2} thread{'s' if t > 1 else ' '} vs 1", f"{m:,.0f}/s", f"{one:,.0f}/s",
            ratio, target, ratio >= WANT_RATIO if t == 16 else None,
            f"{spread(per_round)}; CPU/create {statistics.median(cpus[t]) * 1e6:.0f} µs",
        ))
        rows.append(Row(
            f"W2  raw nats-py atomic batches, {t:>2} task{'s' if t > 1 else ' '} vs 1", f"{rm:,.0f}/s",
            f"{raw_one:,.0f}/s", rm / raw_one, "report", None, f"natskv/raw {m / rm:.2f}",
        ))
    return rows


def bulk_rate(url: str, n: int, round_no: int) -> tuple[float, float]:
    """Records/s and CPU seconds per record of one ``bulk_create`` of ``n`` records on a fresh
    model; checks that the writer's replica and a second client see all of them."""
    bucket = f"wr_bulk_{n}_{round_no}"
    client = natskv.connect(url, name="natskv-writes-bulk")
    try:
        client.delete_bucket(bucket)
        model = client.register(make_model(bucket), timeout=60.0)
        ids = itertools.count(1)
        rows = _new_rows(ids, n)
        gc.collect()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        created = model.bulk_create(rows, timeout=300.0)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        if len(created) != n or model.count() != n or model.get(n) is None:
            raise RuntimeError(f"bulk_create: the writer's replica holds {model.count()} records, not {n}")
        other = natskv.connect(url, name="natskv-writes-check")
        try:
            if other.register(make_model(bucket), timeout=120.0).count() != n:
                raise RuntimeError(f"bulk_create: a second client does not see {n} records")
        finally:
            other.close()
        client.delete_bucket(bucket)
    finally:
        client.close()
    return n / elapsed, cpu / n


def raw_bulk_rate(url: str, n: int, round_no: int, inflight: int = 4) -> float:
    """Records/s of the server alone taking ``n`` records in bulk_create's batches (500 records,
    each a unique marker and the record, both "must not exist"), pre-encoded and written to a
    plain socket, ``inflight`` batches out at once: the floor under any client."""
    import socket
    from urllib.parse import urlparse

    import orjson

    bucket = f"wr_rawbulk_{n}_{round_no}"
    client = natskv.connect(url, name="natskv-writes-rawbulk")
    try:
        client.delete_bucket(bucket)
        client.bucket(bucket).commit([("set", "probe", 1)])  # allow_atomic
        prefix = f"$KV.{bucket}."

        def message(subject: str, reply: str, batch: str, seq: int, commit: bool, payload: bytes) -> bytes:
            head = (f"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: 0\r\nNats-Batch-Id: {batch}\r\n"
                    f"Nats-Batch-Sequence: {seq}\r\n" + ("Nats-Batch-Commit: 1\r\n" if commit else "") + "\r\n")
            hb = head.encode()
            return f"HPUB {subject} {reply} {len(hb)} {len(hb) + len(payload)}\r\n".encode() + hb + payload + b"\r\n"

        batches = []
        for start in range(1, n + 1, 500):
            batch, parts, seq = uuid.uuid4().hex, [], 0
            ids = range(start, min(start + 500, n + 1))
            for i in ids:
                row = model_row(i)
                seq += 1
                parts.append(message(f"{prefix}u.email.{uuid.uuid4().hex}", "", batch, seq, False,
                                     orjson.dumps(f"r:i:{i}")))
                seq += 1
                last = i == ids[-1]
                parts.append(message(f"{prefix}r.i.{i}", f"_INBOX.wr.{start}" if last else "", batch, seq, last,
                                     orjson.dumps(row)))
            batches.append(b"".join(parts))
        where = urlparse(url)
        sock = socket.create_connection((where.hostname, where.port))
        reader = sock.makefile("rb")
        try:
            reader.readline()  # INFO
            sock.sendall(b'CONNECT {"headers":true,"verbose":false,"no_responders":true}\r\n'
                         b"SUB _INBOX.wr.* 1\r\nPING\r\n")
            while not reader.readline().startswith(b"PONG"):
                pass
            t0 = time.perf_counter()
            sent = acked = 0
            while acked < len(batches):
                while sent < len(batches) and sent - acked < inflight:
                    sock.sendall(batches[sent])
                    sent += 1
                line = reader.readline()
                if line.startswith((b"MSG", b"HMSG")):
                    body = reader.read(int(line.split()[-1]) + 2)
                    if b'"seq"' not in body:
                        raise RuntimeError(f"raw bulk batch failed: {body!r}")
                    acked += 1
                elif line.startswith(b"PING"):
                    sock.sendall(b"PONG\r\n")
            elapsed = time.perf_counter() - t0
        finally:
            reader.close()
            sock.close()
        client.delete_bucket(bucket)
    finally:
        client.close()
    return n / elapsed


def measure_bulk(url: str, sizes: tuple[int, ...], rounds: int) -> list[Row]:
    rows = []
    for n in sizes:
        progress(f"W3/W4 bulk_create of {n:,} records vs the raw floor ({rounds} rounds)")
        results = []
        raw = []
        for r in range(rounds):
            if r % 2 == 0:
                results.append(bulk_rate(url, n, r))
                raw.append(raw_bulk_rate(url, n, r))
            else:
                raw.append(raw_bulk_rate(url, n, r))
                results.append(bulk_rate(url, n, r))
        rate = statistics.median(r for r, _ in results)
        cpu = statistics.median(c for _, c in results)
        floor = statistics.median(raw)
        rows.append(Row(
            f"W3  bulk_create of {n:,} records, one call", f"{rate:,.0f}/s", f"{floor:,.0f}/s", rate / floor,
            f">= {WANT_BULK:,}/s", rate >= WANT_BULK,
            f"per round {min(r for r, _ in results):,.0f}-{max(r for r, _ in results):,.0f}/s; "
            f"CPU/record {cpu * 1e6:.0f} µs; baseline W4",
        ))
        rows.append(Row(
            f"W4  raw socket, the same {n:,} records' batches", f"{floor:,.0f}/s", "", None, "report", None,
            f"pre-encoded, 4 batches in flight: the server's floor; per round {min(raw):,.0f}-{max(raw):,.0f}/s",
        ))
    return rows


def write_rows(url: str, quick: bool) -> list[Row]:
    """Every row of this benchmark, measured on the server at ``url``."""
    client = natskv.connect(url, name="natskv-writes")
    try:
        rows = measure_creates(url, client, 3 if quick else 5, 0.6 if quick else 1.5)
    finally:
        client.close()
    rows += measure_bulk(url, (10_000,) if quick else (10_000, 100_000), 2 if quick else 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds; bulk of 10,000 only")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    print(f"natskv {natskv.__version__}  __impl__={natskv.__impl__}  ({Path(natskv.__file__).parent})  {load()}")
    with _server.running_server() as url:
        rows = write_rows(url, args.quick)
    print_table(rows)
    print(f"\nW1 ratio: threads / 1 thread; W2 ratio: tasks / 1 task; W3 ratio: bulk_create / raw socket (W4). "
          f"Medians of alternating rounds; "
          f"total {time.perf_counter() - began:.0f} s; at the end: {load()}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
