"""Op codes, statuses and flags of the dcache wire protocol.

A request is the msgpack array ``[op, request_id, *args]`` and a response is
``[request_id, status, result]`` (docs/PROTOCOL.md is normative). ``Op`` and
``Status`` values are stable wire numbers. What each op takes, and the
credential it needs, is the op table in ``dcache.protocol.ops``.
"""

from __future__ import annotations

from enum import IntEnum

from ..errors import Status

__all__ = [
    "PROTOCOL_VERSION",
    "Op",
    "Status",
    "SetFlag",
    "CONNECTION_REQUEST_ID",
    "PUSH_ID",
    "Push",
    "CHANGING_OPS",
]

#: The protocol version a client announces in HELLO.
PROTOCOL_VERSION = 1

#: Request id used in error frames that answer no particular request.
CONNECTION_REQUEST_ID = 0

#: The request id of a frame a node sends unasked (``[PUSH_ID, kind, payload]``, see ``Push``).
PUSH_ID = -1


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
    PERSIST = 15
    HOTKEYS = 16
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
    MSETV = 42
    INVACK = 43
    BIND = 44
    #: the ring epoch a master's connection routes by, and the oldest one the node accepts writes from
    EPOCH = 45
    # master ops (cluster membership and views)
    RING = 48
    JOIN = 49
    LEAVE = 50
    SYNC = 51
    FENCE = 52
    # every node: proving the cluster secret (after HELLO)
    AUTH = 53
    # master op: remove a dead aux node from the membership
    FORGET = 54


class Push(IntEnum):
    """Kinds of unasked frames ``[PUSH_ID, kind, payload]`` (docs/PROTOCOL.md "Near-cache tracking")."""

    #: ``[seq, [[key, version], ...]]``: the keys changed (``version``: the
    #: entry's new version, or ``INT64_MAX`` when it left); the subscriber
    #: answers with ``INVACK seq`` once it dropped its copies. To a
    #: connection that subscribed for values (GETV track ``2``), a write of a
    #: value up to ``limits.PUSH_VALUE_MAX_BYTES`` is the entry ``[key,
    #: version, value, expires_at]`` instead: the subscription stays, the
    #: copy takes the value, and ``INVACK [seq, keys]`` names the keys it no
    #: longer holds a copy of (their subscriptions end).
    INVALIDATE = 1


class SetFlag(IntEnum):
    """Condition flags of SET and MSET, and of a master's SETV and MSETV entries."""

    NONE = 0
    NX = 1  #: only if the key does not exist
    XX = 2  #: only if the key exists
    #: SETV and MSETV only, to an aux node that lists ``"keep-copy"`` in its
    #: HELLO ``features``: store as without flags, and the sending connection,
    #: which keeps a near-cache copy of the value it writes, is not pushed an
    #: invalidation for this change and stays subscribed to the key
    #: (docs/PROTOCOL.md "Near-cache tracking").
    KEEP_COPY = 4


#: What an aux node that keeps a writer's subscription (``SetFlag.KEEP_COPY``) lists in its HELLO ``features``.
FEATURE_KEEP_COPY = "keep-copy"
#: What an aux node that pushes written values to the copies that asked (GETV track ``2``) lists in its HELLO ``features``.
FEATURE_VALUE_PUSH = "value-push"


#: The ops that may change a key. An aux node may hold the answer of one
#: that changed a key a near cache holds a copy of, until the copy is gone
#: (at most ``limits.INVALIDATION_TIMEOUT_S``, docs/PROTOCOL.md "Near-cache
#: tracking"): a master waits that much longer for their answers.
CHANGING_OPS: frozenset[int] = frozenset(
    int(op)
    for op in (
        Op.SET,
        Op.DELETE,
        Op.MSET,
        Op.EXPIRE,
        Op.INCR,
        Op.DECR,
        Op.PERSIST,
        Op.SETV,
        Op.DELV,
        Op.INCRV,
        Op.APPLY,
        Op.APPLY_DELETES,
        Op.DROP,
        Op.MSETV,
    )
)
