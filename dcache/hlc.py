"""Hybrid logical clock: the version every write carries, and the one wall clock helper.

A version is a 64-bit integer ``(wall_ms << 22) | (counter << 10) | node_tag``:
42 bits of wall-clock milliseconds (enough until the year 2109), a 12-bit
counter for writes within one millisecond, and a 10-bit tag derived from the
issuing node's id, so two nodes never issue the same version. Versions from
one clock strictly increase even if the wall clock steps back.

Comparing versions orders writes by time (last writer wins); ties between
nodes in the same millisecond are broken by counter, then by tag.

Receive rule and skew bound
---------------------------
``observe`` folds in a version seen from elsewhere, so the next version this
clock issues is newer than anything it has seen (a node that received a
write "from the future" makes its own next write win). A version from
outside is a suspect: one further ahead of the local wall clock than the
skew bound (``--max-clock-skew``) is refused by the protocol's parsers
(``version_ceiling``) before it reaches a clock, and ``observe`` itself
ignores it, so no input can push a clock past what it can pack or
poison every later write with a version from the year 2100.
``observe_checked`` is ``observe`` without that second check, for a
handler folding in versions its parser has just checked (MSETV).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "DEFAULT_MAX_SKEW_MS",
    "MAX_VERSION",
    "HybridClock",
    "node_tag",
    "version_ceiling",
    "version_wall_ms",
    "wall_ms",
]

_TAG_BITS = 10
_COUNTER_BITS = 12
_TAG_MASK = (1 << _TAG_BITS) - 1
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1
_LOW_BITS = _TAG_BITS + _COUNTER_BITS
_LOW_MASK = (1 << _LOW_BITS) - 1

#: The largest version that fits the 64-bit field.
MAX_VERSION = (1 << 64) - 1
#: Default bound on how far a received version may be ahead of the local wall clock.
DEFAULT_MAX_SKEW_MS = 5_000


def wall_ms() -> int:
    """Wall-clock time in integer milliseconds (the one clock every module uses)."""
    return time.time_ns() // 1_000_000


def node_tag(node_id: str) -> int:
    """The 10-bit tag a node's versions carry, stable across processes."""
    import xxhash  # here, not at the top: the client imports this module and needs no xxhash

    return xxhash.xxh3_64_intdigest(node_id.encode()) & _TAG_MASK


def version_wall_ms(version: int) -> int:
    """The wall-clock milliseconds a version was issued at."""
    return version >> _LOW_BITS


def version_ceiling(now_ms: int, max_skew_ms: int) -> int:
    """The largest version acceptable from outside at ``now_ms`` with skew bound ``max_skew_ms``."""
    ceiling = ((now_ms + max_skew_ms) << _LOW_BITS) | _LOW_MASK
    return ceiling if ceiling < MAX_VERSION else MAX_VERSION  # not min(): this runs once per parsed write


class HybridClock:
    """Issues strictly increasing versions for one node.

    ``clock`` returns wall-clock milliseconds (tests pass a fake one);
    ``max_skew_ms`` bounds how far ahead of it an observed version may be.
    """

    __slots__ = ("_tag", "_clock", "_ms", "_counter", "_max_skew_ms")

    def __init__(self, node_id: str, clock: Callable[[], int] = wall_ms, max_skew_ms: int = DEFAULT_MAX_SKEW_MS) -> None:
        self._tag = node_tag(node_id)
        self._clock = clock
        self._ms = 0
        self._counter = 0
        self._max_skew_ms = max_skew_ms

    def next(self) -> int:
        """A new version, greater than every version issued or observed."""
        now = self._clock()
        ms = self._ms
        if now > ms:
            self._ms = ms = now
            counter = 0
        else:
            counter = self._counter + 1
            if counter > _COUNTER_MAX:
                self._ms = ms = ms + 1
                counter = 0
        self._counter = counter
        return (ms << _LOW_BITS) | (counter << _TAG_BITS) | self._tag

    def observe(self, version: int) -> bool:
        """Move the clock past ``version`` (the receive rule); return whether it was accepted.

        A version further ahead of the wall clock than the skew bound is
        ignored (``False``): the parsers refuse such versions before they get
        here, so this is the last line of defence, not the check.
        """
        ms = version >> _LOW_BITS
        if ms > self._clock() + self._max_skew_ms:
            return False
        counter = (version >> _TAG_BITS) & _COUNTER_MAX
        if ms > self._ms or (ms == self._ms and counter > self._counter):
            self._ms = ms
            self._counter = counter
        return True

    def observe_checked(self, version: int) -> None:
        """``observe`` of a version a parser has just checked against ``version_ceiling``: no second wall-clock read.

        For a handler's batch of parsed versions (MSETV): the parser read
        the wall clock for its ceiling in the same call, so the skew check
        ``observe`` repeats would pass.
        """
        ms = version >> _LOW_BITS
        if ms >= self._ms:
            counter = (version >> _TAG_BITS) & _COUNTER_MAX
            if ms > self._ms or counter > self._counter:
                self._ms = ms
                self._counter = counter

    @property
    def max_skew_ms(self) -> int:
        """The skew bound: how far ahead of the wall clock an observed version may be."""
        return self._max_skew_ms

    def issued_after(self, version: Any, mine: int) -> bool:
        """Whether ``version`` is newer than ``mine`` (a version of this clock) and carries this clock's tag.

        Such a version was issued by this clock after ``mine`` (versions of one
        clock strictly increase): a later write of the same node, not a
        concurrent one from elsewhere. Two nodes whose ids hash to the same
        tag (about one pair in 1,024) are not told apart.
        """
        return version.__class__ is int and version > mine and version & _TAG_MASK == self._tag

    def ceiling(self) -> int:
        """The largest version this clock accepts from outside right now."""
        return version_ceiling(self._clock(), self._max_skew_ms)
