"""Fail (exit 1) unless the installed natskv runs on its compiled core.

Run by cibuildwheel's test step against the freshly built wheel, from outside the source tree:

    python {project}/tools/check_compiled.py

Checks that ``natskv._core`` imports, that it is a real extension module (not a stray ``.py``),
that ``natskv.__impl__`` is ``"c"``, that ``natskv`` was imported from an installed location and
not from a source checkout on ``sys.path``, and that the compiled core answers like the pure twin on
a few keys. ``NATSKV_IMPL`` is reported; when it is set, it must be ``c``.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import sysconfig
from pathlib import Path


def fail(message: str) -> None:
    print(f"check_compiled: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    env = os.environ.get("NATSKV_IMPL")
    if env is not None and env.strip().lower() != "c":
        fail(f"NATSKV_IMPL={env!r}: run this check with NATSKV_IMPL=c (or unset)")

    try:
        from natskv import _core
    except ImportError as exc:
        fail(f"the compiled core natskv._core does not import: {exc!r}")

    core_file = Path(getattr(_core, "__file__", "") or "")
    if not any(core_file.name.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        fail(f"natskv._core is not an extension module: {core_file}")

    try:
        import natskv
    except ImportError as exc:
        fail(f"import natskv failed (NATSKV_IMPL={env!r}): {exc!r}")
    if natskv.__impl__ != "c":
        fail(f"natskv.__impl__ is {natskv.__impl__!r}, not 'c'")

    package_dir = Path(natskv.__file__).resolve().parent
    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if not any(root in package_dir.parents for root in installed):
        fail(f"natskv was imported from {package_dir}, not from the installed wheel ({', '.join(map(str, installed))})")

    from natskv import _core_py

    sample = ["user:1", "a.b c", "Zürich", "!@#$%^&*()_+", "", "x:y:z"]
    for key in sample:
        if _core.encode_key(key) != _core_py.encode_key(key) or _core.decode_key(_core.encode_key(key)) != key:
            fail(f"compiled and pure cores disagree on {key!r}")

    print(f"check_compiled: OK: natskv {natskv.__version__} __impl__=c, {core_file.name} from {package_dir}"
          f" (NATSKV_IMPL={env!r}, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
