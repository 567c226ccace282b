"""natskv's version. It is written once, in ``pyproject.toml``; this module only reads it.

Installed (a wheel, or ``pip install -e .``), the version comes from the package metadata that
the build wrote from ``pyproject.toml``. Imported from a checkout that was never installed (its
directory on ``sys.path``), there is no metadata: the checkout's ``pyproject.toml`` is read
instead. Neither found: ``0+unknown``, a valid version that sorts before every release.

``natskv.__version__`` loads this module on first use: asking the metadata costs tens of
milliseconds, which ``import natskv`` does not pay.
"""

from __future__ import annotations

import re
from pathlib import Path

UNKNOWN = "0+unknown"

# The first `version = "..."` of the [project] table (the table runs to the next `[` header).
_PROJECT_VERSION = re.compile(r'^\[project\]\s*$(?:(?!^\[).)*?^version\s*=\s*"([^"]+)"', re.MULTILINE | re.DOTALL)


def _checkout_version(pyproject: Path) -> str | None:
    """The version in a checkout's ``pyproject.toml``, when that file is natskv's."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    if not re.search(r'^name\s*=\s*"natskv"\s*$', text, re.MULTILINE):
        return None
    match = _PROJECT_VERSION.search(text)
    return match[1] if match else None


def read_version() -> str:
    """natskv's version: the installed metadata, else the checkout's pyproject.toml, else UNKNOWN."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("natskv")
    except PackageNotFoundError:
        pass
    return _checkout_version(Path(__file__).resolve().parent.parent / "pyproject.toml") or UNKNOWN


__version__ = read_version()
