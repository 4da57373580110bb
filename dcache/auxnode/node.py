"""The aux role: a data node serving the native protocol over one LRU cache.

Every handler is synchronous: it gets its op's parsed arguments (the parsers
in ``dcache.protocol.ops`` have checked them), works on the ``LRUCache`` and
returns the result, so a batch of pipelined requests is answered within one
``data_received`` and leaves in one write.

Writes made directly against an aux node get a version from the node's own
hybrid logical clock; writes routed by a master carry the master's version
(cluster ops, ``dcache.auxnode.cluster_ops``), which this node's clock
observes, so its own next write is newer still.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import time
from typing import TYPE_CHECKING, Any, cast

from ..address import format_address, parse_address
from ..config import AuxConfig
from ..errors import NotAnIntegerError, OutOfMemoryError, ServerError, Status
from ..hlc import HybridClock, wall_ms
from ..lru import EntryTooLargeError, IntegerOverflowError, LRUCache, NotAnInt64Error
from ..lru.cache import NATIVE_MISSING
from ..protocol import FEATURE_KEEP_COPY, FEATURE_VALUE_PUSH, Op, SetFlag
from ..protocol.limits import KEYS_PER_TURN
from ..server import DATA_OPS, LATER, FrameProtocol, Service, answer_too_large, check_answer_size
from .binding import ClusterBinding
from .cluster_ops import ClusterOps
from .snapshots import SnapshotManager
from .tracking import Tracker, TrackingCache

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from .membership import JoinAgent
    from .zkagent import ZkAgent

__all__ = ["AuxNode", "run_aux", "serve_aux"]

log = logging.getLogger("dcache.aux")

#: Most seconds between two ``gc.freeze()`` calls (see ``AuxNode._gc_loop``).
GC_FREEZE_INTERVAL_S = 5.0
#: Seconds between the gc loop's looks at the collector's counts.
GC_CHECK_S = 0.5
#: Allocations between young-generation collections on an aux node (CPython's default is 700).
GC_GEN0_THRESHOLD = 50_000
#: Old expiry-heap items the expiry sweep drains per run while a heap compaction lasts
#: (``LRUCache.drain_expiry_heap``): a few ms of loop time, so a compaction of a million
#: expiring keys ends within seconds even without writes.
EXPIRY_HEAP_DRAIN = 5000


def freeze_due(since_freeze_s: float) -> bool:
    """Whether the aux node's gc loop should collect the young generations and freeze now.

    As soon as a young collection ran since the last freeze (its survivors,
    up to ``GC_GEN0_THRESHOLD`` objects, wait in generation 1), or every
    ``GC_FREEZE_INTERVAL_S``: under a steady stream of new keys each
    collection before a freeze then walks at most about two young
    generations' worth of objects (a few ms), not everything stored since
    the last freeze (about 1 ms per 10,000 new keys: 20 ms after 5 s at
    40,000 new keys a second). The same work in all, in smaller pieces.
    """
    return gc.get_count()[1] > 0 or since_freeze_s >= GC_FREEZE_INTERVAL_S


_NX = SetFlag.NX.value
_XX = SetFlag.XX.value
_OK = Status.OK.value
_INTERNAL = Status.INTERNAL.value
_MGET = Op.MGET.value


class AuxNode(Service):
    """An aux node: the handlers, the cache and the background tasks."""

    role = "aux"
    #: Refused to a master's connection routed by a ring older than the floor (EPOCH): by its old ring
    #: it would write behind a migration's copy and read owners that lack what was written since.
    ring_fenced_ops = frozenset(
        int(op)
        for op in (
            Op.GET,
            Op.MGET,
            Op.EXISTS,
            Op.TTL,
            Op.EXPIRE,
            Op.PERSIST,
            Op.GETV,
            Op.MGETV,
            Op.SETV,
            Op.MSETV,
            Op.DELV,
            Op.INCRV,
            Op.APPLY,
            Op.APPLY_DELETES,
            Op.DROP,
        )
    )

    def __init__(self, config: AuxConfig, node_id: str | None = None) -> None:
        super().__init__(node_id or config.node_id or "aux", config)
        self.config = config
        cache = TrackingCache(config.max_memory, config.max_items)
        if NATIVE_MISSING:
            log.warning(
                "the LRU's C entry (dcache.lru._entry) is %s: each key takes about 110 bytes more memory, "
                "and --max-memory holds a quarter to a third fewer keys (docs/OPERATIONS.md, 'Memory')",
                NATIVE_MISSING,
            )
        #: Which master connections hold a copy of which key (near caches).
        self.tracker = Tracker(self, config.tracking_keys)
        cache.attach(self.tracker)
        self.cache: LRUCache = cache
        self.clock = self._new_clock()
        #: Random per process: a master that sees it change knows the node restarted.
        self.incarnation = random.getrandbits(62)
        #: The ``JoinAgent`` or ``ZkAgent`` keeping this node in a cluster, if any.
        self.membership_agent: JoinAgent | ZkAgent | None = None
        #: The ring epoch a master last admitted this node at (0: never); kept
        #: in snapshots, so a restarted coordinator can tell the node is not new.
        self.ring_epoch = 0
        self.started_at = time.time()
        self.snapshots = SnapshotManager(self)
        #: The cluster this node serves (``dcache.auxnode.binding``).
        self.binding = ClusterBinding(config.data_dir)
        self.register(*DATA_OPS)
        self.cluster_ops = ClusterOps(self)
        self.cluster_ops.register(self.handlers)
        self.register(Op.BIND)

    def _new_clock(self) -> HybridClock:
        return HybridClock(self.node_id, max_skew_ms=self.limits.max_clock_skew_ms)

    def set_ring_epoch(self, epoch: int) -> None:
        """Record the epoch a master admitted this node at (from JOIN's answer)."""
        if epoch > self.ring_epoch:
            self.ring_epoch = epoch

    # -- handlers (hot path: keep them flat) ------------------------------

    def _ping(self, conn: FrameProtocol, rid: int, args: None) -> Any:
        return "PONG"

    def _get(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        return self.cache.get(key)

    def _set(self, conn: FrameProtocol, rid: int, args: tuple[bytes, bytes, int, int]) -> Any:
        key, value, ttl, flags = args
        try:
            return self.cache.set(
                key,
                value,
                expires_at=wall_ms() + ttl if ttl else 0,
                version=self.clock.next(),
                nx=flags == _NX,
                xx=flags == _XX,
            )
        except EntryTooLargeError as exc:
            raise OutOfMemoryError(str(exc)) from None

    def _delete(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        return self.cache.delete(key, version=self.clock.next())

    def _mget(self, conn: FrameProtocol, rid: int, keys: list[bytes]) -> Any:
        get = self.cache.get
        if len(keys) > 16:  # a few values always fit; past that, refuse before packing an answer the client would refuse
            if len(keys) > KEYS_PER_TURN and conn is not None and conn.may_take_turns(rid):
                return _MgetTurns(self, conn, rid, keys).start()
            values = [get(k) for k in keys]
            check_answer_size(values, self.limits.max_frame_bytes)
            return values
        return [get(k) for k in keys]

    def _mset(self, conn: FrameProtocol, rid: int, args: tuple[list[tuple[bytes, bytes]], int]) -> Any:
        items, ttl = args
        expires_at = wall_ms() + ttl if ttl else 0
        cache = self.cache
        stored = 0
        for key, value in items:
            try:
                cache.set(key, value, expires_at=expires_at, version=self.clock.next())
            except EntryTooLargeError as exc:
                raise OutOfMemoryError(f"{exc} (stored {stored} of {len(items)} pairs)") from None
            stored += 1
        return stored

    def _exists(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        return self.cache.exists(key)

    def _expire(self, conn: FrameProtocol, rid: int, args: tuple[bytes, int]) -> Any:
        return self.cache.expire(*args)

    def _ttl(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        return self.cache.ttl_ms(key)

    def _incr(self, conn: FrameProtocol, rid: int, args: tuple[bytes, int]) -> Any:
        return self.add(args[0], args[1], self.clock.next())

    def _decr(self, conn: FrameProtocol, rid: int, args: tuple[bytes, int]) -> Any:
        return self.add(args[0], -args[1], self.clock.next())

    def add(self, key: bytes, delta: int, version: int) -> int:
        """INCR/DECR/INCRV: add ``delta`` to the integer at ``key``, stamped with ``version``.

        Raises:
            NotAnIntegerError: not a signed 64-bit decimal, or the result would overflow.
            OutOfMemoryError: the entry alone exceeds the budget.
        """
        try:
            return self.cache.incr(key, delta, version=version)
        except NotAnInt64Error:
            raise NotAnIntegerError("value is not a signed 64-bit decimal integer") from None
        except IntegerOverflowError:
            raise NotAnIntegerError("increment would overflow a signed 64-bit integer") from None
        except EntryTooLargeError as exc:
            raise OutOfMemoryError(str(exc)) from None

    def _touch(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        return self.cache.touch(key)

    def _persist(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        return self.cache.persist(key)

    def _bind(self, conn: FrameProtocol, rid: int, cluster_id: str) -> Any:
        """BIND: the master's cluster must be the one this node belongs to (the first one, if none yet)."""
        return self.binding.bind(cluster_id)

    def _stats(self, conn: FrameProtocol, rid: int, args: None) -> Any:
        return self.stats()

    # -- everything else -----------------------------------------------------

    def hello_result(self) -> dict[str, Any]:
        """HELLO plus this process's ``incarnation``, so masters notice a restart, and its ``features``."""
        result = super().hello_result()
        result["incarnation"] = self.incarnation
        if self.tracker.max_keys > 0:
            # SETV/MSETV's KEEP_COPY flag (a near cache's own writes); GETV track 2 (written values pushed to copies)
            result["features"] = [FEATURE_KEEP_COPY, FEATURE_VALUE_PUSH]
        return result

    def stats(self) -> dict[str, Any]:
        """The node's counters, as STATS returns them."""
        c = self.cache
        return {
            "role": self.role,
            "node_id": self.node_id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "items": len(c),
            "bytes": c.bytes_used,
            "max_bytes": c.max_bytes,
            "max_items": c.max_items,
            "hits": c.hits,
            "misses": c.misses,
            "evictions": c.evictions,
            "expirations": c.expirations,
            **self.connection_stats(),
            **self.tracker.stats(),
            **self.snapshots.stats(),
            **self._membership_stats(),
            "cluster_id": self.binding.cluster_id,
            "cluster_refusals": self.binding.refusals,
            "ring_floor": self.ring_floor,
            "stale_ring_refusals": self.stale_refused,
        }

    def _membership_stats(self) -> dict[str, Any]:
        agent = self.membership_agent
        return agent.status() if agent is not None else {}

    def collector(self) -> Collector:
        """This node's metrics collector."""
        from .metrics import AuxCollector

        return AuxCollector(self, self.cache, self.snapshots, self.tracker)

    async def _gc_loop(self) -> None:
        """Keep the cyclic GC away from the cache's entries.

        A full collection walks every tracked object: with a million cached
        entries that stalls the loop for 100-300 ms. Cache entries never form
        garbage cycles (an unlinked entry points at the list head, not at
        itself), so they need no collector: whenever ``freeze_due`` says so,
        a young collection first frees whatever cyclic garbage exists, then
        everything still alive moves to the permanent generation
        (``gc.freeze()``, constant time) and later collections only look at
        what is new. Collecting first matters: freezing moves garbage too,
        and frozen garbage is never freed (docs/DECISIONS.md).
        """
        loop = asyncio.get_running_loop()
        frozen_at = loop.time()
        while True:
            await asyncio.sleep(GC_CHECK_S)
            if freeze_due(loop.time() - frozen_at):
                gc.collect(1)
                gc.freeze()
                frozen_at = loop.time()

    async def _expiry_loop(self) -> None:
        """Active expiry: a bounded sweep every ``expiry_interval`` seconds."""
        interval = self.config.expiry_interval
        batch = self.config.expiry_batch
        while True:
            await asyncio.sleep(interval)
            try:
                self.cache.expire_some(batch)
                self.cache.drain_expiry_heap(EXPIRY_HEAP_DRAIN)
                self.cluster_ops.expire_sessions()
                self.tracker.sweep()
            except Exception:
                log.exception("active expiry sweep failed")

    # -- lifecycle (dcache.daemon.serve) -------------------------------------------

    async def start(self) -> str:
        """Load the snapshot, bind the listener(s), start the background tasks and membership; return ``HOST:PORT [resp=HOST:PORT]``."""
        cfg = self.config
        await self.snapshots.load()  # before listening: never serve a half-loaded cache
        self.binding.load()
        server = await self.listen(cfg.host, cfg.port)
        host, port = server.sockets[0].getsockname()[:2]
        if not cfg.node_id:
            self.node_id = f"aux-{host}-{port}"
            self.clock = self._new_clock()
        where = format_address(host, port)
        if cfg.resp_port is not None:
            where += " resp=" + await self._listen_resp(cfg.host, cfg.resp_port)
        self.clock.observe(self.snapshots.max_version)  # new writes must be newer than what was loaded
        self.state.spawn(self._expiry_loop(), "expiry")
        self.snapshots.start()
        gc.collect()
        gc.freeze()  # whatever was loaded stays out of the collector's way
        # Decoding a request and storing its entries allocate a few objects per
        # entry, none in a cycle: at the default threshold the collections
        # doubled what decoding and checking an APPLY page cost (docs/DECISIONS.md).
        gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
        self.state.spawn(self._gc_loop(), "gc-freeze")
        self._start_membership((host, port))
        return where

    async def _listen_resp(self, host: str, port: int) -> str:
        from ..respserver import listen_resp

        server = await listen_resp(self, host, port)
        return format_address(*server.sockets[0].getsockname()[:2])

    async def flush_keys(self) -> int:
        """RESP's FLUSHDB on an aux node: empty the cache (no tombstones: it is for single-node use).

        Answered once the masters holding copies of its keys dropped them, as a held answer is.
        """
        n = len(self.cache)
        self.cache.clear()
        await self.tracker.acknowledged()
        return n

    async def count_keys(self) -> int:
        """RESP's DBSIZE on an aux node: the entries its cache holds."""
        return len(self.cache)

    async def scan_keys(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        """RESP's SCAN on an aux node: one page of this node's keys (the native SCAN over the whole ring)."""
        next_cursor, entries, _ = self.cluster_ops.scan_page(None, cursor, count, 0)
        return next_cursor, [e[0] for e in entries]

    def _start_membership(self, bound: tuple[str, int]) -> None:
        cfg = self.config
        if not (cfg.join or cfg.zookeeper):
            return
        if cfg.advertise:
            advertise = parse_address(cfg.advertise)
        else:
            advertise = bound
        agent: JoinAgent | ZkAgent
        if cfg.zookeeper:
            from .zkagent import ZkAgent

            agent = ZkAgent(cfg, self.node_id, advertise, self.incarnation)
        else:
            from .membership import JoinAgent

            agent = JoinAgent(cfg, self.node_id, advertise, epoch=self.ring_epoch, on_epoch=self.set_ring_epoch, ssl=self.peer_ssl)
        self.membership_agent = agent
        agent.start()

    async def before_close(self, sig: int, again: asyncio.Event) -> None:
        """On SIGTERM a cluster member hands its data over (graceful leave); a second signal cuts it short.

        SIGINT (Ctrl-C) stops without a hand-over: the node's data stays in
        its snapshot, which is how ``dcache cluster`` stops.
        """
        agent = self.membership_agent
        if agent is None or sig != signal.SIGTERM:
            return
        leave = asyncio.ensure_future(agent.leave())
        second = asyncio.ensure_future(again.wait())
        await asyncio.wait([leave, second], return_when=asyncio.FIRST_COMPLETED)
        second.cancel()
        if not leave.done():
            log.warning("second signal: shutting down without finishing the hand-over")
            leave.cancel()

    async def close(self) -> None:
        """Graceful shutdown: leave membership, stop accepting, drain connections, stop tasks, final snapshot."""
        if self.membership_agent is not None:
            await self.membership_agent.close()
        await self.shutdown(self.config.shutdown_grace)
        if not await self.snapshots.close():  # final snapshot: connections are closed, no more writes
            self.exit_code = 1


class _MgetTurns:
    """A large MGET looked up ``KEYS_PER_TURN`` keys per turn, answered as one list.

    The first slice runs in the handler (an error there is the handler's),
    unless other large requests wait for their turn; the others wait in the
    node's ``Turns`` (one budget of keys per loop iteration for every large
    request, ``dcache.turns``). While more remain the connection runs none
    of its later requests (``FrameProtocol.hold_input``), so they see the
    node as it is after the last key, as when the MGET was served in one
    go. A slice stops the request when its client has gone, when the values
    would not fit in an answer, or when it raised (answered with the error;
    the connection goes on). An expiry a slice meets may change a key a master holds a copy
    of: the answer then waits for the invalidations of every such slice, as
    the dispatch holds the answer of a handler (``Service.hold``).
    """

    __slots__ = ("node", "conn", "rid", "keys", "values", "size", "held", "done")

    def __init__(self, node: AuxNode, conn: FrameProtocol, rid: int, keys: list[bytes]) -> None:
        self.node = node
        self.conn = conn
        self.rid = rid
        self.keys = keys
        self.values: list[bytes | None] = []
        #: Bytes of the values found so far.
        self.size = 0
        #: Invalidation rounds the answer waits for (``reply``), and whether every key was looked up.
        self.held = 0
        self.done = False

    def start(self) -> Any:
        """The handler's part: the first slice, unless other large requests wait for their turn (``Turns.busy``: then it waits too); the rest a slice per turn (``LATER``)."""
        turns = self.node.turns
        if not turns.busy:
            self._slice(KEYS_PER_TURN)
        self.conn.hold_input()
        turns.add(self._turn)
        return LATER

    def _slice(self, n: int) -> None:
        """Look up the next ``n`` keys (raises ``FrameTooLargeError`` past the answer's limit)."""
        node = self.node
        keys = self.keys
        values = self.values
        start = len(values)
        end = start + n
        get = node.cache.get
        found = [get(k) for k in keys[start:end]]
        values += found
        size = self.size
        for v in found:
            if v is not None:
                size += len(v)
        self.size = size
        limit = node.limits.max_frame_bytes
        if size > limit:
            raise answer_too_large(len(keys), limit)
        hold = node.hold
        if hold is not None and hold(cast(FrameProtocol, self), 0, _MGET, None) is LATER:  # an expiry invalidated a master's copy
            self.held += 1

    def _turn(self, allowed: int) -> int:
        """One later slice of at most ``allowed`` keys (``Turns``); the last one answers and lets the connection's later requests run.

        Returns the keys it looked up.
        """
        conn = self.conn
        if conn.is_closing:  # the client left: nothing more to look up
            conn.release_input()
            return 0
        served = min(allowed, len(self.keys) - len(self.values))
        try:
            self._slice(served)
        except ServerError as exc:
            self._end(exc.code, exc.message)
            return served
        except Exception as exc:
            log.exception("internal error in a slice of an MGET from %s", conn.peer)
            self._end(_INTERNAL, f"internal error: {exc.__class__.__name__}")
            return served
        if len(self.values) < len(self.keys):
            self.node.turns.add(self._turn)
            return served
        self.done = True
        if not self.held:
            conn.reply(self.rid, _OK, self.values, _MGET)
        conn.release_input()
        return served

    def _end(self, status: int, message: str) -> None:
        self.held = -1  # held invalidations no longer matter: the error answers now
        self.conn.reply(self.rid, status, message, _MGET)
        self.conn.release_input()

    def reply(self, rid: int, status: int, result: Any, op: int = 0) -> None:
        """The tracker released one held round (``Tracker._finish``): answer once none is left and every key was looked up."""
        if self.held <= 0:
            return
        self.held -= 1
        if not self.held and self.done:
            self.conn.reply(self.rid, _OK, self.values, _MGET)


async def serve_aux(config: AuxConfig, *, ready: bool = True) -> None:
    """Run an aux node until SIGTERM or SIGINT, then shut down gracefully (``dcache.daemon.serve``)."""
    from ..daemon import serve

    await serve(AuxNode(config), host=config.host, metrics_port=config.metrics_port, ready=ready)


def run_aux(config: AuxConfig) -> int:
    """Blocking entry point used by the CLI."""
    from ..daemon import run

    return run(lambda: AuxNode(config), host=config.host, metrics_port=config.metrics_port)
