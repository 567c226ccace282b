"""``natskv demo``: a short tour of natskv, run against a live server and checked as it goes.

Each step prints the call and its result; a step whose result is not what the tour says makes
the command exit 1, so the demo doubles as a smoke test (``.ci/run`` runs it). It uses two
buckets of its own, deleted before (a leftover of an interrupted run) and after.

``natskv.cli`` connects and hands the client to :func:`run`; this module does not import the CLI
(the CLI imports it). Like the CLI it imports nothing heavy at import time. Everything runs on
the caller's thread except the watch callback, which runs on natskv's dispatcher thread.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from natskv.client import Client
    from natskv.kv import Bucket

DEMO_BUCKET = "natskv_demo"
DEMO_MODEL_BUCKET = "natskv_demo_users"


def _out(text: str = "") -> None:
    print(text, flush=True)


def _step(title: str) -> None:
    _out()
    _out(f"== {title}")


def _show(call: str, result: Any) -> None:
    line = f"   {call}  ->  {result!r}"
    _out(line if len(line) <= 100 else f"   {call}\n     ->  {result!r}")


def run(db: Client, timeout: float | None = None) -> bool:
    """Tour natskv on a connected client, ``timeout`` for the bucket calls; True when natskv
    behaved as the tour says it should (the caller turns False into exit status 1)."""
    import natskv

    if db.server is not None:
        where = f"the embedded nats-server {db.server_version} at {db.server.url}"
    else:
        where = f"nats-server {db.server_version} at {db.stats()['connected_url']}"
    _out(f"natskv {natskv.__version__} (core: {natskv.__impl__}), connected to {where}")
    db.delete_bucket(DEMO_BUCKET, timeout=timeout)  # a leftover of an interrupted run
    kv = db.bucket(DEMO_BUCKET, history=5, timeout=timeout)
    _out(f"bucket {DEMO_BUCKET!r}: created for this tour, deleted at the end")
    try:
        ok = _tour(kv)
    finally:
        db.delete_bucket(DEMO_BUCKET, timeout=timeout)
    db.delete_bucket(DEMO_MODEL_BUCKET, timeout=timeout)
    try:
        ok = _model_tour(db) and ok
    finally:
        db.delete_bucket(DEMO_MODEL_BUCKET, timeout=timeout)
    _out()
    _out(f"done: buckets {DEMO_BUCKET!r} and {DEMO_MODEL_BUCKET!r} deleted")
    return ok


def _tour(kv: Bucket) -> bool:
    """The demo's steps; False when natskv did not behave as the tour says it should."""
    import natskv

    ok = True

    _step("1. set and get (values are JSON; set returns the new revision)")
    rev = kv.set("user:1", {"name": "Ann", "age": 34})
    _show('kv.set("user:1", {"name": "Ann", "age": 34})', rev)
    kv.set("user:2", {"name": "Bob", "age": 17})
    kv.set("user:3", {"name": "Cleo", "age": 52})
    kv.set("order:1", {"user": 1, "total": 9.5})
    _out("   kv.set(...) for user:2, user:3 and order:1")
    _show('kv.get("user:1")', kv.get("user:1"))
    _show('kv.get("user:404", default="n/a")', kv.get("user:404", default="n/a"))

    _step("2. compare-and-set: a conflict caught")
    seen_by_a = kv.entry("user:1")
    seen_by_b = kv.entry("user:1")
    assert seen_by_a is not None and seen_by_b is not None
    _out(f"   writers A and B both read user:1 at revision {seen_by_a.revision}")
    rev_a = kv.update("user:1", {**seen_by_a.value, "age": 35}, revision=seen_by_a.revision)
    _out(f'   A: kv.update("user:1", {{..., "age": 35}}, revision={seen_by_a.revision})  ->  {rev_a}')
    try:
        kv.update("user:1", {**seen_by_b.value, "name": "Anne"}, revision=seen_by_b.revision)
        _out("   B: update succeeded: that should not happen")
        ok = False
    except natskv.RevisionMismatchError as exc:
        _out(f"   B: kv.update(\"user:1\", ..., revision={seen_by_b.revision}) raised RevisionMismatchError:")
        _out(f"      {exc}")
        _out(f"   B's stale write was refused, so A's change survives (current revision: {exc.current_revision}).")
        fresh = kv.entry("user:1")
        assert fresh is not None
        rev_b = kv.update("user:1", {**fresh.value, "name": "Anne"}, revision=fresh.revision)
        _out(f"   B re-reads (revision {fresh.revision}), reapplies its change, retries -> revision {rev_b}")
        _show('kv.get("user:1")', kv.get("user:1"))

    _step("3. keys by pattern (globs: * ? [abc]; 'user:' is filtered by the server)")
    _show('kv.keys("user:*")', kv.keys("user:*"))
    _show('kv.keys("*:1")', kv.keys("*:1"))
    _show('kv.keys("user:[12]")', kv.keys("user:[12]"))

    _step("4. find with an operator")
    found = kv.find(where={"age": {"$gte": 18}}, pattern="user:*")
    _show('kv.find(where={"age": {"$gte": 18}}, pattern="user:*")', found)

    _step("5. a watch with a callback")
    seen: list[Any] = []
    arrived = threading.Event()

    def on_change(change: Any) -> None:  # runs on natskv's dispatcher thread
        seen.append(change)
        arrived.set()

    watcher = kv.watch("user:*", callback=on_change, updates_only=True)
    _out('   w = kv.watch("user:*", callback=on_change, updates_only=True)')
    kv.set("user:4", {"name": "Dan", "age": 28})
    _out('   kv.set("user:4", {"name": "Dan", "age": 28})')
    if arrived.wait(5.0):
        import orjson

        change = seen[0]  # printed as `natskv watch` prints a change
        value = orjson.dumps(change.value).decode()
        _out(f"   on_change saw: {change.operation} {change.key} = {value}  (revision {change.revision})")
    else:
        _out("   on_change saw nothing within 5 s: that is a bug")
        ok = False
    watcher.stop()
    _out("   w.stop()")

    _step("6. get_many: many keys in one round trip (absent keys are left out)")
    _show('kv.get_many(["user:1", "user:2", "user:404"])', kv.get_many(["user:1", "user:2", "user:404"]))

    _step("7. an atomic commit: all writes or none")
    current = kv.entry("user:2")
    assert current is not None
    try:
        rev = kv.commit([
            ("update", "user:2", {**current.value, "age": 18}, current.revision),
            ("create", "audit:1", {"event": "user:2 came of age"}),
        ])
        ops = f'("update", "user:2", {{..., "age": 18}}, {current.revision}), ("create", "audit:1", {{...}})'
        _show(f"kv.commit([{ops}])", rev)
        _show('kv.get_many(["user:2", "audit:1"])', kv.get_many(["user:2", "audit:1"]))
        try:
            kv.commit([
                ("update", "user:2", {**current.value, "age": 99}, current.revision),
                ("create", "audit:2", {"event": "never stored"}),
            ])
            _out("   a commit with a stale revision succeeded: that should not happen")
            ok = False
        except natskv.RevisionMismatchError as exc:
            stale = current.revision
            _out(f"   the same commit again, with the now stale revision {stale}, raised RevisionMismatchError:")
            _out(f"      {exc}")
            _out("   nothing of it was stored:")
            _show('kv.get("audit:2")', kv.get("audit:2"))
    except natskv.FeatureNotSupportedError as exc:
        _out(f"   skipped: {exc}")

    return ok


def _model_tour(db: Client) -> bool:
    """The demo's model steps; False when natskv did not behave as the tour says it should."""
    import natskv
    from natskv import Field, Model

    ok = True
    _step("8. models: a schema, uniqueness enforced by the server, queries in memory")

    class User(Model):
        __bucket__ = DEMO_MODEL_BUCKET
        id = Field(int, primary_key=True)
        name = Field(str, required=True, max_length=50)
        email = Field(str, unique=True, format="email")
        age = Field(int, index=True, min=0)

    _out("   class User(Model): id (primary key), name (required), email (unique), age (indexed)")
    db.register(User)
    _out(f"   db.register(User)  ->  bucket {DEMO_MODEL_BUCKET!r}, records mirrored into memory")
    try:
        User.bulk_create([
            {"id": 1, "name": "Ann", "email": "ann@example.com", "age": 34},
            {"id": 2, "name": "Bob", "email": "bob@example.com", "age": 17},
            {"id": 3, "name": "Cleo", "email": "cleo@example.com", "age": 52},
        ])
    except natskv.FeatureNotSupportedError as exc:
        _out(f"   skipped: {exc}")
        return ok
    _out("   User.bulk_create([...Ann 34, Bob 17, Cleo 52])")
    adults = User.find(age__gte=18, order_by="-age")
    _show('[u.name for u in User.find(age__gte=18, order_by="-age")]', [u.name for u in adults])
    started = time.perf_counter()
    for _ in range(1000):
        found = User.find_one(email="bob@example.com")
    per_call = (time.perf_counter() - started) / 1000
    _show('User.find_one(email="bob@example.com").name', found.name if found else None)
    _out(f"   (a replica read: {per_call * 1e6:.1f} us per find_one, no round trip)")
    try:
        User.create(id=4, name="Eve", email="ann@example.com", age=29)
        _out("   a second ann@example.com was stored: that should not happen")
        ok = False
    except natskv.UniqueConstraintError as exc:
        _out('   User.create(id=4, name="Eve", email="ann@example.com", ...) raised UniqueConstraintError:')
        _out(f"      {exc}")
    try:
        User.create(id=5, email="not-an-email", age=-1)
        _out("   an invalid record was stored: that should not happen")
        ok = False
    except natskv.ValidationError as exc:
        _out('   User.create(id=5, email="not-an-email", age=-1) raised ValidationError, every issue at once:')
        for field, message, code in exc.issues:
            _out(f"      {field}: {message} ({code})")

    _step("9. a transaction: changes to several records, one atomic commit")
    with db.transaction() as tx:
        ann, bob = tx.get(User, 1), tx.get(User, 2)
        assert ann is not None and bob is not None
        ann.email, bob.email = bob.email, ann.email
        tx.save(ann)
        tx.save(bob)
    _out("   with db.transaction() as tx: swap Ann's and Bob's emails; tx.save(ann); tx.save(bob)")
    _show('User.find_one(email="ann@example.com").name', getattr(User.find_one(email="ann@example.com"), "name", None))
    page = User.paginate(limit=2, order_by="age")
    _show('[u.name for u in User.paginate(limit=2, order_by="age")]', [u.name for u in page])
    _show('User.count(), round(User.avg("age"), 1)', (User.count(), round(User.avg("age"), 1)))
    return ok
