"""The measuring instruments in benchmarks/: compare.py's optional redis section and plot.py's
drawing. Nothing here measures speed (the redis side itself runs with the benchmark, where a
redis-server is installed: CI has none, and the suite never skips)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import compare, floors, plot, warmup  # noqa: E402

FIGURES = {
    "meta": {"date": "2026-12-01", "natskv": "0.1.0", "nats-py": "2.16.0", "nats-server": "2.15.1",
             "python": "3.11.7", "machine": "x86_64, 2 cores", "redis": None},
    "threads": {"counts": [1, 2, 4, 8, 16],
                "ops_per_s": {plot.NATSKV: [1700, 2800, 4600, 5700, 8300],
                              plot.NATSPY: [1800, 2600, 3200, 3100, 3000]},
                # Quartiles of the rounds, for one line only: a figure without them draws too.
                "ops_per_s_iqr": {plot.NATSKV: [[1600, 1800], [2700, 2900], [4400, 4800], [5500, 5900],
                                                [8000, 8600]]}},
    "queries": {"records": 100_000, "matches": [20, 100, 1000, 10_000],
                "p50_us": {"limit=100": [85.0, 300.0, 1200.0, 41000.0], "no limit": [84.0, 315.0, 5000.0, 120000.0]}},
}


def test_redis_section_skipped_with_one_notice_without_redis_server(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no redis-server anywhere
    assert compare.compare_redis(None, compare.QUICK) == []
    out = capsys.readouterr().out.splitlines()
    assert out == ["redis section skipped: no redis-server on PATH (Debian/Ubuntu: apt-get install redis-server)"]


def test_redis_section_skipped_with_one_notice_without_the_redis_package(monkeypatch, tmp_path, capsys):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis raises ImportError
    assert compare.compare_redis(None, compare.QUICK) == []
    out = capsys.readouterr().out.splitlines()
    assert out == ["redis section skipped: the redis package is not installed (pip install -e '.[bench]')"]


def test_the_compared_value_is_127_bytes_of_json():
    assert len(orjson.dumps(compare.json_value())) == 127


def test_plot_draws_both_pictures_from_saved_figures(tmp_path):
    saved = tmp_path / "performance.json"
    saved.write_text(json.dumps(FIGURES))
    out = tmp_path / "img"
    assert plot.main(["--from-json", str(saved), "--out", str(out)]) == 0
    for name in plot.FILES:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 10_000  # axes, lines and labels, not an empty canvas
    assert not (out / "performance.json").exists()  # redrawing writes no figures


def test_plot_draws_a_third_line_when_redis_was_measured(tmp_path):
    import matplotlib.image

    with_redis = json.loads(json.dumps(FIGURES))
    with_redis["threads"]["ops_per_s"][plot.REDISPY] = [1500, 3500, 5700, 6200, 6200]
    with_redis["meta"]["redis"] = "redis-server 7.0.15, redis-py 8.1.0 (hiredis)"
    two = plot.plot(FIGURES, tmp_path / "two")[0]
    three = plot.plot(with_redis, tmp_path / "three")[0]
    a, b = matplotlib.image.imread(two), matplotlib.image.imread(three)
    assert a.shape == b.shape
    assert (a != b).any()


def test_floors_counts_a_busy_process_cpu_and_not_an_idle_one():
    import subprocess
    import time

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # both started
        busy0, idle0 = floors.cpu_seconds(busy.pid), floors.cpu_seconds(idle.pid)
        time.sleep(0.6)
        assert floors.cpu_seconds(busy.pid) - busy0 >= 0.2  # it spun most of that time
        assert floors.cpu_seconds(idle.pid) - idle0 <= 0.05
        wall, client, server = floors.measure(lambda: sum(range(20_000)), 50, idle.pid)
        assert wall > 0 and client > 0 and server <= 1000  # µs per call; the idle process took none
    finally:
        busy.kill()
        idle.kill()


def test_warmup_splits_a_replica_load_by_stage(nats_url, monkeypatch):
    import natskv
    from natskv._speedups import core

    monkeypatch.setattr(warmup, "N", 500)
    monkeypatch.setattr(warmup, "BUCKET", "bench_warmup_test")
    parse_frames = core.parse_frames
    warmup.populate(nats_url)
    try:
        out = warmup.one_round(nats_url, None)
    finally:
        with natskv.connect(nats_url) as db:
            db.delete_bucket("bench_warmup_test")
    assert set(warmup.STAGES) <= out.keys()
    assert all(out[stage] > 0 for stage in ("parse", "take", "apply", "rebuild", "loop", "wall"))
    assert out["server"] == 0.0  # no server pid given
    assert abs(out["loop"] - sum(out[s] for s in ("parse", "take", "apply", "rebuild", "other"))) < 1e-6
    assert core.parse_frames is parse_frames  # the timing wrappers are gone
