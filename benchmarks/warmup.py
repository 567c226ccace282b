"""Replica warm-up: a second client loading a 100,000-record model replica, stage by stage.

    python benchmarks/warmup.py                          # this checkout, 5 rounds
    python benchmarks/warmup.py --rounds 7 --against /path/to/other/checkout:/path/to/its/venv/bin/python

What ``compare.py``'s M4 row measures (``register()`` of the 6-field benchmark model on a fresh
client against a bucket of 100,000 records and their 100,000 unique-email markers), with where the
time goes. Each round runs in a subprocess of its own (a fresh interpreter, as a new process would
load its replica), and with ``--against`` the rounds alternate between the two checkouts, so that
the neighbours' noise on a shared machine hits both alike. Per round, in µs per record:

* ``parse``: ``_core.parse_frames``, the protocol frames split out of what the socket read;
* ``take``: ``_core.take_deliveries``, the consumer's ack subjects checked and entries made;
* ``apply``: ``ModelStore.apply_entries``, keys and JSON values read into records;
* ``rebuild``: ``ModelStore.loaded``, the indexes built in bulk once the records are in;
* ``other``: the rest of the loop thread's CPU (socket reads, the frame reader's and the feed's
  Python, the replica's batching, the collector);
* ``loop``: the loop thread's CPU time during ``register()`` (steadier than wall time);
* ``wall``: ``register()``'s wall time; records/s is computed from it;
* ``server``: the nats-server's CPU time (user + system) during ``register()`` (an embedded server
  only): on a 2-core machine the server and the client share the cores, so wall time cannot go
  below about half the sum of the two CPU times.

The stages are timed by wrapping those functions (a few hundred calls per load: the wrapping costs
nothing measurable). Starts its own nats-server (or uses ``NATSKV_BENCH_URL``; then no server CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

BUCKET = "bench_warmup"
N = 100_000
STAGES = ("parse", "take", "apply", "rebuild", "other", "loop", "wall", "server")


def server_cpu(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(url: str, server_pid: int | None) -> dict[str, float]:
    """One warm-up in this process: the stage split in µs per record (run with ``--round``)."""
    from natskv._speedups import core
    from natskv.models import store

    spent: dict[str, float] = dict.fromkeys(("parse", "take", "apply", "rebuild"), 0.0)
    clock = time.thread_time
    originals: list[tuple[Any, str, Any]] = []

    def timed(owner: Any, name: str, stage: str) -> None:
        inner = getattr(owner, name)
        originals.append((owner, name, inner))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[stage] += clock() - t0

        setattr(owner, name, wrapper)

    # Before connecting: the frame reader looks parse_frames up when it hooks the connection.
    timed(core, "parse_frames", "parse")
    timed(core, "take_deliveries", "take")
    timed(store.ModelStore, "apply_entries", "apply")
    timed(store.ModelStore, "loaded", "rebuild")
    try:
        return _measure(url, server_pid, spent)
    finally:
        for owner, name, inner in originals:
            setattr(owner, name, inner)


def _measure(url: str, server_pid: int | None, spent: dict[str, float]) -> dict[str, float]:
    import natskv
    from benchmarks.bench_models import make_model
    from natskv._runner import runner

    clock = time.thread_time

    def loop_cpu() -> float:
        got: list[float] = []
        done = threading.Event()
        runner.loop.call_soon_threadsafe(lambda: (got.append(clock()), done.set()))
        done.wait()
        return got[0]

    client = natskv.connect(url, name="natskv-warmup")
    try:
        model = make_model(BUCKET)
        client.bucket(BUCKET)  # opened before the clock starts, as compare.py's populated bucket is
        gc.collect()
        for stage in spent:
            spent[stage] = 0.0
        s0, l0, w0 = server_cpu(server_pid), loop_cpu(), time.perf_counter()
        client.register(model, timeout=120.0)
        w1, l1, s1 = time.perf_counter(), loop_cpu(), server_cpu(server_pid)
        if model.count() != N:
            raise RuntimeError(f"the replica holds {model.count()} records, not {N}")
    finally:
        client.close()
    per = 1e6 / N
    out = {stage: seconds * per for stage, seconds in spent.items()}
    out["loop"] = (l1 - l0) * per
    out["other"] = out["loop"] - sum(spent.values()) * per
    out["wall"] = (w1 - w0) * per
    out["server"] = (s1 - s0) * per
    out["impl"] = 1.0 if natskv.__impl__ == "c" else 0.0
    return out


def populate(url: str) -> None:
    import natskv
    from benchmarks.compare import populate_models

    client = natskv.connect(url, name="natskv-warmup-populate")
    try:
        client.delete_bucket(BUCKET)
        populate_models(client.bucket(BUCKET), N)
    finally:
        client.close()


def run_round(python: str, checkout: str, url: str, server_pid: int | None) -> dict[str, float]:
    # This script, run by the checkout's interpreter with the checkout first on sys.path (a
    # checkout without this file can be measured too).
    cmd = [python, str(Path(__file__).resolve()), "--round", url, str(server_pid or 0), checkout]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=checkout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"a warm-up round of {checkout} failed (exit {proc.returncode})")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result.pop("impl"):
        raise RuntimeError(f"{checkout} ran its pure-Python core: build the compiled one (pip install -e .)")
    return result


def report(name: str, rounds: list[dict[str, float]]) -> dict[str, float]:
    medians = {stage: statistics.median(r[stage] for r in rounds) for stage in STAGES}
    rate = 1e6 / medians["wall"]
    cells = "  ".join(f"{stage} {medians[stage]:5.2f}" for stage in STAGES)
    print(f"{name:>8}: {rate:9,.0f} records/s   µs/record: {cells}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", metavar="CHECKOUT:PYTHON",
                        help="alternate with another checkout, run by its own interpreter (its venv)")
    parser.add_argument("--round", nargs=3, metavar=("URL", "SERVER_PID", "CHECKOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.round:
        url, pid, checkout = args.round
        sys.path.insert(0, checkout)
        print(json.dumps(one_round(url, int(pid) or None)))
        return
    sys.path.insert(0, str(HERE.parent))

    import natskv

    sides = [("this", sys.executable, str(HERE.parent))]
    if args.against:
        checkout, _, python = args.against.partition(":")
        sides.append(("against", python or sys.executable, checkout))
    url = os.environ.get("NATSKV_BENCH_URL")
    server = None
    if not url:
        server = natskv.EmbeddedServer()
        server.start()
        url = server.url
    try:
        print(f"populating {N:,} records and their unique markers ...", flush=True)
        populate(url)
        pid = server.pid if server is not None else None
        results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in sides}
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for name, python, checkout in order:
                results[name].append(run_round(python, checkout, url, pid))
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(
                f"{name} {1e6 / results[name][-1]['wall']:,.0f}/s (loop {results[name][-1]['loop']:.2f} µs)"
                for name, _, _ in sides), flush=True)
        medians = {name: report(name, rounds) for name, rounds in results.items()}
        if len(sides) == 2:
            this, other = medians["this"], medians["against"]
            print(f"   ratio: records/s {other['wall'] / this['wall']:.2f}x, "
                  f"loop CPU {other['loop'] / this['loop']:.2f}x "
                  f"(this / against; medians of {args.rounds} alternating rounds)")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
