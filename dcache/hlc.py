"""Hybrid logical clock: the version every write carries.

A version is a 64-bit integer ``(wall_ms << 22) | (counter << 10) | node_tag``:
42 bits of wall-clock milliseconds (enough until the year 2109), a 12-bit
counter for writes within one millisecond, and a 10-bit tag derived from the
issuing node's id, so two nodes never issue the same version. Versions from
one clock strictly increase even if the wall clock steps back; ``observe``
folds in a version seen from elsewhere so the clock never issues one older
than what it has seen.

Comparing versions orders writes by time (last writer wins); ties between
nodes in the same millisecond are broken by counter, then by tag.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import xxhash

__all__ = ["HybridClock", "node_tag", "version_wall_ms"]

_TAG_BITS = 10
_COUNTER_BITS = 12
_TAG_MASK = (1 << _TAG_BITS) - 1
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1
_LOW_BITS = _TAG_BITS + _COUNTER_BITS


def node_tag(node_id: str) -> int:
    """The 10-bit tag a node's versions carry, stable across processes."""
    return xxhash.xxh3_64_intdigest(node_id.encode()) & _TAG_MASK


def version_wall_ms(version: int) -> int:
    """The wall-clock milliseconds a version was issued at."""
    return version >> _LOW_BITS


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class HybridClock:
    """Issues strictly increasing versions for one node.

    ``clock`` returns wall-clock milliseconds; tests pass a fake one.
    """

    __slots__ = ("_tag", "_clock", "_ms", "_counter")

    def __init__(self, node_id: str, clock: Callable[[], int] = _wall_ms) -> None:
        self._tag = node_tag(node_id)
        self._clock = clock
        self._ms = 0
        self._counter = 0

    def next(self) -> int:
        """A new version, greater than every version issued or observed."""
        now = self._clock()
        if now > self._ms:
            self._ms = now
            self._counter = 0
        else:
            self._counter += 1
            if self._counter > _COUNTER_MAX:
                self._ms += 1
                self._counter = 0
        return (self._ms << _LOW_BITS) | (self._counter << _TAG_BITS) | self._tag

    def observe(self, version: int) -> None:
        """Move the clock past ``version`` (one received from another node)."""
        ms = version >> _LOW_BITS
        counter = (version >> _TAG_BITS) & _COUNTER_MAX
        if ms > self._ms or (ms == self._ms and counter > self._counter):
            self._ms = ms
            self._counter = counter
