"""Ops, request and response shapes of the dcache wire protocol.

A request is the msgpack array ``[op, request_id, *args]`` and a response is
``[request_id, status, result]`` (docs/PROTOCOL.md is normative). ``Op`` and
``Status`` values are stable wire numbers.

``Request``/``Response`` are convenience views for tools and tests; the
servers' hot paths work on the decoded lists directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from ..errors import Status

__all__ = [
    "PROTOCOL_VERSION",
    "Op",
    "Status",
    "SetFlag",
    "OP_ARITY",
    "Request",
    "Response",
    "CONNECTION_REQUEST_ID",
]

#: The protocol version a client announces in HELLO.
PROTOCOL_VERSION = 1

#: Request id used in error frames that answer no particular request.
CONNECTION_REQUEST_ID = 0


class Op(IntEnum):
    """Operation codes (the first element of every request)."""

    HELLO = 1
    PING = 2
    GET = 3
    SET = 4
    DELETE = 5
    MGET = 6
    MSET = 7
    EXISTS = 8
    EXPIRE = 9
    TTL = 10
    INCR = 11
    DECR = 12
    TOUCH = 13
    STATS = 14
    # cluster ops (aux nodes; versioned reads/writes, imports, range scans)
    GETV = 32
    MGETV = 33
    SETV = 34
    DELV = 35
    INCRV = 36
    APPLY = 37
    APPLY_DELETES = 38
    SCAN = 39
    DROP = 40
    RANGE_COUNT = 41
    # master ops (cluster membership and views)
    RING = 48
    JOIN = 49
    LEAVE = 50
    SYNC = 51


class SetFlag(IntEnum):
    """Condition flags of SET and MSET."""

    NONE = 0
    NX = 1  #: only if the key does not exist
    XX = 2  #: only if the key exists


#: (least, most) number of arguments after the request id, per op.
OP_ARITY: dict[int, tuple[int, int]] = {
    Op.HELLO: (1, 3),
    Op.PING: (0, 0),
    Op.GET: (1, 1),
    Op.SET: (2, 4),
    Op.DELETE: (1, 1),
    Op.MGET: (1, 1),
    Op.MSET: (1, 2),
    Op.EXISTS: (1, 1),
    Op.EXPIRE: (2, 2),
    Op.TTL: (1, 1),
    Op.INCR: (1, 2),
    Op.DECR: (1, 2),
    Op.TOUCH: (1, 1),
    Op.STATS: (0, 0),
    Op.GETV: (1, 1),
    Op.MGETV: (1, 1),
    Op.SETV: (5, 5),
    Op.DELV: (2, 2),
    Op.INCRV: (3, 3),
    Op.APPLY: (1, 1),
    Op.APPLY_DELETES: (1, 1),
    Op.SCAN: (4, 4),
    Op.DROP: (2, 2),
    Op.RANGE_COUNT: (1, 1),
    Op.RING: (0, 0),
    Op.JOIN: (3, 5),
    Op.LEAVE: (1, 1),
    Op.SYNC: (3, 4),
}


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded request: ``op``, ``request_id`` and positional ``args``."""

    op: int
    request_id: int
    args: tuple[Any, ...] = ()

    def to_wire(self) -> list[Any]:
        """The msgpack array this request is sent as."""
        return [self.op, self.request_id, *self.args]

    @classmethod
    def from_wire(cls, msg: Any) -> Request:
        """Parse a decoded array; raises ``ValueError`` if it is not a request."""
        if type(msg) is not list or len(msg) < 2 or type(msg[0]) is not int or type(msg[1]) is not int:
            raise ValueError("a request is an array [op:int, request_id:int, *args]")
        return cls(msg[0], msg[1], tuple(msg[2:]))


@dataclass(frozen=True, slots=True)
class Response:
    """A decoded response: ``request_id``, ``status`` and ``result``.

    For errors ``result`` is the server's message (a string).
    """

    request_id: int
    status: int
    result: Any = None

    @property
    def ok(self) -> bool:
        """Whether the status is ``OK``."""
        return self.status == Status.OK

    def to_wire(self) -> list[Any]:
        """The msgpack array this response is sent as."""
        return [self.request_id, self.status, self.result]

    @classmethod
    def from_wire(cls, msg: Any) -> Response:
        """Parse a decoded array; raises ``ValueError`` if it is not a response."""
        if type(msg) is not list or len(msg) != 3 or type(msg[0]) is not int or type(msg[1]) is not int:
            raise ValueError("a response is an array [request_id:int, status:int, result]")
        return cls(msg[0], msg[1], msg[2])
