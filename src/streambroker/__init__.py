"""streambroker: durable events on Redis Streams with consumer groups.

Register pools and streams in a :class:`Registry` (or YAML), validate it, make a
:class:`Broker`, publish events and consume them with named consumers of groups.
"""

from ._face import ConsumerSettings
from .apps.worker import AsyncWorker, Worker
from .async_broker import AsyncBatch, AsyncBroker, AsyncConsumer, AsyncHandler
from .broker import Batch, Broker, Consumer, Handler
from .config.registry import PoolSpec, Registry, StreamSpec, ValidatedRegistry
from .core.deadletters import DeadLetter
from .core.stats import ConsumerStats, GroupStats, StreamStats
from .errors import (
    BrokerError,
    ConfigError,
    ConsumerBusyError,
    DecodeError,
    EmbeddedServerError,
    EncodeError,
    EntryTooLargeError,
    InvalidArgumentError,
    LeaseLostError,
    OutOfMemoryError,
    PayloadError,
    PayloadTooLargeError,
    PoolAuthenticationError,
    PoolConnectionError,
    PoolError,
    PoolPermissionError,
    ReplicationError,
    ServerReplyError,
    UnknownGroupError,
    UnknownStreamError,
)
from .io.embedded import EmbeddedServer
from .wire.codecs import Codec
from .wire.events import Event

__version__ = "0.1.0"

__all__ = [
    "AsyncBatch",
    "AsyncBroker",
    "AsyncConsumer",
    "AsyncHandler",
    "AsyncWorker",
    "Batch",
    "Broker",
    "BrokerError",
    "Codec",
    "ConfigError",
    "Consumer",
    "ConsumerBusyError",
    "ConsumerSettings",
    "ConsumerStats",
    "DeadLetter",
    "DecodeError",
    "EmbeddedServer",
    "EmbeddedServerError",
    "EncodeError",
    "EntryTooLargeError",
    "Event",
    "GroupStats",
    "Handler",
    "InvalidArgumentError",
    "LeaseLostError",
    "OutOfMemoryError",
    "PayloadError",
    "PayloadTooLargeError",
    "PoolAuthenticationError",
    "PoolConnectionError",
    "PoolError",
    "PoolPermissionError",
    "PoolSpec",
    "Registry",
    "ReplicationError",
    "ServerReplyError",
    "StreamSpec",
    "StreamStats",
    "UnknownGroupError",
    "UnknownStreamError",
    "ValidatedRegistry",
    "Worker",
    "__version__",
]
