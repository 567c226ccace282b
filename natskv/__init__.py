"""natskv: a blocking, thread-safe, fork-safe Python driver for NATS JetStream Key-Value.

    import natskv
    db = natskv.connect()                     # embedded nats-server for development
    kv = db.bucket("sessions")
    rev = kv.set("user:42", {"name": "Ann"})
    kv.get("user:42")

See README.md for the full tour.
"""

from natskv._speedups import __impl__
from natskv.client import Client, connect
from natskv.codec import BytesCodec, Codec, JSONCodec, StrCodec
from natskv.config import ConnectOptions
from natskv.errors import (
    BatchError,
    BucketNotFoundError,
    ConfigurationError,
    DeadlockError,
    FeatureNotSupportedError,
    InvalidBucketNameError,
    InvalidKeyError,
    JetStreamError,
    KeyExistsError,
    KeyNotFoundError,
    NatsKVError,
    NatsKVTimeoutError,
    NotConnectedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RevisionMismatchError,
    SerializationError,
    ServerError,
    ValidationError,
)
from natskv.kv import Bucket, BucketStatus, Entry
from natskv.server import EmbeddedServer
from natskv.watch import Change, Watcher

__version__ = "0.1.0"

__all__ = [
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
    "DeadlockError",
    "EmbeddedServer",
    "Entry",
    "FeatureNotSupportedError",
    "InvalidBucketNameError",
    "InvalidKeyError",
    "JSONCodec",
    "JetStreamError",
    "KeyExistsError",
    "KeyNotFoundError",
    "NatsKVError",
    "NatsKVTimeoutError",
    "NotConnectedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RevisionMismatchError",
    "SerializationError",
    "ServerError",
    "StrCodec",
    "ValidationError",
    "Watcher",
    "__impl__",
    "__version__",
    "connect",
]
