"""``EmbeddedCluster``: a small JetStream cluster of embedded servers on loopback, for tests.

Readiness and leadership come from the nodes' HTTP monitoring ports: ``/healthz`` for "this node
has a meta leader and is current with it", ``/jsz`` for who leads the meta group, a stream or a
consumer. Every method runs on the caller's thread.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from natskv.errors import ConfigurationError, ServerError
from natskv.server.embedded import EmbeddedServer
from natskv.server.probe import HEALTHZ_JETSTREAM, _monitor_json, healthz
from natskv.server.process import _free_ports, _probe_host, _url_host


class EmbeddedCluster:
    """``size`` clustered nats-servers with JetStream, on loopback, for tests.

    Node ``i`` keeps its log and store in ``<data_dir>/node-<i>`` and its ports (client, route,
    HTTP monitor) across ``stop_node(i)`` / ``start_node(i)``. ``start()`` returns once JetStream
    is usable everywhere: every running node's ``/healthz`` reports a meta leader it is current
    with, and the meta leader sees every running node as current (before that, creating an R3
    stream can fail with "no suitable peers for placement"). Without ``data_dir`` a temporary
    directory is used and deleted by ``stop()``.
    """

    def __init__(
        self,
        size: int = 3,
        data_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        cluster_name: str = "natskv-test",
        binary: str | None = None,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(f"size must be a positive integer, got {size!r}")
        self._size = size
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._temp_dir: Path | None = None
        self._host = host
        self._cluster_name = cluster_name
        self._binary = binary
        self.nodes: list[EmbeddedServer] = []

    @property
    def urls(self) -> list[str]:
        """Client URLs of all nodes (running or not)."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs joined by commas, as ``natskv.connect()`` accepts them."""
        return ",".join(self.urls)

    def __repr__(self) -> str:
        running = sum(node.running for node in self.nodes)
        return f"<EmbeddedCluster {self._cluster_name} size={self._size} running={running}>"

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        """Start every node and wait until JetStream is usable on all; return self.

        Raises ServerError (and stops what was started) when that takes longer than ``timeout``.
        """
        deadline = time.monotonic() + timeout
        if not self.nodes:
            self._create_nodes()
        try:
            for node in self.nodes:
                if not node.running:
                    node.launch()
            for node in self.nodes:
                node.wait_ready(max(deadline - time.monotonic(), 0.0))
            self.wait_jetstream(max(deadline - time.monotonic(), 0.0))
        except BaseException:
            self.stop()
            raise
        return self

    def _create_nodes(self) -> None:
        if self._data_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="natskv-cluster-"))
        base = self._data_dir or self._temp_dir
        assert base is not None
        size = self._size
        # Fixed for the cluster's life: routes name each other's ports, and a restarted node keeps
        # its client and monitoring ports.
        ports = _free_ports(self._host, 3 * size)
        client_ports, route_ports, monitor_ports = ports[:size], ports[size : 2 * size], ports[2 * size :]
        host = _url_host(self._host)
        for i in range(size):
            routes = ",".join(f"nats://{host}:{route_ports[j]}" for j in range(size) if j != i)
            args = [
                "--cluster", f"nats://{host}:{route_ports[i]}",
                "--cluster_name", self._cluster_name,
            ]
            if routes:
                args += ["--routes", routes]
            self.nodes.append(
                EmbeddedServer(
                    data_dir=base / f"node-{i}",
                    port=client_ports[i],
                    monitor_port=monitor_ports[i],
                    host=self._host,
                    name=f"{self._cluster_name}-{i}",
                    extra_args=args,
                    binary=self._binary,
                )
            )

    def _meta_cluster(self, index: int) -> dict[str, Any] | None:
        """Node ``index``'s view of the JetStream meta group (``meta_cluster`` of its ``/jsz``)."""
        meta = self.jsz(index).get("meta_cluster")
        return meta if isinstance(meta, dict) else None

    def _jetstream_usable(self) -> list[int]:
        """Indexes of running nodes not yet usable (empty when the whole cluster is ready)."""
        running = [i for i, node in enumerate(self.nodes) if node.running]
        waiting = [
            i for i in running
            if healthz(_probe_host(self._host), self._monitor_port(i), HEALTHZ_JETSTREAM) != 200
        ]
        if waiting:
            return waiting
        names = {self.nodes[i].name: i for i in running}
        leaders = {(self._meta_cluster(i) or {}).get("leader") for i in running}
        leader = leaders.pop() if len(leaders) == 1 else None
        if leader not in names:
            return running  # the nodes disagree on the leader
        # Only the leader tracks whether its followers are current. A peer it still counts as
        # offline (no server stats from it yet) is refused for placement: "peer offline".
        view = self._meta_cluster(names[leader]) or {}
        current = {leader} | {
            peer.get("name") for peer in view.get("replicas") or () if peer.get("current") and not peer.get("offline")
        }
        return [i for i in running if self.nodes[i].name not in current]

    def wait_jetstream(self, timeout: float = 30.0) -> None:
        """Wait until JetStream is usable on every running node (see the class docstring).

        Raises ServerError naming the nodes still not ready after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            waiting = self._jetstream_usable()
            if not waiting:
                return
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"JetStream is not ready on node(s) {waiting} after {timeout:.1f}s "
                    "(no meta leader, or nodes not caught up); see the logs in "
                    + ", ".join(str(self.nodes[i].log_file) for i in waiting)
                )
            time.sleep(0.05)

    def stop_node(self, index: int, timeout: float = 5.0) -> None:
        """Stop node ``index`` (SIGTERM, then SIGKILL); its ports and store are kept."""
        self.nodes[index]._stop_process(timeout)

    def kill_node(self, index: int) -> None:
        """Kill node ``index`` with SIGKILL (a crash: no clean shutdown, no leader hand-off);
        its ports and store are kept for ``start_node``."""
        node = self.nodes[index]
        proc = node._proc
        if proc is None:
            return
        if node._spawned_by == os.getpid():
            proc.kill()
            proc.wait()
        node._forget_process()

    def jsz(self, index: int, query: str = "") -> dict[str, Any]:
        """Node ``index``'s JetStream report (``/jsz?<query>`` on its monitor port); {} when
        it does not answer."""
        return _monitor_json(_probe_host(self._host), self._monitor_port(index), f"/jsz?{query}")

    def _monitor_port(self, index: int) -> int:
        port = self.nodes[index].monitor_port
        assert port, "cluster nodes are created with a monitoring port"
        return port

    def meta_leader(self) -> int | None:
        """Index of the JetStream meta leader (None while there is none)."""
        names = {node.name: i for i, node in enumerate(self.nodes)}
        for i, node in enumerate(self.nodes):
            if node.running:
                leader = names.get((self._meta_cluster(i) or {}).get("leader", ""))
                if leader is not None and self.nodes[leader].running:
                    return leader
        return None

    def stream_leader(self, stream: str) -> int | None:
        """Index of the node leading ``stream`` (None while it has no leader)."""
        return self._leader_of(stream, None)

    def wait_new_stream_leader(self, stream: str, old: int, timeout: float = 30.0) -> float:
        """Wait until a node other than ``old`` leads ``stream``; return ``time.monotonic()`` at
        the moment it was seen. Raises ServerError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.stream_leader(stream)
            if leader is not None and leader != old:
                return time.monotonic()
            time.sleep(0.01)
        raise ServerError(f"no new leader for stream {stream!r} within {timeout} s")

    def consumer_leader(self, stream: str, consumer: str) -> int | None:
        """Index of the node leading consumer ``consumer`` of ``stream`` (for an R1 consumer:
        the node that holds it). None when no running node reports it as leader."""
        return self._leader_of(stream, consumer)

    def _leader_of(self, stream: str, consumer: str | None) -> int | None:
        names = {node.name: i for i, node in enumerate(self.nodes)}
        query = "streams=true&consumers=true" if consumer else "streams=true"
        for i, node in enumerate(self.nodes):
            if not node.running:
                continue
            for account in self.jsz(i, query).get("account_details") or ():
                for info in account.get("stream_detail") or ():
                    if info.get("name") != stream:
                        continue
                    if consumer is None:
                        cluster = info.get("cluster") or {}
                    else:
                        found = [c for c in info.get("consumer_detail") or () if c.get("name") == consumer]
                        if not found:
                            continue
                        cluster = found[0].get("cluster") or {}
                    leader = names.get(cluster.get("leader", ""))
                    if leader is not None and self.nodes[leader].running:
                        return leader
        return None

    def start_node(self, index: int, timeout: float = 30.0) -> None:
        """Start node ``index`` again on its ports and store; wait until the cluster is usable."""
        deadline = time.monotonic() + timeout
        self.nodes[index].start(timeout)
        self.wait_jetstream(max(deadline - time.monotonic(), 0.0))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every node (idempotent) and delete the temporary data directory, if any."""
        for node in self.nodes:
            node._stop_process(timeout)
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
            self.nodes = []
