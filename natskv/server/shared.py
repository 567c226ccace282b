"""The data directory of the shared server: where it is, its lock file and its state file.

``EmbeddedServer.shared()`` keeps one nats-server per data directory. Processes find it through
``<data_dir>/server.json`` (written atomically by the process that started it) and agree on who
starts or stops it through an exclusive lock on ``<data_dir>/server.lock``. Everything here runs
on the caller's thread.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from natskv.errors import ServerError

DATA_DIR_ENV = "NATSKV_DATA_DIR"
STATE_FILE = "server.json"
LOCK_FILE = "server.lock"


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


def _make_dir(path: Path) -> None:
    """Create ``path`` and its parents; ServerError saying what to choose instead on failure."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServerError(
            f"cannot create the directory {path}: {exc}; choose another data_dir "
            f"(or set {DATA_DIR_ENV} for the shared server)"
        ) from exc


def _read_state(directory: Path) -> dict[str, Any] | None:
    """The state file of ``directory`` as a dict, or None when missing or not a JSON object."""
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _write_state(directory: Path, state: dict[str, Any]) -> None:
    """Replace the state file in one step, so a reader never sees half of it."""
    scratch = directory / f".{STATE_FILE}.{os.getpid()}.tmp"
    scratch.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(scratch, directory / STATE_FILE)


def _remove_state(directory: Path) -> None:
    try:
        (directory / STATE_FILE).unlink()
    except FileNotFoundError:
        pass


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
