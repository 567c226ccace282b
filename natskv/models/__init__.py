"""Models: schema-validated records stored in a NATS Key-Value bucket.

The model layer sits above :class:`natskv.Client` and uses it like any other caller:

- ``fields.py``: :class:`Field`, coercion, validation, the stored JSON form (pure, no I/O);
- ``attributes.py``: Sequelize-style attribute dicts (``db.define``) parsed into Fields;
- ``model.py``: :class:`~natskv.models.model.Model`, its writes and the read calls;
- ``store.py``: what a registered model holds at run time (replica, indexes) and the bucket layout;
- ``planner.py``: how every query is answered (indexes, order, limit); ``query.py``: the query
  language (lookups, ``where=`` dicts, orderings);
- ``live.py``: model watches, live queries and the ``db.on()`` event bus;
- ``transaction.py``: ``db.transaction()``;
- ``registry.py``: the models of one client, behind ``db.register`` and the other delegations.
"""

from natskv.models.fields import Field

__all__ = ["Field"]
