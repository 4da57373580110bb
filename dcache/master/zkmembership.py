"""Membership in ZooKeeper: registrations, a leader master, the ring as a znode.

``ZooKeeperMembership`` is a ``Coordinator`` that only coordinates while it
leads. Every master

* registers ``masters/<id>`` (ephemeral) with the view it routes by, so the
  leader knows when all masters route by a new epoch before moving data;
* watches ``ring`` and routes by any newer view it sees there;
* runs for leader with kazoo's ``Election`` recipe (a ZooKeeper lock).

The leader turns membership into views: an aux node that registers
(``aux/<id>``) joins; one whose registration vanishes (its session ended)
is marked down unless it still answers pings (the masters' own health checks
usually see a dead node first); one that creates ``leaving/<id>`` leaves
after its data moved. It health-checks the aux nodes, runs migrations and
fences restarted nodes, exactly as the embedded coordinator does, and writes
each new view to ``ring`` with a compare-and-set on the znode version: if
the write fails, another master wrote the ring, so this one adopts that view
and gives up leadership. Views only move forward.

A dead aux node is forgotten (FORGET) by the leader at once; another master
checks the request against its own view, then writes it to
``forget/<id>`` (persistent) and waits (bounded) until the ring no longer
lists the node, or the leader writes its refusal into the znode. The leader
serves these requests as they come and when it takes over. A node whose
``aux/<id>`` registration is still there is not forgotten: it would join
again at once (its session has not expired, or it is alive).

A new leader reads the ring, resumes a migration that was in flight
(``prev_ring`` is part of the view), restarts the reconciliation of fenced
nodes, and reconciles the members with the registrations it finds.

A master owns its node id while it holds ``masters/<id>``: it claims that
znode before it follows the ring or runs for leader, so a second master
started with the same id never routes (its versions would carry the first's
tag). When the holder answers at the address its registration names with
this very id, the second master's start fails (``ConfigError``, exit 2);
when it does not answer, it is taken for a previous process of this master
whose session has not expired yet. If that registration names the address
this master is bound to now, from this machine (``machine_id``: hostname
and boot id), only a previous process can have written it: it is taken over
at once. Otherwise the claim waits for the old session to expire
(``--zk-session-timeout``).

A master that loses ZooKeeper keeps routing by the last view it saw and
says so in ``status()`` (``dcache ring``, ``dcache stats``) and in metrics; a
leader whose session expires stops leading. While its session is not
connected, the leader marks no node down or up and fences none for a missed
write (``coordinating``): no other master could follow those views. A
master that stops leading routes by the ring in ZooKeeper again, dropping
the views it made that never got there, and only the leader makes views.
It learns that ZooKeeper is out of reach only when its session does (up to
2/3 of the session timeout): a view it makes before then may be dropped too.
So a node that view fences or marks down keeps this master's hints until the
view is in ZooKeeper (``on_written``), and a down mark waits (bounded) until
the leader's views are there (``_published``), or is held back.
Before a move ends, the leader also waits (bounded) for a master whose
registration vanished in the last ``_GONE_MASTER_S`` seconds: its session
expired, but it may still route by its old view. A master that does not
lead and fences a restarted aux node in its own view lists it in its
registration (``fenced``); the leader reconciles it.

A write through a master that does not lead, which an owner missed, is
acknowledged once the leader fenced that owner: the master sends FENCE to
the leader (its node id from the ring, its address from its ``masters/<id>``
registration) and waits, bounded as an embedded follower waits for its
coordinator. The leader fences only while it is in touch with ZooKeeper;
otherwise, as when the leader cannot be reached, the write is acknowledged
with its hints only. FENCE is never forwarded: a master that does not lead
refuses it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from ssl import SSLContext
from typing import Any

import msgpack
from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError, NoNodeError

from ..address import parse_address
from ..config import MasterConfig
from ..errors import ConfigError, DCacheError, MembershipError, UnavailableError
from ..hlc import HybridClock, wall_ms
from ..peer import PeerConnection, open_peer
from ..protocol import PROTOCOL_VERSION, Op
from ..zookeeper import ZkPaths, ZkSession, dumps, loads, machine_id
from .links import AuxLink
from .membership import Coordinator, Membership, forget_refusal
from .view import DOWN, FENCED, LEAVING, UP, ClusterView, Member

__all__ = ["ZooKeeperMembership"]

log = logging.getLogger("dcache.master.zookeeper")

_WRITE_RETRY_S = 0.2
#: How often a down mark looks whether the leader's views are written to ZooKeeper (``_published``).
_WRITTEN_POLL_S = 0.02
#: How often the leader tries again to admit a registered aux node it could not admit yet (one that left is emptied first).
_JOIN_RETRY_S = 0.5
#: How often a master waiting for its ``masters/<id>`` znode tries again.
_CLAIM_RETRY_S = 0.5
#: Bound on the HELLO that asks the holder of this master's id who it is.
_PROBE_TIMEOUT_S = 2.0
#: How long a master that does not lead waits for the leader to serve its FORGET request.
_FORGET_WAIT_S = 20.0
#: How often it looks at the request and its view meanwhile.
_FORGET_POLL_S = 0.1
#: How long after its registration vanished a master is still waited for (bounded, as one behind) before data moves:
#: its session expired, but it may still route by its last view until it reaches ZooKeeper again (a reconnection
#: backs off up to 1 s). A dead one costs each wait its bound during that time, as in embedded mode (5 s after its last poll).
_GONE_MASTER_S = 10.0


class _LostRing(Exception):
    """The ring znode changed under the leader: another master wrote it."""


class ZooKeeperMembership(Coordinator):
    """Membership kept in ZooKeeper; this master coordinates while it is the leader."""

    role = "zk-follower"

    def __init__(
        self,
        config: MasterConfig,
        view: ClusterView,
        on_view: Callable[[ClusterView], None],
        links: Callable[[], dict[str, AuxLink]],
        clock: HybridClock,
        open_link: Callable[[Member], AuxLink],
        node_id: Callable[[], str],
        address: Callable[[], str],
        *,
        ssl: SSLContext | None = None,
        on_written: Callable[[ClusterView], None] | None = None,
    ) -> None:
        """``ssl``: the master's peer context, to ask another master who it is (``None``: plain TCP).

        ``on_written`` is called for a view this master leads with only once
        it is in ZooKeeper (``_writer``), for one read there at once.
        """
        super().__init__(config, view, on_view, links, clock, open_link, on_written=on_written)
        assert config.zookeeper is not None
        self.paths = ZkPaths(config.cluster)
        self._node_id = node_id
        self._address = address
        self.zk = ZkSession(config.zookeeper, config.zk_session_timeout, "master")
        self.leading = False
        self.leader: str | None = None  # the leader's node id, as the ring says
        self._ring_version = -1  # znode version of the ring last read or written; -1: none
        self._zk_pos = (0, 0)  # (epoch, seq) of the newest ring seen in or written to ZooKeeper
        self._ring_seen = asyncio.Event()
        self._registered: dict[str, dict[str, Any]] = {}
        self._leaving: set[str] = set()
        self._leave_tasks: dict[str, asyncio.Task[Any]] = {}
        #: Registered aux nodes being admitted (``_join_registered``).
        self._join_tasks: dict[str, asyncio.Task[Any]] = {}
        self._to_write: ClusterView | None = None
        self._write_wake = asyncio.Event()
        self._stepdown = threading.Event()
        self._closing = threading.Event()
        self._election_thread: threading.Thread | None = None
        self._election: Any = None
        self.leaderships = 0  # times this master became leader
        self._ssl = ssl
        #: Done once this master holds ``masters/<id>``; a ``ConfigError`` if a live master has its id.
        self._id_claim: asyncio.Future[None] | None = None
        #: Why this master does not route: a live master has its node id (``None``: no such conflict found).
        self.id_error: str | None = None
        self._claimed = False
        #: Masters registered (``masters/<id>``) at the last look, and when each was last seen registered.
        self._masters_now: set[str] = set()
        self._masters_seen: dict[str, float] = {}
        #: Aux nodes this master (not leading) fenced in its own view: its registration asks the leader to reconcile them.
        self._fenced_here: set[str] = set()
        #: The connection to the leader master that FENCE goes over (``_leader_call``), and that leader's node id.
        self._leader_conn: PeerConnection | None = None
        self._leader_conn_id: str | None = None
        self._leader_conn_lock = asyncio.Lock()
        #: Masters' addresses read from their ``masters/<id>`` registrations, by node id.
        self._master_addrs: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to ZooKeeper, claim this master's id and follow the ring (each bounded; then in the background).

        Raises:
            ConfigError: a live master has this master's node id.
        """
        self._id_claim = asyncio.get_running_loop().create_future()
        await self.zk.start()
        self.zk.on_state(self._on_zk_state)
        self._spawn(self._health_loop(), "health")
        self._spawn(self._writer(), "zk-ring-writer")
        self._spawn(self._setup(), "zk-setup")
        # Route by the ring in ZooKeeper from the first request on, if it can be had quickly.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(5.0, self.config.zk_session_timeout)
        try:
            async with asyncio.timeout_at(deadline):
                await self._id_claim
        except TimeoutError:
            pass
        except ConfigError:
            await self.close()
            raise
        try:
            async with asyncio.timeout_at(deadline):
                await self._ring_seen.wait()
        except TimeoutError:
            log.warning("no ring from ZooKeeper %s yet; serving with an empty ring until it comes", self.config.zookeeper)

    async def _setup(self) -> None:
        await self.zk.wait_connected()
        while True:
            try:
                await self.zk.run(self.zk.ensure_dirs, self.paths)
                break
            except KazooException as exc:
                log.warning("creating the cluster's znodes failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                await self.zk.wait_connected()
        claim = self._id_claim
        assert claim is not None
        try:
            await self._claim_id()
        except ConfigError as exc:
            self.id_error = str(exc)
            if claim.cancelled():  # start() gave up waiting: it will not say it
                log.error("%s; this master serves no ring", exc)
            else:
                claim.set_exception(exc)
            return
        self._claimed = True
        if not claim.done():
            claim.set_result(None)
        self._register_self()
        await self.zk.run(self.zk.watch_data, self.paths.ring, self._on_ring)
        await self.zk.run(self.zk.watch_children, self.paths.aux, self._on_aux_children)
        await self.zk.run(self.zk.watch_children, self.paths.leaving, self._on_leaving_children)
        await self.zk.run(self.zk.watch_children, self.paths.forget, self._on_forget_children)
        await self.zk.run(self.zk.watch_children, self.paths.masters, self._on_master_children)
        loop = asyncio.get_running_loop()
        self._election = self.zk.client.Election(self.paths.election, self._node_id())
        self._election_thread = threading.Thread(target=self._election_main, args=(loop,), name="zk-election", daemon=True)
        self._election_thread.start()

    async def _claim_id(self) -> None:
        """Hold ``masters/<id>`` before anything else (see the module note); waits while a previous process holds it.

        Raises:
            ConfigError: a live master answers, at the address its registration
                names, with this master's node id.
        """
        me = self._node_id()
        path = f"{self.paths.masters}/{me}"
        warned = False
        while True:
            view = self.view
            data = dumps({"addr": self._address(), "machine": machine_id(), "epoch": view.epoch, "seq": view.seq, "leader": False})
            try:
                holder = await self.zk.run(self.zk.claim, path, data, {"addr": self._address(), "machine": machine_id()})
            except KazooException as exc:
                log.warning("claiming %s failed (%s); retrying", path, exc)
                holder = {}
            if holder is None:
                return
            addr = holder.get("addr")
            if isinstance(addr, str) and addr != self._address() and await self._answers_as(addr, me):
                raise ConfigError(
                    f"node_id: the master at {addr} has this master's node id {me!r} in ZooKeeper cluster {self.config.cluster!r}; "
                    "every master needs its own --node-id (one id would stamp two masters' writes with one version)"
                )
            if not warned:
                log.warning(
                    "%s is held by another ZooKeeper session (%s, not answering as %r: a previous process of this master "
                    "whose session has not expired yet); not routing until it goes",
                    path,
                    addr,
                    me,
                )
                warned = True
            await asyncio.sleep(_CLAIM_RETRY_S)
            await self.zk.wait_connected()

    async def _open_master(self, host: str, port: int, name: str) -> PeerConnection:
        """A connection to another master, as this master (its credentials and TLS), bounded by ``_PROBE_TIMEOUT_S``."""
        return await open_peer(
            host,
            port,
            name=name,
            auth_token=self.config.auth_token,
            client_name="dcache-master",
            timeout=_PROBE_TIMEOUT_S,
            secret=self.config.secret(),
            ssl=self._ssl,
        )

    async def _answers_as(self, addr: str, node_id: str) -> bool:
        """Whether a master answers at ``addr`` with ``node_id`` (False if it cannot be reached or refuses this one)."""
        try:
            host, port = parse_address(addr)
            conn = await self._open_master(host, port, f"master {addr}")
        except (ValueError, TimeoutError, OSError, DCacheError):
            return False
        conn.close()
        return conn.server_info.get("role") == "master" and conn.server_info.get("node_id") == node_id

    async def close(self) -> None:
        self._closing.set()
        self._stepdown.set()
        if self._election is not None:
            self._election.cancel()
        await super().close()
        if self._leader_conn is not None:
            self._leader_conn.close()
        await self.zk.close()
        if self._election_thread is not None:
            await asyncio.to_thread(self._election_thread.join, 5.0)

    def _on_zk_state(self, state: str) -> None:
        if state == "lost" and self.leading:
            log.warning("ZooKeeper session expired: no longer the leader")
            self._stepdown.set()
        if state == "connected":
            self._register_self()

    def _register_self(self) -> None:
        if not self._claimed:
            return  # _claim_id registers it first
        view = self.view
        reg = {"addr": self._address(), "machine": machine_id(), "epoch": view.epoch, "seq": view.seq, "leader": self.leading}
        if self._fenced_here:
            reg["fenced"] = sorted(self._fenced_here)
        self.zk.register(f"{self.paths.masters}/{self._node_id()}", dumps(reg))

    # -- views ---------------------------------------------------------------------------

    def publish(self, view: ClusterView) -> bool:
        """Adopt a view this master made and write it to ZooKeeper; only the leader makes views.

        One made by a task the leader started that ends after it stepped
        down (a node marked down, say) is dropped: routed by, it would stay
        newer than the leader's views, and this master would never follow
        them again.
        """
        if not self.leading:
            log.info("not leading: the view %d.%d this master made is dropped", view.epoch, view.seq)
            return False
        if not self._route(view):
            return False  # on_written once it is in ZooKeeper
        if self.leading:
            self._to_write = view
            self._write_wake.set()
        self._register_self()
        return True

    def _adopt(self, view: ClusterView) -> None:
        """Route by a view read from ZooKeeper (never written back); it replaces this master's own fences."""
        if Membership.publish(self, view):
            self._fenced_here.clear()
            self._register_self()

    def _on_ring(self, data: bytes | None, stat: Any) -> None:
        self._ring_seen.set()
        if data is None or stat is None:
            return
        try:
            view = ClusterView.from_dict(msgpack.unpackb(data, raw=False, strict_map_key=False), self.view)
        except Exception as exc:
            log.error("the ring in ZooKeeper is unreadable (%s); ignoring it", exc)
            return
        self.leader = view.coordinator or None
        self._zk_pos = max(self._zk_pos, (view.epoch, view.seq))
        if stat.version > self._ring_version and not self.leading:
            self._ring_version = stat.version
        if view.newer_than(self.view):
            if self.leading:
                log.error("the ring in ZooKeeper moved to epoch %d.%d under this leader; stepping down", view.epoch, view.seq)
                self._stepdown.set()
            self._adopt(view)

    def ring_behind(self) -> None:
        """Read the ring in ZooKeeper again (``Membership.ring_behind``): epochs there only grow, whoever leads."""
        Membership.ring_behind(self)

    async def _read_ring_again(self) -> None:
        """Read the ring in ZooKeeper and adopt it as the watch would (``_on_ring``), once connected (bounded by the session timeout)."""
        try:
            async with asyncio.timeout(self.config.zk_session_timeout):
                await self.zk.wait_connected()
                data, stat = await self.zk.run(self.zk.client.get, self.paths.ring)
        except (KazooException, TimeoutError) as exc:
            log.info("reading the ring again after a request refused as routed by an older one failed: %s", exc or "timed out")
            return
        self._on_ring(data, stat)

    async def _writer(self) -> None:
        """Write the leader's views to ZooKeeper in order, latest first, with a compare-and-set."""
        while True:
            await self._write_wake.wait()
            self._write_wake.clear()
            view = self._to_write
            if view is None or not self.leading:
                continue
            try:
                await self.zk.wait_connected()
                self._ring_version = await self.zk.run(self._cas_write, view, self._ring_version)
                self._zk_pos = max(self._zk_pos, (view.epoch, view.seq))
                self._on_written(view)
                if self._to_write is view:
                    self._to_write = None
            except _LostRing:
                log.error("another master wrote the ring: stepping down")
                self._to_write = None
                self._stepdown.set()
            except KazooException as exc:
                log.warning("writing ring epoch %d.%d to ZooKeeper failed (%s); retrying", view.epoch, view.seq, exc)
                await asyncio.sleep(_WRITE_RETRY_S)
                self._write_wake.set()

    def _cas_write(self, view: ClusterView, version: int) -> int:
        """Write ``view`` if the ring is still at ``version``; the new version (worker thread)."""
        data = msgpack.packb(view.to_dict(), use_bin_type=True)
        try:
            if version < 0:
                self.zk.client.create(self.paths.ring, data, makepath=True)
                return 0
            return int(self.zk.client.set(self.paths.ring, data, version=version).version)
        except (BadVersionError, NodeExistsError, NoNodeError):
            raise _LostRing() from None

    def _read_ring(self) -> tuple[ClusterView | None, int]:
        """The ring in ZooKeeper and its version (worker thread)."""
        try:
            data, stat = self.zk.client.get(self.paths.ring)
        except NoNodeError:
            return None, -1
        return ClusterView.from_dict(msgpack.unpackb(data, raw=False, strict_map_key=False), self.view), int(stat.version)

    # -- leadership -------------------------------------------------------------------------

    def _election_main(self, loop: asyncio.AbstractEventLoop) -> None:
        """The election thread: contend, lead until told to step down, contend again."""
        while not self._closing.is_set():
            try:
                self._election.run(self._lead, loop)
            except Exception as exc:
                if not self._closing.is_set():
                    log.warning("leader election interrupted (%s); contending again", exc)
            self._closing.wait(0.5)

    def _lead(self, loop: asyncio.AbstractEventLoop) -> None:
        """Holds the election lock (election thread) until a step-down."""
        self._stepdown.clear()
        if self._closing.is_set():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._become_leader(), loop).result(30.0)
        except Exception:
            log.exception("taking over leadership failed")
        else:
            self._stepdown.wait()
        if not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._resign(), loop).result(10.0)
            except Exception:
                log.exception("stepping down failed")

    async def _become_leader(self) -> None:
        view, version = await self.zk.run(self._read_ring)
        if view is not None:
            self.warn_replicas(view.replicas, f"the ring in ZooKeeper under /dcache/{self.config.cluster}")
            self._adopt(view)
        self._ring_version = version
        me = self._node_id()
        self.leading = True
        self.role = "zk-leader"
        self.leader = me
        self.leaderships += 1
        current = self.view
        if view is None:
            # An empty ZooKeeper: start the epochs from the wall clock so that
            # views of a ring that was lost with ZooKeeper's data stay behind.
            start = max(current.epoch + 1, wall_ms())
            # Everything else as it was: a migration settling stays settling.
            current = replace(current, epoch=start, seq=0, members=dict(current.members), coordinator=me)
            self._route(current)
            self._to_write = current
            self._write_wake.set()
        else:
            self.publish(current.bumped(coordinator=me))
        log.info("leading the cluster %r at ring epoch %d", self.config.cluster, self.view.epoch)
        if self.view.prev_ring is not None:
            log.info("resuming the migration to epoch %d", self.view.epoch)
            self._start_migration()
        for node_id, m in self.view.members.items():
            if m.state == FENCED:
                self._fences[node_id] = self._spawn(self._reconcile(node_id), f"fence-{node_id}")
        await self._refresh_registrations()
        await self._serve_forget_requests()

    async def _resign(self) -> None:
        if not self.leading:
            return
        self.leading = False
        self.role = "zk-follower"
        self._to_write = None
        for task in [self._migration, *self._fences.values(), *self._leave_tasks.values()]:
            if task is not None:
                task.cancel()
        self._fences.clear()
        self._leave_tasks.clear()
        self._register_self()
        log.warning("no longer leading the cluster %r", self.config.cluster)
        self._spawn(self._route_by_zk_ring(), "zk-ring-after-leading")

    async def _route_by_zk_ring(self) -> None:
        """After leading: route by the ring in ZooKeeper, dropping the views made that never got there.

        The leader routes by each view it makes before writing it. If the
        session was lost first (ZooKeeper out of reach), those views reached
        no other master, and they are newer than the ring there: the ring
        watch alone would never replace them, and this master would route
        by a ring no other master knows, and keep its writes off nodes the
        others read.
        """
        while not self.leading:
            await self.zk.wait_connected()
            try:
                view, _ = await self.zk.run(self._read_ring)
            except KazooException as exc:
                log.info("reading the ring after leading failed (%s); retrying", exc)
                await asyncio.sleep(_WRITE_RETRY_S)
                continue
            pos = None if view is None else (view.epoch, view.seq)
            if view is None or pos is None or self.leading or pos < self._zk_pos or not self.view.newer_than(view):
                return  # nothing there, leading again, or a newer ring came through the watch meanwhile
            log.warning(
                "the views after %d.%d up to %d.%d, made while this master led, never reached ZooKeeper: routing by the ring there",
                *pos,
                self.view.epoch,
                self.view.seq,
            )
            self.view = view
            self._on_view(view)
            self._on_written(view)
            self._register_self()
            return

    # -- registrations (leader) ----------------------------------------------------------------

    def _on_aux_children(self, children: list[str]) -> None:
        self._spawn(self._refresh_registrations(children), "zk-aux")

    def _on_leaving_children(self, children: list[str]) -> None:
        self._leaving = set(children)
        if self.leading:
            self._reconcile_leaving()

    def _read_registrations(self, children: list[str] | None) -> dict[str, dict[str, Any]]:
        if children is None:
            children = self.zk.client.get_children(self.paths.aux)
        out = {}
        for child in children:
            try:
                data, _ = self.zk.client.get(f"{self.paths.aux}/{child}")
            except NoNodeError:
                continue
            reg = loads(data)
            if isinstance(reg, dict) and isinstance(reg.get("host"), str) and isinstance(reg.get("port"), int):
                out[child] = reg
            else:
                log.warning("ignoring the malformed aux registration %s: %r", child, data[:200])
        return out

    async def _refresh_registrations(self, children: list[str] | None = None) -> None:
        try:
            self._registered = await self.zk.run(self._read_registrations, children)
        except KazooException as exc:
            log.warning("reading aux registrations failed: %s", exc)
            return
        if self.leading:
            self._reconcile_registrations()
            self._reconcile_leaving()

    def _reconcile_registrations(self) -> None:
        members = self.view.members
        for node_id, reg in self._registered.items():
            if node_id in self._leaving:
                continue
            m = members.get(node_id)
            host, port, weight = reg["host"], int(reg["port"]), float(reg.get("weight", 1.0))
            if m is not None and m.state in (UP, FENCED) and (m.host, m.port, m.weight) == (host, port, weight):
                continue
            if m is not None and m.state == LEAVING:
                continue
            task = self._join_tasks.get(node_id)
            if task is None or task.done():
                self._join_tasks[node_id] = self._spawn(self._join_registered(node_id, host, port, weight), f"zk-join-{node_id}")
        for node_id, m in members.items():
            if node_id not in self._registered and m.state in (UP, FENCED):
                self._spawn(self._confirm_gone(node_id), f"zk-gone-{node_id}")

    async def _join_registered(self, node_id: str, host: str, port: int, weight: float) -> None:
        """Admit a registered node, trying again while it cannot be admitted yet and is still registered (this master leading)."""
        while self.leading and node_id in self._registered:
            try:
                await self.join(node_id, host, port, weight)
                return
            except UnavailableError as exc:
                log.warning("admitting aux node %s failed: %s; trying again in %.1f s", node_id, exc, _JOIN_RETRY_S)
            await asyncio.sleep(_JOIN_RETRY_S)

    async def _confirm_gone(self, node_id: str) -> None:
        """A registration vanished: mark the node down unless it still answers."""
        link = self._links().get(node_id)
        if link is not None:
            try:
                hello = (PROTOCOL_VERSION, self.config.auth_token, "dcache-health")
                await asyncio.wait_for(link.call(Op.HELLO, *hello), self.config.health_timeout * 2)
            except Exception:
                pass
            else:
                log.warning("aux node %s's ZooKeeper session ended but it answers pings; keeping it", node_id)
                return
        if self.leading and node_id not in self._registered:
            self.mark(node_id, DOWN, "its ZooKeeper session ended")

    def _reconcile_leaving(self) -> None:
        for node_id in self._leaving:
            m = self.view.members.get(node_id)
            task = self._leave_tasks.get(node_id)
            if m is None or (task is not None and not task.done()):
                continue
            log.info("aux node %s asks to leave (through ZooKeeper)", node_id)
            self._leave_tasks[node_id] = self._spawn(self._leave_through_zk(node_id), f"zk-leave-{node_id}")

    async def _leave_through_zk(self, node_id: str) -> None:
        """Let a node that created ``leaving/<id>`` leave; a down one cannot (it is forgotten instead)."""
        try:
            await Coordinator.leave(self, node_id)
        except MembershipError as exc:
            log.warning("the leave of aux node %s did not complete: %s", node_id, exc.message)

    # -- forgetting a dead node (see the module note) ------------------------------------------

    async def forget(self, node_id: str, force: bool) -> int:
        """Forget a down aux node: the leader at once, another master through ``forget/<id>``.

        Raises:
            MembershipError: refused by this master's view or by the leader's; nothing changed.
            UnavailableError: ZooKeeper is unreachable, or no leader served the request in time.
        """
        why = forget_refusal(self.view, node_id, force)
        if why is None and node_id in self._registered:
            why = (
                f"aux node {node_id} is still registered in ZooKeeper (aux/{node_id}): it is alive, or its session has "
                "not expired yet (--zk-session-timeout); it would join again at once"
            )
        if why is not None:
            raise MembershipError(why)
        if self.leading:
            return await super().forget(node_id, force)  # checks again, under the coordinator's lock
        path = f"{self.paths.forget}/{node_id}"
        try:
            await self.zk.run(self._put_request, path, dumps({"force": force, "by": self._node_id()}))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _FORGET_WAIT_S
            while loop.time() < deadline:
                if node_id not in self.view.members:
                    return self.view.epoch
                answer = loads(await self.zk.run(self._read_request, path))
                if isinstance(answer, dict) and isinstance(answer.get("refused"), str):
                    await self.zk.run(self._delete_request, path)
                    raise MembershipError(f"the leader ({self.leader}) refused: {answer['refused']}")
                await asyncio.sleep(_FORGET_POLL_S)
            await self.zk.run(self._delete_request, path)
        except KazooException as exc:
            raise UnavailableError(f"ZooKeeper {self.config.zookeeper} failed the request to forget {node_id}: {exc!r}") from None
        raise UnavailableError(
            f"no leader (last known: {self.leader}) served the request to forget {node_id} within {_FORGET_WAIT_S:.0f} s; "
            "it is withdrawn: try again"
        )

    def _put_request(self, path: str, data: bytes) -> None:
        """Create ``path`` with ``data``, or replace an older request's (worker thread)."""
        try:
            self.zk.client.create(path, data, makepath=True)
        except NodeExistsError:
            self.zk.client.set(path, data)

    def _read_request(self, path: str) -> bytes | None:
        """A znode's data, a request's or a registration's (``None``: gone) (worker thread)."""
        try:
            data, _ = self.zk.client.get(path)
        except NoNodeError:
            return None
        return bytes(data)

    def _delete_request(self, path: str) -> None:
        """Delete a request (gone already is fine) (worker thread)."""
        try:
            self.zk.client.delete(path)
        except NoNodeError:
            pass

    def _read_requests(self) -> dict[str, Any]:
        """Every pending request to forget, by node id (worker thread)."""
        out: dict[str, Any] = {}
        for child in self.zk.client.get_children(self.paths.forget):
            data = self._read_request(f"{self.paths.forget}/{child}")
            if data is not None:
                out[child] = loads(data)
        return out

    def _on_forget_children(self, children: list[str]) -> None:
        if self.leading and children:
            self._spawn(self._serve_forget_requests(), "zk-forget")

    async def _serve_forget_requests(self) -> None:
        """The leader forgets the nodes other masters ask it to, or writes its refusal into the request."""
        try:
            requests = await self.zk.run(self._read_requests)
        except KazooException as exc:
            log.warning("reading the requests to forget aux nodes failed: %s", exc)
            return
        for node_id, request in requests.items():
            if not self.leading:
                return
            path = f"{self.paths.forget}/{node_id}"
            if not isinstance(request, dict) or "refused" in request:
                continue  # refused already: the master that asked deletes it
            try:
                try:
                    await self.forget(node_id, request.get("force") is True)
                except MembershipError as exc:
                    if node_id in self.view.members:
                        log.warning("refused to forget aux node %s (asked by master %s): %s", node_id, request.get("by"), exc.message)
                        await self.zk.run(self.zk.client.set, path, dumps({**request, "refused": exc.message}))
                        continue
                await self.zk.run(self._delete_request, path)  # done (or done before: another task served it)
            except (KazooException, NoNodeError) as exc:
                log.info("answering the request to forget %s failed: %s", node_id, exc)

    # -- overrides of the coordinator ---------------------------------------------------------

    async def join(self, node_id: str, host: str, port: int, weight: float, known_epoch: int = 0) -> int:
        if not self.leading:
            raise UnavailableError("membership is kept in ZooKeeper: start aux nodes with --zookeeper")
        return await super().join(node_id, host, port, weight)

    async def leave(self, node_id: str) -> bool:
        raise UnavailableError("membership is kept in ZooKeeper: a leaving aux node creates its leaving/ znode")

    @property
    def coordinating(self) -> bool:
        """Whether this master marks nodes down or up and fences them for missed writes: it leads and is connected to ZooKeeper.

        A leader out of touch with ZooKeeper makes no such view until it is
        back, as no other master could follow it: routed by here alone, a
        node marked down lost this master's writes (no hints) while the
        others still read it, and a fenced node is reconciled by nothing
        once that view is dropped (``_route_by_zk_ring``). Its hints keep a
        silent node's missed writes meanwhile, as a follower's do. A
        restarted node is still fenced by the leader (``on_aux_restart``):
        it keeps being written, and the other masters see the restart too.
        """
        return self.leading and self.zk.state == "connected"

    def _epoch_published(self, epoch: int) -> bool:
        """Whether a ring of ``epoch`` is in ZooKeeper, where the other masters read it (a ring floor may name only such an epoch)."""
        return self._zk_pos[0] >= epoch

    async def _published(self, timeout: float) -> bool:
        """Wait (bounded) until every view this leader routes by is in ZooKeeper; False if not, or if it is out of touch with it.

        A leader learns that ZooKeeper stopped answering only when its
        session does (up to 2/3 of the session timeout): a view it made
        meanwhile (a fence for a missed write) is dropped when it steps down.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.coordinating:
            if self._zk_pos >= (self.view.epoch, self.view.seq):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(_WRITTEN_POLL_S)
        return False

    def on_aux_restart(self, node_id: str) -> None:
        """The leader fences the node (in touch with ZooKeeper or not); another master fences it in its own view and asks the leader, through its registration, to reconcile it.

        Only the leader's next view lifts such a fence. When the leader's
        view already let the node back (it restarted while down there) and
        this master's link saw the new process only after adopting that
        view, no next view would come (``_reconcile_fenced_elsewhere``).
        """
        if self.leading:
            super().on_aux_restart(node_id)
            return
        Membership.on_aux_restart(self, node_id)
        m = self.view.members.get(node_id)
        if m is not None and m.state == FENCED and node_id not in self._fenced_here:
            self._fenced_here.add(node_id)
            self._register_self()

    async def _health_round(self) -> None:
        if self.coordinating:
            await super()._health_round()
            await self._reconcile_fenced_elsewhere()

    async def _reconcile_fenced_elsewhere(self) -> None:
        """Fence (and so reconcile) the up nodes another master at this view fenced on its own (see ``on_aux_restart``)."""
        try:
            regs = await self.zk.read_registrations(self.paths.masters)
        except KazooException:
            return
        view = self.view
        for name, reg in regs.items():
            fenced = reg.get("fenced")
            if name == self._node_id() or (reg.get("epoch"), reg.get("seq")) != (view.epoch, view.seq) or not isinstance(fenced, list):
                continue
            for node_id in fenced:
                m = self.view.members.get(node_id) if isinstance(node_id, str) else None
                if m is not None and m.state == UP and self.coordinating:
                    self.fence(node_id, f"master {name} saw it restart after this view let it back: reconciling before it serves reads")

    def sync(
        self, follower_id: str, epoch: int, seq: int, their_view: dict[str, Any] | None = None, reconcile: list[str] | None = None
    ) -> dict[str, Any] | None:
        raise UnavailableError("membership is kept in ZooKeeper: masters follow the ring there")

    async def fence_missed(self, node_id: str, since_ms: int, why: str) -> int:
        """The leader fences the node itself; another master asks the leader (FENCE), bounded as an embedded follower.

        Raises:
            UnavailableError: this master leads but is out of touch with
                ZooKeeper (``coordinating``), or the leader is unknown,
                unreachable, or refuses (out of touch, or no longer leading).
        """
        if self.coordinating:
            return await super().fence_missed(node_id, since_ms, why)
        if self.leading:
            raise UnavailableError(
                f"this master leads but is out of touch with ZooKeeper: it fences no aux node ({node_id}) until it is back"
            )
        timeout = max(1.0, 2 * self.config.follow_interval + 1.5)  # as an embedded follower's FENCE
        return int(await self._leader_call(Op.FENCE, node_id, since_ms, why, timeout=timeout))

    async def serve_fence(self, node_id: str, since_ms: int, why: str) -> int:
        """FENCE from a master that does not lead: only the leader, in touch with ZooKeeper, fences (never forwarded).

        Raises:
            UnavailableError: this master does not lead, or is out of touch with ZooKeeper.
        """
        if not self.coordinating:
            who = "leads but is out of touch with ZooKeeper" if self.leading else f"does not lead (the ring names {self.leader})"
            raise UnavailableError(f"master {self._node_id()} {who}: it cannot fence aux node {node_id}")
        return await super().fence_missed(node_id, since_ms, why)

    async def _leader_call(self, op: int, *args: Any, timeout: float) -> Any:
        """Call the leader master over one kept connection.

        Raises:
            UnavailableError: no leader is known, its address cannot be read,
                or it cannot be reached in time.
        """
        try:
            conn = await self._leader_connection()
            return await conn.call(op, *args, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise UnavailableError(f"the leader master {self.leader} is unreachable: {str(exc) or 'timed out'}") from None

    async def _leader_connection(self) -> PeerConnection:
        """The open connection to the master the ring names as leader (opened, and checked to be that master, if needed)."""
        leader = self.leader
        if leader is None or leader == self._node_id():
            raise UnavailableError("no other master is known to lead yet")
        async with self._leader_conn_lock:
            conn = self._leader_conn
            if conn is not None and not conn.is_closing and self._leader_conn_id == leader:
                return conn
            if conn is not None:
                conn.close()
                self._leader_conn = None
            addr = self._master_addrs.get(leader) or await self._master_address(leader)
            host, port = parse_address(addr)
            try:
                conn = await self._open_master(host, port, f"leader master {leader} at {addr}")
            except BaseException:
                self._master_addrs.pop(leader, None)  # read it again next time: the leader may have moved
                raise
            if conn.server_info.get("role") != "master" or conn.server_info.get("node_id") != leader:
                conn.close()
                self._master_addrs.pop(leader, None)
                raise UnavailableError(f"the master at {addr} is not the leader {leader}")
            self._leader_conn, self._leader_conn_id = conn, leader
            return conn

    async def _master_address(self, node_id: str) -> str:
        """A master's address, from its ``masters/<id>`` registration (bounded read).

        Raises:
            UnavailableError: ZooKeeper did not answer in time, or the master is not registered.
        """
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT_S):
                data = await self.zk.run(self._read_request, f"{self.paths.masters}/{node_id}")
        except (KazooException, TimeoutError) as exc:
            raise UnavailableError(f"reading master {node_id}'s registration in ZooKeeper failed: {exc!r}") from None
        reg = loads(data)
        addr = reg.get("addr") if isinstance(reg, dict) else None
        if not isinstance(addr, str):
            raise UnavailableError(f"master {node_id} is not registered in ZooKeeper")
        self._master_addrs[node_id] = addr
        return addr

    def request_reconcile(self, node_id: str) -> None:
        if self.coordinating:
            super().request_reconcile(node_id)
        else:
            Membership.request_reconcile(self, node_id)

    def _on_master_children(self, children: list[str]) -> None:
        now = time.monotonic()
        for name in self._masters_now | set(children):  # a vanished one was there until now
            self._masters_seen[name] = now
        self._masters_now = set(children)

    def _gone_masters(self) -> list[str]:
        """Masters whose registration vanished less than ``_GONE_MASTER_S`` ago."""
        now = time.monotonic()
        return [m for m, seen in self._masters_seen.items() if m not in self._masters_now and now - seen < _GONE_MASTER_S]

    async def _masters_at(self, pos: tuple[int, int], timeout: float) -> list[str]:
        """Wait (bounded) until every registered master routes by the view ``pos`` or a later one.

        A master whose registration vanished recently (``_GONE_MASTER_S``)
        counts as behind until it registers again at ``pos``: its session
        expired, but it may still be routing by an older view.
        """
        lagging: list[str] = await self.zk.wait_masters_at(
            self.paths.masters, pos, timeout, skip=self._node_id(), absent=self._gone_masters
        )
        return lagging

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = super().status() if self.leading else {"role": self.role}
        out["role"] = self.role
        out["cluster"] = self.config.cluster
        out["leader"] = self.leader
        out["leaderships"] = self.leaderships
        out["registered_aux"] = sorted(self._registered)
        out["node_id_claimed"] = self._claimed
        if self.id_error is not None:
            out["node_id_error"] = self.id_error
        out.update(self.zk.status())
        return out
