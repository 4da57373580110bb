"""Every bound the wire protocol enforces, in one place (sans-IO).

``Limits`` is what a server's parsers (``dcache.protocol.ops``) check each
request against, and what a client uses to refuse an oversized key before
sending it. The module-level constants are the fixed bounds of the protocol
itself (integer widths, the longest TTL) and the defaults of the
configurable ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..hlc import DEFAULT_MAX_SKEW_MS, version_ceiling, wall_ms
from ..widths import INT64_MAX, INT64_MIN, UINT64_MAX

__all__ = [
    "INT64_MIN",
    "INT64_MAX",
    "UINT64_MAX",
    "MAX_TTL_MS",
    "MAX_FRAME_BYTES",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "MAX_BATCH_KEYS",
    "MAX_HELLO_FRAME_BYTES",
    "MAX_ARRAY_ITEMS",
    "MAX_RANGES",
    "MAX_NAME_CHARS",
    "MAX_HOT_KEYS",
    "MAX_MATCH_PATTERN_BYTES",
    "MAX_MATCH_STEPS",
    "MAX_CONFIG_PATTERNS",
    "MAX_CONFIG_PATTERN_BYTES",
    "MAX_WEIGHT",
    "NEAR_LEASE_S",
    "INVALIDATION_TIMEOUT_S",
    "PUSH_VALUE_MAX_BYTES",
    "RING_WAIT_S",
    "MAX_RING_WAITERS",
    "MAX_LINK_WAITERS",
    "KEYS_PER_TURN",
    "Limits",
]

#: Longest TTL a request may carry: a hundred years, in milliseconds.
MAX_TTL_MS = 100 * 365 * 24 * 3600 * 1000
#: Default largest frame body a peer may send (32 MiB).
MAX_FRAME_BYTES = 32 * 1024 * 1024
#: Default largest key (bytes after UTF-8 encoding).
MAX_KEY_BYTES = 1024
#: Default largest value.
MAX_VALUE_BYTES = 8 * 1024 * 1024
#: Default most keys (or entries) in one request: MGET, MSET, MGETV, APPLY, APPLY_DELETES.
MAX_BATCH_KEYS = 10_000
#: Largest frame a node with an auth token accepts before HELLO succeeded (a HELLO fits easily).
MAX_HELLO_FRAME_BYTES = 4096
#: Most items in any one array or map of a frame (the decoder refuses more before building them):
#: room for the largest batch and for every range list a ring moves (a node of a 1000-node ring
#: owns 2048 points per unit of weight).
MAX_ARRAY_ITEMS = 100_000
#: Most hash ranges in one SCAN, DROP or RANGE_COUNT.
MAX_RANGES = MAX_ARRAY_ITEMS
#: Longest node id, host name or client name accepted.
MAX_NAME_CHARS = 255
#: Most keys one HOTKEYS answer lists.
MAX_HOT_KEYS = 100
#: Longest SCAN MATCH pattern over RESP (compiling one costs Python work per byte; a key is at most
#: ``max_key_bytes``, 1 KiB by default, so a longer pattern only wastes it).
MAX_MATCH_PATTERN_BYTES = 16 * 1024
#: Most byte steps one RESP SCAN call may spend matching its page against MATCH: the page asked
#: of a node shrinks to what the pattern's worst case on a key of ``max_key_bytes`` allows
#: (``dcache.protocol.resp.scan_page_count``). About 35 ms of matching on a busy 2-core machine
#: (4 ns a step); without it one SCAN held a node's loop 24 s (docs/DECISIONS.md).
MAX_MATCH_STEPS = 1 << 23
#: CONFIG GET's most patterns and longest pattern over RESP: a client asks for a few of the nine
#: parameters dcache reports, and each pattern is compiled (unbounded, 1 MB of patterns kept a
#: node's loop busy for seconds).
MAX_CONFIG_PATTERNS = 64
MAX_CONFIG_PATTERN_BYTES = 128
#: Largest ring weight of an aux node (JOIN, ``--weight``): 2048 ring points per unit of weight.
MAX_WEIGHT = 1000.0
#: A master answers from a near-cache copy only while the aux node it
#: subscribed on has answered it within this many seconds on the tracking
#: connection (its lease; docs/PROTOCOL.md "Near-cache tracking").
NEAR_LEASE_S = 1.0
#: Most seconds an aux node holds a write's answer waiting for a subscriber's
#: INVACK; past it the subscriber is cut off. Longer than ``NEAR_LEASE_S``
#: (with margin), so a silent master's copies have expired by then.
INVALIDATION_TIMEOUT_S = 2.0 * NEAR_LEASE_S
#: Largest value an aux node pushes to the near-cache copies subscribed for
#: values (GETV track ``2``) when it is written; a larger one is pushed as an
#: invalidation (its copies are dropped and filled again by a read).
PUSH_VALUE_MAX_BYTES = 16 * 1024
#: Most seconds a master that has had no ring since it started holds a data
#: request for one (a restarted coordinator until a follower hands it the
#: ring); past it the request is answered ``UNAVAILABLE``. Below the
#: client's default 5 s timeout, so the client sees that answer, not its own
#: timeout (docs/DECISIONS.md, "A master holds data requests until its first ring").
RING_WAIT_S = 3.0
#: Most data requests a master holds for its first ring at once, over all its
#: connections; their bytes stay below ``--max-input-buffer`` too. Past
#: either, a request is answered ``UNAVAILABLE`` at once.
MAX_RING_WAITERS = 10_000
#: Most requests a master's link to one aux node holds while its first
#: connection opens (HELLO, then BIND: a few ms after the node joined); each
#: waits at most the link's ``--aux-timeout``. Past it, a request is answered
#: ``UNAVAILABLE`` at once, as before a link waited (docs/DECISIONS.md,
#: "A new link holds requests while it opens").
MAX_LINK_WAITERS = 10_000
#: Keys of one multi-key request a node serves per loop iteration: a master routes a larger
#: MGET or MSET, an aux node looks up a larger MGET, a slice per iteration (the client's later
#: requests wait, ``FrameProtocol.hold_input``), so the node serves its other clients between
#: slices. 10,000 keys in one go held a master's loop 125 ms for an MGET, 184 ms for an MSET
#: of 3 KiB values (docs/BENCHMARKS.md).
KEYS_PER_TURN = 512


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds a node enforces on every request.

    Attributes:
        max_frame_bytes: largest frame body.
        max_key_bytes: largest key.
        max_value_bytes: largest value.
        max_batch_keys: most keys or entries in one request (``TOO_MANY_KEYS`` above).
        max_clock_skew_ms: how far ahead of this node's wall clock a version
            from outside may be (``CLOCK_SKEW`` beyond).
        clock: wall-clock milliseconds (tests pass a fake one).

    Raises:
        ValueError: a bound is not positive, or the frame limit leaves no
            room for a maximal key and value.
    """

    max_frame_bytes: int = MAX_FRAME_BYTES
    max_key_bytes: int = MAX_KEY_BYTES
    max_value_bytes: int = MAX_VALUE_BYTES
    max_batch_keys: int = MAX_BATCH_KEYS
    max_clock_skew_ms: int = DEFAULT_MAX_SKEW_MS
    clock: Callable[[], int] = field(default=wall_ms, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_key_bytes", "max_value_bytes", "max_batch_keys"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_clock_skew_ms < 0:
            raise ValueError("max_clock_skew_ms must be >= 0")
        if self.max_key_bytes + self.max_value_bytes + 64 > self.max_frame_bytes:
            raise ValueError("max_frame_bytes must exceed max_key_bytes + max_value_bytes + 64")

    def version_ceiling(self) -> int:
        """The largest version acceptable from outside right now."""
        return version_ceiling(self.clock(), self.max_clock_skew_ms)
