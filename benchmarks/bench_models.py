"""asv: model reads on the in-memory replica, compiled core vs pure Python core.

20,000 records of the 6-field model of ``compare.py`` (explicit int primary key, unique ``email``,
indexed ``age`` and ``role``, plain ``name`` and ``score``), written straight into the bucket in
the model's stored layout with ``set_many``, then ``register``-ed. natskv picks its core once, at
import (``NATSKV_IMPL``), so the ``impl`` parameter checks what this process runs: the case for
the other core is skipped (``setup`` raises NotImplementedError). ``asv run`` with
``NATSKV_IMPL=python`` in the environment measures the pure core; without it the compiled one
(and the ``c`` cases are skipped when the compiled core is missing). ``compare.py`` runs both
cores side by side in one run.
"""

from __future__ import annotations

from typing import ClassVar

from . import _server

_server.ensure_natskv()

N = 20_000
AGES = 1000  # age = i % 1000: 20 records per age; [500, 505) is 100 rows
RANGE_LO, RANGE_HI = 500, 505


def stored_row(i: int) -> dict:
    return {
        "id": i,
        "email": f"user{i}@example.com",
        "age": i % AGES,
        "role": "admin" if i % 100 == 0 else "editor" if i % 10 == 0 else "viewer",
        "name": f"user {i:06d}",
        "score": (i * 7919 % 100_000) / 100.0,
        "_created_at": "2026-01-01T00:00:00+00:00",
        "_updated_at": "2026-01-01T00:00:00+00:00",
    }


def make_model(bucket: str) -> type:
    """A fresh model class (one per registration): explicit int pk, unique email, indexed age and
    role, plain name and score. compare.py uses the same one."""
    from natskv import Field, Model

    return type("BenchUser", (Model,), {
        "__module__": __name__,
        "__bucket__": bucket,
        "id": Field(int, primary_key=True),
        "email": Field(str, unique=True),
        "age": Field(int, index=True),
        "role": Field(str, index=True),
        "name": Field(str),
        "score": Field(float),
    })


class Models:
    """Replica reads over 20,000 records."""

    params: ClassVar[list[str]] = ["c", "python"]
    param_names: ClassVar[list[str]] = ["impl"]
    timeout = 180.0
    bucket = "bench_models"

    def setup(self, impl: str) -> None:
        import natskv

        if natskv.__impl__ != impl:
            raise NotImplementedError(f"this process runs the {natskv.__impl__!r} core (NATSKV_IMPL), not {impl!r}")
        self.bench = _server.KVBench(self.bucket)  # its bucket is codec="bytes"; the model uses JSON
        try:
            client = self.bench.client
            assert client is not None
            client.delete_bucket(self.bucket)  # KVBench's bytes bucket is not used here
            client.delete_bucket("bench_models_json")
            self.bench.bucket_name = "bench_models_json"  # KVBench deletes this one on close
            kv = client.bucket("bench_models_json")
            for start in range(1, N + 1, 2000):
                batch = {}
                for i in range(start, min(start + 2000, N + 1)):
                    row = stored_row(i)
                    batch[f"r:i:{i}"] = row
                    batch[f'u:email:"{row["email"]}"'] = f"r:i:{i}"
                kv.set_many(batch, timeout=60.0)
            self.model = client.register(make_model("bench_models_json"), timeout=120.0)
            self.client = client
            self.i = 0
        except BaseException:
            self.bench.close()
            raise

    def teardown(self, impl: str) -> None:
        # asv calls teardown after a setup that raised NotImplementedError (the skipped core) too.
        bench = getattr(self, "bench", None)
        if bench is not None:
            bench.close()

    def _next(self) -> int:
        self.i = self.i % 997 + 1
        return self.i * 20

    def time_get_pk(self, impl: str) -> None:
        self.model.get(self._next())

    def time_find_one_unique(self, impl: str) -> None:
        self.model.find_one(email=f"user{self._next()}@example.com")

    def time_find_one_indexed(self, impl: str) -> None:
        self.model.find_one(age=self._next() % AGES)

    def time_find_indexed_range_100(self, impl: str) -> None:
        self.model.find(age__gte=RANGE_LO, age__lt=RANGE_HI)

    def time_find_wide_range_limit_100(self, impl: str) -> None:
        # 100 of 1,100 matches (55 ages), no order: the hard case of a limited query.
        self.model.find(age__gte=RANGE_LO, age__lt=RANGE_LO + 55, limit=100)

    def time_find_wide_range_limit_10(self, impl: str) -> None:
        # 10 of 10,000 matches (half the ages), no order.
        self.model.find(age__gte=0, age__lt=AGES // 2, limit=10)

    def time_find_wide_range_order_other_limit_100(self, impl: str) -> None:
        # 100 of 1,100 matches ordered by another indexed field (role): the planner picks between
        # walking the role index and sorting the age range's candidates.
        self.model.find(age__gte=RANGE_LO, age__lt=RANGE_LO + 55, order_by="role", limit=100)

    def time_find_no_condition_limit_100(self, impl: str) -> None:
        # No indexed condition (score is not indexed): walks the primary key index, filtering.
        self.model.find(score__gte=500.0, limit=100)

    def time_count_full_scan(self, impl: str) -> None:
        self.model.count(where={"score": {"$gt": 990.0}})

    def time_paginate_indexed_20(self, impl: str) -> None:
        # A page of 20 in age order from a cursor in the middle: walks the age index from there.
        self.model.paginate(limit=20, after=f"[{RANGE_LO}, {self._next()}]", order_by="age")

    def time_transaction_two_records(self, impl: str) -> None:
        # Read two records, change both, commit them as one atomic batch (a server round trip).
        with self.client.transaction() as tx:
            a, b = tx.get(self.model, 1), tx.get(self.model, 2)
            a.score, b.score = b.score, a.score
            tx.save(a)
            tx.save(b)
