"""asv: the key/pattern/filter core, compiled (``natskv._core``) vs pure Python (``natskv._core_py``).

The two modules are imported directly, not through ``natskv._speedups``, so ``NATSKV_IMPL`` does not
matter here. Without the compiled core the ``c`` cases are skipped (``setup`` raises
NotImplementedError). ``compare.py`` reuses the data and the operations defined here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, ClassVar

from . import _server

_server.ensure_natskv()

N = 10_000
IMPLS = {"c": "natskv._core", "python": "natskv._core_py"}
PATTERN = "user:*:pro*"
WHERE: dict[str, Any] = {
    "age": {"$gte": 18, "$lt": 65},
    "address.city": {"$in": ["Paris", "Oslo", "Lima"]},
    "$or": [{"tags": {"$contains": "vip"}}, {"name": {"$startswith": "A"}}],
}


def load_core(impl: str) -> ModuleType:
    """The core module for ``impl``; NotImplementedError (asv: skip) when it cannot be imported."""
    try:
        return importlib.import_module(IMPLS[impl])
    except ImportError as exc:
        raise NotImplementedError(f"{IMPLS[impl]} is not available: {exc}") from exc


def make_keys(n: int = N) -> list[str]:
    """A realistic mix: mostly plain hierarchical keys, some needing escapes, some non-ASCII."""
    keys = []
    for i in range(n):
        kind = i % 10
        if kind < 4:
            keys.append(f"user:{i}:profile")
        elif kind < 6:
            keys.append(f"order:2026-11-{i % 28 + 1:02d}:{i}")
        elif kind < 7:
            keys.append(f"session/{i * 2654435761 % 2**32:08x}")
        elif kind < 8:
            keys.append(f"email:ann.{i}@example.com")
        elif kind < 9:
            keys.append(f"user:{i}:prefs v2")
        else:
            keys.append(f"city:Zürich {i}")
    return keys


def make_docs(n: int = N) -> list[Any]:
    cities = ["Paris", "Oslo", "Lima", "Rome", "Kyiv"]
    return [
        {
            "name": ("Ann", "Bob", "Ada", "Eve")[i % 4] + str(i),
            "age": i % 90,
            "address": {"city": cities[i % 5], "zip": f"{i:05d}"},
            "tags": ["vip"] if i % 7 == 0 else ["new", "trial"],
            "score": i * 0.5,
        }
        for i in range(n)
    ]


def make_batch(n: int = 1000) -> list[tuple[str, bytes, dict[str, str]]]:
    """One ``bulk_create`` batch: ``n // 2`` rows, each a unique marker and its record, every
    message with a "must not exist" check."""
    create = {"Nats-Expected-Last-Subject-Sequence": "0"}
    items = []
    for i in range(n // 2):
        items.append((f"u.email.=22u{i}@example=2Ecom=22", f'"r:i:{i}"'.encode(), create))
        items.append((f"r.i.{i}", b'{"id":%d,"email":"u%d@example.com","name":"User %d","age":30}' % (i, i, i), create))
    return items


def operations(core: ModuleType, keys: list[str], docs: list[Any]) -> dict[str, Callable[[], object]]:
    """The timed operations, each over ``len(keys)`` keys / ``len(docs)`` dicts, and one atomic
    batch of 1000 messages."""
    encoded = core.encode_keys(keys)
    pattern = core.compile_pattern(PATTERN)
    batch = make_batch()
    return {
        "encode_keys": lambda: core.encode_keys(keys),
        "decode_keys": lambda: core.decode_keys(encoded),
        "pattern_filter_keys": lambda: pattern.filter_keys(keys),
        "compile_filter_filter": lambda: core.compile_filter(WHERE).filter(docs),
        "atomic_batch": lambda: core.atomic_batch("$KV.users.", batch, "4f1c9a0e", "_INBOX.a.1", "_INBOX.a.2"),
    }


class Core:
    """10,000 keys / dicts per call."""

    params: ClassVar[list[str]] = ["c", "python"]
    param_names: ClassVar[list[str]] = ["impl"]

    def setup(self, impl: str) -> None:
        core = load_core(impl)
        self.ops = operations(core, make_keys(), make_docs())

    def time_encode_keys(self, impl: str) -> None:
        self.ops["encode_keys"]()

    def time_decode_keys(self, impl: str) -> None:
        self.ops["decode_keys"]()

    def time_pattern_filter_keys(self, impl: str) -> None:
        self.ops["pattern_filter_keys"]()

    def time_compile_filter_filter(self, impl: str) -> None:
        self.ops["compile_filter_filter"]()

    def time_atomic_batch(self, impl: str) -> None:
        self.ops["atomic_batch"]()
