"""Routing of client ops to aux nodes: the one home of the read and write rules.

Every op a master serves is routed here, by the current ``ClusterView``.

Reads (``ReadOp``). A key's read candidates (``ClusterView.read_candidates``)
are tried in order; nodes this master cannot trust right now (suspected,
not connected, or holding hints of writes they missed) go last. The first
candidate is read with the other first-owner reads of the same loop
iteration as one MGET (``LinkBatcher``); a miss or an error there goes on to
the next candidate with GETV, and a hit on a later candidate after misses
repairs the candidates that missed (APPLY, last writer wins, so a repair
never overwrites newer data). MGET, EXISTS and TTL are made of the same
``ReadOp`` s: there is exactly one place that says where a read goes when
its first owner misses. While a ring rebuilt after a lone coordinator's
restart is reconciled (``read_every_owner``), every read goes to every
owner instead and the newest version wins (``dcache.master.newestread``).

Writes (``WriteOp``). A write is stamped with a version from this master's
hybrid logical clock and sent in parallel to every live target
(``ClusterView.write_targets``). It is acknowledged when every target
answered, or ``write_quorum`` of them applied it, with these rules:

* an owner that answers that it holds a newer version (``[2, version]``)
  makes the master move its clock past that version (the receive rule) and
  send the write again, once, with a fresh version; if an owner still holds
  a newer one, a concurrent newer write won and the client gets
  ``SUPERSEDED``: a write is never acknowledged without taking effect;
* an owner that is suspected, not connected, or times out does not fail the
  write while another owner applied it: the master keeps a hint for it
  (``dcache.master.hints``) and replays it when the owner answers again;
* no owner applied it: ``UNAVAILABLE``; an error from an owner (not enough
  memory...) is answered as it is.

A SET's SETVs to a node leave with the other SETs of the same loop
iteration as one MSETV (``LinkBatcher``), answered per entry. MSET is one
``WriteOp`` per pair. SET NX/XX and INCR are decided by the
first live candidate (the condition, or the counter's value) and then
copied to the other owners with the same version. While reads ask every
owner, each of these (and TOUCH) first brings the key's owners up to its
newest version (``reconcile``) and is decided by an owner that holds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

from ..errors import (
    NotAnIntegerError,
    ServerError,
    Status,
    SupersededError,
    UnavailableError,
    UpstreamTimeoutError,
)
from ..hlc import HybridClock, wall_ms
from ..peer import PeerConnection
from ..protocol import Op, SetFlag
from ..protocol.limits import KEYS_PER_TURN
from ..server import LATER, FrameProtocol, deferred
from ..turns import Slice, Turns
from .hints import Hints, replay_forever
from .links import MAX_HELD, MAX_HELD_BYTES, AuxLink
from .nearcache import HotKeys, NearCache
from .newestread import NewestRead
from .view import ClusterView

__all__ = ["Router", "RouterStats", "ReadOp", "WriteOp", "LinkBatcher", "Sink"]

log = logging.getLogger("dcache.master.router")

_OK = 0
_UNAVAILABLE = int(Status.UNAVAILABLE)
_TIMEOUT = int(Status.UPSTREAM_TIMEOUT)
_FRAME_TOO_LARGE = int(Status.FRAME_TOO_LARGE)
_BAD_ARGUMENTS = int(Status.BAD_ARGUMENTS)
_SUPERSEDED = int(Status.SUPERSEDED)
_STALE_RING = int(Status.STALE_RING)
_INTERNAL = int(Status.INTERNAL)
#: Most keys in one MGET (``LinkBatcher.MAX_BATCH``; a module constant for the hot path).
_MAX_BATCH = 256
_GET = int(Op.GET)
_SETV = int(Op.SETV)
_DELV = int(Op.DELV)
_KEEP_COPY = int(SetFlag.KEEP_COPY)
#: SETV's answer when the condition (NX/XX) failed.
_CONDITION_FAILED = 0
#: Seconds RING and STATS wait for each aux node's STATS.
STATS_TIMEOUT_S = 0.5
#: Seconds between attempts to replay hints to a node that is not usable yet.
_REPLAY_RETRY_S = 0.2
#: Most seconds a write acknowledged without an owner waits for that owner's fence.
FENCE_TIMEOUT_S = 3.0
#: How far back (ms) an owner that missed a write is re-filled from, before its first miss:
#: room for writes in flight and for clocks that disagree.
_FENCE_MARGIN_MS = 10_000
#: Least seconds between two warnings that fences of one aux node failed (the others are counted in the next).
FENCE_WARN_EVERY_S = 10.0


class Sink(Protocol):
    """Where an op's answer goes: a client connection, or a collector of several answers."""

    def reply(self, rid: int, status: int, result: Any, op: int = 0) -> None: ...


class RouterStats:
    """Plain counters of the router (turned into metrics at scrape time).

    ``hits`` and ``misses`` count the reads this master answered (GET, each
    MGET key, EXISTS, TTL) as its clients saw them: found or not, once per
    read, whatever the owners it asked on the way.
    """

    __slots__ = (
        "hits",
        "misses",
        "fallbacks",
        "repairs",
        "unavailable",
        "partial_writes",
        "superseded_retries",
        "superseded",
        "fences_failed",
        "stale_ring",
    )

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.fallbacks = 0
        self.repairs = 0
        self.unavailable = 0
        self.partial_writes = 0
        self.superseded_retries = 0
        self.superseded = 0
        #: Fences of an owner that missed a write which failed or timed out (the write was acknowledged anyway).
        self.fences_failed = 0
        #: Requests an owner refused as routed by an older ring than its floor (``STALE_RING``): this master was behind.
        self.stale_ring = 0


class Router:
    """Sends each op to the right aux nodes and combines their answers."""

    def __init__(
        self,
        view: ClusterView,
        links: dict[str, AuxLink],
        clock: HybridClock,
        write_quorum: int = 0,
        max_answer_bytes: int = 32 << 20,
        turns: Turns | None = None,
    ) -> None:
        """``turns``: the process's budget of keys per loop iteration for large requests (the master's ``Service.turns``)."""
        self.view = view
        self.links = links
        self.clock = clock
        self.write_quorum = write_quorum
        #: An MGET whose values add up to more than this is answered FRAME_TOO_LARGE as soon as they do.
        self.max_answer_bytes = max_answer_bytes
        self.stats = RouterStats()
        #: Where a large MGET or MSET queues its slices after the first (``dcache.turns``).
        self.turns = turns if turns is not None else Turns()
        self.batcher = LinkBatcher(self)
        self.hints = Hints()
        #: Fences a node cluster-wide (``Membership.fence_missed``); set by the master.
        self.fence_missed: Callable[[str, int, str], Awaitable[int]] | None = None
        #: Called when an owner refused a request as routed by an older ring (``STALE_RING``): read the ring again now.
        self.ring_behind: Callable[[], None] | None = None
        self._fencing: dict[str, asyncio.Future[Any]] = {}
        #: Per aux node: when a failed fence was last logged, and how many failed since.
        self._fence_warned: dict[str, tuple[float, int]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        #: Copies of hot keys answered without an aux node (None: near cache off; ``dcache.master.nearcache``).
        self.near: NearCache | None = None
        #: The read sketch behind HOTKEYS and the near cache (None: reads are not counted).
        self.hot: HotKeys | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Reads ask every owner and answer the newest version (``NewestRead``): set while the
        #: owners of a rebuilt ring may disagree (``ClusterView.reconciling``, set by the master's view).
        self.read_every_owner = False

    # -- trust -----------------------------------------------------------------

    def trusted(self, node_id: str) -> bool:
        """Whether reads may go to ``node_id`` now: connected, not suspected, no missed writes here."""
        link = self.links.get(node_id)
        return link is not None and link.usable and node_id not in self.hints

    def read_order(self, candidates: list[str]) -> list[str]:
        """``candidates`` with the nodes this master cannot trust right now moved last."""
        trusted = [n for n in candidates if self.trusted(n)]
        if len(trusted) == len(candidates):
            return candidates
        return trusted + [n for n in candidates if n not in trusted]

    def on_recover(self, node_id: str) -> None:
        """A suspected node answers again: replay its hints."""
        self._replay(node_id)

    def _replay(self, node_id: str) -> None:
        link = self.links.get(node_id)
        if link is None or node_id not in self.hints:
            return
        self.spawn(replay_forever(self.hints, node_id, link.call, lambda: link.usable, _REPLAY_RETRY_S))

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background (errors are logged at debug level)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("background work failed: %s", task.exception())

    def repair(self, nodes: list[str], key: bytes, entry: list[Any]) -> None:
        """Write ``entry`` (``[value, expires_at, version]``) back to ``nodes``, which missed it."""
        value, expires_at, version = entry
        for node in nodes:
            link = self.links.get(node)
            if link is not None:
                self.stats.repairs += 1
                link.send(Op.APPLY, ([[key, value, expires_at, version]],), _ignore)

    def hint(self, nodes: list[str], op: int, key: bytes, args: tuple[Any, ...]) -> None:
        """Keep hints for ``nodes``, which missed a SETV/DELV of ``key`` with ``args``, and replay when they can."""
        hints = self.hints
        for node in nodes:
            if op == _SETV:
                _, value, expires_at, _, version = args
                hints.add_set(node, key, value, expires_at, version)
            else:
                hints.add_delete(node, key, args[1])
            link = self.links.get(node)
            if link is not None and not link.suspect:
                self._replay(node)  # it timed out or was not connected but is not suspect: try now

    def after_missed(self, nodes: list[str], then: Callable[[], None]) -> None:
        """Call ``then`` (acknowledge a write) once no master reads the ``nodes`` that missed it.

        A node this master keeps hints for is safe from this master's reads,
        not from the others'. So before a write missed by a node that is
        ``up`` or ``fenced`` in the view is acknowledged, the coordinator
        makes sure the node is fenced cluster-wide and that its
        reconciliation covers this write (``fence_missed``; every master
        skips a fenced node until it is reconciled with the writes since
        shortly before it missed one). Down nodes cost nothing: they are not
        written to, and come back through a migration. One fence request per
        node is in flight at a time; writes that miss it meanwhile wait for
        the same one.
        If the fence cannot be made within ``FENCE_TIMEOUT_S``, the write is
        acknowledged anyway (its hints stay) and the failure is logged.
        """
        members = self.view.members
        # Fenced nodes too: this view may be older than the coordinator's,
        # which may have reconciled and unfenced the node meanwhile.
        up = [n for n in nodes if (m := members.get(n)) is not None and m.state in ("up", "fenced")]
        if not up or self.fence_missed is None:
            then()
            return
        waits = [self._fence(n) for n in up]
        done = waits[0] if len(waits) == 1 else asyncio.gather(*waits, return_exceptions=True)
        done.add_done_callback(lambda _: then())

    def stale_ring(self) -> None:
        """An owner refused a request as routed by a ring older than its floor: count it, and have the ring read again."""
        self.stats.stale_ring += 1
        if self.ring_behind is not None:
            self.ring_behind()

    def _fence(self, node_id: str) -> asyncio.Future[Any]:
        fut = self._fencing.get(node_id)
        if fut is not None and not fut.done():
            return fut
        since = wall_ms()
        link = self.links.get(node_id)
        if link is not None and link.suspected_since:
            since = min(since, int(link.suspected_since * 1000))
        since -= _FENCE_MARGIN_MS + self.clock.max_skew_ms
        fut = self._fencing[node_id] = asyncio.ensure_future(self._fence_call(node_id, since))
        return fut

    async def _fence_call(self, node_id: str, since_ms: int) -> None:
        assert self.fence_missed is not None
        try:
            async with asyncio.timeout(FENCE_TIMEOUT_S):
                await self.fence_missed(node_id, since_ms, "a write was acknowledged without it")
        except Exception as exc:
            self.stats.fences_failed += 1
            self._warn_fence_failed(node_id, str(exc) or "timed out")

    def _warn_fence_failed(self, node_id: str, why: str) -> None:
        """Log that a fence of ``node_id`` failed, at most once per ``FENCE_WARN_EVERY_S`` per node.

        While no master can fence (ZooKeeper out of reach, the coordinator
        gone), every write that misses the node fails its fence at once: one
        line per write would flood the log. The line says how many failed
        since the last one.
        """
        now = time.monotonic()
        last, missed = self._fence_warned.get(node_id, (0.0, 0))
        if last and now - last < FENCE_WARN_EVERY_S:
            self._fence_warned[node_id] = (last, missed + 1)
            return
        self._fence_warned[node_id] = (now, 0)
        log.warning(
            "could not fence aux node %s, which missed a write (%s); acknowledging it anyway%s",
            node_id,
            why,
            f" ({missed} more such writes since the last warning)" if missed else "",
        )

    # -- reads -------------------------------------------------------------------

    def get(self, sink: Sink, rid: int, key: bytes) -> Any:
        """Answer GET ``rid`` with ``key``'s value (or nil) through ``sink``; returns ``LATER``, or the value itself.

        The master serves GET with this method directly (it is the hottest
        op): a value answered from the near cache is returned, for the
        dispatch to answer with the other answers of its batch; a caller
        that is not a dispatch hands it to its sink.
        """
        if self.read_every_owner:
            return self._read_newest(sink, rid, key, False)
        near = self.near
        if near is not None:
            count = near.hot.note(key)
            if count >= near.hot.hot_count or key in near.entries:  # else a cold key: no call more than counting it
                taken = self._near_get(sink, rid, key, count)
                if taken is not None:
                    return taken
            else:
                near.misses += 1
        elif self.hot is not None:
            self.hot.note(key)
        candidates = self.view.read_candidates(key)
        if not candidates:
            self.stats.unavailable += 1
            raise UnavailableError("no aux node is available for this key")
        first = candidates[0]
        link = self.links.get(first)
        if link is not None and not link.suspect and first not in self.hints.by_node:
            # the first owner, batched (what ReadOp.start() does, inlined); its ReadOp is made only if a hit is not all it needs
            self.batcher.add(link, (sink, rid, key, candidates, self.view))
        else:
            ReadOp(self, sink, rid, key, candidates, False).start()
        return LATER

    def _near_get(self, sink: Sink, rid: int, key: bytes, count: int) -> Any:
        """The near cache's copy of ``key`` (bytes), or ``LATER`` if a fill from the first owner took the read, or None.

        ``count``: what the sketch just answered for this read (``HotKeys.note``).
        """
        near = self.near
        assert near is not None
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        value = near.lookup(key, loop.time())  # counts the miss when there is no live copy
        if value is not None:
            self.stats.hits += 1
            return value
        if count < near.hot.hot_count or not near.may_fill(key, loop.time()):
            return None
        candidates = self.view.read_candidates(key)
        if not candidates:
            return None
        first = candidates[0]
        link = self.links.get(first)
        if link is None or not link.usable or not link.tracks or first in self.hints.by_node:
            return None
        fill = near.start_fill(key, loop.time())
        if fill is None:
            return None
        op = _NearFill(self, sink, rid, key, candidates, fill)
        op.conn = link.send_tracked(Op.GETV, (key, 2 if link.values else True), op)
        return LATER

    def _read_newest(self, sink: Sink, rid: int, key: bytes, entry: bool) -> Any:
        """Read ``key`` from every owner and answer the newest version (``NewestRead``); returns ``LATER``."""
        candidates = self.view.read_candidates(key)
        if not candidates:
            self.stats.unavailable += 1
            raise UnavailableError("no aux node is available for this key")
        NewestRead(self, sink, rid, key, entry).start(candidates)
        return LATER

    def read_entry(self, sink: Sink, rid: int, key: bytes) -> None:
        """Answer ``rid`` with ``key``'s entry ``[value, expires_at, version]`` (or nil) through ``sink``."""
        if self.read_every_owner:
            self._read_newest(sink, rid, key, True)
            return
        candidates = self.view.read_candidates(key)
        if not candidates:
            self.stats.unavailable += 1
            raise UnavailableError("no aux node is available for this key")
        ReadOp(self, sink, rid, key, candidates, True).start()

    def mget(self, conn: FrameProtocol, rid: int, keys: list[bytes]) -> None:
        """MGET: one read per key (batched per node), answered together; ``KEYS_PER_TURN`` keys routed per turn (``dcache.turns``)."""
        if not keys:
            conn.reply(rid, _OK, [])
            return
        collect = _Collect(conn, rid, len(keys), Op.MGET, limit=self.max_answer_bytes)
        if len(keys) > KEYS_PER_TURN and self.turns.busy:
            self._wait_turn(conn, partial(self._route_reads, conn, collect, keys, 0))
            return
        self._route_reads(conn, collect, keys, 0, KEYS_PER_TURN, False)

    def _wait_turn(self, conn: FrameProtocol, first: Slice) -> None:
        """Queue the first slice of a large MGET or MSET behind the other large requests' (``Turns.busy``), its connection's later requests held.

        Otherwise the first slice runs in the handler (``queued`` False), so
        a large request alone is served as soon as it arrives.
        """
        conn.hold_input()
        self.turns.add(first)

    def _route_reads(
        self, conn: FrameProtocol, collect: _Collect, keys: list[bytes], start: int, allowed: int = KEYS_PER_TURN, queued: bool = True
    ) -> int:
        """Route MGET's keys from ``start`` on, ``allowed`` of them, and queue the rest (see ``_next_turn``); return how many were routed.

        ``queued``: the slice runs in its turn (``Turns``), not in the handler.
        """
        if queued and (collect.done or conn.is_closing):  # answered (an error), or the client left: nothing more to read
            conn.release_input()
            return 0
        end = min(start + allowed, len(keys))
        get = self.get
        try:
            for i in range(start, end):
                try:
                    value = get(collect, i, keys[i])
                except ServerError as exc:  # this key has no live owner: the whole MGET fails with it
                    collect.reply(i, exc.code, exc.message, Op.MGET)
                    break
                if value is not LATER:  # a copy from the near cache
                    collect.reply(i, _OK, value)
        except BaseException:
            _failed_slice(conn, collect, queued)
            raise
        more = end < len(keys) and not collect.done
        self._next_turn(conn, queued, more, partial(self._route_reads, conn, collect, keys, end) if more else None)
        return end - start

    def _next_turn(self, conn: FrameProtocol, queued: bool, more: bool, rest: Slice | None) -> None:
        """After one slice of a large MGET or MSET: queue the next for a later turn (``more``), or end the request's hold.

        The first slice run in the handler that leaves keys behind stops the
        connection's later requests (``hold_input``); a queued slice that
        routes the last key, or that finds nothing more to do (an MGET
        answered, its client gone), lets them run (``release_input``), as
        does a queued slice that raised (``_failed_slice``).
        """
        if more:
            assert rest is not None
            if not queued:
                conn.hold_input()
            self.turns.add(rest)
        elif queued:
            conn.release_input()

    def exists(self, conn: FrameProtocol, rid: int, key: bytes) -> None:
        """EXISTS: whether a read finds the key."""
        self.read_entry(_Transform(conn, rid, Op.EXISTS, _exists), 0, key)

    def ttl(self, conn: FrameProtocol, rid: int, key: bytes) -> None:
        """TTL: ms left, -1 without expiry, -2 missing."""
        self.read_entry(_Transform(conn, rid, Op.TTL, _ttl), 0, key)

    async def touch(self, key: bytes) -> bool:
        """TOUCH on the first owner that answers."""
        candidates = self.read_order(self.view.read_candidates(key))
        if self.read_every_owner:
            prefer = await self.reconcile(key)
            candidates = self.read_order(self.view.read_candidates(key))  # the view may have changed meanwhile
            if prefer in candidates:
                candidates = [prefer, *(n for n in candidates if n != prefer)]
        for node in candidates:
            link = self.links.get(node)
            if link is None:
                continue
            try:
                return bool(await link.call(Op.TOUCH, key))
            except (UnavailableError, UpstreamTimeoutError):
                continue
        raise UnavailableError("no owner of the key is available")

    # -- writes -------------------------------------------------------------------

    def _targets(self, key: bytes) -> list[str]:
        near = self.near
        if near is not None and (key in near.entries or key in near.filling):
            near.discard(key)  # this master's own write: its copy goes now
        targets = self.view.write_targets(key)
        if not targets:
            self.stats.unavailable += 1
            raise UnavailableError("no aux node is available for this key")
        return targets

    def set_op(self, sink: Sink, rid: int, args: tuple[bytes, bytes, int, int], op: int = Op.SET) -> Any:
        """SET's handler (the master serves SET with it directly, no extra call layer): ``args`` as its parser returns them.

        With NX or XX, ``set_if`` in a coroutine; without, a versioned write
        to every live owner, answered through ``sink`` (``LATER``).
        """
        key, value, ttl_ms, flags = args
        if flags:
            return deferred(self.set_if(key, value, ttl_ms, flags))
        expires_at = wall_ms() + ttl_ms if ttl_ms else 0
        near = self.near
        if near is not None and (key in near.entries or key in near.filling) and self._write_through(sink, rid, op, key, value, expires_at):
            return LATER
        WriteOp(self, sink, rid, op, key, self._targets(key), _SETV, (key, value, expires_at, 0, self.clock.next()), True).start()
        return LATER

    def _write_through(self, sink: Sink, rid: int, op: int, key: bytes, value: bytes, expires_at: int) -> bool:
        """SET of a key the near cache holds: a KEEP_COPY write whose answer makes the value the new copy (``_KeptWrite``).

        Only when the first owner the write goes to is the key's first read
        candidate (the one copies are filled from), reached without hints and
        keeping a writer's subscription (``AuxLink.keeps``); otherwise False,
        and the write goes as any other (its copy dropped).
        """
        near = self.near
        assert near is not None
        targets = self.view.write_targets(key)
        if not targets:
            return False
        owner = targets[0]
        link = self.links.get(owner)
        if link is None or not link.keeps_copies or owner in self.hints.by_node:
            return False
        candidates = self.view.read_candidates(key)
        if not candidates or candidates[0] != owner:
            return False
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fill = near.write_through(key, loop.time())
        if fill is None:
            return False
        write = _KeptWrite(self, sink, rid, op, key, targets, _SETV, (key, value, expires_at, _KEEP_COPY, self.clock.next()), True)
        write.fill = fill
        write.start()
        return True

    def set(self, sink: Sink, rid: int, key: bytes, value: bytes, ttl_ms: int, op: int = Op.SET) -> None:
        """SET without a condition: a versioned write to every live owner."""
        self.set_op(sink, rid, (key, value, ttl_ms, 0), op)

    def delete(self, sink: Sink, rid: int, key: bytes) -> None:
        """DELETE: a versioned delete on every live owner; answers whether any held the key."""
        WriteOp(self, sink, rid, Op.DELETE, key, self._targets(key), _DELV, (key, self.clock.next()), None).start()

    def mset(self, conn: FrameProtocol, rid: int, pairs: list[tuple[bytes, bytes]], ttl_ms: int) -> None:
        """MSET: one write per pair; answers the number of pairs once all are stored; ``KEYS_PER_TURN`` pairs routed per turn (``dcache.turns``).

        Every pair is written, also after one failed (MSET is not atomic:
        the first error answers the request, and the writes already sent
        stand).
        """
        if not pairs:
            conn.reply(rid, _OK, 0)
            return
        collect = _Collect(conn, rid, len(pairs), Op.MSET, count=True)
        if len(pairs) > KEYS_PER_TURN and self.turns.busy:
            self._wait_turn(conn, partial(self._route_writes, conn, collect, pairs, ttl_ms, 0))
            return
        self._route_writes(conn, collect, pairs, ttl_ms, 0, KEYS_PER_TURN, False)

    def _route_writes(
        self,
        conn: FrameProtocol,
        collect: _Collect,
        pairs: list[tuple[bytes, bytes]],
        ttl_ms: int,
        start: int,
        allowed: int = KEYS_PER_TURN,
        queued: bool = True,
    ) -> int:
        """Route MSET's pairs from ``start`` on, ``allowed`` of them, and queue the rest (see ``_next_turn``); return how many were routed.

        ``queued``: the slice runs in its turn (``Turns``), not in the handler.
        """
        end = min(start + allowed, len(pairs))
        set_op = self.set_op
        try:
            for i in range(start, end):
                key, value = pairs[i]
                try:
                    set_op(collect, i, (key, value, ttl_ms, 0), Op.MSET)
                except ServerError as exc:
                    collect.reply(i, exc.code, exc.message, Op.MSET)
        except BaseException:
            _failed_slice(conn, collect, queued)
            raise
        more = end < len(pairs)
        self._next_turn(conn, queued, more, partial(self._route_writes, conn, collect, pairs, ttl_ms, end) if more else None)
        return end - start

    async def set_if(self, key: bytes, value: bytes, ttl_ms: int, flags: int) -> bool:
        """SET NX/XX: the first live owner decides the condition; the others copy its outcome."""
        primary, link = await self._newest_primary(key) if self.read_every_owner else self._primary(key)
        expires_at = wall_ms() + ttl_ms if ttl_ms else 0
        version = self.clock.next()
        try:
            status = await link.call(Op.SETV, key, value, expires_at, flags, version)
        except (UnavailableError, UpstreamTimeoutError) as exc:
            raise UnavailableError(f"the owner of the key is unavailable: {exc}") from None
        if status == _CONDITION_FAILED:
            return False
        if status.__class__ is list:  # it holds a newer version: a concurrent write won
            self.clock.observe(status[1])
            self.stats.superseded += 1
            raise SupersededError("a newer write of this key won; the conditional SET did not take effect")
        await self._copy(key, [value, expires_at, version], primary)
        return True

    async def incr(self, key: bytes, delta: int) -> int:
        """INCR/DECR: the first live owner adds; the others copy the result with its version."""
        primary, link = await self._newest_primary(key) if self.read_every_owner else self._primary(key)
        try:
            value, expires_at, version = await link.call(Op.INCRV, key, delta, self.clock.next())
        except NotAnIntegerError:
            raise
        except (UnavailableError, UpstreamTimeoutError) as exc:
            raise UnavailableError(f"the owner of the key is unavailable: {exc}") from None
        self.clock.observe(version)
        await self._copy(key, [str(value).encode(), expires_at, version], primary)
        return int(value)

    def reconcile(self, key: bytes) -> asyncio.Future[str | None]:
        """Bring ``key``'s owners up to its newest version before one of them decides an op (``NewestRead``).

        Used while reads ask every owner: the first owner may hold an older
        version than another owner, and INCR on it, or a condition tested on
        it, would decide on that older value (and its copy, with a newer
        version, would overwrite the newest everywhere). Resolves with an
        owner that holds the newest state when the owners disagreed (None:
        they agree, or no owner answered; the op then fails on its own).
        """
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        candidates = self.view.read_candidates(key)
        if not candidates:
            done.set_result(None)
        else:
            NewestRead(self, None, 0, key, True, partial(_resolve, done)).start(candidates)
        return done

    async def _newest_primary(self, key: bytes) -> tuple[str, AuxLink]:
        """``_primary`` while reads ask every owner: the owners brought up to the newest version first (``reconcile``),
        and an owner that holds it preferred."""
        prefer = await self.reconcile(key)
        if prefer is not None:
            link = self.links.get(prefer)
            if link is not None and not link.suspect and prefer in self.view.write_targets(key):
                if self.near is not None:
                    self.near.discard(key)
                return prefer, link
        return self._primary(key)

    def _primary(self, key: bytes) -> tuple[str, AuxLink]:
        """The owner that decides an op on ``key``: the first live read candidate."""
        if self.near is not None:
            self.near.discard(key)
        for node in self.read_order(self.view.read_candidates(key)):
            link = self.links.get(node)
            if link is not None:
                return node, link
        self.stats.unavailable += 1
        raise UnavailableError("no aux node is available for this key")

    async def _copy(self, key: bytes, entry: list[Any], primary: str) -> None:
        """Copy an entry the primary decided to the key's other owners; those that cannot take it get hints."""
        value, expires_at, version = entry
        others = [n for n in self.view.write_targets(key) if n != primary]
        if not others:
            return
        calls = []
        missed = []
        for node in others:
            link = self.links.get(node)
            if link is None or link.suspect:
                missed.append(node)
            else:
                calls.append((node, link.call(Op.APPLY, [[key, value, expires_at, version]])))
        results = await asyncio.gather(*(c for _, c in calls), return_exceptions=True)
        for (node, _), r in zip(calls, results, strict=True):
            if isinstance(r, (UnavailableError, UpstreamTimeoutError)):
                missed.append(node)
            elif isinstance(r, BaseException):
                log.warning("copying %r to %s failed: %s", key, node, r)
        if missed:
            self.stats.partial_writes += 1
            self.hint(missed, _SETV, key, (key, value, expires_at, 0, version))
            fenced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.after_missed(missed, partial(fenced.set_result, None))
            await fenced

    def expire(self, conn: FrameProtocol, rid: int, key: bytes, ttl_ms: int) -> None:
        """EXPIRE on every live owner; answers whether any held the key.

        EXPIRE is not versioned: an owner that misses it keeps the old expiry
        (no hint can carry it); it is acknowledged if any owner applied it.
        """
        _FanOut(self, conn, rid, Op.EXPIRE, self._targets(key), (key, ttl_ms)).start()

    def persist(self, conn: FrameProtocol, rid: int, key: bytes) -> None:
        """PERSIST on every live owner; answers whether any removed an expiry.

        Unversioned like EXPIRE: an owner that misses it keeps its expiry.
        """
        _FanOut(self, conn, rid, Op.PERSIST, self._targets(key), (key,)).start()

    async def apply_entries(self, entries: list[tuple[bytes, bytes, int, int]]) -> int:
        """Versioned, last-writer-wins copies (restore): each entry to its owners.

        Returns how many entries their first owner applied (the rest were
        older than what the cluster holds, or expired).
        """
        view = self.view
        first: dict[str, list[list[Any]]] = {}
        rest: dict[str, list[list[Any]]] = {}
        near = self.near
        for key, value, expires_at, version in entries:
            if near is not None:
                near.discard(key)
            self.clock.observe(version)
            targets = view.write_targets(key)
            if not targets:
                raise UnavailableError("no aux node is available for some keys")
            entry = [key, value, expires_at, version]
            first.setdefault(targets[0], []).append(entry)
            for n in targets[1:]:
                rest.setdefault(n, []).append(entry)
        links = self.links

        async def send(node: str, batch: list[list[Any]]) -> Any:
            link = links.get(node)
            if link is None:
                raise UnavailableError(f"no link to aux node {node}")
            return await link.call(Op.APPLY, batch)

        counts = await asyncio.gather(*(send(n, b) for n, b in first.items()))
        if rest:
            await asyncio.gather(*(send(n, b) for n, b in rest.items()), return_exceptions=True)
        return sum(int(c) for c in counts)

    # -- cluster-wide --------------------------------------------------------

    async def gather_stats(self, timeout: float = STATS_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """STATS of every live, unsuspected aux node; nodes that do not answer within ``timeout`` are left out."""
        view = self.view
        nodes = [n for n in view.members if view.is_live(n) and n in self.links and not self.links[n].suspect]
        results = await asyncio.gather(*(asyncio.wait_for(self.links[n].call(Op.STATS), timeout) for n in nodes), return_exceptions=True)
        return {n: r for n, r in zip(nodes, results, strict=True) if isinstance(r, dict)}


class ReadOp:
    """A read in flight: tries the candidates in order; repairs earlier misses.

    It is its own callback (``__call__(status, result)``), so a read costs
    no future and no task. ``entry``: answer ``[value, expires_at,
    version]`` instead of the value.
    """

    __slots__ = ("router", "sink", "rid", "key", "candidates", "view", "i", "missed", "error", "entry")

    def __init__(self, router: Router, sink: Sink, rid: int, key: bytes, candidates: list[str], entry: bool) -> None:
        self.router = router
        self.sink = sink
        self.rid = rid
        self.key = key
        self.candidates = candidates
        #: The view ``candidates`` come from.
        self.view = router.view
        self.i = -1
        self.missed: list[str] | None = None
        self.error: Any = None
        self.entry = entry

    def start(self) -> None:
        """Put the nodes this master cannot trust last, then read the first candidate."""
        self.candidates = self.router.read_order(self.candidates)
        self.i = -1
        self.next()

    def next(self) -> None:
        """Read the next candidate, or answer when none is left."""
        self.i += 1
        candidates = self.candidates
        router = self.router
        if self.i < len(candidates):
            link = router.links.get(candidates[self.i])
            if link is None:
                self(_UNAVAILABLE, f"no link to aux node {candidates[self.i]}")
            elif self.i == 0 and not self.entry:
                # the first owner: batched with the other GETs of this loop
                # iteration into one MGET (values only, the cheapest answer);
                # nothing was answered yet, so the read is all in a ``Batched``
                router.batcher.add(link, (self.sink, self.rid, self.key, candidates, self.view))
            else:
                link.send(Op.GETV, (self.key,), self)  # later owners: a repair needs the version
            return
        if self.error is not None and self.missed is None:
            router.stats.unavailable += 1
            self.sink.reply(self.rid, _UNAVAILABLE, f"no owner of the key answered: {self.error}", _GET)
        else:
            router.stats.misses += 1
            self.sink.reply(self.rid, _OK, None)

    def reroute(self) -> None:
        """Start again from the current view's candidates (the view changed before the read was sent)."""
        view = self.router.view
        self.view = view
        self.candidates = view.read_candidates(self.key)
        if not self.candidates:
            self.error = "no aux node is available for this key"  # next() answers UNAVAILABLE
        self.start()

    def __call__(self, status: int, result: Any) -> None:
        if status == _OK:
            if result is not None:
                self.router.stats.hits += 1
                if self.i == 0 and not self.entry:
                    self.sink.reply(self.rid, _OK, result)
                    return
                if self.missed:
                    self.router.repair(self.missed, self.key, result)
                self.sink.reply(self.rid, _OK, result if self.entry else result[0])
                return
            if self.missed is None:
                self.missed = []
            self.missed.append(self.candidates[self.i])
        elif status == _UNAVAILABLE or status == _TIMEOUT:
            self.error = result
            self.router.stats.fallbacks += 1
        else:
            if status == _STALE_RING:
                self.router.stale_ring()
            self.sink.reply(self.rid, status, result, _GET)
            return
        self.next()


#: A first-owner read waiting in the ``LinkBatcher``: ``(sink, rid, key, candidates, view)``.
#: Nothing was answered for it yet, so this is all its ``ReadOp`` would hold
#: (``i`` 0, nothing missed, no error); the ``ReadOp`` is made (``_read_op``)
#: only if the read needs more than a hit on that owner: a hit costs no object.
Batched = tuple[Sink, int, bytes, list[str], ClusterView]


def _read_op(router: Router, read: Batched) -> ReadOp:
    """The ``ReadOp`` of a batched read, at its first candidate (answered by it next, or sent again)."""
    sink, rid, key, candidates, view = read
    op = ReadOp(router, sink, rid, key, candidates, False)
    op.view = view
    op.i = 0
    return op


class _NearFill:
    """A hot key's first-owner read that also fills the near cache (``GETV [key, true]``).

    A hit is stored (unless an invalidation overtook it) and answered; a
    miss or an error goes on exactly as a ``ReadOp`` whose first candidate
    answered that. ``BAD_ARGUMENTS`` is the answer of an aux node from
    before tracking (a rolling upgrade, masters first): the read starts
    again as a plain one, and the node's link stops asking it to track.
    """

    __slots__ = ("router", "sink", "rid", "key", "candidates", "fill", "conn")

    def __init__(self, router: Router, sink: Sink, rid: int, key: bytes, candidates: list[str], fill: Any) -> None:
        self.router = router
        self.sink = sink
        self.rid = rid
        self.key = key
        self.candidates = candidates
        self.fill = fill
        self.conn: Any = None

    def __call__(self, status: int, result: Any) -> None:
        router = self.router
        near = router.near
        hit = status == _OK and result.__class__ is list and len(result) == 3
        if near is not None:
            near.end_fill(self.key, self.fill, result if hit else None, self.conn)
        if hit:
            router.stats.hits += 1
            self.sink.reply(self.rid, _OK, result[0])
            return
        candidates = self.candidates
        if status == _BAD_ARGUMENTS:
            link = router.links.get(candidates[0])
            if link is not None:
                link.no_tracking()
            ReadOp(router, self.sink, self.rid, self.key, candidates, False).start()
            return
        op = ReadOp(router, self.sink, self.rid, self.key, [candidates[0], *router.read_order(candidates[1:])], False)
        op.i = 0  # the first candidate, just read
        op(status, result if status != _OK else None)


class _Split:
    """Hands each value of a batched MGET answer to the read that asked for it.

    If the values together exceed the frame limit (the aux node answers
    FRAME_TOO_LARGE), each read is sent again on its own: every single value
    fits in a frame.
    """

    __slots__ = ("router", "reads", "link")

    def __init__(self, router: Router, reads: list[Batched], link: AuxLink) -> None:
        self.router = router
        self.reads = reads
        self.link = link

    def __call__(self, status: int, result: Any) -> None:
        reads = self.reads
        router = self.router
        if status == _OK and result.__class__ is list and len(result) == len(reads):
            hits = 0
            for read, value in zip(reads, result, strict=True):
                if value is None:
                    _read_op(router, read)(_OK, None)  # a miss: the read goes on to the replicas
                else:
                    hits += 1
                    read[0].reply(read[1], _OK, value)  # a hit on the first owner (ReadOp(0, value), without the ReadOp)
            if hits:
                router.stats.hits += hits
            return
        if status == _FRAME_TOO_LARGE:
            link = self.link
            for read in reads:
                link.send(Op.GET, (read[2],), _read_op(router, read))
            link.flush()
            return
        if status == _OK:
            status, result = _UNAVAILABLE, "malformed MGET answer from an aux node"
        for read in reads:
            _read_op(router, read)(status, result)


class LinkBatcher:
    """Turns the first-owner reads of one loop iteration into one MGET, and its SETs into one MSETV, per aux node.

    Pipelined clients send many requests at once; forwarding them as one
    MGET or MSETV per node saves a frame, a request id and a dispatch per key
    on both the master and the aux node. A batch leaves at the end of the
    iteration in which its requests arrived (no added delay); a lone read
    goes as a GET, a lone write as a SETV. The writes wait on their link
    (``AuxLink.held``), which sends them before any other request to
    that node.

    Per node, requests leave in the order they were made: waiting writes
    leave before a read is queued, and waiting reads (``AuxLink.reads_waiting``)
    before any other request to that node, so a read never overtakes an
    earlier write, nor a write (a DELETE, an INCR...) an earlier read.
    """

    __slots__ = ("_router", "_pending", "_holding", "_scheduled", "_loop")

    #: Most keys in one MGET.
    MAX_BATCH = _MAX_BATCH

    def __init__(self, router: Router) -> None:
        self._router = router
        self._pending: dict[AuxLink, list[Batched]] = {}
        self._holding: list[AuxLink] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, link: AuxLink, read: Batched) -> None:
        """Queue the first-owner read ``read`` on ``link``."""
        if link.held:  # earlier writes to this node leave first
            link.release_held()
        ops = self._pending.get(link)
        if ops is None:
            self._pending[link] = [read]
            link.reads_waiting = partial(self._release_reads, link)  # any other request to the node sends them first
        else:
            ops.append(read)
            if len(ops) >= _MAX_BATCH:
                del self._pending[link]
                link.reads_waiting = None
                self._send(link, ops, True)
                link.flush()
                return
        if not self._scheduled:  # once per loop iteration, not per read
            self._schedule()

    def _release_reads(self, link: AuxLink) -> None:
        """Send the reads waiting for ``link`` now (another request to that node is about to leave)."""
        ops = self._pending.pop(link, None)
        if ops:
            self._send_reads(link, ops)

    def add_write(self, link: AuxLink, args: tuple[Any, ...], target: Callable[[int, Any], None]) -> None:
        """Queue the SETV ``args`` (``(key, value, expires_at, flags, version)``) on ``link``; ``target`` gets its answer."""
        if link.reads_waiting is not None:  # earlier reads of this node leave first
            release = link.reads_waiting
            link.reads_waiting = None
            release()
        held = link.held
        if not held:
            self._holding.append(link)
        held.append((args, target))  # held on the link, to leave with others as one MSETV
        link.held_bytes += len(args[1])
        if len(held) >= MAX_HELD or link.held_bytes >= MAX_HELD_BYTES:  # a full batch leaves now
            link.release_held(True)
            link.flush()
            return
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._holding:
            holding = self._holding
            self._holding = []
            for link in holding:
                if link.held:
                    link.release_held(True)  # now, not one more loop iteration later
                    link.flush()
        if self._pending:
            pending = self._pending
            self._pending = {}
            for link, ops in pending.items():
                link.reads_waiting = None
                if self._send_reads(link, ops, True):
                    link.flush()

    def _send_reads(self, link: AuxLink, ops: list[Batched], now: bool = False) -> bool:
        """Send ``ops`` routed by the current view (``now``: written at once); reroute the others. Whether anything was sent."""
        router = self._router
        view = router.view
        fresh = [read for read in ops if read[4] is view]
        if len(fresh) != len(ops):
            # The view changed after these reads were routed (say the node
            # was found restarted and fenced in between): route them again
            # (they go out with the next batch), or they would read a node
            # that may serve stale data.
            for read in ops:
                if read[4] is not view:
                    _read_op(router, read).reroute()
            ops = fresh
            if not ops:
                return False
        self._send(link, ops, now)
        return True

    def _send(self, link: AuxLink, ops: list[Batched], now: bool = False) -> None:
        if len(ops) == 1:
            link.send(Op.GET, (ops[0][2],), _read_op(self._router, ops[0]), now)
        else:
            link.send(Op.MGET, ([read[2] for read in ops],), _Split(self._router, ops, link), now)


class _Target:
    """One owner's answer to a ``WriteOp``."""

    __slots__ = ("write", "node")

    def __init__(self, write: WriteOp, node: str) -> None:
        self.write = write
        self.node = node

    def __call__(self, status: int, result: Any) -> None:
        self.write.answer(self.node, status, result)


class WriteOp:
    """A versioned write (SETV or DELV) of one key to all its live owners (see the module note).

    ``ok_result`` is what a successful write answers (``None``: whether any
    owner answered true, as DELETE does). ``op`` is the client's op, for the
    error counts.
    """

    __slots__ = (
        "router",
        "sink",
        "rid",
        "op",
        "key",
        "targets",
        "upstream",
        "args",
        "ok_result",
        "pending",
        "ok",
        "any_true",
        "missed",
        "error",
        "fatal",
        "newer",
        "retried",
    )

    pending: int
    ok: int
    any_true: bool
    missed: list[str]
    error: Any
    fatal: tuple[int, Any] | None
    newer: int

    def __init__(
        self,
        router: Router,
        sink: Sink,
        rid: int,
        op: int,
        key: bytes,
        targets: list[str],
        upstream: int,
        args: tuple[Any, ...],
        ok_result: Any,
    ) -> None:
        self.router = router
        self.sink = sink
        self.rid = rid
        self.op = op
        self.key = key
        self.targets = targets
        self.upstream = upstream
        self.args = args
        self.ok_result = ok_result
        self.retried = False

    def start(self) -> None:
        """Send the write to every target this master trusts; the others get hints once it is applied."""
        links = self.router.links
        targets = self.targets
        if len(targets) == 1:  # one owner, not suspected: the op is its own callback (``__call__``)
            link = links.get(targets[0])
            if link is not None and not link.suspect:
                if self.upstream == _SETV:
                    # the bound method, not the op: Python calls it inline, an instance's __call__ through C
                    self.router.batcher.add_write(link, self.args, self.__call__)
                else:
                    link.send(self.upstream, self.args, self)
                return
        self._reset()
        send_to = []
        for node in self.targets:
            link = links.get(node)
            if link is None or link.suspect:
                self.missed.append(node)
            else:
                send_to.append((node, link))
        if not send_to:  # every owner is suspected: try them all rather than refuse
            send_to = [(n, links[n]) for n in self.targets if n in links]
            self.missed = [n for n in self.targets if n not in links]
        self.pending = len(send_to)
        if not send_to:
            self.finish()
            return
        if self.upstream == _SETV:  # with the other SETs of this loop turn: one MSETV per node
            batcher = self.router.batcher
            for node, link in send_to:
                batcher.add_write(link, self.args, _Target(self, node))
            return
        for node, link in send_to:
            link.send(self.upstream, self.args, _Target(self, node))

    def __call__(self, status: int, result: Any) -> None:
        """The answer of a write sent to one owner only (``start``).

        An owner that applied it (any answer but ``[2, held]``) answers the
        client at once, unless a write quorum above 1 asks for more owners
        than there are: what ``answer`` then ``finish`` would do, without them.
        """
        if status == _OK and result.__class__ is not list and self.router.write_quorum <= 1:
            self.sink.reply(self.rid, _OK, (result is True) if self.ok_result is None else self.ok_result)
            return
        self._reset()
        self.pending = 1
        self.answer(self.targets[0], status, result)

    def _reset(self) -> None:
        """The counts of a write about to gather its owners' answers (the one-owner path sets them only when it needs them)."""
        self.ok = 0
        self.any_true = False
        self.missed = []
        self.error = None
        self.fatal = None
        self.newer = 0

    def answer(self, node: str, status: int, result: Any) -> None:
        """One owner's answer."""
        if status == _OK:
            if result.__class__ is list:  # [2, held]: it holds a newer version
                held = result[1]
                if held.__class__ is int and held > self.newer:
                    self.newer = held
            else:
                self.ok += 1
                if result is True:
                    self.any_true = True
        elif status == _UNAVAILABLE or status == _TIMEOUT:
            self.missed.append(node)
            self.error = result
        elif self.fatal is None:
            self.fatal = (status, result)
        self.pending -= 1
        if not self.pending:
            self.finish()

    def finish(self) -> None:
        """Every owner sent to has answered: acknowledge, retry once with a newer version, or fail."""
        router = self.router
        sink = self.sink
        if self.fatal is not None:
            if self.fatal[0] == _STALE_RING:
                router.stale_ring()
            sink.reply(self.rid, *self.fatal, self.op)
            return
        if self.newer:
            router.clock.observe(self.newer)  # the receive rule: our next version is newer still
            if not self.retried:
                router.stats.superseded_retries += 1
                self.retried = True
                args = self.args
                self.args = (*args[:-1], router.clock.next())
                self.start()
                return
            router.stats.superseded += 1
            sink.reply(self.rid, _SUPERSEDED, "a newer write of this key won; this write did not take effect", self.op)
            return
        if not self.ok:
            router.stats.unavailable += 1
            sink.reply(self.rid, _UNAVAILABLE, f"no owner of the key applied the write: {self.error or 'none is reachable'}", self.op)
            return
        quorum = router.write_quorum
        if quorum and self.ok < quorum:
            sink.reply(self.rid, _UNAVAILABLE, f"the write reached {self.ok} of the {quorum} owners the quorum needs", self.op)
            return
        result = self.any_true if self.ok_result is None else self.ok_result
        if self.missed:
            router.stats.partial_writes += 1
            router.hint(self.missed, self.upstream, self.key, self.args)
            router.after_missed(self.missed, partial(sink.reply, self.rid, _OK, result))
            return
        sink.reply(self.rid, _OK, result)


class _KeptWrite(WriteOp):
    """A SET of a key this master holds a near-cache copy of, to a first owner that keeps a writer's subscription.

    It goes to the first owner as a SETV with KEEP_COPY, batched with the
    loop turn's other SETs on the connection every request to that node
    goes on, so the owner pushes this master no invalidation for it and
    keeps that connection subscribed; the other owners get a plain SETV.
    The first owner's answer stores the written value as the key's copy,
    tied to the connection that carried the answer
    (``PeerConnection.answering``), through ``NearCache.end_fill``, which
    discards it if an invalidation of a newer version came first. If the
    owner is no longer reachable that way when the write (or its retry)
    starts, the fill ends with nothing stored and the write goes as any other.
    """

    __slots__ = ("fill",)

    #: The near-cache fill the first owner's answer ends (``NearCache.write_through``); None once ended.
    fill: Any

    def start(self) -> None:
        """Queue the KEEP_COPY write for the first owner and a plain one for the others; or (fill ended) a plain write."""
        if self.fill is not None:
            router = self.router
            links = router.links
            targets = self.targets
            first = targets[0]
            link = links.get(first)
            if link is not None and link.keeps_copies:
                batcher = router.batcher
                if len(targets) == 1:
                    batcher.add_write(link, self.args, self.__call__)
                    return
                self._reset()
                send_to = []
                for node in targets[1:]:
                    other = links.get(node)
                    if other is None or other.suspect:
                        self.missed.append(node)
                    else:
                        send_to.append((node, other))
                self.pending = 1 + len(send_to)
                key, value, expires_at, _, version = self.args
                plain = (key, value, expires_at, 0, version)
                batcher.add_write(link, self.args, partial(self._first_answered, first))
                for node, other in send_to:
                    batcher.add_write(other, plain, _Target(self, node))
                return
            self._settle(False)
        WriteOp.start(self)

    def __call__(self, status: int, result: Any) -> None:
        """The only owner's answer: its copy (``_first``), then as any write's."""
        self._first(status, result)
        WriteOp.__call__(self, status, result)

    def _first_answered(self, node: str, status: int, result: Any) -> None:
        """The first owner's answer, with other owners: its copy (``_first``), then counted with theirs."""
        self._first(status, result)
        self.answer(node, status, result)

    def _first(self, status: int, result: Any) -> None:
        """A stored write becomes the copy; a superseded one keeps its fill for the retry (``finish``); anything else ends it."""
        if self.fill is not None and not (status == _OK and result.__class__ is list and not self.retried):
            self._settle(status == _OK and result.__class__ is int and result == 1)

    def finish(self) -> None:
        """``WriteOp.finish``; a fill still open (its owner answered superseded) ends unless a retry follows."""
        if self.fill is not None and (self.fatal is not None or not self.newer or self.retried):
            self._settle(False)
        WriteOp.finish(self)

    def _settle(self, stored: bool) -> None:
        """End the fill: the written value becomes the copy if the owner ``stored`` it (an answer being read: its connection is open)."""
        fill = self.fill
        self.fill = None
        key, value, expires_at, _, version = self.args
        self.args = (key, value, expires_at, 0, version)  # a retry, or the plain write, goes without KEEP_COPY
        router = self.router
        near = router.near
        if near is None:
            return
        conn = PeerConnection.answering if stored else None
        if conn is None or conn.closed:
            near.end_fill(key, fill, None, None)
            return
        link = router.links.get(self.targets[0])
        if link is not None and link.tracking is not conn:
            link.tracking = conn  # the connection every request goes on changed: its lease is renewed from now on
        near.end_fill(key, fill, [value, expires_at, version], conn)


class _FanOut:
    """An unversioned write (EXPIRE, PERSIST) to every live owner; true if any answered true."""

    __slots__ = ("router", "sink", "rid", "op", "targets", "args", "pending", "ok", "any_true", "error", "fatal", "missed")

    def __init__(self, router: Router, sink: Sink, rid: int, op: int, targets: list[str], args: tuple[Any, ...]) -> None:
        self.router = router
        self.sink = sink
        self.rid = rid
        self.op = op
        self.targets = targets
        self.args = args
        self.pending = 0
        self.ok = 0
        self.any_true = False
        self.error: Any = None
        self.fatal: tuple[int, Any] | None = None
        self.missed: list[str] = []

    def start(self) -> None:
        links = self.router.links
        usable = [(n, links[n]) for n in self.targets if n in links and not links[n].suspect]
        if not usable:
            usable = [(n, links[n]) for n in self.targets if n in links]
        self.missed = [n for n in self.targets if n not in {u for u, _ in usable}]
        self.pending = len(usable)
        if not usable:
            self.router.stats.unavailable += 1
            self.sink.reply(self.rid, _UNAVAILABLE, "no owner of the key is reachable", self.op)
            return
        for node, link in usable:
            link.send(self.op, self.args, partial(self.answer, node))

    def answer(self, node: str, status: int, result: Any) -> None:
        if status == _OK:
            self.ok += 1
            self.any_true = self.any_true or bool(result)
        elif status == _UNAVAILABLE or status == _TIMEOUT:
            self.error = result
            self.missed.append(node)
        elif self.fatal is None:
            self.fatal = (status, result)
        self.pending -= 1
        if self.pending:
            return
        if self.fatal is not None:
            if self.fatal[0] == _STALE_RING:
                self.router.stale_ring()
            self.sink.reply(self.rid, *self.fatal, self.op)
        elif not self.ok:
            self.router.stats.unavailable += 1
            self.sink.reply(self.rid, _UNAVAILABLE, f"no owner of the key applied it: {self.error}", self.op)
        elif self.missed:
            self.router.stats.partial_writes += 1
            self.router.after_missed(self.missed, partial(self.sink.reply, self.rid, _OK, self.any_true))
        else:
            self.sink.reply(self.rid, _OK, self.any_true)


class _Collect:
    """Gathers the answers of several ops (MGET's reads, MSET's writes) into one answer to the client.

    The first error answers the whole request; later answers are dropped.
    With ``count`` the answer is the number of ops (MSET), else the list of
    their results in order (MGET).
    """

    __slots__ = ("conn", "rid", "op", "results", "pending", "done", "n", "size", "limit")

    def __init__(self, conn: Sink, rid: int, n: int, op: int, *, count: bool = False, limit: int = 0) -> None:
        self.conn = conn
        self.rid = rid
        self.op = op
        self.results: list[Any] | None = None if count else [None] * n
        self.pending = n
        self.done = False
        self.n = n
        #: Bytes of values gathered, and the most the answer may hold (0: no bound).
        self.size = 0
        self.limit = limit

    def reply(self, index: int, status: int, result: Any, op: int = 0) -> None:
        if self.done:
            return
        if status:
            self.done = True
            self.conn.reply(self.rid, status, result, self.op)
            return
        if self.results is not None:
            if result is not None and self.limit:
                self.size += len(result)
                if self.size > self.limit:
                    self.done = True
                    self.results = None
                    message = f"the values of these {self.n} keys exceed the {self.limit}-byte frame limit: ask for fewer keys at once"
                    self.conn.reply(self.rid, _FRAME_TOO_LARGE, message, self.op)
                    return
            self.results[index] = result
        self.pending -= 1
        if not self.pending:
            self.done = True
            self.conn.reply(self.rid, _OK, self.n if self.results is None else self.results, self.op)


class _Transform:
    """Answers a client with a function of one read's entry (EXISTS, TTL)."""

    __slots__ = ("conn", "rid", "op", "fn")

    def __init__(self, conn: Sink, rid: int, op: int, fn: Any) -> None:
        self.conn = conn
        self.rid = rid
        self.op = op
        self.fn = fn

    def reply(self, index: int, status: int, result: Any, op: int = 0) -> None:
        if status:
            self.conn.reply(self.rid, status, result, self.op)
        else:
            self.conn.reply(self.rid, _OK, self.fn(result), self.op)


def _failed_slice(conn: FrameProtocol, collect: _Collect, queued: bool) -> None:
    """A slice of a large MGET or MSET raised (a bug): no slice follows, the client gets an error, its later requests run.

    The error of a first slice run in the handler is answered by the
    dispatch that called the handler; a queued slice answers ``INTERNAL``
    itself (``Turns`` logs the exception and runs the other requests' slices).
    """
    if queued:
        collect.reply(0, _INTERNAL, "internal error while routing this request's keys", collect.op)
        conn.release_input()
    collect.done = True


def _exists(entry: list[Any] | None) -> bool:
    return entry is not None


def _ttl(entry: list[Any] | None) -> int:
    if entry is None:
        return -2
    expires_at = entry[1]
    if not expires_at:
        return -1
    return max(0, int(expires_at) - wall_ms())


def _resolve(done: asyncio.Future[Any], result: Any) -> None:
    if not done.done():
        done.set_result(result)


def _ignore(status: int, result: Any) -> None:
    """The callback of a best-effort request (a read repair)."""
