"""One nats-server child process: ``EmbeddedServer``, and the shared per-data-dir server.

``EmbeddedServer`` runs ``nats-server`` on loopback with JetStream and an explicit store directory
(and, when asked, an HTTP monitoring port on the same host), and waits until the client port
greets with the expected server name, plus, with a monitoring port, until the server itself says
it is ready (``/healthz``): no blind sleeps.
``EmbeddedServer.shared()`` is what ``natskv.connect()`` uses when no URL is given: one server per
data directory, found again by every later process through a state file, and left running when
the process that started it exits, like a local database.

Every method runs on the caller's thread. This module imports neither ``nats`` nor ``asyncio``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from natskv.errors import ConfigurationError, ServerError
from natskv.server.binary import find_server_binary, server_version
from natskv.server.probe import HEALTHZ_STARTED, _greeting_and_health, _read_info
from natskv.server.process import (
    _SHARED_CHILDREN,
    _detach_kwargs,
    _free_ports,
    _kill_at_exit,
    _log_tail,
    _pid_alive,
    _port_is_free,
    _probe_host,
    _terminate_pid,
    _url_host,
)
from natskv.server.shared import (
    LOCK_FILE,
    _FileLock,
    _make_dir,
    _read_state,
    _remove_state,
    _write_state,
    default_data_dir,
)

LOG_FILE = "nats-server.log"

_READY_POLL = 0.001  # seconds between readiness probes of a starting server (a refused connect)


class _PortTakenError(ServerError):
    """nats-server could not bind its port (another process took it after it was picked)."""


# --------------------------------------------------------------------------------------------
# One server
# --------------------------------------------------------------------------------------------


class EmbeddedServer:
    """A ``nats-server`` child process on loopback, with JetStream and an explicit store dir.

    ``data_dir`` holds the log (``nats-server.log``) and, unless ``store_dir`` is given, the
    JetStream store (``<data_dir>/jetstream``). Without ``data_dir`` a temporary directory is
    created at start and deleted by ``stop()`` (not by ``restart()``). ``port=0`` picks a free port
    at the first start; ``restart()`` reuses the same port and store, so clients reconnect and
    file-stored data is still there. ``monitor_port`` is the HTTP monitoring port (``/healthz``,
    ``/varz``, ``/jsz``), bound to ``host`` like the client port; 0 picks a free one the same way.
    ``extra_args`` are appended to the command line: a ``-m``/``--http_port`` there replaces
    ``monitor_port``, and a ``-ms``/``--https_port`` means None (nats-server refuses HTTP and
    HTTPS monitoring together). ``binary`` overrides ``find_server_binary()``.

    Ready means the client port greets with this server's name (and JetStream on): nats-server
    opens its client listener last, once JetStream and every other listener are up. With a
    monitoring port, ``/healthz`` must agree too. The default is no monitoring port: the HTTP
    listener and the request add about a millisecond to a 12 ms start, and a single server has
    nothing more to say there (``EmbeddedCluster`` gives its nodes one: its readiness needs it).

    The server is stopped by ``stop()``, by leaving a ``with`` block, or (as a last resort) when
    this object is garbage-collected or the interpreter exits. Use ``EmbeddedServer.shared()`` for
    a server that outlives the process.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        jetstream: bool = True,
        store_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        log_file: str | os.PathLike[str] | None = None,
        name: str | None = None,
        binary: str | None = None,
        monitor_port: int | None = None,
    ) -> None:
        for label, value in (("port", port), ("monitor_port", monitor_port)):
            if value is None and label == "monitor_port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise ConfigurationError(f"{label} must be an integer from 0 (pick one) to 65535, got {value!r}")
        if isinstance(extra_args, str):
            raise ConfigurationError("extra_args must be a sequence of arguments, not one string")
        extra_args = tuple(str(arg) for arg in extra_args)
        http_port = _flag_value(extra_args, ("m", "http_port"))
        if http_port is not None and http_port.isdigit():
            monitor_port = int(http_port)
        elif _flag_value(extra_args, ("ms", "https_port")) is not None:
            monitor_port = None
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._log_file = Path(log_file) if log_file is not None else None
        self._port = port
        self._monitor_port = monitor_port
        self._host = host
        self._jetstream = jetstream
        self._extra_args = extra_args
        self._name = name
        self._binary = binary
        self._temp_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._owned = True
        self._detached = False
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], int], EmbeddedServer] | None = None
        self._log_offset = 0
        self._spawned_by = 0  # pid of the process that spawned the server (fork awareness)
        self.info: dict[str, Any] | None = None  # the INFO the server sent at start / attach

    # -- properties ----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The client port (0 until a server started with ``port=0`` has picked one)."""
        return self._port

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``. Raises ServerError before the port is known."""
        if not self._port:
            raise ServerError("the server has no port yet: call start() first")
        return f"nats://{_url_host(self._host)}:{self._port}"

    @property
    def monitor_port(self) -> int | None:
        """The HTTP monitoring port (0 until a server started with ``monitor_port=0`` picked
        one), None without one."""
        return self._monitor_port

    @property
    def monitor_url(self) -> str:
        """``http://127.0.0.1:<monitor port>``. Raises ServerError when the port is not known."""
        if self._monitor_port is None:
            raise ServerError("this server runs without an HTTP monitoring port: start one with monitor_port=0")
        if not self._monitor_port:
            raise ServerError("the server has no monitoring port yet: call start() first")
        return f"http://{_url_host(self._host)}:{self._monitor_port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (or last ran), else None."""
        return self._proc.pid if self._proc is not None else self._pid

    @property
    def owned(self) -> bool:
        """False for handles to a shared server: their stop() leaves the process running."""
        return self._owned

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        if self._proc is not None and self._spawned_by == os.getpid():
            return self._proc.poll() is None
        return self._pid is not None and _pid_alive(self._pid)

    @property
    def data_dir(self) -> Path | None:
        return self._data_dir if self._data_dir is not None else self._temp_dir

    @property
    def store_dir(self) -> Path | None:
        """The directory passed to ``nats-server -sd``."""
        if self._store_dir is not None:
            return self._store_dir
        base = self.data_dir
        return base / "jetstream" if base is not None else None

    @property
    def log_file(self) -> Path | None:
        if self._log_file is not None:
            return self._log_file
        base = self.data_dir
        return base / LOG_FILE if base is not None else None

    @property
    def name(self) -> str | None:
        """The server name (``--name``); defaults to ``natskv-<port>``."""
        if self._name is not None:
            return self._name
        return f"natskv-{self._port}" if self._port else None

    def __repr__(self) -> str:
        where = self.url if self._port else "no port yet"
        state = "running" if self.running else "stopped"
        owner = "" if self._owned else ", shared (not owned)"
        return f"<EmbeddedServer {where} pid={self.pid} {state}{owner} data_dir={self.data_dir}>"

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        """Start the server and wait until it is ready (see the class docstring); return self.

        Does nothing when already running. Raises ServerError (with the tail of the server log)
        when the binary is missing, a port is taken, the server exits, or it is not ready within
        ``timeout``.
        """
        if self.running:
            return self
        if not self._owned:
            raise ServerError("this shared server is not running: call EmbeddedServer.shared() again")
        if self._data_dir is not None and self._store_dir is None:
            # nats-server does not lock its store: two servers on one store would corrupt it.
            running = type(self)._attach(self._data_dir)
            if running is not None:
                raise ServerError(
                    f"a natskv server is already running on {self._data_dir} (pid {running.pid}, {running.url}); "
                    "connect to it, or stop it first with `natskv server --stop`"
                )
        deadline = time.monotonic() + timeout
        pick_port, pick_monitor = self._port == 0, self._monitor_port == 0
        attempts = 3 if pick_port or pick_monitor else 1
        had_temp_dir = self._temp_dir is not None
        while True:
            attempts -= 1
            try:
                self.launch()
                self.wait_ready(max(deadline - time.monotonic(), 0.0))
                return self
            except _PortTakenError:
                # A port picked by binding port 0 can be taken by another process before the
                # server binds it: pick again.
                if attempts > 0:
                    self._port = 0 if pick_port else self._port
                    self._monitor_port = 0 if pick_monitor else self._monitor_port
                    continue
                self._discard_new_temp_dir(had_temp_dir)
                raise
            except BaseException:
                self._discard_new_temp_dir(had_temp_dir)
                raise

    def _discard_new_temp_dir(self, had_temp_dir: bool) -> None:
        # A failed first start leaves nothing behind (its log tail is in the error already).
        if not had_temp_dir and self._temp_dir is not None and not self.running:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def launch(self) -> None:
        """Spawn the process without waiting for it; ``wait_ready()`` waits. ``start()`` is both.

        Raises ServerError when the binary is missing or an explicit port is already in use.
        """
        binary = self._binary or find_server_binary()
        if self.data_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="natskv-server-"))
        data_dir = self.data_dir
        assert data_dir is not None
        _make_dir(data_dir)
        if self._jetstream:
            assert self.store_dir is not None
            _make_dir(self.store_dir)
        for label, port in (("port", self._port), ("monitor_port", self._monitor_port)):
            if port and not _port_is_free(self._host, port):
                raise ServerError(
                    f"{label} {port} on {self._host} is already in use by another process: "
                    f"choose another {label}, or {label}=0 to pick a free one"
                )
        if self._port == 0 or self._monitor_port == 0:
            # Three candidates: at least two differ from an explicit port among them.
            explicit = (self._port, self._monitor_port)
            picked = [port for port in _free_ports(self._host, 3) if port not in explicit]
            if self._port == 0:
                self._port = picked.pop(0)
            if self._monitor_port == 0:
                self._monitor_port = picked.pop(0)
        self._spawn(binary)

    def _command(self, binary: str) -> list[str]:
        cmd = [binary, "-a", self._host, "-p", str(self._port), "--name", str(self.name)]
        if self._monitor_port is not None:
            # -m binds to the -a host: the monitoring port is loopback-only like the client port.
            cmd += ["-m", str(self._monitor_port)]
        if self._jetstream:
            cmd += ["-js", "-sd", str(self.store_dir)]
        cmd += ["-l", str(self.log_file)]
        cmd += self._extra_args
        return cmd

    def _spawn(self, binary: str) -> None:
        log_path = self.log_file
        assert log_path is not None
        _make_dir(log_path.parent)
        with open(log_path, "ab") as log:
            self._log_offset = log.tell()
            try:
                proc = subprocess.Popen(
                    self._command(binary),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,  # flag errors come before -l takes effect
                    close_fds=True,
                    **(_detach_kwargs() if self._detached else {}),
                )
            except OSError as exc:
                raise ServerError(f"could not run {binary!r}: {exc}") from exc
        self._proc = proc
        self._pid = proc.pid
        self._spawned_by = os.getpid()
        if self._detached:
            _SHARED_CHILDREN[proc.pid] = proc
        else:
            self._finalizer = weakref.finalize(self, _kill_at_exit, proc, self._spawned_by)

    def wait_ready(self, timeout: float) -> None:
        """Wait until the launched server is ready (see ``start()``); ServerError with the log
        tail when it exits first or is not ready within ``timeout``."""
        proc = self._proc
        if proc is None:
            raise ServerError("the server was not launched")
        deadline = time.monotonic() + timeout
        host = _probe_host(self._host)
        probe = 0.25  # how long one probe may wait for an answer
        pause = _READY_POLL
        info: dict[str, Any] | None = None
        while True:
            code = proc.poll()
            if code is not None:
                tail = _log_tail(self.log_file, self._log_offset)  # type: ignore[arg-type]
                self._forget_process()
                error = _PortTakenError if "address already in use" in tail else ServerError
                raise error(
                    f"nats-server exited with code {code} while starting on {host}:{self._port}; "
                    f"server log:\n{tail}"
                )
            # A listener that stays silent is not ours (or is starved): probe briefly so an exit
            # is noticed, longer when starved.
            began = time.monotonic()
            wait = min(probe, max(deadline - began, 0.05))
            status: int | None
            if self._monitor_port is None:
                info, status = _read_info(host, self._port, wait), 200  # the greeting alone
            else:
                # Ready is nats-server's own verdict (every listener up, JetStream enabled),
                # asked once the client port greets (see _greeting_and_health).
                info, status = _greeting_and_health(host, self._port, self._monitor_port, HEALTHZ_STARTED, wait)
            if info is None and time.monotonic() - began >= probe:
                probe = min(probe * 2, 2.0)
            if (
                info is not None
                and info.get("server_name") == self.name
                and (info.get("jetstream") or not self._jetstream)
            ):
                if status == 200:
                    self.info = info
                    return
                # Each "not ready" is a warning line in the server log: ask less often.
                pause = min(pause * 2, 0.1)
            if time.monotonic() >= deadline:
                tail = _log_tail(self.log_file, self._log_offset)  # type: ignore[arg-type]
                self._stop_process(2.0)
                seen = f" (a server named {info.get('server_name')!r} answered)" if info else ""
                raise ServerError(
                    f"nats-server did not become ready on {host}:{self._port} within "
                    f"{timeout:.1f}s{seen}; server log:\n{tail}"
                )
            try:
                proc.wait(timeout=pause)
            except subprocess.TimeoutExpired:
                pass

    def _forget_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc is not None:
            _SHARED_CHILDREN.pop(self._proc.pid, None)
        self._proc = None

    def _stop_process(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if self._spawned_by == os.getpid():
            _terminate_pid(proc.pid, timeout, proc)
        # else: a forked child inherited this object; the server belongs to the parent.
        self._forget_process()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout``, then SIGKILL. Idempotent.

        Does nothing for a handle to a shared server (use ``stop_shared()``). Deletes the
        temporary data directory of a server started without ``data_dir``.
        """
        if not self._owned:
            return
        self._stop_process(timeout)
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def restart(self, timeout: float = 10.0, stop_timeout: float = 5.0) -> EmbeddedServer:
        """Stop and start again on the same port and store dir; return self.

        Connected clients see a disconnect and reconnect to the same URL; JetStream file storage
        survives. Raises ServerError like ``start()``, or for a shared-server handle.
        """
        if not self._owned:
            raise ServerError("this is a handle to a shared server: use stop_shared() and shared()")
        self._stop_process(stop_timeout)
        return self.start(timeout)

    # -- the shared, per-data-dir server -------------------------------------------------------

    @classmethod
    def shared(
        cls, data_dir: str | os.PathLike[str] | None = None, timeout: float = 10.0
    ) -> EmbeddedServer:
        """Return the shared server of ``data_dir`` (default: ``default_data_dir()``), starting it
        if no live one is found.

        The shared server is one nats-server per data dir, on loopback, its JetStream store in
        ``<data_dir>/jetstream`` and its log in ``<data_dir>/nats-server.log``. It is started
        detached and KEEPS RUNNING AFTER THIS PROCESS EXITS, like a local database, so the next
        process (or another one right now) finds it through ``<data_dir>/server.json`` (pid,
        port, name, version) and connects in milliseconds. A state file is trusted only when its
        pid is alive and its port greets with the recorded server name. An exclusive lock file
        (``server.lock``) makes concurrent callers start one server, not two.

        The handle returned never owns the process: its ``stop()`` does nothing. Stop the server
        with ``EmbeddedServer.stop_shared(data_dir)`` (or ``natskv server --stop``).

        Raises ServerError when the server cannot be found or started, or the lock is not
        obtained within ``timeout`` plus a margin.
        """
        directory = Path(data_dir) if data_dir is not None else default_data_dir()
        _make_dir(directory)
        handle = cls._attach(directory)
        if handle is not None:
            return handle
        with _FileLock(directory / LOCK_FILE, timeout + 5.0):
            handle = cls._attach(directory)
            if handle is not None:
                return handle
            binary = find_server_binary()
            server = cls(data_dir=directory, name=f"natskv-shared-{secrets.token_hex(4)}", binary=binary)
            server._detached = True
            server.start(timeout)
            version = server.info.get("version") if server.info else None
            state = {
                "pid": server.pid,
                "port": server.port,
                "monitor_port": server.monitor_port,
                "host": server.host,
                "name": server.name,
                "version": version or ".".join(map(str, server_version(binary))),
                "binary": binary,
                "store_dir": str(server.store_dir),
                "started_at": time.time(),
            }
            _write_state(directory, state)
            server._owned = False
            return server

    @classmethod
    def _attach(cls, directory: Path) -> EmbeddedServer | None:
        state = _read_state(directory)
        if state is None:
            return None
        try:
            pid, port = int(state["pid"]), int(state["port"])
            host, name = str(state["host"]), state["name"]
        except (KeyError, TypeError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        # The recorded pid may have been reused and the port taken by another server since: the
        # greeting must carry the recorded name.
        info = _read_info(_probe_host(host), port, timeout=2.0)
        if info is None or info.get("server_name") != name:
            return None
        # None: started without one, or by a natskv that did not record it.
        monitor_port = state.get("monitor_port")
        handle = cls(
            data_dir=directory, port=port, host=host, name=name,
            monitor_port=monitor_port if isinstance(monitor_port, int) and 0 < monitor_port < 65536 else None,
        )
        handle._owned = False
        handle._pid = pid
        handle.info = info
        return handle

    @classmethod
    def stop_shared(cls, data_dir: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> bool:
        """Stop the shared server of ``data_dir`` (default: ``default_data_dir()``).

        Returns True when a running server was stopped, False when none was running (a stale
        state file is removed either way). Raises ServerError when the lock cannot be taken.
        """
        directory = Path(data_dir) if data_dir is not None else default_data_dir()
        if not directory.is_dir():
            return False
        with _FileLock(directory / LOCK_FILE, timeout + 5.0):
            handle = cls._attach(directory)
            _remove_state(directory)
            if handle is None or handle._pid is None:
                return False
            child = _SHARED_CHILDREN.pop(handle._pid, None)
            _terminate_pid(handle._pid, timeout, child)
            return True


def _flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last of the flags ``names`` in nats-server arguments, else None (Go's flag
    syntax: one or two dashes, the value after ``=`` or as the next argument)."""
    found = None
    for i, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if not flag.startswith("-") or flag.lstrip("-") not in names:
            continue
        found = value if equals else (args[i + 1] if i + 1 < len(args) else "")
    return found
