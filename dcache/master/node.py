"""The master role: serves the native protocol by routing every op to aux nodes.

A master holds no data. Handlers validate arguments exactly like an aux node
(same limits, same errors) and hand the work to the ``Router`` as a deferred
answer; the ``FrameProtocol`` sends each answer when it is ready, batching
the answers of one loop iteration into one write.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from typing import Any

from ..config import MasterConfig
from ..errors import BadArgumentsError, Status, UnavailableError
from ..hlc import HybridClock
from ..protocol import Op, check_key
from ..protocol.args import MAX_TTL_MS, parse_delta, parse_entries, parse_mset, parse_set
from ..server import LATER, FrameProtocol, Service, deferred, ready_line
from .links import AuxLink
from .membership import Coordinator, Follower, Membership
from .router import Router
from .view import UP, ClusterView, Member

__all__ = ["MasterNode", "serve_master", "run_master"]

log = logging.getLogger("dcache.master")

#: Allocations between young-generation collections on a master (CPython's default is 700).
GC_GEN0_THRESHOLD = 50_000


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


_UNAVAILABLE = int(Status.UNAVAILABLE)
_TIMEOUT = int(Status.UPSTREAM_TIMEOUT)
_FRAME_TOO_LARGE = int(Status.FRAME_TOO_LARGE)
_GET = int(Op.GET)


class _ReadOp:
    """A GET in flight: tries the candidates in order; repairs earlier misses.

    It is its own callback (``__call__(status, result)``), so a read costs
    no future and no task.
    """

    __slots__ = ("router", "conn", "rid", "key", "candidates", "view", "i", "missed", "error")

    def __init__(self, router: Router, conn: FrameProtocol, rid: int, key: bytes, candidates: list[str]) -> None:
        self.router = router
        self.conn = conn
        self.rid = rid
        self.key = key
        self.candidates = candidates
        #: The view ``candidates`` come from.
        self.view = router.view
        self.i = -1
        self.missed: list[str] | None = None
        self.error: Any = None

    def next(self) -> None:
        self.i += 1
        candidates = self.candidates
        if self.i < len(candidates):
            link = self.router.links.get(candidates[self.i])
            if link is None:
                self(_UNAVAILABLE, f"no link to aux node {candidates[self.i]}")
            elif self.i == 0:
                # the first owner: batched with the other GETs of this loop
                # iteration into one MGET (values only, the cheapest answer)
                self.router.get_batcher.add(link, self)
            else:
                link.send(Op.GETV, (self.key,), self)  # later owners: a repair needs the version
            return
        if self.error is not None and self.missed is None:
            self.router.stats.unavailable += 1
            self.conn.reply(self.rid, _UNAVAILABLE, f"no owner of the key answered: {self.error}", _GET)
        else:
            self.conn.reply(self.rid, 0, None)

    def reroute(self) -> None:
        """Start again from the current view's candidates (the view changed before the read was sent)."""
        view = self.router.view
        self.view = view
        self.candidates = view.read_candidates(self.key)
        if not self.candidates:
            self.error = "no aux node is available for this key"  # next() answers UNAVAILABLE
        self.i = -1
        self.next()

    def __call__(self, status: int, result: Any) -> None:
        if status == 0:
            if result is not None:
                if self.i == 0:
                    self.conn.reply(self.rid, 0, result)
                    return
                if self.missed:
                    self.router._repair(self.missed, self.key, result)
                self.conn.reply(self.rid, 0, result[0])
                return
            if self.missed is None:
                self.missed = []
            self.missed.append(self.candidates[self.i])
        elif status == _UNAVAILABLE or status == _TIMEOUT:
            self.error = result
            self.router.stats.fallbacks += 1
        else:
            self.conn.reply(self.rid, status, result, _GET)
            return
        self.next()


class _Split:
    """Hands each value of a batched MGET answer to the read that asked for it.

    If the values together exceed the frame limit (the aux node answers
    FRAME_TOO_LARGE), each read is sent again on its own: every single value
    fits in a frame.
    """

    __slots__ = ("ops", "link")

    def __init__(self, ops: list[_ReadOp], link: AuxLink) -> None:
        self.ops = ops
        self.link = link

    def __call__(self, status: int, result: Any) -> None:
        ops = self.ops
        if status == 0 and result.__class__ is list and len(result) == len(ops):
            for op, value in zip(ops, result, strict=True):
                if value is None:
                    op(0, None)  # a miss: the read goes on to the replicas
                else:
                    op.conn.reply(op.rid, 0, value)  # a hit on the first owner (op(0, value), inlined)
            return
        if status == _FRAME_TOO_LARGE:
            link = self.link
            for op in ops:
                link.send(Op.GET, (op.key,), op)
            link.flush()
            return
        if status == 0:
            status, result = _UNAVAILABLE, "malformed MGET answer from an aux node"
        for op in ops:
            op(status, result)


class GetBatcher:
    """Turns the first-owner GETs of one loop iteration into one MGET per aux node.

    Pipelined clients send many GETs at once; forwarding them as one MGET
    per node saves a frame, a request id and a decode per key on both the
    master and the aux node. The batch leaves at the end of the iteration
    in which the GETs arrived (no added delay); a lone GET goes as a GET.
    """

    __slots__ = ("_pending", "_scheduled", "_loop")

    #: Most keys in one MGET.
    MAX_BATCH = 256

    def __init__(self) -> None:
        self._pending: dict[AuxLink, list[_ReadOp]] = {}
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, link: AuxLink, op: _ReadOp) -> None:
        ops = self._pending.get(link)
        if ops is None:
            self._pending[link] = [op]
        else:
            ops.append(op)
            if len(ops) >= self.MAX_BATCH:
                del self._pending[link]
                self._send(link, ops)
                link.flush()
                return
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        pending = self._pending
        self._pending = {}
        for link, ops in pending.items():
            view = ops[0].router.view
            fresh = [op for op in ops if op.view is view]
            if len(fresh) != len(ops):
                # The view changed after these reads were routed (say the node
                # was found restarted and fenced in between): route them again
                # (they go out with the next batch), or they would read a node
                # that may serve stale data.
                for op in ops:
                    if op.view is not view:
                        op.reroute()
                ops = fresh
                if not ops:
                    continue
            self._send(link, ops)
            link.flush()  # now, not one more loop iteration later

    @staticmethod
    def _send(link: AuxLink, ops: list[_ReadOp]) -> None:
        if len(ops) == 1:
            link.send(Op.GET, (ops[0].key,), ops[0])
        else:
            link.send(Op.MGET, ([op.key for op in ops],), _Split(ops, link))


class _WriteOp:
    """A write sent to every target at once; answers when all have answered.

    ``ok_result`` is what a successful write answers (``None``: whether any
    target answered true, as DELETE does). The acknowledgement rule is the
    router's (see ``Router._write_all``). ``op`` is the client's op (for the
    error counts by op).
    """

    __slots__ = ("router", "conn", "rid", "pending", "ok", "any_true", "timeouts", "error", "fatal", "ok_result", "op", "_targets")

    def __init__(self, router: Router, conn: FrameProtocol, rid: int, targets: list[str], ok_result: Any, op: int) -> None:
        self.router = router
        self.conn = conn
        self.rid = rid
        self.pending = len(targets)
        self.ok = 0
        self.any_true = False
        self.timeouts = 0
        self.error: Any = None
        self.fatal: tuple[int, Any] | None = None
        self.ok_result = ok_result
        self.op = op
        self._targets = targets

    def send(self, op: int, args: tuple[Any, ...]) -> None:
        links = self.router.links
        for node in self._targets:
            link = links.get(node)
            if link is None:
                self(_UNAVAILABLE, f"no link to aux node {node}")
            else:
                link.send(op, args, self)

    def __call__(self, status: int, result: Any) -> None:
        if status == 0:
            self.ok += 1
            if result:
                self.any_true = True
        elif status == _UNAVAILABLE or status == _TIMEOUT:
            if status == _TIMEOUT:
                self.timeouts += 1
            self.error = result
        elif self.fatal is None:
            self.fatal = (status, result)
        self.pending -= 1
        if self.pending:
            return
        router = self.router
        conn = self.conn
        if self.fatal is not None:
            conn.reply(self.rid, *self.fatal, self.op)
            return
        if not self.ok:
            router.stats.unavailable += 1
            conn.reply(self.rid, _UNAVAILABLE, f"no owner of the key applied the write: {self.error}", self.op)
            return
        if self.error is not None:
            router.stats.partial_writes += 1
        quorum = router.write_quorum
        if quorum and self.ok < quorum:
            conn.reply(self.rid, _UNAVAILABLE, f"the write reached {self.ok} of the {quorum} owners the quorum needs", self.op)
        elif not quorum and self.timeouts:
            conn.reply(self.rid, _TIMEOUT, f"{self.timeouts} owner(s) did not confirm the write in time", self.op)
        else:
            conn.reply(self.rid, 0, self.any_true if self.ok_result is None else self.ok_result)


class MasterNode(Service):
    """A master: membership, links to aux nodes, the router and the handlers."""

    role = "master"

    def __init__(self, config: MasterConfig) -> None:
        super().__init__(config.node_id or "master", config.limits, config.auth_token)
        self.config = config
        self._max_key = config.limits.max_key_bytes
        self.clock = HybridClock(self.node_id)
        self.links: dict[str, AuxLink] = {}
        self.started_at = time.time()
        self.server: asyncio.base_events.Server | None = None
        members = [Member(node_id, host, port) for node_id, host, port in config.aux]
        view = ClusterView.initial(members, config.replicas, epoch=time.time_ns() // 1_000_000)
        self.router = Router(view, self.links, self.clock, config.write_quorum)
        self.router.get_batcher = GetBatcher()
        self.membership: Membership
        if config.zookeeper:
            from .zkmembership import ZooKeeperMembership

            self.membership = ZooKeeperMembership(
                config,
                ClusterView.initial([], config.replicas, epoch=0),
                self._on_view,
                lambda: self.links,
                self.clock,
                lambda: self.node_id,
                self._address,
            )
        elif config.coordinator:
            self.membership = Follower(config, ClusterView.initial([], config.replicas, epoch=0), self._on_view, lambda: self.node_id)
        else:
            self.membership = Coordinator(config, view, self._on_view, lambda: self.links, self.clock)
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
        h[Op.RING] = self._ring
        h[Op.JOIN] = self._join
        h[Op.LEAVE] = self._leave
        h[Op.SYNC] = self._sync
        h[Op.APPLY] = self._apply

    # -- view changes -------------------------------------------------------------

    def _on_view(self, view: ClusterView) -> None:
        """Adopt a new view: open links to new members, close links to gone ones."""
        cfg = self.config
        for node_id, m in view.members.items():
            link = self.links.get(node_id)
            if link is not None and (link.host, link.port) != (m.host, m.port):
                self.state.spawn(link.close())
                link = None
            if link is None:
                link = self.links[node_id] = AuxLink(
                    node_id,
                    m.host,
                    m.port,
                    size=cfg.aux_connections,
                    timeout=cfg.aux_timeout,
                    auth_token=cfg.auth_token,
                    on_restart=self.membership.on_aux_restart,
                    on_answers=self.flush_all,
                )
                if self.server is not None:
                    link.start()
        for node_id in [n for n in self.links if n not in view.members]:
            self.state.spawn(self.links.pop(node_id).close())
        self.router.view = view

    # -- handlers ---------------------------------------------------------------------

    def _ping(self, msg: list[Any]) -> Any:
        if len(msg) != 2:
            raise BadArgumentsError("PING takes no arguments")
        return "PONG"

    def _get(self, msg: list[Any]) -> Any:
        try:
            _, rid, key = msg
        except ValueError:
            raise BadArgumentsError("GET takes [key]") from None
        if key.__class__ is not bytes or not 0 < len(key) <= self._max_key:
            key = check_key(key, self.limits)
        router = self.router
        candidates = router.view.read_candidates(key)
        if not candidates:
            router.stats.unavailable += 1
            raise UnavailableError("no aux node is available for this key")
        conn = self.current
        assert conn is not None
        op = _ReadOp(router, conn, rid, key, candidates)
        link = router.links.get(candidates[0])
        if link is None:
            op.next()
        else:  # the first owner (what op.next() does, inlined)
            op.i = 0
            router.get_batcher.add(link, op)
        return LATER

    def _set(self, msg: list[Any]) -> Any:
        key, value, ttl, flags = parse_set(msg, self.limits)
        if flags:
            return deferred(self.router.set(key, value, ttl, flags))
        args = (key, value, _wall_ms() + ttl if ttl else 0, 0, self.clock.next())
        self._write(msg[1], key, True, Op.SET).send(Op.SETV, args)
        return LATER

    def _delete(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("DELETE takes [key]") from None
        key = check_key(key, self.limits)
        self._write(msg[1], key, None, Op.DELETE).send(Op.DELV, (key, self.clock.next()))
        return LATER

    def _write(self, rid: int, key: bytes, ok_result: Any, op: int) -> _WriteOp:
        """A write of ``key`` to its live targets, answering request ``rid`` on the current connection."""
        router = self.router
        targets = router.view.write_targets(key)
        if not targets:
            router.stats.unavailable += 1
            raise UnavailableError("no aux node is available for this key")
        conn = self.current
        assert conn is not None
        return _WriteOp(router, conn, rid, targets, ok_result, op)

    def _mget(self, msg: list[Any]) -> Any:
        try:
            _, _, keys = msg
        except ValueError:
            raise BadArgumentsError("MGET takes [keys]") from None
        if keys.__class__ is not list:
            raise BadArgumentsError("MGET takes a list of keys")
        limits = self.limits
        return deferred(self.router.mget([check_key(k, limits) for k in keys]))

    def _mset(self, msg: list[Any]) -> Any:
        items, ttl = parse_mset(msg, self.limits)
        return deferred(self.router.mset(items, ttl))

    def _exists(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("EXISTS takes [key]") from None
        return deferred(self.router.exists(check_key(key, self.limits)))

    def _expire(self, msg: list[Any]) -> Any:
        try:
            _, _, key, ttl_ms = msg
        except ValueError:
            raise BadArgumentsError("EXPIRE takes [key, ttl_ms]") from None
        if ttl_ms.__class__ is not int or ttl_ms > MAX_TTL_MS:
            raise BadArgumentsError(f"ttl_ms must be an integer of at most {MAX_TTL_MS}")
        return deferred(self.router.expire(check_key(key, self.limits), ttl_ms))

    def _ttl(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("TTL takes [key]") from None
        return deferred(self.router.ttl(check_key(key, self.limits)))

    def _incr(self, msg: list[Any]) -> Any:
        return self._add(msg, 1, "INCR")

    def _decr(self, msg: list[Any]) -> Any:
        return self._add(msg, -1, "DECR")

    def _add(self, msg: list[Any], sign: int, name: str) -> Any:
        key, delta = parse_delta(msg, self.limits, name)
        return deferred(self.router.incr(key, sign * delta))

    def _touch(self, msg: list[Any]) -> Any:
        try:
            _, _, key = msg
        except ValueError:
            raise BadArgumentsError("TOUCH takes [key]") from None
        return deferred(self.router.touch(check_key(key, self.limits)))

    def _stats(self, msg: list[Any]) -> Any:
        if len(msg) != 2:
            raise BadArgumentsError("STATS takes no arguments")
        return deferred(self.cluster_stats())

    def _ring(self, msg: list[Any]) -> Any:
        if len(msg) != 2:
            raise BadArgumentsError("RING takes no arguments")
        return deferred(self.ring_info())

    def _join(self, msg: list[Any]) -> Any:
        if len(msg) not in (5, 6, 7):
            raise BadArgumentsError("JOIN takes [node_id, host, port, weight?, known_epoch?]")
        node_id, host, port = msg[2:5]
        weight = msg[5] if len(msg) >= 6 else 1.0
        known_epoch = msg[6] if len(msg) == 7 else 0
        if not isinstance(node_id, str) or not node_id or not isinstance(host, str) or port.__class__ is not int or not 0 < port < 65536:
            raise BadArgumentsError("JOIN takes [node_id: str, host: str, port: int, weight?: float, known_epoch?: int]")
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise BadArgumentsError("weight must be a positive number")
        if known_epoch.__class__ is not int or known_epoch < 0:
            raise BadArgumentsError("known_epoch must be a non-negative integer")
        return deferred(self.membership.join(node_id, host, port, float(weight), known_epoch))

    def _leave(self, msg: list[Any]) -> Any:
        if len(msg) != 3 or not isinstance(msg[2], str):
            raise BadArgumentsError("LEAVE takes [node_id]")
        return deferred(self.membership.leave(msg[2]))

    def _apply(self, msg: list[Any]) -> Any:
        entries = parse_entries(msg, self.limits)
        for entry in entries:
            self.clock.observe(entry[3])
        return deferred(self.router.apply_entries([list(e) for e in entries]))

    def _sync(self, msg: list[Any]) -> Any:
        if len(msg) not in (5, 6) or not isinstance(msg[2], str) or msg[3].__class__ is not int or msg[4].__class__ is not int:
            raise BadArgumentsError("SYNC takes [follower_id, epoch, seq, view?]")
        view = msg[5] if len(msg) == 6 else None
        if view is not None and not isinstance(view, dict):
            raise BadArgumentsError("SYNC's view must be a map (a ring view) or nil")
        return self.membership.sync(msg[2], msg[3], msg[4], view)

    def _address(self) -> str:
        """``host:port`` this master listens on (the configured one before it binds)."""
        if self.server is not None and self.server.sockets:
            host, port = self.server.sockets[0].getsockname()[:2]
            return f"{host}:{port}"
        return f"{self.config.host}:{self.config.port}"

    # -- operator views ---------------------------------------------------------------

    def master_stats(self) -> dict[str, Any]:
        """This master's own counters."""
        view = self.router.view
        rs = self.router.stats
        return {
            "role": self.role,
            "node_id": self.node_id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "membership": self.membership.role,
            "epoch": view.epoch,
            "members": len(view.members),
            "members_up": sum(1 for m in view.members.values() if m.state == UP),
            "migrating": view.prev_ring is not None,
            "replicas": view.replicas,
            "connections": len(self.state.connections),
            "total_connections": self.state.total_connections,
            "requests": self.requests_total,
            "errors": self.errors_total,
            "protocol_errors": self.protocol_errors_total,
            "fallbacks": rs.fallbacks,
            "repairs": rs.repairs,
            "unavailable": rs.unavailable,
            "partial_writes": rs.partial_writes,
            **self._migration_stats(),
            **self._zookeeper_stats(),
        }

    def _zookeeper_stats(self) -> dict[str, Any]:
        """ZooKeeper connection and leadership (ZooKeeper mode only)."""
        zk = getattr(self.membership, "zk", None)
        if zk is None:
            return {}
        return {**zk.status(), "leader": getattr(self.membership, "leader", None)}

    def _migration_stats(self) -> dict[str, Any]:
        """Migration progress (coordinator only; followers report none)."""
        progress = self.membership.status().get("migration")
        if not progress:
            return {}
        return {
            "migration_state": progress["state"],
            "migration_streams_total": progress["streams_total"],
            "migration_streams_done": progress["streams_done"],
            "migration_keys_moved": progress["keys_moved"],
            "migration_keys_moved_total": progress["keys_moved_total"],
            "migrations_total": progress["migrations_total"],
        }

    async def cluster_stats(self) -> dict[str, Any]:
        """STATS on a master: its own counters plus totals over the aux nodes."""
        out = self.master_stats()
        per_node = await self.router.gather_stats()
        for field in ("items", "bytes", "max_bytes", "hits", "misses", "evictions", "expirations"):
            out[field] = sum(int(s.get(field, 0)) for s in per_node.values())
        out["aux_nodes_answering"] = len(per_node)
        return out

    async def ring_info(self) -> dict[str, Any]:
        """RING: members, health, epoch, shares, key counts and migration progress."""
        view = self.router.view
        shares = view.ring.shares() if len(view.ring) else {}
        per_node = await self.router.gather_stats()
        nodes = []
        for node_id, m in sorted(view.members.items()):
            stats = per_node.get(node_id, {})
            link = self.links.get(node_id)
            nodes.append(
                {
                    "node_id": node_id,
                    "addr": m.addr,
                    "state": m.state,
                    "since_ms": m.since_ms,
                    "weight": m.weight,
                    "share": round(shares.get(node_id, 0.0), 6),
                    "items": stats.get("items"),
                    "bytes": stats.get("bytes"),
                    "connected": link.connected if link is not None else False,
                }
            )
        return {
            "epoch": view.epoch,
            "seq": view.seq,
            "replicas": view.replicas,
            "ring": view.ring.to_dict(),
            "migrating": view.prev_ring is not None,
            "master": self.node_id,
            "membership": self.membership.status(),
            "nodes": nodes,
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, connect to the aux nodes, start membership."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        self.server = await loop.create_server(self.protocol_factory, cfg.host, cfg.port, reuse_address=True, backlog=1024)
        if not cfg.node_id:
            host, port = self.server.sockets[0].getsockname()[:2]
            self.node_id = f"master-{host}-{port}"
            self.clock = HybridClock(self.node_id)
            self.router.clock = self.clock
        self._on_view(self.membership.view)
        for link in self.links.values():
            link.start()
        await self.membership.start()
        # Per request the master allocates a few small objects that die
        # young; collecting the young generation every 700 allocations costs
        # more than it finds. Everything from start-up moves out of the
        # collector's sight (docs/DECISIONS.md).
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)

    async def close(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close links."""
        if self.server is not None:
            self.server.close()
        deadline = time.monotonic() + self.config.shutdown_grace
        while any(link.in_flight for link in self.links.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.state.connections):
            conn.close()
        await self.membership.close()
        await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


async def serve_master(config: MasterConfig, *, ready: bool = True) -> None:
    """Run a master until SIGTERM or SIGINT."""
    node = MasterNode(config)
    await node.start()
    assert node.server is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = None
    if config.metrics_port is not None:
        from ..metrics import MasterCollector, registry_for, start_metrics_server

        metrics = await start_metrics_server(registry_for(MasterCollector(node)), config.host, config.metrics_port)
        log.info("master %s serves metrics at %s", node.node_id, metrics.url)
    log.info("master %s (%s) listening on %s", node.node_id, node.membership.role, ready_line(node.server)[6:])
    if ready:
        print(ready_line(node.server), flush=True)
    try:
        await stop.wait()
    finally:
        log.info("master %s shutting down", node.node_id)
        await node.close()
        if metrics is not None:
            await metrics.close()


def run_master(config: MasterConfig) -> int:
    """Blocking entry point used by the CLI."""
    import uvloop

    uvloop.run(serve_master(config))
    return 0
