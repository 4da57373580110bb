"""Cluster-facing ops of an aux node: versioned reads and writes, imports, range scans.

These are what masters (routing, replication, repair) and the rebalancer use;
docs/PROTOCOL.md "Cluster ops (aux nodes)" is normative. Every handler is
synchronous like the rest of the aux node's.

Versions come from the caller (a master's hybrid logical clock) and are
stored as given. Imports (``SETV``, ``APPLY``, ``DELV``, ``APPLY_DELETES``) are
last-writer-wins (``LRUCache.apply``/``apply_delete``); ``INCRV`` is a local
write that always applies, like ``INCR``.

Scans never stall the loop: cursor 0 takes a list copy of the keys (and of the
tombstoned keys) as a *session*; each call examines a bounded slice of that
copy, looking every key up live, and returns a cursor
``(session_id << 32) | position``. Sessions idle for ``SCAN_SESSION_TTL_S`` are
dropped, and at most ``MAX_SCAN_SESSIONS`` live at once (the least recently
used is dropped first). A scan that finishes within its first call creates no
session at all.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import BadArgumentsError, NotAnIntegerError, OutOfMemoryError
from ..lru import EntryTooLargeError, IntegerOverflowError, LRUCache
from ..lru import NotAnIntegerError as CacheNotAnIntegerError
from ..protocol import Op, SetFlag, check_key, check_value
from ..protocol.args import parse_entries, parse_expires_at, parse_version
from ..ring import hash64
from ..server import Handler

if TYPE_CHECKING:
    from .node import AuxNode

__all__ = [
    "ClusterOps",
    "compile_ranges",
    "SCAN_SESSION_TTL_S",
    "MAX_SCAN_SESSIONS",
    "SCAN_MIN_WORK",
    "SCAN_WORK_PER_ENTRY",
    "MAX_SCAN_COUNT",
    "DROP_WORK",
]

#: Seconds a scan session survives without being used.
SCAN_SESSION_TTL_S = 60.0
#: Most scan sessions held at once; opening one more drops the least recently used.
MAX_SCAN_SESSIONS = 16
#: A SCAN call examines at most ``max(count * SCAN_WORK_PER_ENTRY, SCAN_MIN_WORK)`` snapshot keys.
SCAN_MIN_WORK = 20_000
SCAN_WORK_PER_ENTRY = 8
#: Larger ``count`` values are clamped to this (bounds the work and the answer).
MAX_SCAN_COUNT = 10_000
#: A DROP call examines at most this many snapshot keys.
DROP_WORK = 20_000

_NX = SetFlag.NX.value
_XX = SetFlag.XX.value
_U64_MAX = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_POS_BITS = 32
_POS_MASK = (1 << _POS_BITS) - 1
_MAX_SESSION_ID = (1 << 32) - 1
# msgpack bytes per scanned item on top of key and value (array and bin headers, two ints).
_ENTRY_WIRE_OVERHEAD = 32
_TOMB_WIRE_OVERHEAD = 16
_SCAN = "SCAN"
_DROP = "DROP"

#: A compiled set of ranges: a predicate on 64-bit hashes, ``None`` for the whole circle.
RangeMatcher = Callable[[int], bool] | None


def _cursor_arg(cursor: Any) -> int:
    if cursor.__class__ is not int or not 0 <= cursor <= _U64_MAX:
        raise BadArgumentsError("cursor must be an integer in 0 .. 2**64-1")
    return int(cursor)


def _check_fits(cache: LRUCache, key: bytes, value: bytes, expires_at: int) -> None:
    size = cache.charge(key, value, expires_at)
    if size > cache.max_bytes:
        raise OutOfMemoryError(f"entry of {size} bytes exceeds the cache budget of {cache.max_bytes} bytes")


def _match_none(h: int) -> bool:
    return False


def compile_ranges(ranges: Any) -> RangeMatcher:
    """Validate ``[[start, end], ...]`` and return a fast membership test on hashes.

    A range is the arc ``(start, end]`` (``dcache.ring.in_range``): start
    exclusive, end inclusive, wrapping through 0 when ``start > end``, the
    whole circle when ``start == end``. The arcs are turned into sorted,
    merged inclusive intervals; one interval is two comparisons, more are a
    ``bisect``. Returns ``None`` when the ranges cover the whole circle.

    Raises:
        BadArgumentsError: not a list of ``[int, int]`` pairs in ``[0, 2**64)``.
    """
    if ranges.__class__ is not list:
        raise BadArgumentsError("ranges must be a list of [start, end] pairs")
    spans: list[tuple[int, int]] = []
    for r in ranges:
        if r.__class__ is not list or len(r) != 2:
            raise BadArgumentsError("ranges must be a list of [start, end] pairs")
        start, end = r
        if start.__class__ is not int or end.__class__ is not int or not (0 <= start <= _U64_MAX and 0 <= end <= _U64_MAX):
            raise BadArgumentsError("range bounds must be integers in 0 .. 2**64-1")
        if start == end:
            return None
        if start < end:
            spans.append((start + 1, end))
        else:
            if start < _U64_MAX:
                spans.append((start + 1, _U64_MAX))
            spans.append((0, end))
    if not spans:
        return _match_none
    spans.sort()
    los: list[int] = []
    his: list[int] = []
    for lo, hi in spans:
        if his and lo <= his[-1] + 1:
            if hi > his[-1]:
                his[-1] = hi
        else:
            los.append(lo)
            his.append(hi)
    if len(los) == 1:
        lo0, hi0 = los[0], his[0]
        if lo0 == 0 and hi0 == _U64_MAX:
            return None

        def match_one(h: int) -> bool:
            return lo0 <= h <= hi0

        return match_one

    def match_many(h: int) -> bool:
        i = bisect_right(los, h) - 1
        return i >= 0 and h <= his[i]

    return match_many


class _Session:
    """A scan in progress: the key lists it walks and when it was last used."""

    __slots__ = ("kind", "keys", "tombs", "last_used")

    def __init__(self, kind: str, keys: list[bytes], tombs: list[bytes], now: float) -> None:
        self.kind = kind
        self.keys = keys
        self.tombs = tombs
        self.last_used = now


class ClusterOps:
    """The cluster-facing handlers of one ``AuxNode`` (see the module docstring).

    ``monotonic`` (seconds) times scan sessions; tests may replace the
    attribute with a fake clock.
    """

    def __init__(self, node: AuxNode, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.monotonic = monotonic
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._next_session_id = 1

    def register(self, handlers: dict[int, Handler]) -> None:
        """Install the handlers in an op -> handler table."""
        handlers[Op.GETV] = self.getv
        handlers[Op.MGETV] = self.mgetv
        handlers[Op.SETV] = self.setv
        handlers[Op.DELV] = self.delv
        handlers[Op.INCRV] = self.incrv
        handlers[Op.APPLY] = self.apply
        handlers[Op.APPLY_DELETES] = self.apply_deletes
        handlers[Op.SCAN] = self.scan
        handlers[Op.DROP] = self.drop
        handlers[Op.RANGE_COUNT] = self.range_count

    # -- versioned reads and writes ----------------------------------------

    def getv(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("GETV takes [key]") from None
        e = self.node.cache.lookup(check_key(key, self.node.limits))
        if e is None:
            return None
        return [e.value, e.expires_at, e.version]

    def mgetv(self, msg: list[Any]) -> Any:
        try:
            _, _, keys = msg
        except ValueError:
            raise BadArgumentsError("MGETV takes [keys]") from None
        if keys.__class__ is not list:
            raise BadArgumentsError("MGETV takes a list of keys")
        limits = self.node.limits
        checked = [check_key(k, limits) for k in keys]
        lookup = self.node.cache.lookup
        out: list[Any] = []
        for key in checked:
            e = lookup(key)
            out.append(None if e is None else [e.value, e.expires_at, e.version])
        return out

    def setv(self, msg: list[Any]) -> Any:
        try:
            _, _, key, value, expires_at, flags, version = msg
        except ValueError:
            raise BadArgumentsError("SETV takes [key, value, expires_at, flags, version]") from None
        limits = self.node.limits
        key = check_key(key, limits)
        value = check_value(value, limits)
        expires_at = parse_expires_at(expires_at)
        if flags.__class__ is not int or flags not in (0, _NX, _XX):
            raise BadArgumentsError("flags must be 0, 1 (NX) or 2 (XX)")
        version = parse_version(version)
        cache = self.node.cache
        _check_fits(cache, key, value, expires_at)
        if flags and (cache.get_entry(key) is not None) == (flags == _NX):
            return 0
        try:
            return 1 if cache.apply(key, value, expires_at=expires_at, version=version) else 2
        except EntryTooLargeError as exc:  # pragma: no cover - _check_fits ran first
            raise OutOfMemoryError(str(exc)) from None

    def delv(self, msg: list[Any]) -> Any:
        try:
            _, _, key, version = msg
        except ValueError:
            raise BadArgumentsError("DELV takes [key, version]") from None
        key = check_key(key, self.node.limits)
        return self.node.cache.apply_delete(key, version=parse_version(version))

    def incrv(self, msg: list[Any]) -> Any:
        try:
            _, _, key, delta, version = msg
        except ValueError:
            raise BadArgumentsError("INCRV takes [key, delta, version]") from None
        key = check_key(key, self.node.limits)
        if delta.__class__ is not int or not _INT64_MIN <= delta <= _INT64_MAX:
            raise BadArgumentsError("delta must be a signed 64-bit integer")
        version = parse_version(version)
        cache = self.node.cache
        try:
            result = cache.incr(key, delta, version=version)
        except CacheNotAnIntegerError:
            raise NotAnIntegerError("value is not a signed 64-bit decimal integer") from None
        except IntegerOverflowError:
            raise NotAnIntegerError("increment would overflow a signed 64-bit integer") from None
        except EntryTooLargeError as exc:
            raise OutOfMemoryError(str(exc)) from None
        e = cache.get_entry(key)
        if e is None:
            # The kept expiry passed between the increment and this read: the
            # entry is gone, so report an expiry in the past (now) to match.
            return [result, max(1, time.time_ns() // 1_000_000)]
        return [result, e.expires_at]

    # -- imports -------------------------------------------------------------

    def apply(self, msg: list[Any]) -> Any:
        items = parse_entries(msg, self.node.limits)
        cache = self.node.cache
        for key, value, expires_at, _ in items:
            _check_fits(cache, key, value, expires_at)
        apply = cache.apply
        applied = 0
        for key, value, expires_at, version in items:
            if apply(key, value, expires_at=expires_at, version=version):
                applied += 1
        return applied

    def apply_deletes(self, msg: list[Any]) -> Any:
        try:
            _, _, deletes = msg
        except ValueError:
            raise BadArgumentsError("APPLY_DELETES takes [deletes]") from None
        if deletes.__class__ is not list:
            raise BadArgumentsError("APPLY_DELETES takes a list of [key, version] pairs")
        limits = self.node.limits
        items: list[tuple[bytes, int]] = []
        for item in deletes:
            if item.__class__ is not list or len(item) != 2:
                raise BadArgumentsError("APPLY_DELETES takes a list of [key, version] pairs")
            items.append((check_key(item[0], limits), parse_version(item[1])))
        apply_delete = self.node.cache.apply_delete
        removed = 0
        for key, version in items:
            if apply_delete(key, version=version):
                removed += 1
        return removed

    # -- range scans ----------------------------------------------------------

    def scan(self, msg: list[Any]) -> Any:
        try:
            _, _, ranges, cursor, count, min_version = msg
        except ValueError:
            raise BadArgumentsError("SCAN takes [ranges, cursor, count, min_version]") from None
        match = compile_ranges(ranges)
        cursor = _cursor_arg(cursor)
        if count.__class__ is not int or count < 1:
            raise BadArgumentsError("count must be a positive integer")
        if min_version.__class__ is not int or not 0 <= min_version <= _U64_MAX:
            raise BadArgumentsError("min_version must be an integer in 0 .. 2**64-1")
        count = min(count, MAX_SCAN_COUNT)
        cache = self.node.cache
        if cursor:
            sid, session, pos = self._resume(_SCAN, cursor)
            keys, tombs = session.keys, session.tombs
        else:
            sid, pos = 0, 0
            keys, tombs = cache.keys_snapshot(), cache.tombstone_keys_snapshot()
        nkeys = len(keys)
        total = nkeys + len(tombs)
        stop = min(total, pos + max(count * SCAN_WORK_PER_ENTRY, SCAN_MIN_WORK))
        byte_budget = self.node.limits.max_frame_bytes // 2
        entries: list[list[Any]] = []
        tombstones: list[list[Any]] = []
        n = 0
        size = 0
        full = False
        get_entry = cache.get_entry
        key_stop = min(stop, nkeys)
        while pos < key_stop:
            key = keys[pos]
            if match is None or match(hash64(key)):
                e = get_entry(key)
                if e is not None and e.version >= min_version:
                    cost = len(key) + len(e.value) + _ENTRY_WIRE_OVERHEAD
                    if n and size + cost > byte_budget:
                        full = True
                        break
                    entries.append([key, e.value, e.expires_at, e.version])
                    size += cost
                    n += 1
                    if n >= count:
                        pos += 1
                        full = True
                        break
            pos += 1
        if not full:
            tombstone_version = cache.tombstone_version
            while pos < stop:
                key = tombs[pos - nkeys]
                if match is None or match(hash64(key)):
                    v = tombstone_version(key)
                    if v and v >= min_version:
                        cost = len(key) + _TOMB_WIRE_OVERHEAD
                        if n and size + cost > byte_budget:
                            break
                        tombstones.append([key, v])
                        size += cost
                        n += 1
                        if n >= count:
                            pos += 1
                            break
                pos += 1
        return [self._next_cursor(_SCAN, sid, pos, total, keys, tombs), entries, tombstones]

    def drop(self, msg: list[Any]) -> Any:
        try:
            _, _, ranges, cursor = msg
        except ValueError:
            raise BadArgumentsError("DROP takes [ranges, cursor]") from None
        match = compile_ranges(ranges)
        cursor = _cursor_arg(cursor)
        cache = self.node.cache
        if cursor:
            sid, session, pos = self._resume(_DROP, cursor)
            keys = session.keys
        else:
            sid, pos = 0, 0
            keys = cache.keys_snapshot()
        total = len(keys)
        stop = min(total, pos + DROP_WORK)
        delete = cache.delete
        dropped = 0
        while pos < stop:
            key = keys[pos]
            pos += 1
            if (match is None or match(hash64(key))) and delete(key):
                dropped += 1
        return [self._next_cursor(_DROP, sid, pos, total, keys, []), dropped]

    def range_count(self, msg: list[Any]) -> Any:
        try:
            _, _, ranges = msg
        except ValueError:
            raise BadArgumentsError("RANGE_COUNT takes [ranges]") from None
        match = compile_ranges(ranges)
        items = self.node.cache.items()
        if match is None:
            return sum(1 for _ in items)
        return sum(1 for key, _, _, _ in items if match(hash64(key)))

    # -- scan sessions ----------------------------------------------------------

    @property
    def session_count(self) -> int:
        """Scan sessions currently held."""
        return len(self._sessions)

    def expire_sessions(self, now: float | None = None) -> int:
        """Drop sessions idle for ``SCAN_SESSION_TTL_S``; return how many were dropped."""
        if now is None:
            now = self.monotonic()
        sessions = self._sessions
        dropped = 0
        while sessions:
            sid, session = next(iter(sessions.items()))
            if now - session.last_used < SCAN_SESSION_TTL_S:
                break
            del sessions[sid]
            dropped += 1
        return dropped

    def _resume(self, kind: str, cursor: int) -> tuple[int, _Session, int]:
        """The session and position a non-zero cursor names, or ``BadArgumentsError``."""
        now = self.monotonic()
        self.expire_sessions(now)
        sid = cursor >> _POS_BITS
        pos = cursor & _POS_MASK
        session = self._sessions.get(sid)
        if session is None:
            raise BadArgumentsError("scan cursor expired")
        if session.kind != kind:
            raise BadArgumentsError(f"cursor belongs to a {session.kind}, not a {kind}")
        if pos > len(session.keys) + len(session.tombs):
            raise BadArgumentsError("scan cursor is out of range")
        session.last_used = now
        self._sessions.move_to_end(sid)
        return sid, session, pos

    def _next_cursor(self, kind: str, sid: int, pos: int, total: int, keys: list[bytes], tombs: list[bytes]) -> int:
        """The cursor to return: 0 (and the session closed) when done, else session and position."""
        if pos >= total:
            if sid:
                self._sessions.pop(sid, None)
            return 0
        if not sid:
            sid = self._open(kind, keys, tombs)
        return (sid << _POS_BITS) | pos

    def _open(self, kind: str, keys: list[bytes], tombs: list[bytes]) -> int:
        now = self.monotonic()
        sessions = self._sessions
        self.expire_sessions(now)
        while len(sessions) >= MAX_SCAN_SESSIONS:
            sessions.popitem(last=False)
        sid = self._next_session_id
        while sid in sessions:  # only after 2**32 sessions
            sid = sid % _MAX_SESSION_ID + 1
        self._next_session_id = sid % _MAX_SESSION_ID + 1
        sessions[sid] = _Session(kind, keys, tombs, now)
        return sid
