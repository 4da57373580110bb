"""The dcache Python client: asyncio ``Client``, blocking ``SyncClient``, and their parts.

``Client`` and ``SyncClient`` are what applications use, with their options
in one ``ClientConfig``; ``GetBatcher`` turns many concurrent ``get``s into
few ``mget``s on a ``Client``, and ``SetBatcher`` many ``set``s into few
``mset``s. ``NodePool``, ``ClientConnection`` and
``open_connection`` are the layers beneath, for tools (``dcache dump`` reads
aux nodes with ``open_connection``).
"""

from .batcher import BatchStats, GetBatcher, SetBatcher, Sink
from .client import MAX_TTL_S, Client, Key, Pairs, Value, create_client
from .config import ClientConfig
from .connection import ClientConnection, open_connection
from .pool import AcquireContext, NodePool, PoolConnection
from .sync import SyncClient

__all__ = [
    "MAX_TTL_S",
    "AcquireContext",
    "BatchStats",
    "Client",
    "ClientConfig",
    "ClientConnection",
    "Key",
    "NodePool",
    "Pairs",
    "PoolConnection",
    "Sink",
    "SyncClient",
    "Value",
    "GetBatcher",
    "SetBatcher",
    "create_client",
    "open_connection",
]
