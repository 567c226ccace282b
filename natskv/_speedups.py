"""Pick the core implementation: compiled ``natskv._core`` or pure-Python ``natskv._core_py``.

The environment variable ``NATSKV_IMPL`` decides, once, at import time:

- ``c``: the compiled core or an ImportError saying why it failed and how to fix it;
- ``python``: the pure-Python core;
- unset or empty: the compiled core when it imports, else the pure-Python one.

Anything else raises ImportError. ``core`` is the chosen module and ``__impl__`` is ``"c"`` or
``"python"``; the rest of natskv does ``from natskv._speedups import core``. Type checkers always
read ``natskv._core_py``, the typed reference, so the ``.pyx`` needs no stub.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["__impl__", "core"]

_VALID = ("c", "python")


def _load(choice: str) -> tuple[ModuleType, str]:
    if choice not in ("", *_VALID):
        raise ImportError(
            f"NATSKV_IMPL={choice!r} is not valid: use 'c' (compiled core), 'python' (pure-Python"
            " core), or leave it unset to prefer the compiled core"
        )
    if choice == "python":
        from natskv import _core_py

        return _core_py, "python"
    try:
        from natskv import _core
    except ImportError as exc:
        if choice == "c":
            raise ImportError(
                "NATSKV_IMPL=c but the compiled core natskv._core could not be imported:"
                f" {exc}; reinstall natskv so the extension is built"
                " (pip install --force-reinstall --no-binary natskv natskv) or set"
                " NATSKV_IMPL=python"
            ) from exc
        from natskv import _core_py

        return _core_py, "python"
    return _core, "c"


if TYPE_CHECKING:
    from natskv import _core_py as core

    __impl__: str = "python"
else:
    core, __impl__ = _load(os.environ.get("NATSKV_IMPL", "").strip().lower())
