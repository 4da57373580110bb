"""The dcache exception tree and the registry of wire error codes.

Every error that can cross the wire has a stable integer code (``Status``).
``ServerError`` subclasses register themselves by code, so a client turns an
error response back into the same exception class the server raised
(``error_from_status``). Registering a code twice is a programming error and
fails at import time.

Timeouts raise the builtin ``TimeoutError``; a cache miss is ``None``, never
an exception.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar

__all__ = [
    "Status",
    "DCacheError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ForeignProtocolError",
    "ConfigError",
    "ClientError",
    "InvalidArgumentError",
    "NoAvailableNodeError",
    "PoolClosedError",
    "ServerError",
    "RemoteProtocolErrorResponse",
    "UnknownOpError",
    "BadArgumentsError",
    "KeyTooLargeError",
    "ValueTooLargeError",
    "FrameTooLargeError",
    "AuthError",
    "HandshakeError",
    "NotAnIntegerError",
    "OutOfMemoryError",
    "InternalServerError",
    "UnavailableError",
    "UpstreamTimeoutError",
    "ClockSkewError",
    "SupersededError",
    "TooManyKeysError",
    "OverloadedError",
    "WrongClusterError",
    "MembershipError",
    "StaleRingError",
    "error_from_status",
]


class Status(IntEnum):
    """Response status codes; 0 is success, everything else is an error.

    The numbers are part of the protocol (docs/PROTOCOL.md) and never change.
    """

    OK = 0
    PROTOCOL_ERROR = 1
    UNKNOWN_OP = 2
    BAD_ARGUMENTS = 3
    KEY_TOO_LARGE = 4
    VALUE_TOO_LARGE = 5
    FRAME_TOO_LARGE = 6
    AUTH_FAILED = 7
    HANDSHAKE = 8
    NOT_AN_INTEGER = 9
    OUT_OF_MEMORY = 10
    INTERNAL = 11
    UNAVAILABLE = 12
    UPSTREAM_TIMEOUT = 13
    CLOCK_SKEW = 14
    SUPERSEDED = 15
    TOO_MANY_KEYS = 16
    OVERLOADED = 17
    WRONG_CLUSTER = 18
    MEMBERSHIP = 19
    STALE_RING = 20


class DCacheError(Exception):
    """Root of every exception dcache raises on purpose."""


class ProtocolError(DCacheError):
    """Bytes that do not follow the wire protocol; the connection must close.

    ``status`` is the wire code the server reports in its last error frame
    (``PROTOCOL_ERROR``, or ``FRAME_TOO_LARGE`` for an oversized frame).
    """

    def __init__(self, message: str, *, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol cannot carry (our bug or bad input)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that do not follow the protocol."""


class ForeignProtocolError(RemoteProtocolError):
    """The server answered in another protocol (HTTP, RESP): the address is not a dcache native-protocol port.

    ``protocol`` is ``"HTTP"`` or ``"RESP"``; the message says which kind of
    port it probably is and which one to use instead.
    """

    def __init__(self, message: str, *, protocol: str) -> None:
        super().__init__(message)
        self.protocol = protocol


class ConfigError(DCacheError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ClientError(DCacheError):
    """A client-side failure that is not a server's answer."""


class InvalidArgumentError(ClientError, ValueError):
    """The client refused a call before sending it: a bad key, value, TTL or option, or one over the client's ``limits``.

    Nothing was sent; a server never raises it (a server's refusal is a
    ``ServerError``: ``BadArgumentsError``, ``KeyTooLargeError``...). It is a
    ``ValueError`` too, so ``except ValueError`` catches it. Before 0.1.0 the
    client raised the server's classes for these local checks.
    """


class NoAvailableNodeError(ClientError):
    """No endpoint could be reached (all connection attempts failed)."""


class PoolClosedError(ClientError):
    """The client or pool was closed while (or before) the call was made."""


_REGISTRY: dict[int, type[ServerError]] = {}


class ServerError(DCacheError):
    """An error response from a dcache server.

    Subclasses set ``status`` and are registered by it; ``message`` is the
    server's human-readable explanation.
    """

    status: ClassVar[Status] = Status.INTERNAL

    def __init__(self, message: str = "", *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = int(self.status) if code is None else code

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        code = int(cls.__dict__.get("status", -1))
        if code < 0:
            return
        if code in _REGISTRY:
            raise RuntimeError(f"status code {code} registered twice ({_REGISTRY[code].__name__}, {cls.__name__})")
        _REGISTRY[code] = cls


class RemoteProtocolErrorResponse(ServerError):
    """The server could not decode what we sent and closed the connection."""

    status = Status.PROTOCOL_ERROR


class UnknownOpError(ServerError):
    """The op code is not one the server knows."""

    status = Status.UNKNOWN_OP


class BadArgumentsError(ServerError):
    """Wrong number or types of arguments for an op."""

    status = Status.BAD_ARGUMENTS


class KeyTooLargeError(ServerError):
    """The key is longer than the server's ``max_key_bytes``."""

    status = Status.KEY_TOO_LARGE


class ValueTooLargeError(ServerError):
    """The value is longer than the server's ``max_value_bytes``."""

    status = Status.VALUE_TOO_LARGE


class FrameTooLargeError(ServerError):
    """A frame exceeded the server's ``max_frame_bytes``; the connection closes."""

    status = Status.FRAME_TOO_LARGE


class AuthError(ServerError):
    """Authentication is required, or the token given in HELLO is wrong."""

    status = Status.AUTH_FAILED


class HandshakeError(ServerError):
    """HELLO was malformed or asked for a protocol version the server lacks."""

    status = Status.HANDSHAKE


class NotAnIntegerError(ServerError):
    """INCR/DECR on a value that is not a signed 64-bit decimal, or overflow."""

    status = Status.NOT_AN_INTEGER


class OutOfMemoryError(ServerError):
    """The entry alone is larger than the node's memory budget."""

    status = Status.OUT_OF_MEMORY


class InternalServerError(ServerError):
    """The server failed while handling the request (a bug); it keeps serving."""

    status = Status.INTERNAL


class UnavailableError(ServerError):
    """No node that owns the key is reachable right now (cluster)."""

    status = Status.UNAVAILABLE


class UpstreamTimeoutError(ServerError):
    """A master timed out waiting for the aux node that owns the key."""

    status = Status.UPSTREAM_TIMEOUT


class ClockSkewError(ServerError):
    """A version from another node is further ahead of this node's clock than ``--max-clock-skew``.

    Nothing of the request was applied. A version that far ahead would push
    this node's hybrid clock into the future (every later write would carry
    it), so it is refused and counted instead.
    """

    status = Status.CLOCK_SKEW


class SupersededError(ServerError):
    """A write did not take effect: an owner of the key holds a newer version.

    A master first moves its clock past the version it learns and sends the
    write again; this error means a newer write (a concurrent one) still won.
    """

    status = Status.SUPERSEDED


class TooManyKeysError(ServerError):
    """More keys (or entries) in one request than the server's ``--max-batch-keys``; split the request."""

    status = Status.TOO_MANY_KEYS


class OverloadedError(ServerError):
    """The node is at its connection limit or its input-buffer cap; it closes the connection. Try again later."""

    status = Status.OVERLOADED


class WrongClusterError(ServerError):
    """An aux node bound to one cluster refused a master of another (BIND).

    The node records the cluster that first drives it (in its data dir) and
    serves no other: two clusters moving and dropping the same node's keys
    lose data. The message names the cluster the node belongs to.
    """

    status = Status.WRONG_CLUSTER


class MembershipError(ServerError):
    """A master refused a membership change (FORGET, LEAVE) as the cluster stands; nothing changed.

    The message says why and what to do: the node is unknown, up or
    leaving (remove a live node with SIGTERM); a migration runs (wait until
    the ring is stable); forgetting it would lose keys with no other copy
    (FORGET with ``force``); a down node cannot LEAVE (FORGET it).
    """

    status = Status.MEMBERSHIP


class StaleRingError(UnavailableError):
    """An aux node refused a request a master routed by a ring older than the oldest it serves (EPOCH); nothing was applied or read.

    The leader (the coordinator) raises that floor on every node before a
    migration copies, so a master that was paused or cut off while the
    ring changed can neither write by its old ring where the copy would
    miss it nor read old owners that miss what was written since.
    The master reads the ring again: send the request again. It is an
    ``UnavailableError``, so code that sends again on ``UNAVAILABLE``
    handles it as it is.
    """

    status = Status.STALE_RING


def error_from_status(status: int, message: str) -> ServerError:
    """Build the registered ``ServerError`` subclass for a wire status code.

    Unknown codes (a newer server) become a plain ``ServerError``.
    """
    cls = _REGISTRY.get(status)
    if cls is None:
        return ServerError(message, code=status)
    return cls(message)
