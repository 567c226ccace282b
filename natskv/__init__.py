"""natskv: a blocking, thread-safe, fork-safe Python driver for NATS JetStream Key-Value.

    import natskv
    db = natskv.connect()                     # embedded nats-server for development
    kv = db.bucket("sessions")
    rev = kv.set("user:42", {"name": "Ann"})
    kv.get("user:42")

See README.md for the full tour.
"""

from typing import TYPE_CHECKING, Any

from natskv._speedups import __impl__
from natskv.config import ConnectOptions
from natskv.errors import (
    AuthenticationError,
    BackupError,
    BatchError,
    BucketNotFoundError,
    ConfigurationError,
    DeadlockError,
    FeatureNotSupportedError,
    InvalidArgumentError,
    InvalidBucketNameError,
    InvalidKeyError,
    JetStreamError,
    KeyExistsError,
    KeyNotFoundError,
    LockNotOwnedError,
    NatsKVError,
    NatsKVTimeoutError,
    NoRespondersError,
    NotConnectedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RevisionMismatchError,
    SerializationError,
    ServerError,
    ServiceError,
    SlowConsumerError,
    UniqueConstraintError,
    ValidationError,
)
from natskv.server import EmbeddedServer

if TYPE_CHECKING:
    from natskv._version import __version__
    from natskv.client import Client, connect
    from natskv.codec import BytesCodec, Codec, JSONCodec, StrCodec
    from natskv.counter import Counter
    from natskv.kv import Bucket, BucketStatus, Entry
    from natskv.lock import Lock
    from natskv.models.fields import Field
    from natskv.models.model import Model, Page
    from natskv.models.transaction import Transaction
    from natskv.ops import Create, Delete, Set, Update
    from natskv.pubsub import Message, PubAck, StreamInfo, Subscription
    from natskv.replica import LocalReplica
    from natskv.watch import Change, Watcher

# These pull in nats-py and asyncio (~150 ms): loaded on first use, so `natskv --help` and
# `natskv server` start fast.
_LAZY = {
    "Client": "natskv.client",
    "connect": "natskv.client",
    "BytesCodec": "natskv.codec",
    "Codec": "natskv.codec",
    "JSONCodec": "natskv.codec",
    "StrCodec": "natskv.codec",
    "Bucket": "natskv.kv",
    "BucketStatus": "natskv.kv",
    "Entry": "natskv.kv",
    "Counter": "natskv.counter",
    "Lock": "natskv.lock",
    "Change": "natskv.watch",
    "LocalReplica": "natskv.replica",
    "Model": "natskv.models.model",
    "Page": "natskv.models.model",
    "Transaction": "natskv.models.transaction",
    "Field": "natskv.models.fields",
    "Watcher": "natskv.watch",
    "Message": "natskv.pubsub",
    "PubAck": "natskv.pubsub",
    "StreamInfo": "natskv.pubsub",
    "Subscription": "natskv.pubsub",
    "Set": "natskv.ops",
    "Create": "natskv.ops",
    "Update": "natskv.ops",
    "Delete": "natskv.ops",
    "__version__": "natskv._version",  # read from the package metadata, written in pyproject.toml
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'natskv' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AuthenticationError",
    "BackupError",
    "BatchError",
    "Bucket",
    "BucketNotFoundError",
    "BucketStatus",
    "BytesCodec",
    "Change",
    "Client",
    "Codec",
    "ConfigurationError",
    "ConnectOptions",
    "Counter",
    "Create",
    "DeadlockError",
    "Delete",
    "EmbeddedServer",
    "Entry",
    "FeatureNotSupportedError",
    "Field",
    "InvalidArgumentError",
    "InvalidBucketNameError",
    "InvalidKeyError",
    "JSONCodec",
    "JetStreamError",
    "KeyExistsError",
    "KeyNotFoundError",
    "LocalReplica",
    "Lock",
    "LockNotOwnedError",
    "Message",
    "Model",
    "NatsKVError",
    "NatsKVTimeoutError",
    "NoRespondersError",
    "NotConnectedError",
    "Page",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PubAck",
    "RevisionMismatchError",
    "SerializationError",
    "ServerError",
    "ServiceError",
    "Set",
    "SlowConsumerError",
    "StrCodec",
    "StreamInfo",
    "Subscription",
    "Transaction",
    "UniqueConstraintError",
    "Update",
    "ValidationError",
    "Watcher",
    "__impl__",
    "__version__",
    "connect",
]
