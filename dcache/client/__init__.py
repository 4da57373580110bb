"""The dcache Python client: asyncio ``Client``, blocking ``SyncClient``, and their parts.

``Client`` and ``SyncClient`` are what applications use, with their options
in one ``ClientConfig``; ``NodePool``,
``ClientConnection`` and ``open_connection`` are the layers beneath them, for
tools and for the master's connections to aux nodes.
"""

from .client import MAX_TTL_S, Client, Key, Pairs, Value, create_client
from .config import ClientConfig
from .connection import ClientConnection, open_connection
from .pool import AcquireContext, NodePool, PoolConnection
from .sync import SyncClient

__all__ = [
    "MAX_TTL_S",
    "AcquireContext",
    "Client",
    "ClientConfig",
    "ClientConnection",
    "Key",
    "NodePool",
    "Pairs",
    "PoolConnection",
    "SyncClient",
    "Value",
    "create_client",
    "open_connection",
]
