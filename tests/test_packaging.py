"""Type checkers see the installed natskv, its types and its ``py.typed`` marker.

setuptools' default editable install of a flat layout puts a meta-path finder in site-packages, which
only a running interpreter executes: mypy, run anywhere but in the checkout, then reported
``Cannot find implementation or library stub for module named "natskv"``. pyproject.toml's
``package-dir = {"" = "."}`` makes the editable install a static ``.pth`` line instead. This test
runs mypy the way a user's project would: from a directory outside the checkout, on a script that
imports natskv. It holds for a regular (wheel) install too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import natskv

SCRIPT = '''\
import natskv

def open_bucket(url: str) -> natskv.Bucket:
    db: natskv.Client = natskv.connect(url)
    return db.bucket("sessions", history=5)

reveal_type(natskv.connect)
revision: int = open_bucket("nats://127.0.0.1:4222").set("k", 1)
'''


@pytest.mark.slow
def test_mypy_outside_the_checkout_finds_natskv_and_its_types(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(SCRIPT, encoding="utf-8")
    # No MYPYPATH or PYTHONPATH: mypy must find natskv the way it finds any installed package.
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--strict", "app.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert 'Revealed type is "def (' in output and "-> natskv.client.Client" in output, output


def test_python_in_another_directory_imports_this_natskv_with_its_core(tmp_path: Path) -> None:
    """The import a type checker resolves is the one Python makes: the same package, compiled core
    included when this run has it."""
    done = subprocess.run([sys.executable, "-c", "import natskv; print(natskv.__file__); print(natskv.__impl__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    location, impl = done.stdout.split()
    assert Path(location) == Path(natskv.__file__)
    assert impl == natskv.__impl__
