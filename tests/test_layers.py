"""The layering rules of docs/architecture.md, checked on the source's import graph.

tools/import_graph.py reads every natskv module's imports without importing anything, and sorts
each into run-time (module level), lazy (inside a function) and type-only (under TYPE_CHECKING).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import import_graph

EDGES, EXTERNAL = import_graph.build_graph()
EXECUTED = [e for e in EDGES if e.kind != "typing"]


def test_the_graph_was_read() -> None:
    # A parser that found nothing would pass every rule below.
    assert {"natskv.client", "natskv.kv", "natskv.aio.connection", "natskv.models.model"} <= set(EXTERNAL)
    assert any(e.source == "natskv.client" and e.target == "natskv.kv" for e in EXECUTED)
    assert "nats" in EXTERNAL["natskv.aio.connection"]


def test_no_import_cycles_other_than_type_only() -> None:
    assert import_graph.cycles(EDGES) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    edges = [import_graph.Edge("a", "b", "runtime"), import_graph.Edge("b", "a", "lazy"),
             import_graph.Edge("b", "c", "typing"), import_graph.Edge("c", "b", "runtime")]
    assert import_graph.cycles(edges) == [["a", "b"]]


def test_only_aio_imports_nats_py() -> None:
    offenders = sorted(m for m, names in EXTERNAL.items() if "nats" in names and not m.startswith("natskv.aio"))
    assert offenders == []


@pytest.mark.parametrize("module", ["natskv._core_py", "natskv._regex"])
def test_the_pure_core_does_no_io(module: str) -> None:
    assert not EXTERNAL[module] & {"asyncio", "socket", "nats", "threading", "subprocess", "selectors"}
    assert {e.target for e in EXECUTED if e.source == module} <= {"natskv._regex"}


def test_the_client_does_not_load_the_model_layer() -> None:
    # Models sit above the client: the client module names them only lazily or for type checking.
    eager = [e.target for e in EDGES if e.source == "natskv.client" and e.kind == "runtime"]
    assert not [t for t in eager if t.startswith("natskv.models")]


def test_models_reach_the_server_only_through_the_client() -> None:
    below = ("natskv.aio", "natskv.wire")
    offenders = sorted({f"{e.source} -> {e.target}" for e in EXECUTED
                        if e.source.startswith("natskv.models") and e.target.startswith(below)})
    assert offenders == []
