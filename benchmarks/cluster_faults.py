"""Cluster faults, measured: acked writes lost, kill-to-next-write and watch gap.

    python benchmarks/cluster_faults.py            # 3 runs, prints each and the medians
    python benchmarks/cluster_faults.py --runs 1

Each run starts a 3-node ``EmbeddedCluster`` (loopback, temporary stores), an R3 bucket with a
watch and an R3 model bucket, and keeps two writer threads busy (``kv.set`` of new keys and
``Model.create`` with an autoincrement key, each call with ``timeout=15``, longer than an election)
while it

1. SIGKILLs the node holding the watch's consumer (neither the node the client is connected to,
   nor the meta leader, nor the bucket's stream leader), then starts it again;
2. SIGKILLs the bucket's stream leader (the client is connected to another node), then starts
   it again;
3. restarts all three nodes one after the other (SIGTERM, start, wait until JetStream is usable).

Figures:
- acked writes lost: acknowledged ``set``/``create`` calls whose value is not in the bucket at
  the end (read through the stream leader), and missing from the watch or a model replica;
- repeated: keys the watch delivered more than once;
- leader-to-write: from the moment a new stream leader is visible (``/jsz``, polled every 10 ms)
  to the writer's next acknowledged write; kill-to-write: from the SIGKILL to that write;
- watch gap: the longest time between a write's acknowledgement and its delivery to the watch,
  over the writes around the consumer's node kill.

It is a report, not a test (tests/test_cluster.py asserts the limits): it exits 0.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import natskv
from natskv.server import EmbeddedCluster
from natskv.wire import jsapi


class Load:
    """Two writer threads (KV sets and model creates) and the watch that records deliveries."""

    def __init__(self, kv: natskv.Bucket, model: type[natskv.Model]) -> None:
        self.kv = kv
        self.model = model
        self.acked: dict[str, float] = {}  # key -> when its set returned
        self.created: dict[int, float] = {}  # primary key -> when its create returned
        self.seen: dict[str, list[float]] = {}  # key -> delivery times (more than one: repeated)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sets, daemon=True),
                         threading.Thread(target=self._creates, daemon=True)]

    def on_change(self, change: natskv.Change) -> None:
        if change.key:
            self.seen.setdefault(change.key, []).append(time.monotonic())

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _sets(self) -> None:
        i = 0
        while not self._stop.is_set():
            key = f"w:{i:07d}"
            try:
                self.kv.set(key, i, timeout=15)
                self.acked[key] = time.monotonic()
                i += 1
            except natskv.NatsKVError as exc:
                self.errors.append(f"set: {exc!r}")  # outcome unknown: not counted as acknowledged
                i += 1
            time.sleep(0.002)

    def _creates(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                obj = self.model.create(n=i)
                self.created[obj.id] = time.monotonic()
            except natskv.NatsKVError as exc:
                self.errors.append(f"create: {exc!r}")
            i += 1
            time.sleep(0.005)

    def first_ack_after(self, t: float) -> float | None:
        """When the first write to the KV bucket acknowledged after ``t`` returned."""
        after = [a for a in list(self.acked.values()) if a > t]
        return min(after) if after else None


def node_of_url(cluster: EmbeddedCluster, client: natskv.Client) -> int:
    url = client._conn.nc.connected_url  # type: ignore[union-attr]
    return next(i for i, node in enumerate(cluster.nodes) if node.port == url.port)


def place_away(cluster: EmbeddedCluster, db: natskv.Client, stream: str) -> None:
    """Move the stream's leader off the node the client is connected to."""
    for _ in range(20):
        leader = cluster.stream_leader(stream)
        if leader is not None and leader != node_of_url(cluster, db):
            return
        try:
            jsapi.call(db._conn, f"STREAM.LEADER.STEPDOWN.{stream}", None, 5.0)
        except natskv.NatsKVError:
            pass
        time.sleep(0.5)
    raise RuntimeError("could not move the stream leader away from the client's node")


def busy_nodes(cluster: EmbeddedCluster, db: natskv.Client, stream: str) -> set[int]:
    """The client's node, the meta leader and the stream's leader."""
    return {node_of_url(cluster, db), cluster.meta_leader(), cluster.stream_leader(stream)} - {None}  # type: ignore[return-value]


def watch_away(cluster: EmbeddedCluster, db: natskv.Client, kv: natskv.Bucket, load: Any) -> tuple[Any, int]:
    """A watch whose consumer is on none of the client's node, the meta leader and the stream
    leader: its loss is then the only fault (writes go on, the consumer can be recreated)."""
    stream = "KV_" + kv.name
    for _ in range(20):
        if len(busy_nodes(cluster, db, stream)) < len(cluster.nodes):
            break
        try:  # three different nodes: move the stream leader (elected at random) and look again
            jsapi.call(db._conn, f"STREAM.LEADER.STEPDOWN.{stream}", None, 5.0)
        except natskv.NatsKVError:
            pass
        time.sleep(0.5)
    for _ in range(30):
        watcher = kv.watch("w:*", callback=load.on_change)
        name = watcher._subscription[0].feed.consumer_name
        node = None
        for _ in range(100):
            node = cluster.consumer_leader(stream, name)
            if node is not None:
                break
            time.sleep(0.02)
        if node is not None and node not in busy_nodes(cluster, db, stream):
            return watcher, node
        watcher.stop()
    raise RuntimeError("could not place a watch consumer away from the client's node and the leaders")


def run_once(quiet: bool = False) -> dict[str, float]:
    out: dict[str, float] = {}
    with EmbeddedCluster(3) as cluster:
        db = natskv.connect(cluster.url, name="writer", timeout=15.0)  # Model.create's default timeout
        observer = natskv.connect(cluster.url, name="observer", timeout=15.0)
        kv = db.bucket("faults", replicas=3)
        db.bucket("items", replicas=3)

        class Item(natskv.Model):
            __bucket__ = "items"
            id = natskv.Field(int, primary_key=True, generated="autoincrement")
            n = natskv.Field(int)

        class ItemSeen(natskv.Model):
            __bucket__ = "items"
            id = natskv.Field(int, primary_key=True, generated="autoincrement")
            n = natskv.Field(int)

        db.register(Item)
        observer.register(ItemSeen)
        load = Load(kv, Item)
        watcher, consumer_node = watch_away(cluster, db, kv, load)
        load.start()
        time.sleep(1.0)

        # 1. the node holding the watch's consumer
        t_kill = time.monotonic()
        cluster.kill_node(consumer_node)
        time.sleep(3.0)
        window = [k for k, a in list(load.acked.items()) if t_kill - 0.5 <= a <= t_kill + 2.5]
        gaps = [load.seen[k][0] - load.acked[k] for k in window if k in load.seen]
        out["watch gap s"] = max(gaps) if gaps else float("nan")
        cluster.start_node(consumer_node)

        # 2. the stream leader
        place_away(cluster, db, "KV_faults")
        time.sleep(0.5)
        leader = cluster.stream_leader("KV_faults")
        assert leader is not None
        t_kill = time.monotonic()
        cluster.kill_node(leader)
        t_leader = cluster.wait_new_stream_leader("KV_faults", leader)
        deadline = time.monotonic() + 10
        while load.first_ack_after(t_kill + 0.01) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        t_next = load.first_ack_after(t_kill + 0.01) or float("nan")
        out["election s"] = t_leader - t_kill
        out["leader-to-write s"] = max(0.0, t_next - t_leader)
        out["kill-to-write s"] = t_next - t_kill
        time.sleep(1.0)
        cluster.start_node(leader)

        # 3. rolling restart
        for i in range(3):
            cluster.stop_node(i)
            time.sleep(0.5)
            cluster.start_node(i)
        time.sleep(1.0)
        load.stop()

        # Everything acknowledged is stored, delivered once, and in both replicas.
        keys = set(kv.keys("w:*", timeout=30))
        lost = [k for k in load.acked if k not in keys]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(k not in load.seen for k in load.acked):
            time.sleep(0.05)
        missed = [k for k in load.acked if k not in load.seen]
        repeated = [k for k, times in load.seen.items() if len(times) > 1]
        records = {item.id for item in Item.find()}
        while time.monotonic() < deadline and len({i.id for i in ItemSeen.find()}) < len(load.created):
            time.sleep(0.05)
        observed = {item.id for item in ItemSeen.find()}
        out["acked writes"] = len(load.acked) + len(load.created)
        out["acked writes lost"] = len(lost) + len([pk for pk in load.created if pk not in records])
        out["missed by watch"] = len(missed)
        out["missed by observer replica"] = len([pk for pk in load.created if pk not in observed])
        out["repeated by watch"] = len(repeated)
        out["failed calls"] = len(load.errors)
        if load.errors and not quiet:
            print("  failed calls: " + "; ".join(load.errors[:5]))
        watcher.stop()
        observer.close()
        db.close()
    if not quiet:
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig()
    logging.getLogger("natskv").setLevel(logging.ERROR)  # reconnects and resumed watches are expected here
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}")
        runs.append(run_once())
    print(f"\nmedians over {len(runs)} runs")
    for name in runs[0]:
        print(f"  {name:28s} {statistics.median(r[name] for r in runs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
