"""The master role: serves the native protocol by routing every op to aux nodes.

A master holds no data. Its handlers get their op's parsed arguments (the
parsers in ``dcache.protocol.ops`` check them exactly as on an aux node) and
hand the work to the ``Router`` (``dcache.master.router``), which answers
later through the connection: every rule about where a read or a write goes
lives there. The node itself owns the links to the aux nodes, the
membership, and the operator views (STATS, RING).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ..address import format_address
from ..config import MasterConfig
from ..errors import BadArgumentsError, UnavailableError
from ..hlc import HybridClock
from ..protocol import Op
from ..protocol.limits import MAX_RING_WAITERS, RING_WAIT_S
from ..server import DATA_OPS, LATER, FrameProtocol, RequestGate, Service, deferred
from .keyscan import KeyScan, KeyScans, scan_plan
from .links import AuxLink, ConnectionFactory
from .membership import Coordinator, Follower, Membership
from .nearcache import HotKeys, NearCache
from .router import Router
from .view import DOWN, FENCED, UP, ClusterView, Member

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

__all__ = ["MasterNode", "serve_master", "run_master"]

log = logging.getLogger("dcache.master")

#: Allocations between young-generation collections on a master (CPython's default is 700).
GC_GEN0_THRESHOLD = 50_000


#: The ops that wait for a master's first ring (``RequestGate``): every data op
#: that reads or writes keys. PING, STATS, HOTKEYS and the membership and admin
#: ops (HELLO, RING, JOIN, SYNC, APPLY...) are served at once: the recovery needs them.
RING_OPS = tuple(op for op in DATA_OPS if op not in (Op.PING, Op.STATS))

#: Seconds between two looks at the links while held requests wait for them (``_open_when_linked``).
LINK_POLL_S = 0.01

#: A follower that has not SYNCed for this long no longer holds its node id (it polls every --follow-interval).
FOLLOWER_SILENT_S = 5.0


class MasterNode(Service):
    """A master: membership, links to aux nodes, the router and the handlers."""

    role = "master"

    def __init__(self, config: MasterConfig, *, connect: ConnectionFactory | None = None) -> None:
        """``connect`` opens the connections to aux nodes (default: TCP); tests pass their own."""
        super().__init__(config.node_id or "master", config)
        self.config = config
        self._connect = connect
        self.clock = self._new_clock()
        self.links: dict[str, AuxLink] = {}
        #: The connection each follower master SYNCs on, and when it last did, by its node id (``_sync``).
        self._follower_conns: dict[str, tuple[FrameProtocol, float]] = {}
        #: RESP SCANs in progress (``scan_keys``).
        self.key_scans = KeyScans()
        self.started_at = time.time()
        members = [Member(node_id, host, port) for node_id, host, port in config.aux]
        view = ClusterView.initial(members, config.replicas, epoch=time.time_ns() // 1_000_000)
        self.router = Router(view, self.links, self.clock, config.write_quorum, config.limits.max_frame_bytes, self.turns)
        self.router.hints.on_overflow = self._hints_lost
        self.router.hot = HotKeys()
        #: ZooKeeper mode: the session is suspended or lost (``_on_zk_state``); reads then ask every owner.
        self._zk_out_of_touch = False
        if config.near_cache_size:
            self.router.near = NearCache(config.near_cache_size, self.router.hot, min_hits=config.near_cache_min_hits)
        self.membership: Membership
        if config.zookeeper:
            from .zkmembership import ZooKeeperMembership

            self.membership = ZooKeeperMembership(
                config,
                ClusterView.initial([], config.replicas, epoch=0),
                self._on_view,
                lambda: self.links,
                self.clock,
                self._new_link,
                lambda: self.node_id,
                self._address,
                ssl=self.peer_ssl,
                on_written=self._on_written,
            )
            self.membership.zk.on_state(self._on_zk_state)
        elif config.coordinator:
            self.membership = Follower(
                config,
                ClusterView.initial([], config.replicas, epoch=0),
                self._on_view,
                lambda: self.node_id,
                ssl=self.peer_ssl,
                on_written=self._on_written,
            )
        else:
            self.membership = Coordinator(
                config, view, self._on_view, lambda: self.links, self.clock, self._new_link, on_written=self._on_written
            )
        self.register(
            *(op for op in DATA_OPS if op not in (Op.GET, Op.SET)),
            Op.HOTKEYS,
            Op.RING,
            Op.JOIN,
            Op.LEAVE,
            Op.FORGET,
            Op.SYNC,
            Op.APPLY,
            Op.FENCE,
        )
        self.handlers[Op.GET] = self.router.get  # the hottest ops: no extra call layer
        self.handlers[Op.SET] = self.router.set_op
        self.router.fence_missed = self.membership.fence_missed
        self.router.ring_behind = self.membership.ring_behind
        if isinstance(self.membership, Coordinator):
            self.membership.on_gathering = self._ring_due_in
        #: Data requests wait here until this master's first ring (``start``, ``_on_view``).
        self.ring_gate = RequestGate(self, RING_OPS, RING_WAIT_S, MAX_RING_WAITERS, self._no_ring_yet)
        self._gate_opener: asyncio.Task[None] | None = None

    def _no_ring_yet(self) -> str:
        """The ``UNAVAILABLE`` message of a data request that waited in vain for this master's first ring."""
        return (
            f"master {self.node_id} has no ring yet (started {time.time() - self.started_at:.1f} s ago, "
            f"membership {self.membership.role}): try another master, or again"
        )

    def _new_clock(self) -> HybridClock:
        return HybridClock(self.node_id, max_skew_ms=self.limits.max_clock_skew_ms)

    # -- view changes -------------------------------------------------------------

    def _on_view(self, view: ClusterView) -> None:
        """Adopt a new view: open links to new members, close links to gone ones."""
        for node_id, m in view.members.items():
            link = self.links.get(node_id)
            if link is not None and (link.host, link.port) != (m.host, m.port):
                self.state.spawn(link.close())
                link = None
            if link is None:
                link = self.links[node_id] = self._new_link(m)
                if self.router.near is not None:
                    link.on_invalidate = self.router.near.invalidate
                    link.on_update = self.router.near.update
                if self.server is not None:
                    link.start()
        for node_id in [n for n in self.links if n not in view.members]:
            self.state.spawn(self.links.pop(node_id).retire())  # what is in flight to it is still answered
        if self.router.near is not None:
            self.router.near.clear()  # copies were subscribed by the old view's owners
        for link in self.links.values():
            link.announce(view.epoch)  # before any write routed by it (links.AuxLink.announce; nothing if the epoch is the same)
        self.router.view = view
        self._read_every_owner()  # in the same step: no read routed by one without the other
        if len(view.ring) and self.ring_gate.closed and self._gate_opener is None:
            self._gate_opener = self.state.spawn(self._open_when_linked(), "ring-gate")

    def _on_written(self, view: ClusterView) -> None:
        """``view`` is where every master gets it: drop the hints of the nodes it marks down, fences or removes.

        Down, fenced or gone in such a view, a node is filled again from the
        other owners (migration or reconciliation) before it serves reads. A
        view only this master routes by (a ZooKeeper leader's, not written
        yet) may be dropped, and then nothing refills the node: its hints
        stay until the view is written (docs/DECISIONS.md).
        """
        hints = self.router.hints
        for node_id in hints.nodes:
            member = view.members.get(node_id)
            if member is None or member.state in (DOWN, FENCED):
                hints.drop(node_id)

    def _new_link(self, m: Member) -> AuxLink:
        """A link to ``m`` (not started) with this master's credentials, TLS and cluster binding."""
        cfg = self.config
        return AuxLink(
            m.node_id,
            m.host,
            m.port,
            size=cfg.aux_connections,
            timeout=cfg.aux_timeout,
            suspect_after=cfg.suspect_after,
            auth_token=cfg.auth_token,
            secret=self.secret,
            on_restart=self.membership.on_aux_restart,
            on_recover=self.router.on_recover,
            on_answers=self.flush_all,
            factory=self._connect,
            ssl=self.peer_ssl,
            cluster=self.cluster_id,
        )

    async def _open_when_linked(self) -> None:
        """The first ring came: run the requests held for it once its nodes' links are open (at most ``--aux-timeout``).

        Released at once, they would find links still connecting (``not
        connected``); each held request keeps its own bound (``RING_WAIT_S``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.aux_timeout
        while loop.time() < deadline and not self._ring_linked():
            await asyncio.sleep(LINK_POLL_S)
        self.ring_gate.open()

    def _ring_linked(self) -> bool:
        """Whether every node of the ring that is not down has a link with a connection open."""
        links = self.links
        return all(n in links and links[n].connected for n, m in self.router.view.members.items() if m.state != DOWN)

    def _read_every_owner(self) -> None:
        """Reads ask every owner of a key and answer the newest while the owners may disagree unknown to this master.

        That is while a rebuilt ring is reconciled (``ClusterView.reconciling``),
        and, in ZooKeeper mode, while this master is out of touch with
        ZooKeeper: no master can fence a node then, so a write that missed
        one is acknowledged with hints only (docs/DECISIONS.md, "A master out
        of touch with ZooKeeper reads every owner"). Going that way, the
        near cache is emptied: a copy's owner may be the node that missed it.
        """
        why = "until the rebuilt ring is reconciled" if self.router.view.reconciling else ""
        if self._zk_out_of_touch:
            why = "while out of touch with ZooKeeper"
        on = bool(why)
        if on == self.router.read_every_owner:
            return
        self.router.read_every_owner = on
        if on and self.router.near is not None:
            self.router.near.clear()
        if on:
            log.info("reads ask every owner of a key %s", why)
        else:
            log.info("reads no longer ask every owner of a key")

    def _on_zk_state(self, state: str) -> None:
        """The ZooKeeper session's state changed (``ZkSession.on_state``): reads ask every owner unless it is connected."""
        out = state in ("suspended", "lost")
        if out != self._zk_out_of_touch:
            self._zk_out_of_touch = out
            self._read_every_owner()

    def _ring_due_in(self, window: float) -> None:
        """This coordinator restarted and gathers re-announcements for ``window`` s: held requests wait for the ring.

        Each waits until the ring is rebuilt, at most the window plus
        ``RING_WAIT_S`` from now (the links to the nodes open in that margin),
        instead of ``RING_WAIT_S`` from its arrival: the ring is due, not lost
        (docs/DECISIONS.md, "A restarted coordinator holds requests until its
        ring is rebuilt").
        """
        if self.ring_gate.closed:
            self.ring_gate.wait_until(asyncio.get_running_loop().time() + window + RING_WAIT_S)

    def _hints_lost(self, node_id: str) -> None:
        """Hints for ``node_id`` overflowed: it must be reconciled in full before it serves reads again."""
        self.membership.request_reconcile(node_id)

    # -- handlers ---------------------------------------------------------------------

    def _ping(self, conn: FrameProtocol, rid: int, args: None) -> Any:
        return "PONG"

    def _delete(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        self.router.delete(conn, rid, key)
        return LATER

    def _mget(self, conn: FrameProtocol, rid: int, keys: list[bytes]) -> Any:
        self.router.mget(conn, rid, keys)
        return LATER

    def _mset(self, conn: FrameProtocol, rid: int, args: tuple[list[tuple[bytes, bytes]], int]) -> Any:
        self.router.mset(conn, rid, *args)
        return LATER

    def _exists(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        self.router.exists(conn, rid, key)
        return LATER

    def _expire(self, conn: FrameProtocol, rid: int, args: tuple[bytes, int]) -> Any:
        self.router.expire(conn, rid, *args)
        return LATER

    def _ttl(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        self.router.ttl(conn, rid, key)
        return LATER

    def _incr(self, conn: FrameProtocol, rid: int, args: tuple[bytes, int]) -> Any:
        return deferred(self.router.incr(args[0], args[1]))

    def _decr(self, conn: FrameProtocol, rid: int, args: tuple[bytes, int]) -> Any:
        return deferred(self.router.incr(args[0], -args[1]))

    def _touch(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        return deferred(self.router.touch(key))

    def _persist(self, conn: FrameProtocol, rid: int, key: bytes) -> Any:
        self.router.persist(conn, rid, key)
        return LATER

    def _stats(self, conn: FrameProtocol, rid: int, args: None) -> Any:
        return deferred(self.cluster_stats())

    def _hotkeys(self, conn: FrameProtocol, rid: int, count: int) -> Any:
        """HOTKEYS: this master's hottest keys met by its read sketch, ``[[key, reads_per_s], ...]`` hottest first."""
        hot = self.router.hot
        return [] if hot is None else [[key, round(rate, 1)] for key, rate in hot.hottest(count)]

    def _ring(self, conn: FrameProtocol, rid: int, args: None) -> Any:
        return deferred(self.ring_info())

    def _join(self, conn: FrameProtocol, rid: int, args: tuple[str, str, int, float, int]) -> Any:
        return deferred(self.membership.join(*args))

    def _leave(self, conn: FrameProtocol, rid: int, node_id: str) -> Any:
        return deferred(self.membership.leave(node_id))

    def _forget(self, conn: FrameProtocol, rid: int, args: tuple[str, bool]) -> Any:
        return deferred(self.membership.forget(*args))

    def _apply(self, conn: FrameProtocol, rid: int, entries: list[tuple[bytes, bytes, int, int]]) -> Any:
        return deferred(self.router.apply_entries(entries))

    def _fence(self, conn: FrameProtocol, rid: int, args: tuple[str, int, str]) -> Any:
        return deferred(self.membership.serve_fence(*args))

    def _sync(self, conn: FrameProtocol, rid: int, args: tuple[str, int, int, dict[str, Any] | None, list[str]]) -> Any:
        follower_id = args[0]
        holder, seen = self._follower_conns.get(follower_id, (conn, 0.0))
        now = time.monotonic()
        # A holder silent for a while may be a half-open connection of a follower that restarted elsewhere.
        if holder is not conn and not holder.is_closing and now - seen < FOLLOWER_SILENT_S:
            peer = holder.peer
            where = format_address(*peer[:2]) if isinstance(peer, tuple) else str(peer)
            # Two masters with one id stamp versions with one node tag, and the coordinator
            # would count them as one follower (a leave waits for each to adopt the new ring).
            raise BadArgumentsError(
                f"node id {follower_id!r} is already used by the follower master at {where}: every master needs its own --node-id"
            )
        self._follower_conns[follower_id] = (conn, now)
        return self.membership.sync(*args)

    def cluster_id(self) -> str | None:
        """The cluster this master's links BIND aux nodes to (``None``: not known yet).

        ZooKeeper mode: ``zk:NAME`` (``--cluster``), whichever master leads.
        Embedded: ``NAME/ID``, the coordinator's node id; a follower takes its
        coordinator's (HELLO's ``cluster_id``). docs/DECISIONS.md says why.
        """
        cfg = self.config
        if cfg.zookeeper:
            return f"zk:{cfg.cluster}"
        if isinstance(self.membership, Follower):
            return self.membership.cluster_id
        return f"{cfg.cluster}/{self.node_id}"

    def hello_result(self) -> dict[str, Any]:
        """HELLO plus ``cluster_id``: a follower BINDs aux nodes to its coordinator's cluster."""
        result = super().hello_result()
        result["cluster_id"] = self.cluster_id()
        return result

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
        hints = self.router.hints
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
            **self.connection_stats(),
            "hits": rs.hits,
            "misses": rs.misses,
            "fallbacks": rs.fallbacks,
            "repairs": rs.repairs,
            "unavailable": rs.unavailable,
            "partial_writes": rs.partial_writes,
            "fences_failed": rs.fences_failed,
            "superseded_retries": rs.superseded_retries,
            "superseded": rs.superseded,
            "stale_ring_requests": rs.stale_ring,
            "hints": hints.total(),
            "hinted_total": hints.hinted_total,
            "hints_replayed": hints.replayed_total,
            "hint_overflows": hints.overflows_total,
            "aux_suspected": sum(1 for link in self.links.values() if link.suspect),
            "ring_waits": self.ring_gate.held_total,
            "ring_wait_refusals": self.ring_gate.expired_total,
            **(self.router.near.stats() if self.router.near is not None else {}),
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
        """STATS on a master: its own counters (``hits``/``misses`` as its clients saw them) plus ``aux_*`` totals.

        The ``aux_*`` fields sum the aux nodes that answer at once, as they
        count: ``aux_items`` holds every replica's copy, and ``aux_hits`` /
        ``aux_misses`` every read an aux node served, the masters' replica,
        fallback and repair reads included (docs/OPERATIONS.md, "dcache stats").
        """
        out = self.master_stats()
        per_node = await self.router.gather_stats()
        for field in ("items", "bytes", "max_bytes", "hits", "misses", "evictions", "expirations"):
            out["aux_" + field] = sum(int(s.get(field, 0)) for s in per_node.values())
        out["aux_nodes_answering"] = len(per_node)
        return out

    async def ring_info(self) -> dict[str, Any]:
        """RING: members, health, epoch, shares, key counts and migration progress."""
        view = self.router.view
        shares = view.ring.shares() if len(view.ring) else {}
        per_node = await self.router.gather_stats()
        hints = self.router.hints.status()
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
                    "answering": node_id in per_node,
                    "suspected": link.suspect if link is not None else False,
                    "hints": hints.get(node_id, {}).get("hints", 0),
                    "auth_error": link.auth_error if link is not None else None,
                    "cluster_error": link.cluster_error if link is not None else None,
                }
            )
        return {
            "epoch": view.epoch,
            "seq": view.seq,
            "replicas": view.replicas,
            "ring": view.ring.to_dict(),
            "migrating": view.prev_ring is not None,
            "reads_every_owner": self.router.read_every_owner,
            "master": self.node_id,
            "membership": self.membership.status(),
            "nodes": nodes,
        }

    def collector(self) -> Collector:
        """This master's metrics collector."""
        from .metrics import MasterCollector

        return MasterCollector(self, self.router, self.links, self.membership, self.ring_gate)

    # -- lifecycle (dcache.daemon.serve) --------------------------------------------------

    async def start(self) -> str:
        """Listen, connect to the aux nodes, start membership; return the address listened on (and ``resp=HOST:PORT``)."""
        cfg = self.config
        if not len(self.membership.view.ring):
            self.ring_gate.close()  # until the first ring comes (a restarted coordinator, a follower, ZooKeeper)
        server = await self.listen(cfg.host, cfg.port)
        host, port = server.sockets[0].getsockname()[:2]
        if not cfg.node_id:
            self.node_id = f"master-{host}-{port}"
            self.clock = self._new_clock()
            self.router.clock = self.clock
        self._on_view(self.membership.view)
        for link in self.links.values():
            link.start()
        await self.membership.start()
        where = format_address(host, port)
        if cfg.resp_port is not None:
            from ..respserver import listen_resp

            resp = await listen_resp(self, cfg.host, cfg.resp_port)
            where += " resp=" + format_address(*resp.sockets[0].getsockname()[:2])
        # Per request the master allocates a few small objects that die
        # young; collecting the young generation every 700 allocations costs
        # more than it finds. Everything from start-up moves out of the
        # collector's sight (docs/DECISIONS.md). Connections form no
        # reference cycles, so they are freed without the collector.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
        return where

    async def flush_keys(self) -> int:
        """RESP's FLUSHDB on a master: drop every key of every aux node in the view (DROP over the whole ring).

        DROP leaves no tombstones, and hints this master keeps are dropped too,
        so nothing it holds brings a key back; a write in flight meanwhile may
        survive. Returns the number of entries dropped. Waits for this
        master's first ring like a data request (``RequestGate.ready``).
        """
        await self.ring_gate.ready()
        dropped = 0
        for node_id in list(self.router.view.members):
            link = self.links.get(node_id)
            if link is None:
                continue
            cursor = 0
            while True:
                cursor, n = await link.call(Op.DROP, [[0, 0]], cursor)
                dropped += int(n)
                if not cursor:
                    break
            self.router.hints.drop(node_id)
        return dropped

    async def count_keys(self) -> int:
        """RESP's DBSIZE on a master: the keys of the aux nodes that answer at once, each counted once.

        The aux nodes count every copy, so their sum is divided by the
        ring's copies per key. Waits for this master's first ring like a
        data request (``RequestGate.ready``): a ringless master would count
        no aux node and answer 0.

        Raises:
            UnavailableError: this master had no ring within ``RING_WAIT_S``.
        """
        await self.ring_gate.ready()
        per_node = await self.router.gather_stats()
        return sum(int(s.get("items", 0)) for s in per_node.values()) // max(1, self.router.view.replicas)

    async def scan_keys(self, cursor: int, count: int) -> tuple[int, list[bytes]]:
        """RESP's SCAN on a master: one page of the cluster's keys (``dcache.master.keyscan``).

        A call sends one native SCAN (``count`` items at most, a bounded
        amount of work on the node) and moves to the next node when one is
        done; it goes on to the next node at once when a finished node's last
        page was empty, so empty pages stay rare. Waits for this master's
        first ring like a data request (``RequestGate.ready``).

        Raises:
            BadArgumentsError: an unknown or expired cursor (also the aux node's own session expiring).
            UnavailableError: a node of the plan is no longer linked (it left during the scan), or
                this master had no ring within ``RING_WAIT_S``.
        """
        await self.ring_gate.ready()
        links = self.links
        if cursor:
            scan = self.key_scans.resume(cursor)
        else:
            scan = KeyScan(scan_plan(self.router.view, lambda n: n in links and not links[n].suspect))
        keys: list[bytes] = []
        while scan.index < len(scan.plan):
            node_id, arcs = scan.plan[scan.index]
            link = links.get(node_id)
            if link is None:
                raise UnavailableError(f"aux node {node_id} left during the scan: start again from 0")
            next_cursor, entries, _ = await link.call(Op.SCAN, arcs, scan.cursor, count, 0)
            keys = [e[0] for e in entries]
            scan.cursor = next_cursor
            if next_cursor:
                break
            scan.index += 1
            if keys:
                break
        return self.key_scans.keep(cursor, scan), keys

    async def before_close(self, sig: int, again: asyncio.Event) -> None:
        """Nothing to hand over: a master holds no data."""

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), stop membership, close links."""
        self.ring_gate.fail_all(f"master {self.node_id} is shutting down before it had a ring: try another master")
        await self.shutdown(self.config.shutdown_grace)
        await self.membership.close()
        await asyncio.gather(*(link.close() for link in self.links.values()), return_exceptions=True)


async def serve_master(config: MasterConfig, *, ready: bool = True) -> None:
    """Run a master until SIGTERM or SIGINT (``dcache.daemon.serve``)."""
    from ..daemon import serve

    await serve(MasterNode(config), host=config.host, metrics_port=config.metrics_port, ready=ready)


def run_master(config: MasterConfig) -> int:
    """Blocking entry point used by the CLI."""
    from ..daemon import run

    return run(lambda: MasterNode(config), host=config.host, metrics_port=config.metrics_port)
