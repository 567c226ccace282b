"""Models: schema-validated records stored in a NATS Key-Value bucket.

This package starts with the schema layer (:class:`Field`); the model classes build on it.
"""

from natskv.models.fields import Field

__all__ = ["Field"]
