"""ModelRegistry: the models registered with one client, their events and their transactions.

``db.register``, ``db.define``, ``db.get_model``, ``db.on``, ``db.transaction`` and
``db.run_transaction`` are one-line delegations to the client's registry, which does the work
here, on the caller's thread. The registry uses its :class:`~natskv.client.Client` as any other
caller would (``bucket()``, ``options``, ``has_atomic_batches``), and each registered model's
:class:`~natskv.models.store.ModelStore` keeps the client for its counters and transactions.

Layers and imports: the model layer sits above the client. Nothing in ``natskv.models`` imports
``natskv.client`` at run time (only under ``TYPE_CHECKING``, for annotations), and ``client.py``
imports no model module at import time: ``Client._models()`` imports this module inside the
function, the first time a model call needs the registry, and keeps the registry it makes. So
the import graph has no run-time cycle, a program that never uses models never loads them, and a
client that never registers a model carries no event bus.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from natskv._runner import check_timeout
from natskv.errors import InvalidArgumentError, RevisionMismatchError
from natskv.models.attributes import define_schema
from natskv.models.live import EventBus, ModelEvent
from natskv.models.model import Model
from natskv.models.store import ModelStore, resolve_timeout
from natskv.models.transaction import Transaction
from natskv.replica import LocalReplica

if TYPE_CHECKING:
    from natskv.client import Client

log = logging.getLogger("natskv")
T = TypeVar("T")

# A replica's first load streams its whole bucket, which takes longer than one request.
_MIN_LOAD_TIMEOUT = 30.0


class ModelRegistry:
    """The models of one client, by class name, with the client's model event bus.

    Made by ``Client._models()`` on first use; thread-safe as the client is. The docstrings of
    the ``Client`` methods that delegate here are the public documentation.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._models: dict[str, type[Model]] = {}
        self._events = EventBus()

    def register(self, model: type[Model], *, bucket: str | None = None, timeout: float | None = None) -> type[Model]:
        """See :meth:`natskv.Client.register`."""
        if not (isinstance(model, type) and issubclass(model, Model)) or model.__dict__.get("__abstract__"):
            raise InvalidArgumentError(f"register() takes a natskv.Model subclass, not {model!r}")
        check_timeout(timeout)
        client = self.client
        name = bucket or model.__dict__.get("__bucket__") or model.__name__.lower()
        kv = client.bucket(name, timeout=timeout)
        store = ModelStore(model, client, kv)
        store.replica = LocalReplica(kv, "r:*", on_apply=store.apply, on_reset=store.reset, on_loaded=store.loaded,
                                     storage=store)
        if timeout is not None:
            load = resolve_timeout(client, timeout)
        else:
            load = max(client.options.request_timeout, _MIN_LOAD_TIMEOUT)
        store.replica.start(load)
        model._store = store
        self._models[model.__name__] = model
        if not client.has_atomic_batches:
            needs = [f"unique field {n!r}" for n, f in model._fields.items() if f.unique and n != model._pk]
            needs += [f"autoincrement field {n!r}" for n, f in model._fields.items() if f.generated == "autoincrement"]
            if model.__max_records__ is not None:
                needs.append(f"__max_records__ = {model.__max_records__}")
            if needs:
                log.warning(
                    "natskv: model %s has %s, which need nats-server 2.12 (atomic batches); this server "
                    "has no atomic batch, so writing such values raises FeatureNotSupportedError (reads work)",
                    model.__name__, ", ".join(needs),
                )
        self._events.attach(model)
        return model

    def define(self, name: str, attributes: Mapping[str, Any], *, indexes: Iterable[str | Mapping[str, Any]] = (),
               bucket: str | None = None, timeout: float | None = None) -> type[Model]:
        """See :meth:`natskv.Client.define`."""
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidArgumentError(f"a model name is a Python identifier, not {name!r}")
        namespace: dict[str, Any] = dict(define_schema(attributes, indexes))
        namespace["__module__"] = __name__
        return self.register(type(name, (Model,), namespace), bucket=bucket, timeout=timeout)

    def get_model(self, name: str) -> type[Model]:
        """See :meth:`natskv.Client.get_model`."""
        try:
            return self._models[name]
        except KeyError:
            raise InvalidArgumentError(
                f"no model {name!r} is registered; registered: {sorted(self._models) or 'none'}"
            ) from None

    def on(self, pattern: str, callback: Callable[[ModelEvent], None]) -> Callable[[], None]:
        """See :meth:`natskv.Client.on`."""
        return self._events.on(pattern, callback)

    def transaction(self, timeout: float | None = None) -> Transaction:
        """See :meth:`natskv.Client.transaction`."""
        return Transaction(self.client, timeout)

    def run_transaction(self, fn: Callable[[Transaction], T], retries: int = 5, timeout: float | None = None) -> T:
        """See :meth:`natskv.Client.run_transaction`."""
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(f"retries must be an int >= 0, not {retries!r}")
        for _ in range(retries):
            try:
                with self.transaction(timeout) as tx:
                    return fn(tx)
            except RevisionMismatchError:
                continue
        with self.transaction(timeout) as tx:  # the last try: its conflict is raised
            return fn(tx)

    def bucket_names(self) -> set[str]:
        """The buckets of the registered models (a bucket manager never closes them)."""
        return {model._store.bucket.name for model in list(self._models.values()) if model._store is not None}

    def forget_bucket(self, bucket: str) -> None:
        """Unregister the models stored in ``bucket`` (``delete_bucket`` deleted it)."""
        for model_name, model in list(self._models.items()):
            if model._store is not None and model._store.bucket.name == bucket:
                model._store = None
                del self._models[model_name]

    def close(self) -> None:
        """Stop the event dispatcher (the client is closing), waiting up to the client's default
        timeout for a handler that is running."""
        self._events.stop(self.client.options.request_timeout)


__all__ = ["ModelRegistry"]
