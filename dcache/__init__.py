"""dcache: a distributed in-memory cache.

The public API is the client (``Client``, ``SyncClient``, ``create_client``)
and the exception tree in ``dcache.errors``. The roles (aux, master, http)
are started with the ``dcache`` command.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    AuthError,
    BadArgumentsError,
    ClientError,
    ConfigError,
    DCacheError,
    InvalidArgumentError,
    KeyTooLargeError,
    NoAvailableNodeError,
    NotAnIntegerError,
    ProtocolError,
    ServerError,
    ValueTooLargeError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .client import Client, SyncClient, create_client

_LAZY = {"Client", "SyncClient", "create_client"}


def __getattr__(name: str) -> Any:
    # The client is imported on first use, so daemons that never use it
    # (and tools that only need the errors) do not pay for it.
    if name in _LAZY:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'dcache' has no attribute {name!r}")


__all__ = [
    "AuthError",
    "BadArgumentsError",
    "Client",
    "ClientError",
    "ConfigError",
    "DCacheError",
    "InvalidArgumentError",
    "KeyTooLargeError",
    "NoAvailableNodeError",
    "NotAnIntegerError",
    "ProtocolError",
    "ServerError",
    "SyncClient",
    "ValueTooLargeError",
    "__version__",
    "create_client",
]
