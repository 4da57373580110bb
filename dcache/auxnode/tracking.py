"""Near-cache tracking on an aux node: who holds a copy of which key, and telling them first when it changes.

A master that keeps a hot key in its near cache reads it with ``GETV [key,
true]``: the connection it asked on becomes a *subscriber* of that key.
When the key changes here for any reason (a write, a delete, a TTL change,
an eviction, an expiry, a DROP after a migration, an import, a flush), the
subscription ends and the subscriber gets an ``INVALIDATE`` push naming the
key and its new version. The answer to the request that made the change is
held until every subscriber acknowledged the push (``INVACK``), so a client
that sees the write acknowledged can no longer read the old value from any
master's near cache (docs/PROTOCOL.md "Near-cache tracking" is normative).

Failure rules, with ``NEAR_LEASE_S`` (a master's lease: it serves a copy
only while the aux node answered it on the tracking connection within that
time) and ``INVALIDATION_TIMEOUT_S`` (longer than the lease):

* a subscriber that does not acknowledge within the timeout is cut off (its
  connection closed, its subscriptions dropped) and the held answers go out:
  having heard nothing since the push, its lease has run out;
* a subscriber whose connection is gone holds answers of writes to its keys
  until the timeout has passed since it was found gone (it may not know yet
  and serve its copies until its lease runs out), then its subscriptions go.

A connection that subscribed for values (GETV track ``2``, a master that
saw ``"value-push"`` in this node's HELLO) is pushed, for a write of a value
up to ``PUSH_VALUE_MAX_BYTES``, the entry ``[key, version, value,
expires_at]`` instead, and its subscription stays: its copy takes the new
value, so a key written through several masters keeps a copy in each. Its
``INVACK [seq, keys]`` names the pushed keys it holds no copy of (evicted,
dropped, never filled): those subscriptions end there. It names a key only
when it has neither a copy nor a read or write of the key in flight, on the
one connection every request of it goes on, so a later fill subscribes
again after the removal.

Bounds: at most ``max_keys`` keys are tracked; subscribing one more
invalidates the oldest tracked key (its subscribers drop their copy and may
subscribe again). A connection subscribes a key at most once, so a key has
at most one subscription per master connection.

Cost when no master subscribes: the cache's writes pay a call and an empty
dict lookup (``TrackingCache``), the entries of a batch (MSETV) not even
that (``batch_apply``); requests pay one attribute test in the dispatch
(``Service.hold``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..lru import LRUCache
from ..protocol import INT64_MAX, PUSH_ID, Push, pack, queue_frame
from ..protocol.limits import INVALIDATION_TIMEOUT_S, PUSH_VALUE_MAX_BYTES
from ..server import LATER

if TYPE_CHECKING:
    from ..server import FrameProtocol, Service

__all__ = ["Tracker", "TrackingCache", "GONE"]

log = logging.getLogger("dcache.aux.tracking")

#: The version an invalidation carries when the key left (delete, eviction, expiry, flush).
GONE = INT64_MAX
_INVALIDATE = int(Push.INVALIDATE)


class _Subscriber:
    """One subscribing connection: its push sequence and what it acknowledged."""

    __slots__ = ("conn", "seq", "acked", "gone_at", "pending", "values")

    def __init__(self, conn: FrameProtocol) -> None:
        self.conn = conn
        #: It subscribed for values (GETV track 2): writes push it the value, and its subscriptions stay.
        self.values = False
        self.seq = 0
        self.acked = 0
        #: ``loop.time()`` the connection was found gone (0: alive).
        self.gone_at = 0.0
        #: ``[key, version]`` pairs of the round being formed.
        self.pending: list[list[Any]] = []


class _Round:
    """The invalidations of one loop iteration and the answers held until they are acknowledged."""

    __slots__ = ("needs", "not_before", "deadline", "waiters", "timer")

    def __init__(self) -> None:
        #: subscriber -> the push sequence it must acknowledge.
        self.needs: dict[_Subscriber, int] = {}
        #: The held answers may not leave before this ``loop.time()`` (gone subscribers).
        self.not_before = 0.0
        self.deadline = 0.0
        #: ``(conn, rid, op, result)`` of the held answers.
        self.waiters: list[tuple[Any, int, int, Any]] = []
        self.timer: asyncio.TimerHandle | None = None


class _Settle:
    """A held answer that settles a future (``Tracker.acknowledged``) instead of answering a connection."""

    __slots__ = ("done",)

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def reply(self, rid: int, status: int, result: Any, op: int = 0) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Tracker:
    """The tracking table of one aux node (see the module note)."""

    def __init__(self, service: Service, max_keys: int, timeout: float = INVALIDATION_TIMEOUT_S) -> None:
        self._service = service
        self.max_keys = max_keys
        self.timeout = timeout
        #: key -> its subscribers.
        self.table: dict[bytes, list[_Subscriber]] = {}
        self._subs: dict[Any, _Subscriber] = {}
        self._forming: _Round | None = None
        self._waiting: list[_Round] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pushes = 0
        self.invalidations = 0
        self.overflows = 0
        self.timeouts = 0
        self.held_answers = 0
        self.value_updates = 0
        self.unheld = 0
        #: ``(connection, key)`` while a KEEP_COPY write of ``key`` from that connection is stored
        #: (``ClusterOps``): its subscription to the key stays, and it is not pushed this change.
        self.keeping: tuple[Any, bytes] | None = None

    # -- subscribing -----------------------------------------------------------------

    def track(self, conn: FrameProtocol, key: bytes, values: bool = False) -> None:
        """Subscribe ``conn`` to ``key``'s next change (``values``: to its writes' values, see the module note)."""
        if self.max_keys <= 0:
            return
        sub = self._subs.get(conn)
        if sub is None or sub.gone_at:
            if sub is not None:  # a gone subscriber's connection object cannot come back
                return
            sub = self._subs[conn] = _Subscriber(conn)
        if values:
            sub.values = True
        table = self.table
        subs = table.get(key)
        if subs is None:
            if len(table) >= self.max_keys:
                self.overflows += 1
                self.changed(next(iter(table)), GONE)
            table[key] = [sub]
        elif sub not in subs:
            subs.append(sub)

    def ack(self, conn: FrameProtocol, seq: int, unheld: Sequence[bytes] = ()) -> None:
        """``conn`` acknowledged the pushes up to ``seq``: release the answers that waited only on that.

        ``unheld``: keys whose values it was pushed and of which it holds no
        copy (nor a read or write in flight): its subscriptions to them end.
        """
        sub = self._subs.get(conn)
        if sub is None:
            return
        if unheld:
            table = self.table
            for key in unheld:
                subs = table.get(key)
                if subs is not None and sub in subs:
                    self.unheld += 1
                    if len(subs) == 1:
                        del table[key]
                    else:
                        subs.remove(sub)
        if seq <= sub.acked:
            return
        sub.acked = min(seq, sub.seq)
        self._release_ready()

    @property
    def subscribers(self) -> int:
        """Connections subscribed to at least one key (including gone ones not yet purged)."""
        return len(self._subs)

    # -- changes -----------------------------------------------------------------

    def changed(self, key: bytes, version: int, value: bytes | None = None, expires_at: int = 0) -> None:
        """``key`` changed (its new version, or ``GONE``): end its subscriptions and queue their pushes.

        ``value`` (and ``expires_at``): what a write stored; the connections
        subscribed for values are pushed it and stay subscribed (module note).
        """
        subs = self.table.pop(key, None)
        if subs is None:
            return
        stay: list[_Subscriber] = []
        keeping = self.keeping
        if keeping is not None and keeping[1] == key:  # the writer keeps its copy of this very write
            writer = keeping[0]
            stay = [sub for sub in subs if sub.conn is writer]
            if stay:
                subs = [sub for sub in subs if sub.conn is not writer]
                if not subs:
                    self.table[key] = stay
                    return
        if value is not None and len(value) > PUSH_VALUE_MAX_BYTES:
            value = None
        r = self._forming
        if r is None:
            r = self._form()
        for sub in subs:
            if sub.gone_at:
                until = sub.gone_at + self.timeout
                if until > r.not_before:
                    r.not_before = until
            elif sub.conn.is_closing:
                sub.gone_at = self._now()
                r.not_before = max(r.not_before, sub.gone_at + self.timeout)
            elif value is not None and sub.values:
                sub.pending.append([key, version, value, expires_at])
                r.needs[sub] = 0
                stay.append(sub)
                self.value_updates += 1
            else:
                sub.pending.append([key, version])
                r.needs[sub] = 0
        if stay:
            self.table[key] = stay
        self.invalidations += 1
        self._service.hold = self._hold

    def not_holding(self) -> None:
        """The changes just made belong to no request (a background sweep): the next request's answer is not held for them."""
        self._service.hold = None

    async def acknowledged(self) -> None:
        """Wait until every subscriber acknowledged the changes just made (at once if they touched no tracked key).

        For a request whose handler changes keys outside the dispatch (a
        coroutine, such as RESP's FLUSHDB): ``Service.hold`` holds only the
        answers the dispatch sends, so such a handler awaits this before it
        returns, as a held answer waits.
        """
        if self._forming is None:
            self._service.hold = None
            return
        done = asyncio.get_running_loop().create_future()
        self._hold(_Settle(done), 0, 0, None)
        await done

    def changed_all(self) -> None:
        """Every key changed (a flush)."""
        for key in list(self.table):
            self.changed(key, GONE)

    def _form(self) -> _Round:
        r = self._forming = _Round()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._loop.call_soon(self._send)
        return r

    def _hold(self, conn: Any, rid: int, op: int, result: Any) -> Any:
        """The dispatch's hook after a handler that changed a tracked key: hold its answer until the round is acknowledged."""
        self._service.hold = None
        r = self._forming
        if r is None:
            return result
        r.waiters.append((conn, rid, op, result))
        self.held_answers += 1
        return LATER

    def _send(self) -> None:
        """End of the iteration: push each subscriber its invalidations and start waiting."""
        r = self._forming
        self._forming = None
        self._service.hold = None
        if r is None:
            return
        for sub in r.needs:
            sub.seq += 1
            r.needs[sub] = sub.seq
            out: list[bytes] = []
            queue_frame(out, pack([PUSH_ID, _INVALIDATE, [sub.seq, sub.pending]]))
            sub.pending = []
            sub.conn.send(out)
            self.pushes += 1
        now = self._now()
        r.deadline = now + self.timeout
        self._waiting.append(r)
        if not self._release_ready():
            return
        assert self._loop is not None
        if r in self._waiting:
            r.timer = self._loop.call_at(max(r.deadline, r.not_before), self._overdue, r)

    def _release_ready(self) -> bool:
        """Send the held answers of every round now acknowledged; whether any round still waits."""
        now = self._now()
        still: list[_Round] = []
        for r in self._waiting:
            if r.not_before <= now and all(sub.acked >= seq or sub.gone_at for sub, seq in r.needs.items()):
                self._finish(r)
            else:
                still.append(r)
        self._waiting = still
        return bool(still)

    def _overdue(self, r: _Round) -> None:
        """A round's time is up: cut off the subscribers that did not acknowledge, then answer."""
        r.timer = None
        for sub, seq in r.needs.items():
            if sub.acked < seq and not sub.gone_at:
                self.timeouts += 1
                log.warning(
                    "a subscriber (%s) did not acknowledge invalidations within %.1f s: cutting it off", sub.conn.peer, self.timeout
                )
                self._drop(sub)
                sub.conn.close()
        if r in self._waiting:
            self._waiting.remove(r)
            self._finish(r)

    def _finish(self, r: _Round) -> None:
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None
        for conn, rid, op, result in r.waiters:
            conn.reply(rid, 0, result, op)
        self._service.flush_all()

    # -- gone subscribers --------------------------------------------------------------

    def sweep(self) -> None:
        """Notice closed subscriber connections; forget those gone for longer than the timeout (bounded work per call)."""
        now = self._now()
        forget: list[_Subscriber] = []
        for sub in self._subs.values():
            if not sub.gone_at:
                if sub.conn.is_closing:
                    sub.gone_at = now
            elif now - sub.gone_at >= self.timeout:
                forget.append(sub)
        for sub in forget:
            self._drop(sub)
        if self._waiting:
            self._release_ready()

    def _drop(self, sub: _Subscriber) -> None:
        """Remove every subscription of ``sub`` (O(tracked keys): rare)."""
        self._subs.pop(sub.conn, None)
        sub.gone_at = sub.gone_at or self._now()
        table = self.table
        for key in [k for k, subs in table.items() if sub in subs]:
            subs = table[key]
            subs.remove(sub)
            if not subs:
                del table[key]

    def _now(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    def stats(self) -> dict[str, int]:
        """Counters and sizes for STATS and the metrics."""
        return {
            "tracked_keys": len(self.table),
            "tracking_max_keys": self.max_keys,
            "tracking_subscribers": len(self._subs),
            "invalidation_pushes": self.pushes,
            "invalidations": self.invalidations,
            "tracking_overflows": self.overflows,
            "invalidation_timeouts": self.timeouts,
            "answers_held_for_invalidation": self.held_answers,
            "tracking_value_pushes": self.value_updates,
            "tracking_unheld": self.unheld,
        }


class TrackingCache(LRUCache):
    """An ``LRUCache`` that tells a ``Tracker`` of every change to a tracked key (see the module note)."""

    __slots__ = ("tracker",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracker: Tracker | None = None

    def attach(self, tracker: Tracker) -> None:
        """Report changes to ``tracker`` (evictions and expiries through ``on_drop``)."""
        self.tracker = tracker
        table = tracker.table

        def dropped(key: bytes) -> None:
            if key in table:
                tracker.changed(key, GONE)

        self.on_drop = dropped

    def _changed(self, key: bytes) -> None:
        t = self.tracker
        if t is not None and key in t.table:
            e = self.get_entry(key)
            t.changed(key, e.version if e is not None else GONE)

    def _written(self, key: bytes) -> None:
        """``key`` was written: its subscribers for values are pushed the entry (``Tracker.changed``), the others an invalidation."""
        t = self.tracker
        if t is not None and key in t.table:
            e = self.get_entry(key)
            if e is None:
                t.changed(key, GONE)
            else:
                t.changed(key, e.version, e.value, e.expires_at)

    def set(self, key: bytes, value: bytes, *, expires_at: int = 0, version: int = 0, nx: bool = False, xx: bool = False) -> bool:
        """``LRUCache.set``, then invalidate ``key``'s subscribers."""
        done = LRUCache.set(self, key, value, expires_at=expires_at, version=version, nx=nx, xx=xx)
        t = self.tracker
        if t is not None and t.table and key in t.table:
            self._written(key)
        return done

    def apply(self, key: bytes, value: bytes, *, expires_at: int, version: int) -> bool:
        """``LRUCache.apply``; invalidate ``key``'s subscribers if it applied."""
        done = LRUCache.apply(self, key, value, expires_at=expires_at, version=version)
        if done:
            t = self.tracker
            if t is not None and t.table and key in t.table:
                self._written(key)
        return done

    def batch_apply(self) -> Callable[..., bool]:
        """``LRUCache.apply`` itself while no key is tracked (no call through ``apply`` per entry), else ``apply``.

        Equivalent for the whole batch: its stores can end subscriptions
        (evictions) but not start one, so no key becomes tracked before it ends.
        """
        t = self.tracker
        if t is None or not t.table:
            return super().apply
        return self.apply

    def apply_many(self, items: Sequence[tuple[bytes, bytes, int, int]]) -> int:
        """``LRUCache.apply_many``; invalidate the subscribers of the keys it stored (an APPLY page, a migration's, a restore's)."""
        t = self.tracker
        if t is None or not t.table:
            return LRUCache.apply_many(self, items)
        table = t.table
        get = self.get_entry
        before = {item[0]: (e.version if (e := get(item[0])) is not None else 0) for item in items if item[0] in table}
        applied = LRUCache.apply_many(self, items)
        for key, version in before.items():
            e = get(key)
            if e is not None and e.version != version:
                t.changed(key, e.version)
        return applied

    def delete(self, key: bytes, *, version: int = 0) -> bool:
        """``LRUCache.delete``, then invalidate ``key``'s subscribers."""
        done = LRUCache.delete(self, key, version=version)
        t = self.tracker
        if t is not None and t.table and key in t.table:
            t.changed(key, GONE)
        return done

    def apply_delete(self, key: bytes, *, version: int) -> bool:
        """``LRUCache.apply_delete``; invalidate ``key``'s subscribers if it removed the key."""
        done = LRUCache.apply_delete(self, key, version=version)
        if done:
            t = self.tracker
            if t is not None and t.table and key in t.table:
                t.changed(key, GONE)
        return done

    def expire(self, key: bytes, ttl_ms: int) -> bool:
        """``LRUCache.expire``, then invalidate ``key``'s subscribers (its expiry changed)."""
        done = LRUCache.expire(self, key, ttl_ms)
        if done:
            self._changed(key)
        return done

    def persist(self, key: bytes) -> bool:
        """``LRUCache.persist``, then invalidate ``key``'s subscribers (its expiry changed)."""
        done = LRUCache.persist(self, key)
        if done:
            self._changed(key)
        return done

    def incr(self, key: bytes, delta: int, *, version: int = 0) -> int:
        """``LRUCache.incr``, then invalidate ``key``'s subscribers."""
        result = LRUCache.incr(self, key, delta, version=version)
        self._changed(key)
        return result

    def clear(self) -> None:
        """``LRUCache.clear``, then invalidate every subscription."""
        LRUCache.clear(self)
        if self.tracker is not None:
            self.tracker.changed_all()

    def expire_some(self, max_checks: int = 20) -> int:
        """``LRUCache.expire_some`` (a background sweep): its invalidations go out, but hold no request's answer."""
        removed = LRUCache.expire_some(self, max_checks)
        if removed and self.tracker is not None:
            self.tracker.not_holding()
        return removed

    def changed_keys(self, keys: Iterable[bytes]) -> None:
        """Invalidate the subscribers of ``keys`` (for changes made around the methods above)."""
        for key in keys:
            self._changed(key)
