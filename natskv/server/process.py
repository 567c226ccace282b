"""Processes, ports and logs of the servers natskv spawns: all on the caller's thread.

Picking free ports, telling whether a pid is alive (a zombie is not), stopping a process with
SIGTERM then SIGKILL, and reading the tail of a server log for error messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

_LOG_TAIL_BYTES = 4096
_POLL = 0.005  # seconds between checks on a process that is stopping

# Shared servers this process started, kept so their Popen objects are never collected while the
# server runs (that would warn) and so stop_shared() can reap its own child.
_SHARED_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _probe_host(host: str) -> str:
    """Where to connect to reach a server bound to ``host`` (wildcards mean this machine)."""
    if host in ("", "0.0.0.0"):  # noqa: S104 (a comparison: nothing binds here)
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
            state: int = kernel32.WaitForSingleObject(handle, 0)
            return state == 0x102  # WAIT_TIMEOUT: still running
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


def _detach_kwargs() -> dict[str, Any]:
    if os.name == "nt":
        flags = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        return {"creationflags": flags}
    return {"start_new_session": True}
