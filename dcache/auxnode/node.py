"""The aux role: a data node serving the native protocol over one LRU cache.

Every handler is synchronous: it validates its arguments, works on the
``LRUCache`` and returns the result, so a batch of pipelined requests is
answered within one ``data_received`` and leaves in one write.

Writes made directly against an aux node get a version from the node's own
hybrid logical clock; writes routed by a master carry the master's version
(cluster ops, see docs/PROTOCOL.md).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import time
from typing import TYPE_CHECKING, Any

from ..config import AuxConfig
from ..errors import (
    BadArgumentsError,
    NotAnIntegerError,
    OutOfMemoryError,
)
from ..hlc import HybridClock
from ..lru import EntryTooLargeError, IntegerOverflowError, LRUCache
from ..lru import NotAnIntegerError as CacheNotAnIntegerError
from ..protocol import Op, SetFlag, check_key
from ..protocol.args import MAX_TTL_MS, parse_delta, parse_mset, parse_set
from ..server import Service, ready_line
from .cluster_ops import ClusterOps
from .snapshots import SnapshotManager

__all__ = ["AuxNode", "run_aux", "serve_aux"]

log = logging.getLogger("dcache.aux")

#: Seconds between ``gc.freeze()`` calls (see ``AuxNode._gc_loop``).
GC_FREEZE_INTERVAL_S = 5.0

_NX = SetFlag.NX.value
_XX = SetFlag.XX.value


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class AuxNode(Service):
    """An aux node: the handlers, the cache and the background tasks."""

    role = "aux"

    def __init__(self, config: AuxConfig, node_id: str | None = None) -> None:
        super().__init__(node_id or config.node_id or "aux", config.limits, config.auth_token)
        self.config = config
        self.cache = LRUCache(config.max_memory, config.max_items)
        self.clock = HybridClock(self.node_id)
        #: Random per process: a master that sees it change knows the node restarted.
        self.incarnation = random.getrandbits(62)
        #: The ``JoinAgent`` or ``ZkAgent`` keeping this node in a cluster, if any.
        self.membership_agent: Any = None
        #: The ring epoch a master last admitted this node at (0: never); kept
        #: in snapshots, so a restarted coordinator can tell the node is not new.
        self.ring_epoch = 0
        self.started_at = time.time()
        self.server: asyncio.base_events.Server | None = None
        self.snapshots = SnapshotManager(self)
        h = self.handlers
        h[Op.PING] = self._ping
        h[Op.GET] = self._get
        h[Op.SET] = self._set
        h[Op.DELETE] = self._delete
        h[Op.MGET] = self._mget
        h[Op.MSET] = self._mset
        h[Op.EXISTS] = self._exists
        h[Op.EXPIRE] = self._expire
        h[Op.TTL] = self._ttl
        h[Op.INCR] = self._incr
        h[Op.DECR] = self._decr
        h[Op.TOUCH] = self._touch
        h[Op.STATS] = self._stats
        self.cluster_ops = ClusterOps(self)
        self.cluster_ops.register(h)

    def set_ring_epoch(self, epoch: int) -> None:
        """Record the epoch a master admitted this node at (from JOIN's answer)."""
        if epoch > self.ring_epoch:
            self.ring_epoch = epoch

    # -- handlers (hot path: keep them flat) ------------------------------

    def _ping(self, msg: list[Any]) -> Any:
        if len(msg) != 2:
            raise BadArgumentsError("PING takes no arguments")
        return "PONG"

    def _get(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("GET takes [key]") from None
        return self.cache.get(check_key(key, self.limits))

    def _set(self, msg: list[Any]) -> Any:
        key, value, ttl, flags = parse_set(msg, self.limits)
        try:
            return self.cache.set(
                key,
                value,
                expires_at=_wall_ms() + ttl if ttl else 0,
                version=self.clock.next(),
                nx=flags == _NX,
                xx=flags == _XX,
            )
        except EntryTooLargeError as exc:
            raise OutOfMemoryError(str(exc)) from None

    def _delete(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("DELETE takes [key]") from None
        return self.cache.delete(check_key(key, self.limits), version=self.clock.next())

    def _mget(self, msg: list[Any]) -> Any:
        try:
            _, _, keys = msg
        except ValueError:
            raise BadArgumentsError("MGET takes [keys]") from None
        if keys.__class__ is not list:
            raise BadArgumentsError("MGET takes a list of keys")
        limits = self.limits
        get = self.cache.get
        return [get(check_key(k, limits)) for k in keys]

    def _mset(self, msg: list[Any]) -> Any:
        items, ttl = parse_mset(msg, self.limits)
        expires_at = _wall_ms() + ttl if ttl else 0
        cache = self.cache
        stored = 0
        for key, value in items:
            try:
                cache.set(key, value, expires_at=expires_at, version=self.clock.next())
            except EntryTooLargeError as exc:
                raise OutOfMemoryError(f"{exc} (stored {stored} of {len(items)} pairs)") from None
            stored += 1
        return stored

    def _exists(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("EXISTS takes [key]") from None
        return self.cache.exists(check_key(key, self.limits))

    def _expire(self, msg: list[Any]) -> Any:
        try:
            _, _, key, ttl_ms = msg
        except ValueError:
            raise BadArgumentsError("EXPIRE takes [key, ttl_ms]") from None
        if ttl_ms.__class__ is not int:
            raise BadArgumentsError("ttl_ms must be an integer")
        if ttl_ms > MAX_TTL_MS:
            raise BadArgumentsError(f"ttl_ms must be at most {MAX_TTL_MS}")
        return self.cache.expire(check_key(key, self.limits), ttl_ms)

    def _ttl(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("TTL takes [key]") from None
        return self.cache.ttl_ms(check_key(key, self.limits))

    def _incr(self, msg: list[Any]) -> Any:
        return self._add(msg, 1, "INCR")

    def _decr(self, msg: list[Any]) -> Any:
        return self._add(msg, -1, "DECR")

    def _add(self, msg: list[Any], sign: int, name: str) -> Any:
        key, delta = parse_delta(msg, self.limits, name)
        try:
            return self.cache.incr(key, sign * delta, version=self.clock.next())
        except CacheNotAnIntegerError:
            raise NotAnIntegerError("value is not a signed 64-bit decimal integer") from None
        except IntegerOverflowError:
            raise NotAnIntegerError("increment would overflow a signed 64-bit integer") from None
        except EntryTooLargeError as exc:
            raise OutOfMemoryError(str(exc)) from None

    def _touch(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("TOUCH takes [key]") from None
        return self.cache.touch(check_key(key, self.limits))

    def _stats(self, msg: list[Any]) -> Any:
        if len(msg) != 2:
            raise BadArgumentsError("STATS takes no arguments")
        return self.stats()

    # -- everything else -----------------------------------------------------

    def hello_result(self) -> dict[str, Any]:
        """HELLO plus this process's ``incarnation``, so masters notice a restart."""
        result = super().hello_result()
        result["incarnation"] = self.incarnation
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
            "connections": len(self.state.connections),
            "total_connections": self.state.total_connections,
            "requests": self.requests_total,
            "errors": self.errors_total,
            "protocol_errors": self.protocol_errors_total,
            **self.snapshots.stats(),
            **self._membership_stats(),
        }

    def _membership_stats(self) -> dict[str, Any]:
        status = getattr(self.membership_agent, "status", None)
        return status() if status is not None else {}

    async def _gc_loop(self) -> None:
        """Keep the cyclic GC away from the cache's entries.

        A full collection walks every tracked object: with a million cached
        entries that stalls the loop for 100-300 ms. Cache entries never form
        garbage cycles (an unlinked entry points at the list head, not at
        itself), so they need no collector: every ``GC_FREEZE_INTERVAL_S``
        everything allocated so far moves to the permanent generation
        (``gc.freeze()``, constant time) and collections only look at what
        is new. See docs/DECISIONS.md.
        """
        while True:
            await asyncio.sleep(GC_FREEZE_INTERVAL_S)
            gc.freeze()

    async def _expiry_loop(self) -> None:
        """Active expiry: a bounded sweep every ``expiry_interval`` seconds."""
        interval = self.config.expiry_interval
        batch = self.config.expiry_batch
        while True:
            await asyncio.sleep(interval)
            try:
                self.cache.expire_some(batch)
            except Exception:
                log.exception("active expiry sweep failed")

    async def start(self) -> None:
        """Bind the listener and start the background tasks."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        await self.snapshots.load()  # before listening: never serve a half-loaded cache
        self.server = await loop.create_server(self.protocol_factory, cfg.host, cfg.port, reuse_address=True, backlog=1024)
        if not cfg.node_id:
            host, port = self.server.sockets[0].getsockname()[:2]
            self.node_id = f"aux-{host}-{port}"
            self.clock = HybridClock(self.node_id)
        self.clock.observe(self.snapshots.max_version)  # new writes must be newer than what was loaded
        self.state.spawn(self._expiry_loop(), "expiry")
        self.snapshots.start()
        gc.freeze()  # whatever was loaded stays out of the collector's way
        self.state.spawn(self._gc_loop(), "gc-freeze")

    async def close(self) -> None:
        """Graceful shutdown: stop accepting, drain connections, stop tasks."""
        if self.server is not None:
            self.server.close()
        grace = self.config.shutdown_grace
        for conn in list(self.state.connections):
            conn.close()
        deadline = time.monotonic() + grace
        while self.state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in list(self.state.tasks):
            task.cancel()
        if self.state.tasks:
            await asyncio.wait(self.state.tasks, timeout=grace or None)
        await self.snapshots.close()  # final snapshot: connections are closed, no more writes
        if self.server is not None:
            await self.server.wait_closed()


async def serve_aux(config: AuxConfig, *, ready: bool = True) -> None:
    """Run an aux node until SIGTERM or SIGINT, then shut down gracefully.

    With ``--join`` (or ``--zookeeper``) the node registers with a master (or in
    ZooKeeper), and on SIGTERM it hands
    its data over (graceful leave) before closing; a second signal during the
    hand-over cuts it short. SIGINT (Ctrl-C) stops without a hand-over (the
    node's data stays in its snapshot), which is how ``dcache cluster`` stops.
    """
    from .membership import JoinAgent

    if TYPE_CHECKING:
        from .zkagent import ZkAgent

    node = AuxNode(config)
    await node.start()
    assert node.server is not None
    metrics = None
    if config.metrics_port is not None:
        from ..metrics import AuxCollector, registry_for, start_metrics_server

        metrics = await start_metrics_server(registry_for(AuxCollector(node)), config.host, config.metrics_port)
        log.info("aux node %s serves metrics at %s", node.node_id, metrics.url)
    stop = asyncio.Event()
    received: list[int] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("aux node %s listening on %s", node.node_id, ready_line(node.server)[6:])
    agent: JoinAgent | ZkAgent | None = None
    if config.join or config.zookeeper:
        if config.advertise:
            from ..config import parse_address

            advertise = parse_address(config.advertise)
        else:
            advertise = node.server.sockets[0].getsockname()[:2]
        if config.zookeeper:
            from .zkagent import ZkAgent

            agent = ZkAgent(config, node.node_id, advertise, node.incarnation)
        else:
            agent = JoinAgent(config, node.node_id, advertise, epoch=node.ring_epoch, on_epoch=node.set_ring_epoch)
        node.membership_agent = agent
        agent.start()
    if ready:
        print(ready_line(node.server), flush=True)
    try:
        await stop.wait()
        if agent is not None and received[0] == signal.SIGTERM:
            stop.clear()
            leave = asyncio.ensure_future(agent.leave())
            second = asyncio.ensure_future(stop.wait())
            await asyncio.wait([leave, second], return_when=asyncio.FIRST_COMPLETED)
            second.cancel()
            if not leave.done():
                log.warning("second signal: shutting down without finishing the hand-over")
                leave.cancel()
    finally:
        log.info("aux node %s shutting down", node.node_id)
        if agent is not None:
            await agent.close()
        await node.close()
        if metrics is not None:
            await metrics.close()


def run_aux(config: AuxConfig) -> int:
    """Blocking entry point used by the CLI."""
    import uvloop

    uvloop.run(serve_aux(config))
    return 0
