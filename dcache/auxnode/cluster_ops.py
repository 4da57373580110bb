"""Cluster-facing ops of an aux node: versioned reads and writes, imports, range scans.

These are what masters (routing, replication, repair) and the rebalancer use;
docs/PROTOCOL.md "Cluster ops (aux nodes)" is normative. Every handler is
synchronous like the rest of the aux node's.

Versions come from the caller (a master's hybrid logical clock) and are
stored as given; the parsers have refused any further ahead of this node's
clock than ``--max-clock-skew``, and this node's clock observes every one it
stores (the receive rule), so its own next version is newer. Imports
(``SETV``, ``APPLY``, ``DELV``, ``APPLY_DELETES``) are last-writer-wins
(``LRUCache.apply``/``apply_delete``). ``SETV`` and ``DELV`` say when they
lost to a newer version (``[2, held_version]``), so a master never
acknowledges a write that did not take effect. ``INCRV`` is a local write
that always applies, like ``INCR``; it answers the version it used.

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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import BadArgumentsError, FrameTooLargeError, OutOfMemoryError, ServerError, Status
from ..hlc import HybridClock
from ..lru import EntryTooLargeError, LRUCache
from ..protocol import Limits, Op, Packed, SetFlag, pack
from ..ring import RangeMatcher, hash64
from ..server import FrameProtocol, Handler
from .tracking import Tracker


class ClusterOpsHost(Protocol):
    """What the cluster ops need of their node (an ``AuxNode`` has it)."""

    cache: LRUCache
    clock: HybridClock
    tracker: Tracker

    def route_by(self, conn: FrameProtocol | None, epoch: int, floor: int) -> int:
        """EPOCH (``Service.route_by``)."""
        ...

    @property
    def limits(self) -> Limits: ...

    def add(self, key: bytes, delta: int, version: int) -> int:
        """INCR with a given version (typed errors)."""
        ...


__all__ = [
    "ClusterOps",
    "ClusterOpsHost",
    "SUPERSEDED",
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

_OK = int(Status.OK)
_OUT_OF_MEMORY = int(Status.OUT_OF_MEMORY)
#: An MSETV entry's answer when stored, ``[0, 1]`` on the wire; one object shared by every answer (never changed).
_STORED = (_OK, 1)
#: The answer of an MSETV of n entries, every one stored, as packed bytes
#: (``_ALL_STORED[n]``, the bytes of ``[_STORED] * n``), for n up to this:
#: a master's MSETVs carry a loop turn's writes to one node, a handful at ``-P 1``.
_PACKED_STORED_UPTO = 64
_ALL_STORED = tuple(Packed(pack([_STORED] * n)) for n in range(_PACKED_STORED_UPTO + 1))

#: First element of the answer of a SETV or DELV that lost to a newer version: ``[SUPERSEDED, held_version]``.
SUPERSEDED = 2

_NX = SetFlag.NX.value
_XX = SetFlag.XX.value
_KEEP_COPY = SetFlag.KEEP_COPY.value
_POS_BITS = 32
_POS_MASK = (1 << _POS_BITS) - 1
_MAX_SESSION_ID = (1 << 32) - 1
# msgpack bytes per scanned item on top of key and value (array and bin headers, two ints).
_ENTRY_WIRE_OVERHEAD = 32
_TOMB_WIRE_OVERHEAD = 16
#: Snapshot keys a SCAN hashes and matches at a time (a page stops mid-chunk when full).
_SCAN_CHUNK = 2048
_SCAN = "SCAN"
_DROP = "DROP"


def _check_fits(cache: LRUCache, key: bytes, value: bytes, expires_at: int) -> None:
    size = cache.charge(key, value, expires_at)
    if size > cache.max_bytes:
        raise OutOfMemoryError(f"entry of {size} bytes exceeds the cache budget of {cache.max_bytes} bytes")


class _Session:
    """A scan in progress: the keys it walks (``LRUCache.keys_snapshot``), the tombstones, and when it was last used."""

    __slots__ = ("kind", "keys", "tombs", "last_used")

    def __init__(self, kind: str, keys: Sequence[bytes], tombs: list[bytes], now: float) -> None:
        self.kind = kind
        self.keys = keys
        self.tombs = tombs
        self.last_used = now


class ClusterOps:
    """The cluster-facing handlers of one ``AuxNode`` (see the module docstring).

    ``monotonic`` (seconds) times scan sessions; tests may replace the
    attribute with a fake clock.
    """

    def __init__(self, node: ClusterOpsHost, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.monotonic = monotonic
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._next_session_id = 1

    def register(self, handlers: dict[int, Handler]) -> None:
        """Install the handlers in an op -> handler table."""
        handlers[Op.GETV] = self.getv
        handlers[Op.MGETV] = self.mgetv
        handlers[Op.SETV] = self.setv
        handlers[Op.MSETV] = self.msetv
        handlers[Op.DELV] = self.delv
        handlers[Op.INCRV] = self.incrv
        handlers[Op.APPLY] = self.apply
        handlers[Op.APPLY_DELETES] = self.apply_deletes
        handlers[Op.SCAN] = self.scan
        handlers[Op.DROP] = self.drop
        handlers[Op.RANGE_COUNT] = self.range_count
        handlers[Op.INVACK] = self.invack
        handlers[Op.EPOCH] = self.epoch

    # -- the ring epochs requests are routed by --------------------------------

    def epoch(self, conn: FrameProtocol, rid: int, args: tuple[int, int]) -> Any:
        """EPOCH: ``conn``'s requests are routed by ring ``epoch``; raise the node's floor to ``floor``. Answers the floor.

        The leader raises it before a migration copies (``Migrator.run``):
        from then on, a request routed by an older ring (a master paused or
        cut off while the ring changed, which writes to the old owners only,
        behind the copy, and reads them) is refused (``Service.route_by``,
        ``AuxNode.ring_fenced_ops``).
        """
        return self.node.route_by(conn, *args)

    # -- versioned reads and writes ----------------------------------------

    def getv(self, conn: FrameProtocol, rid: int, args: tuple[bytes, int]) -> Any:
        key, track = args
        node = self.node
        e = node.cache.lookup(key)
        if e is None:
            return None
        if track:
            node.tracker.track(conn, key, track == 2)
        return [e.value, e.expires_at, e.version]

    def invack(self, conn: FrameProtocol, rid: int, args: tuple[int, list[bytes]]) -> Any:
        """INVACK: the connection dropped the copies the pushes up to ``seq`` named, and holds none of ``keys`` (values it was pushed)."""
        seq, keys = args
        self.node.tracker.ack(conn, seq, keys)
        return True

    def mgetv(self, conn: FrameProtocol, rid: int, keys: list[bytes]) -> Any:
        lookup = self.node.cache.lookup
        out: list[Any] = []
        append = out.append
        size = 0
        for key in keys:
            e = lookup(key)
            if e is None:
                append(None)
            else:
                value = e.value
                size += len(value)
                append([value, e.expires_at, e.version])
        limit = self.node.limits.max_frame_bytes
        if size > limit:
            raise FrameTooLargeError(
                f"the values of these {len(keys)} keys exceed the {limit}-byte frame limit: ask for fewer keys at once"
            )
        return out

    def held_version(self, key: bytes) -> int:
        """The newest version this node holds for ``key``: its live entry's or its tombstone's (0: none)."""
        cache = self.node.cache
        e = cache.get_entry(key)
        held = e.version if e is not None else 0
        tomb = cache.tombstone_version(key)
        return tomb if tomb > held else held

    def setv(self, conn: FrameProtocol, rid: int, args: tuple[bytes, bytes, int, int, int]) -> Any:
        self.node.clock.observe(args[4])
        if args[3] == _KEEP_COPY:
            return self._store_kept(conn, *args)
        return self._store(*args)

    def _store_kept(self, conn: FrameProtocol, key: bytes, value: bytes, expires_at: int, flags: int, version: int) -> Any:
        """A SETV with KEEP_COPY: ``_store`` without a condition, and ``conn`` keeps its copy.

        ``conn``'s subscription to ``key`` does not end with this change and
        it is pushed no invalidation for it (``Tracker.keeping``; the key's
        other subscribers are, as for any write). If the key then holds this
        write, ``conn`` is subscribed to it (again, or for the first time),
        so the key's next change reaches its copy.
        """
        node = self.node
        tracker = node.tracker
        tracker.keeping = (conn, key)
        try:
            result = self._store(key, value, expires_at, 0, version)
        finally:
            tracker.keeping = None
        e = node.cache.get_entry(key)
        if e is not None and e.version == version:
            tracker.track(conn, key)
        return result

    def _store(self, key: bytes, value: bytes, expires_at: int, flags: int, version: int) -> Any:
        """A SETV whose version the clock observed: 1 (stored; 2: already expired), 0 (NX/XX failed) or ``[2, held]``.

        Raises:
            OutOfMemoryError: the entry alone exceeds the cache's budget (checked before the condition).
        """
        cache = self.node.cache
        if flags:
            _check_fits(cache, key, value, expires_at)
            if (cache.get_entry(key) is not None) == (flags == _NX):
                return 0
        try:
            applied = cache.apply(key, value, expires_at=expires_at, version=version)
        except EntryTooLargeError as exc:  # checked first thing, the cache unchanged: the same check as _check_fits
            raise OutOfMemoryError(str(exc)) from None
        return 1 if applied else self._not_applied(key, value, version)

    def _not_applied(self, key: bytes, value: bytes, version: int) -> Any:
        """The result of a SETV whose import did not apply: 2 (already expired), 1 (applied before) or ``[2, held]``."""
        held = self.held_version(key)
        if held < version:
            return 2  # already expired: nothing to store
        if held == version and (e := self.node.cache.get_entry(key)) is not None and e.value == value:
            return 1  # this very write, applied before (versions are unique per write)
        return [SUPERSEDED, held]

    def msetv(self, conn: FrameProtocol, rid: int, entries: list[list[Any]]) -> list[Any] | Packed:
        """SETV of each entry, in order; answers ``[status, result]`` per entry (a master's writes of one loop turn).

        The clock observes the newest version once, after the entries are
        stored, as APPLY's does: nothing else runs in between (no store
        reads the clock), and the newest is found in the same loop. The
        parser has checked every version against the skew bound in this
        very call, so the clock folds it in without a second wall-clock
        read (``observe_checked``). An entry without flags (every SET a
        master routes) takes ``_store``'s steps inline, through the cache's
        ``batch_apply``, and when stored answers the one shared ``_STORED``;
        when every entry was stored, the answer is ``_ALL_STORED``'s,
        packed already.
        """
        out: list[Any] = []
        node = self.node
        apply = node.cache.batch_apply()
        append = out.append
        newest = 0
        try:
            for entry in entries:
                key, value, expires_at, flags, version = entry
                if version > newest:
                    newest = version
                try:
                    if flags == _KEEP_COPY:
                        append([_OK, self._store_kept(conn, *entry)])
                        apply = node.cache.batch_apply()  # the key is tracked now: later entries tell its changes
                    elif flags:
                        append([_OK, self._store(*entry)])
                    elif apply(key, value, expires_at=expires_at, version=version):
                        append(_STORED)
                    else:
                        append([_OK, self._not_applied(key, value, version)])
                except EntryTooLargeError as exc:  # as _store's OutOfMemoryError
                    append([_OUT_OF_MEMORY, str(exc)])
                except ServerError as exc:
                    append([exc.code, exc.message])
        finally:  # even past an unexpected error: what was stored is observed
            if newest:
                node.clock.observe_checked(newest)
        n = len(out)
        if n <= _PACKED_STORED_UPTO and out.count(_STORED) == n:
            return _ALL_STORED[n]  # the same answer, packed once (answers pay msgpack about 1,000 instructions an entry)
        return out

    def delv(self, conn: FrameProtocol, rid: int, args: tuple[bytes, int]) -> Any:
        key, version = args
        node = self.node
        node.clock.observe(version)
        cache = node.cache
        if cache.apply_delete(key, version=version):
            return True
        e = cache.get_entry(key)
        if e is not None and e.version > version:
            return [SUPERSEDED, e.version]
        return False

    def incrv(self, conn: FrameProtocol, rid: int, args: tuple[bytes, int, int]) -> Any:
        key, delta, version = args
        node = self.node
        clock = node.clock
        clock.observe(version)
        if self.held_version(key) >= version:
            version = clock.next()  # the result must be newer than what it replaces, or copies of it lose
        result = node.add(key, delta, version)
        e = node.cache.get_entry(key)
        if e is None:
            # The kept expiry passed between the increment and this read: the
            # entry is gone, so report an expiry in the past (now) to match.
            return [result, max(1, time.time_ns() // 1_000_000), version]
        return [result, e.expires_at, version]

    # -- imports -------------------------------------------------------------

    def apply(self, conn: FrameProtocol, rid: int, items: list[tuple[bytes, bytes, int, int]]) -> Any:
        cache = self.node.cache
        try:
            applied = cache.apply_many(items)
        except EntryTooLargeError as exc:
            raise OutOfMemoryError(str(exc)) from None
        newest = max((version for _, _, _, version in items), default=0)
        if newest:
            self.node.clock.observe(newest)  # in the same handler as the stores: nothing runs in between
        return applied

    def apply_deletes(self, conn: FrameProtocol, rid: int, items: list[tuple[bytes, int]]) -> Any:
        newest = max((version for _, version in items), default=0)
        if newest:
            self.node.clock.observe(newest)
        apply_delete = self.node.cache.apply_delete
        removed = 0
        for key, version in items:
            if apply_delete(key, version=version):
                removed += 1
        return removed

    # -- range scans ----------------------------------------------------------

    def scan(self, conn: FrameProtocol, rid: int, args: tuple[RangeMatcher, int, int, int, bool]) -> Any:
        match, cursor, count, min_version, packed = args
        page = self.scan_page(match, cursor, count, min_version)
        if packed:
            # Packed once here, the entries cross the master as one bin and are
            # decoded once, by the APPLY that receives them.
            entries = page[1]
            return [page[0], pack(entries), page[2], len(entries)]
        return page

    def scan_page(self, match: RangeMatcher, cursor: int, count: int, min_version: int) -> list[Any]:
        """One SCAN page: ``[next_cursor, entries, tombstones]`` (docs/PROTOCOL.md; also RESP's SCAN on this node)."""
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
        while pos < key_stop and not full:
            # A chunk's keys are hashed and matched in one comprehension; only
            # the matches are looked up (a quarter of them when a node joins 3).
            chunk_stop = min(key_stop, pos + _SCAN_CHUNK)
            chunk = keys[pos:chunk_stop]
            hits = range(len(chunk)) if match is None else match.select(map(hash64, chunk))
            for i in hits:
                key = chunk[i]
                e = get_entry(key)
                if e is None or e.version < min_version:
                    continue
                value = e.value
                cost = len(key) + len(value) + _ENTRY_WIRE_OVERHEAD
                if n and size + cost > byte_budget:
                    chunk_stop = pos + i
                    full = True
                    break
                entries.append([key, value, e.expires_at, e.version])
                size += cost
                n += 1
                if n >= count:
                    chunk_stop = pos + i + 1
                    full = True
                    break
            pos = chunk_stop
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

    def drop(self, conn: FrameProtocol, rid: int, args: tuple[RangeMatcher, int]) -> Any:
        match, cursor = args
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

    def range_count(self, conn: FrameProtocol, rid: int, match: RangeMatcher) -> Any:
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

    def _next_cursor(self, kind: str, sid: int, pos: int, total: int, keys: Sequence[bytes], tombs: list[bytes]) -> int:
        """The cursor to return: 0 (and the session closed) when done, else session and position."""
        if pos >= total:
            if sid:
                self._sessions.pop(sid, None)
            return 0
        if not sid:
            sid = self._open(kind, keys, tombs)
        return (sid << _POS_BITS) | pos

    def _open(self, kind: str, keys: Sequence[bytes], tombs: list[bytes]) -> int:
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
