"""natskv's speed in two pictures, measured by this script in one run.

    python benchmarks/plot.py                  # measure (about 2.5 minutes), then draw
    python benchmarks/plot.py --quick          # fewer, shorter rounds (about 1 minute)
    python benchmarks/plot.py --from-json docs/img/performance.json   # redraw saved figures only

Writes into ``--out`` (default ``docs/img/``, where the README and docs/performance.md find them):

- ``threads.png``: get calls per second against the number of callers (1, 2, 4, 8, 16) sharing one
  client: natskv's blocking ``kv.get`` from N threads, nats-py's asyncio ``kv.get`` from N tasks on
  one event loop (asyncio's counterpart of N threads), and redis-py's ``GET`` from N threads on one
  ``Redis`` client when ``redis-server`` and the ``redis`` package are installed. The same 127-byte
  JSON value everywhere, decoded with orjson by every side;
- ``query-latency.png``: ``Model.find`` p50 against the number of records an indexed age range
  matches (20, 100, 1,000 and 10,000 of compare.py's 100,000-record model; the model has 20
  records per age, so 20 is the smallest range), with ``limit=100`` and without a limit;
- ``performance.json``: the figures both pictures are drawn from, with the versions and machine.

The measurements reuse compare.py's functions (server, interleaving, model population); the sides
of each point are measured in rotating order, several rounds, medians. Needs matplotlib
(``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_AS_SCRIPT = __name__ == "__main__"
REPO = Path(__file__).resolve().parent.parent
if _AS_SCRIPT and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "docs" / "img"
THREADS = (1, 2, 4, 8, 16)
MATCHES = (20, 100, 1_000, 10_000)  # records matched by the age range (20 per age)
QUERY_LIMIT = 100
NATSKV = "natskv (threads)"
NATSPY = "nats-py asyncio (tasks)"
REDISPY = "redis-py (threads)"
FILES = ("threads.png", "query-latency.png")


def measure(quick: bool = False) -> dict[str, Any]:
    """Run both measurements against a server of their own; the figures as a JSON-able dict."""
    import natskv
    from benchmarks import _server, compare

    began = time.perf_counter()
    with _server.running_server() as url:
        client = natskv.connect(url, name="natskv-plot")
        try:
            threads, redis_versions = measure_threads(url, client, quick)
            queries = measure_queries(client, quick)
            server_version = client.server_version
        finally:
            client.close()
    return {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "natskv": natskv.__version__,
            "core": natskv.__impl__,
            "python": platform.python_version(),
            "nats-py": compare.version("nats-py"),
            "nats-server": server_version,
            "redis": redis_versions,
            "machine": f"{platform.machine()}, {compare.usable_cores()} cores",
            "mode": "quick" if quick else "full",
            "seconds": round(time.perf_counter() - began),
        },
        "threads": threads,
        "queries": queries,
    }


def measure_threads(url: str, client: Any, quick: bool) -> tuple[dict[str, Any], str | None]:
    """Gets per second of 1..16 callers on one client, per library; and redis's versions (or None)."""
    import orjson

    from benchmarks import compare

    rounds, seconds = (3, 0.4) if quick else (7, 0.6)
    value = compare.json_value()
    encoded = orjson.dumps(value)
    keys = [f"key{i}" for i in range(compare.REDIS_KEYS)]
    client.delete_bucket("plot_threads")
    kv = client.bucket("plot_threads")
    natspy = compare.NatsPy(url, "plot_natspy")
    redis_versions = None
    try:
        with contextlib.ExitStack() as stack:
            kv.set_many(dict.fromkeys(keys, value))
            natspy.put_all(keys, encoded)
            sides: dict[str, Any] = {
                NATSKV: lambda n: compare.throughput_of(kv.get, keys, n, seconds)[0],
                NATSPY: lambda n: natspy.throughput(keys, n, seconds, orjson.loads),
            }
            reason = compare.redis_missing()
            if reason is None:
                server = stack.enter_context(compare.RedisServer())
                r = compare.redis_client(server.port)
                stack.callback(r.close)
                r.mset(dict.fromkeys(keys, encoded))
                redis_versions = compare.redis_versions(r)
                r_get, loads = r.get, orjson.loads

                def redis_get(key: str) -> object:
                    return loads(r_get(key))

                sides[REDISPY] = lambda n: compare.throughput_of(redis_get, keys, n, seconds)[0]
            else:
                print(f"redis-py line left out: {reason}", flush=True)
            for get in sides.values():
                get(2)  # warm-up: connections, lazy imports
            samples: dict[str, dict[int, list[float]]] = {name: {n: [] for n in THREADS} for name in sides}
            order = list(sides)
            for rnd in range(rounds):
                compare.progress(f"threads: round {rnd + 1} of {rounds} ({len(THREADS)} counts x {len(sides)} "
                                 f"libraries x {seconds:.1f} s)")
                for step, n in enumerate(THREADS):
                    gc.collect()
                    shift = (rnd + step) % len(order)  # each library goes first as often as the others
                    for name in order[shift:] + order[:shift]:
                        samples[name][n].append(sides[name](n))
    finally:
        natspy.close()
        client.delete_bucket("plot_threads")
    return {
        "counts": list(THREADS),
        "ops_per_s": {name: [round(statistics.median(per[n])) for n in THREADS] for name, per in samples.items()},
        # The middle half of the rounds (their quartiles): how much the neighbours moved a point.
        "ops_per_s_iqr": {name: [[round(q) for q in quartiles(per[n])] for n in THREADS]
                          for name, per in samples.items()},
        "rounds": rounds,
        "seconds_per_point": seconds,
    }, redis_versions


def quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartiles of ``values`` (both the value itself when there is one)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def measure_queries(client: Any, quick: bool) -> dict[str, Any]:
    """``Model.find`` p50 in µs on compare.py's 100,000-record model, per range size, with and
    without ``limit=100``."""
    from benchmarks import compare
    from benchmarks.bench_models import make_model

    rounds, budget = (3, 0.25) if quick else (5, 0.5)
    bucket = "plot_models"
    client.delete_bucket(bucket)
    try:
        compare.progress(f"queries: populating {compare.MODEL_N:,} records")
        compare.populate_models(client.bucket(bucket), compare.MODEL_N)
        model = client.register(make_model(bucket), timeout=120.0)
        per_age = compare.MODEL_N // 5000  # compare.model_row: age = i % 5000
        series: dict[str, list[float]] = {f"limit={QUERY_LIMIT}": [], "no limit": []}
        for matches in MATCHES:
            ages = matches // per_age
            starts = [k * 37 % (5000 - ages) for k in range(8)]
            for label, limit in ((f"limit={QUERY_LIMIT}", QUERY_LIMIT), ("no limit", None)):
                expected = matches if limit is None else min(matches, limit)

                def find(lo: int, ages: int = ages, limit: int | None = limit, expected: int = expected) -> object:
                    got = model.find(age__gte=lo, age__lt=lo + ages, limit=limit)
                    if len(got) != expected:
                        raise RuntimeError(f"find returned {len(got)} rows, not {expected}")
                    return got

                compare.local_samples(find, starts, 3)
                compare.progress(f"queries: find over {matches:,} matches, {label} ({rounds} rounds)")
                samples: list[float] = []
                for _ in range(rounds):
                    gc.collect()
                    samples += compare.local_samples(find, starts, 2000, budget=budget)
                series[label].append(round(statistics.median(samples) * 1e6, 1))
    finally:
        client.delete_bucket(bucket)
    return {"records": compare.MODEL_N, "matches": list(MATCHES), "p50_us": series}


def plot(figures: dict[str, Any], out_dir: Path) -> list[Path]:
    """Draw ``threads.png`` and ``query-latency.png`` from ``figures`` (what :func:`measure`
    returns) into ``out_dir``; return their paths. Measures nothing."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, the same output on every machine
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = figures.get("meta", {})
    caption = ", ".join(f"{k} {meta[k]}" for k in ("natskv", "nats-py", "nats-server", "python") if meta.get(k))
    if meta.get("machine"):
        caption += f"; {meta['machine']}, {meta.get('date', '')}"
    if meta.get("redis"):
        caption += f"\n{meta['redis']}"
    paths = []

    def new_figure() -> tuple[Any, Any]:
        fig, ax = plt.subplots(figsize=(7.0, 4.6), layout="constrained")
        # Room under the axes for the caption, which the layout engine does not place.
        fig.get_layout_engine().set(rect=(0.0, 0.07, 1.0, 0.93))
        fig.text(0.99, 0.01, caption, ha="right", va="bottom", fontsize=7, color="0.4")
        return fig, ax

    threads = figures["threads"]
    fig, ax = new_figure()
    spreads = threads.get("ops_per_s_iqr", {})
    for (name, rates), marker in zip(threads["ops_per_s"].items(), "osD^v", strict=False):
        (line,) = ax.plot(threads["counts"], rates, marker=marker, label=name)
        if name in spreads:
            low, high = zip(*spreads[name], strict=True)
            ax.fill_between(threads["counts"], low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads["counts"], [str(n) for n in threads["counts"]])
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("threads (asyncio: tasks) sharing one client")
    ax.set_ylabel("gets per second")
    ax.set_title("Gets per second against callers, one client, 127-byte JSON value\n"
                 "(median of rounds; shaded: the middle half of the rounds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(out_dir / FILES[0])
    fig.savefig(paths[-1], dpi=110, metadata={"Software": None})
    plt.close(fig)

    queries = figures["queries"]
    fig, ax = new_figure()
    for (name, p50), marker in zip(queries["p50_us"].items(), "os", strict=False):
        ax.plot(queries["matches"], p50, marker=marker, label=f"find(age range, {name})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(queries["matches"], [f"{n:,}" for n in queries["matches"]])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("records matching the range")
    ax.set_ylabel("p50 latency (µs)")
    ax.set_title(f"Model.find p50 against matches, {queries['records']:,} records, replica")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    paths.append(out_dir / FILES[1])
    fig.savefig(paths[-1], dpi=110, metadata={"Software": None})
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about 1 minute)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory of the PNGs and the JSON")
    parser.add_argument("--from-json", type=Path, help="draw from these figures instead of measuring")
    args = parser.parse_args(argv)
    if args.from_json:
        figures = json.loads(args.from_json.read_text())
    else:
        from benchmarks import _server

        _server.ensure_natskv(prefer_checkout=True)  # measure this checkout's natskv
        figures = measure(args.quick)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "performance.json").write_text(json.dumps(figures, indent=2) + "\n")
    for path in plot(figures, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
