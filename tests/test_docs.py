"""The documentation's Python examples run as written, against a real nats-server.

Every fenced ``python`` block of README.md and of the docs site's pages (docs/, but not the API
reference, which mkdocstrings generates from the docstrings) is run on its own, top to bottom, in a
fresh interpreter whose ``NATS_URL`` points at this module's server, so ``natskv.connect()`` in an
example talks to it. Each block starts on an empty server: the buckets of the block before are
deleted first.

A block that cannot run on its own (it names hosts, TLS files or credentials that do not exist here)
is not run when the line right above its fence is the marker ``<!-- docs-test: skip -->``, which
renders as nothing; such a block is still compiled, so its syntax stays valid. Keep those rare: an
example nobody runs drifts from the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import natskv
from natskv.server import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
SKIP_MARKER = "<!-- docs-test: skip -->"
# Pages whose examples are not meant to run: architecture.md draws the code's own layers.
NOT_EXAMPLES = {"architecture.md"}
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    skipped: bool

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The fenced ``python`` blocks of a Markdown file, in order (fences at column 0 only)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path}:{i + 1}: a code fence that is never closed")
        if opening.group(1) == "python":
            skipped = i > 0 and lines[i - 1].strip() == SKIP_MARKER
            blocks.append(Block(path, i + 1, "\n".join(lines[i + 1:end]) + "\n", skipped))
        i = end + 1
    return blocks


def documents() -> list[Path]:
    pages = [p for p in sorted((ROOT / "docs").rglob("*.md"))
             if p.name not in NOT_EXAMPLES and "reference" not in p.relative_to(ROOT / "docs").parts]
    return [ROOT / "README.md", *pages]


BLOCKS = [block for path in documents() for block in python_blocks(path)]
RUNNABLE = [block for block in BLOCKS if not block.skipped]
NOT_RUN = [block for block in BLOCKS if block.skipped]


def test_the_documents_have_examples() -> None:
    """The extraction found the README's and the quickstart's examples (a renamed page or a changed
    fence style would otherwise make this module test nothing)."""
    names = {block.path.name for block in BLOCKS if not block.skipped}
    assert {"README.md", "quickstart.md"} <= names, names
    skipped = [block.id for block in BLOCKS if block.skipped]
    assert len(skipped) <= len(BLOCKS) // 3, f"too many examples skipped: {skipped}"


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A server of this module's own: the examples use bucket names ("user", "sessions") that
    other tests' buckets must not meet."""
    server = EmbeddedServer(data_dir=tmp_path_factory.mktemp("docs-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def empty(url: str) -> None:
    with natskv.connect(url, timeout=10.0) as client:
        for bucket in client.buckets():
            client.delete_bucket(bucket)


# Each example is a fresh interpreter (about a second): slow, so the inner loop stays fast.
@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_example_runs(block: Block, docs_server: EmbeddedServer, tmp_path: Path) -> None:
    empty(docs_server.url)
    script = tmp_path / "example.py"
    # Blank lines before the code keep the traceback's line numbers those of the document.
    script.write_text("\n" * block.line + block.code, encoding="utf-8")
    env = {**os.environ, "NATS_URL": docs_server.url, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, (
        f"the example at {block.id} failed (exit {done.returncode}):\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}")


@pytest.mark.parametrize("block", NOT_RUN, ids=[block.id for block in NOT_RUN])
def test_example_not_run_still_compiles(block: Block) -> None:
    """Examples that need hosts or files this machine lacks are at least valid Python."""
    compile("\n" * block.line + block.code, block.id, "exec")
