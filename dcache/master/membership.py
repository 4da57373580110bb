"""Cluster membership behind one interface: who the aux nodes are and which view to route by.

``Membership`` is what a master's router and handlers use. Two embedded
implementations exist (a ZooKeeper one can sit behind the same interface):

* ``Coordinator``: this master decides. It health-checks every aux node,
  admits nodes that JOIN, lets nodes LEAVE after handing their data over,
  publishes a new ``ClusterView`` (epoch + 1) on every change, and runs the
  data migration each change implies (``Migrator``).
* ``Follower``: another master decides. The follower polls it (SYNC) every
  ``follow_interval`` seconds and adopts any newer view; if the coordinator
  is unreachable it keeps routing by the last view it saw and says so in its
  status. JOIN and LEAVE are forwarded to the coordinator.

Views only move forward: a view replaces the current one only if its
``(epoch, seq)`` is larger. A coordinator's first epoch is its start time in
milliseconds, so a restarted coordinator's views supersede the old ones.

A restarted coordinator knows nothing of the ring, but the cluster does.
Followers still route by the last view: a follower whose SYNC shows an epoch
from before the coordinator started is asked for that view (the answer
``{"want_view": true}``) and hands it over in its next SYNC; the
coordinator adopts its members, rings and any migration in flight under a
new epoch, and nothing moves. Aux nodes re-announce with the epoch that
admitted them (``known_epoch`` in JOIN); an older one than the
coordinator's start, with no follower to ask, opens a recovery window
(``--recovery-window``) in which the re-announcements are gathered, then
applied as one change without migration (the nodes hold their own data):
the ring comes back whole instead of one node at a time, each a migration
from a ring that was never real. Until the ring is back the coordinator
publishes nothing, so followers keep serving by their last view. A ring
rebuilt this way has lost its migration record (a migration copying when
the old coordinator died, ranges its previous owners had not dropped yet)
and its member states (a node down or fenced then, whose missed writes were
in that coordinator's hints): ``_reconcile_rebuilt`` copies whatever a node
holds outside its own arcs to their owners, and with several copies per key
its own arcs to the other owners, then drops what is outside its arcs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from ssl import SSLContext
from typing import Any

from ..address import parse_address
from ..config import MasterConfig
from ..errors import BadArgumentsError, ConfigError, MembershipError, ServerError, UnavailableError
from ..hlc import HybridClock, wall_ms
from ..peer import PeerConnection, open_peer
from ..protocol import PROTOCOL_VERSION, Op
from .links import AuxLink
from .migration import Migrator
from .view import DOWN, FENCED, LEAVING, UP, ClusterView, Member

__all__ = ["Membership", "Coordinator", "Follower", "forget_refusal"]

log = logging.getLogger("dcache.master.membership")

#: A later reconciliation pass copies what is newer than the start of the one before, less this margin (ms).
_FENCE_PASS_MARGIN_MS = 5_000
#: A node down for longer than this comes back empty (``_back``): a delete's
#: tombstone lasts 60 s (``dcache.lru``), and its old copy of a key deleted
#: before that would be read again. Half of it leaves time for the migration
#: that copies the tombstones still there to it.
EMPTY_AFTER_DOWN_MS = 30_000
#: The whole hash circle, as DROP takes it.
_WHOLE_CIRCLE = [[0, 0]]


def forget_refusal(view: ClusterView, node_id: str, force: bool) -> str | None:
    """Why ``node_id`` may not be forgotten in ``view`` (``None``: it may).

    Only a down member is forgotten, and only while no migration runs: the
    one that started when it went down copies its ranges from their other
    replicas, and until it is done those copies are not all in place. Keys
    whose every copy was on down nodes (``--replicas 1``, or as many nodes
    down as copies) are gone for good once it is forgotten: that takes
    ``force``.
    """
    m = view.members.get(node_id)
    if m is None:
        known = ", ".join(sorted(view.members)) or "none"
        return f"unknown aux node {node_id!r} (members: {known})"
    if m.state == LEAVING:
        return f"aux node {node_id} is leaving: it is handing its data over, and leaves the ring when that is done"
    if m.state != DOWN:
        return f"aux node {node_id} is {m.state}: only a down node can be forgotten; remove a live one with SIGTERM (graceful leave)"
    if view.prev_ring is not None:
        return (
            f"a migration is running (epoch {view.epoch}): its copies from the remaining replicas may not be in place yet; "
            "try again once 'dcache ring' shows the ring stable"
        )
    lost = view.share_without_copy(node_id)
    if lost > 0 and not force:
        return (
            f"about {lost * 100:.1f}% of the keys had their only copies on down nodes including {node_id} "
            f"(replicas {view.replicas}): forgetting it loses them for good; they miss now and would come back "
            "only with the node; repeat with force (dcache forget --force) to accept that"
        )
    return None


async def _drop_everything(link: AuxLink) -> int:
    """DROP every key of the node behind ``link`` (page by page); return how many were dropped."""
    cursor, dropped = 0, 0
    while True:
        cursor, n = await link.call(Op.DROP, _WHOLE_CIRCLE, cursor)
        dropped += int(n)
        if not cursor:
            return dropped


def _nothing(view: ClusterView) -> None:
    """``on_written`` of a membership whose master keeps nothing per view."""


def _no_gathering(window: float) -> None:
    """``Coordinator.on_gathering`` of a coordinator whose master holds no request for its ring."""


def _same_move(a: ClusterView, b: ClusterView) -> bool:
    """Whether two views move the same data: the same previous ring and the same members in the current ring."""
    return a.prev_ring is not None and a.prev_ring is b.prev_ring and dict(a.ring.nodes) == dict(b.ring.nodes)


def _down_cannot_leave(node_id: str, what: str) -> str:
    return (
        f"aux node {node_id} {what}: a down node cannot hand its data over (its ranges are copied from their other "
        "replicas); remove it with FORGET (dcache forget) once the ring is stable"
    )


class Membership:
    """The interface every membership backend implements."""

    role = "none"

    def __init__(
        self,
        config: MasterConfig,
        view: ClusterView,
        on_view: Callable[[ClusterView], None],
        *,
        on_written: Callable[[ClusterView], None] | None = None,
    ) -> None:
        """``on_view(view)``: route by ``view`` now. ``on_written(view)``: ``view`` is where every master gets it.

        Written means the coordinator's own views (its followers poll them),
        views read from ZooKeeper, and the ZooKeeper leader's views once they
        are in ZooKeeper: a node such a view fences, marks down or removes is
        reconciled or refilled before it serves reads, so the master drops the
        hints it keeps for it then, and not before (a leader cut off from
        ZooKeeper drops the views it could not write). ``None``: nothing to do.
        """
        self.config = config
        self.view = view
        self._on_view = on_view
        self._on_written = on_written or _nothing
        self._tasks: set[asyncio.Task[Any]] = set()
        #: The read of the ring an aux node's STALE_RING asked for (``ring_behind``), while it runs.
        self._reread: asyncio.Task[None] | None = None

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def publish(self, view: ClusterView) -> bool:
        """Adopt ``view`` if it is newer than the current one; it is written (``on_written``)."""
        if not self._route(view):
            return False
        self._on_written(view)
        return True

    def _route(self, view: ClusterView) -> bool:
        """Route by ``view`` if it is newer than the current one (``on_view``); whether it was."""
        if not view.newer_than(self.view):
            return False
        old = self.view
        self.view = view
        if view.epoch != old.epoch:
            log.info(
                "ring epoch %d: members %s%s",
                view.epoch,
                ", ".join(f"{m.node_id}({m.state})" for m in view.members.values()),
                " (migrating)" if view.prev_ring is not None else "",
            )
        self._on_view(view)
        return True

    async def start(self) -> None:
        """Start background work."""

    async def close(self) -> None:
        """Stop background work."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def warn_replicas(self, replicas: int, source: str) -> None:
        """Say so when this master's ``--replicas`` differs from the running cluster's, which it keeps.

        Changing the count under a running cluster would copy nothing to the
        owners it adds (their stale copies of deleted keys would be read
        again) and drop nothing from the ones it removes: docs/OPERATIONS.md,
        "Changing --replicas", has the procedure.
        """
        if replicas != self.config.replicas:
            log.warning(
                "--replicas %d ignored: the cluster keeps %d copies per key (%s); "
                'changing it takes a new cluster and a restore (docs/OPERATIONS.md, "Changing --replicas")',
                self.config.replicas,
                replicas,
                source,
            )

    async def join(self, node_id: str, host: str, port: int, weight: float, known_epoch: int = 0) -> int:
        """Admit (or re-admit) an aux node; returns the resulting epoch.

        ``known_epoch`` is the epoch the node was last admitted at (0: never).
        """
        raise NotImplementedError

    async def leave(self, node_id: str) -> bool:
        """Remove an aux node after its data moved to the other owners.

        Raises:
            MembershipError: the node is down (it cannot hand its data over:
                FORGET it), or was marked down while it was leaving.
        """
        raise NotImplementedError

    async def forget(self, node_id: str, force: bool) -> int:
        """Remove a down aux node from the membership at once; returns the resulting epoch.

        Raises:
            MembershipError: ``forget_refusal`` says why not; nothing changed.
        """
        raise BadArgumentsError("this master does not coordinate the cluster")

    def sync(
        self, follower_id: str, epoch: int, seq: int, their_view: dict[str, Any] | None = None, reconcile: list[str] | None = None
    ) -> dict[str, Any] | None:
        """Answer a follower's poll: the view if it is newer than ``(epoch, seq)``.

        ``their_view`` is the follower's own view, sent when asked for it
        (``{"want_view": True}``, by a coordinator that restarted).
        ``reconcile`` names aux nodes the follower lost hints for (they need
        a full reconciliation, ``request_reconcile``).
        """
        raise BadArgumentsError("this master does not coordinate the cluster")

    async def fence_missed(self, node_id: str, since_ms: int, why: str) -> int:
        """``node_id`` missed a write acknowledged without it: fence it cluster-wide, then return the epoch.

        Returns once every master routes by a view where the node is fenced
        (no master reads it until it is reconciled with writes since
        ``since_ms``), or a bounded wait ran out and every reachable aux node
        then took the fenced view's epoch as its ring floor (a master still
        behind is refused, ``STALE_RING``). A master that does not
        coordinate asks the one that does (FENCE).

        Raises:
            UnavailableError: no fence can be made now (the coordinator is
                unreachable or cannot change membership), or it reached no
                other master and no ring floor may name it (a ZooKeeper
                leader whose view is not written there); the caller
                acknowledges the write anyway and keeps its hints.
        """
        raise NotImplementedError

    async def serve_fence(self, node_id: str, since_ms: int, why: str) -> int:
        """FENCE from another master: ``fence_missed`` (a follower forwards it to its coordinator)."""
        return await self.fence_missed(node_id, since_ms, why)

    def ring_behind(self) -> None:
        """An aux node refused a request as routed by a ring older than its floor: read the ring again now (one read at a time).

        The leader raised that floor while this master was paused or cut
        off; the ring watch (ZooKeeper) or the next poll (a follower) would
        bring the new ring too, a little later. A coordinator's ring is the
        cluster's own: it has nothing to read.
        """
        if self._reread is None or self._reread.done():
            log.warning(
                "an aux node refused a request this master routed by ring epoch %d, older than the one it requires: "
                "this master fell behind the ring (paused, or cut off); reading it again",
                self.view.epoch,
            )
            self._reread = self._spawn(self._read_ring_again(), "ring-behind")

    async def _read_ring_again(self) -> None:
        """Read and adopt the cluster's ring (``ring_behind``); errors are logged, not raised."""

    def request_reconcile(self, node_id: str) -> None:
        """An aux node missed writes this master could not keep hints for: have it reconciled in full.

        The base behaviour (a ZooKeeper master that is not the leader) can
        only say so; the coordinator fences the node, a follower asks the
        coordinator in its next SYNC.
        """
        log.warning("aux node %s missed writes whose hints were lost; it is reconciled when it is next fenced or marked down", node_id)

    def on_aux_restart(self, node_id: str) -> None:
        """An aux node came back as a new process: stop reading from it.

        Called by its link before the new connection carries a request. The
        base behaviour (a follower's) fences it in the local view until the
        coordinator's next view says otherwise.
        """
        view = self.view
        m = view.members.get(node_id)
        if m is None or m.state != UP:
            return
        members = dict(view.members)
        members[node_id] = Member(m.node_id, m.host, m.port, m.weight, FENCED, wall_ms())
        local = replace(view, members=members)  # same (epoch, seq): any newer view replaces it
        self.view = local
        self._on_view(local)
        # Its hints go: the coordinator, which sees the restart too (and is
        # asked to, in ZooKeeper mode), reconciles it in full.
        self._on_written(local)

    def status(self) -> dict[str, Any]:
        """What ``dcache ring`` shows about membership."""
        return {"role": self.role}


class Coordinator(Membership):
    """This master decides membership (embedded mode)."""

    role = "coordinator"

    def __init__(
        self,
        config: MasterConfig,
        view: ClusterView,
        on_view: Callable[[ClusterView], None],
        links: Callable[[], dict[str, AuxLink]],
        clock: HybridClock,
        open_link: Callable[[Member], AuxLink],
        *,
        on_written: Callable[[ClusterView], None] | None = None,
    ) -> None:
        """``open_link`` makes a link to a node outside the view (started by the caller, closed after use)."""
        super().__init__(config, view, on_view, on_written=on_written)
        self._links = links
        self._clock = clock
        self._open_link = open_link
        self._misses: dict[str, int] = {}
        #: Down nodes that answer again and wait for the running migration to end (``_back``).
        self._waiting_back: set[str] = set()
        #: Down nodes being emptied before they come back (``_empty``), and the
        #: ``since_ms`` of the down mark each one was emptied for.
        self._emptying: dict[str, asyncio.Task[None]] = {}
        self._emptied: dict[str, int] = {}
        #: Silent nodes fenced on their way down, until every master stopped reading them (``_mark_down``).
        self._marking_down: dict[str, asyncio.Task[None]] = {}
        self._incarnations: dict[str, int] = {}
        #: node id -> restarts its link reported (``on_aux_restart``): a health round that began before one ignores the node.
        self._restarts_seen: dict[str, int] = {}
        self._fences: dict[str, asyncio.Task[None]] = {}
        #: node id -> the version its reconciliation copies from (0: everything).
        self._fence_since: dict[str, int] = {}
        #: Fenced nodes that missed a write during the current reconciliation pass.
        self._fence_dirty: set[str] = set()
        self._followers: dict[str, tuple[int, int, float]] = {}
        self.migrator = Migrator(config, links, clock, self._followers_caught_up, floor_known=self._epoch_published)
        self._migration: asyncio.Task[None] | None = None
        #: The sources of the ring change's copy while it runs (empty once it settles): see ``fence``.
        self._copy_sources: frozenset[str] = frozenset()
        self._changed = asyncio.Condition()
        self._lock = asyncio.Lock()
        self.health_events: list[dict[str, Any]] = []
        # Restart recovery (see the module note).
        self._first = (view.epoch, view.seq)
        self._recovered = asyncio.Event()
        #: Set when ``--expect-aux`` nodes have re-announced: the recovery window may end early.
        self._gathered = asyncio.Event()
        self._recovery: asyncio.Task[None] | None = None
        self._recovery_joins: dict[str, Member] = {}
        #: How this coordinator's ring came back after a restart, for ``dcache ring``.
        self.recovery: dict[str, Any] | None = None
        #: Called with the window's length (s) as this coordinator starts gathering re-announcements: its
        #: ring comes by the window's end, and the data requests it holds may wait for it (``RequestGate.wait_until``).
        self.on_gathering: Callable[[float], None] = _no_gathering

    @property
    def _fresh(self) -> bool:
        """Whether the view is still the one this coordinator started with."""
        return (self.view.epoch, self.view.seq) == self._first

    def _before_me(self, epoch: int) -> bool:
        """Whether ``epoch`` is from an earlier coordinator, while this one has not changed the ring yet."""
        return 0 < epoch < self._first[0] and self._fresh and not self._recovered.is_set()

    async def start(self) -> None:
        self._spawn(self._health_loop(), "health")
        if self.view.prev_ring is not None:
            self._start_migration()

    # -- view changes -----------------------------------------------------------

    def _change(self, members: dict[str, Member], reason: str, *, migrate: bool = True) -> ClusterView:
        view = self.view.with_members(members, migrate=migrate)
        log.info("membership change (%s): epoch %d -> %d", reason, self.view.epoch, view.epoch)
        self.publish(view)
        if view.prev_ring is not None:
            self._start_migration()
        self._notify()  # waiters look again (a leaving node marked down ends its leave)
        return view

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        self._spawn(notify(), "notify")

    def _start_migration(self) -> None:
        """Start the current view's migration, in place of a running one.

        The one replaced is cancelled, but a cancelled task may run on: on
        Python 3.11, ``asyncio.wait_for`` returns its inner call's result when
        that call ends as the caller is cancelled. So a migration, and a
        reconciliation (``_reconcile``), changes the ring only while it is
        still the current one.
        """
        if self._migration is not None and not self._migration.done():
            self._migration.cancel()
        self._migration = self._spawn(self._migrate(self.view), "migration")

    async def _migrate(self, view: ClusterView) -> None:
        plan = self.migrator.plan(view)
        self._copy_sources = frozenset(src for src, _ in plan)
        try:
            await self.migrator.run(view, plan)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("migration to epoch %d failed; retrying in 1 s", view.epoch)
            await asyncio.sleep(1.0)
            # A view published meanwhile that keeps the move (a node fenced
            # or reconciled) started no migration of its own: retry under it.
            if _same_move(self.view, view) and self._migration is asyncio.current_task():
                self._start_migration()
            return
        if not _same_move(self.view, view) or self._migration is not asyncio.current_task():
            return  # superseded while it ran (_start_migration): the new view's migration, or the new copy, takes over
        self._copy_sources = frozenset()
        # Two steps, so that no master reads an owner that no longer gets
        # writes: first every master reads the new owners while writes still
        # go to both rings' owners; only once all of them route by that view
        # do writes stop going to the previous owners. A change that keeps
        # the move (a node fenced meanwhile) only restarts the wait.
        timeout = max(3.0, self.config.follow_interval * 6)
        while True:
            current = self.view
            settling = current if current.settling else current.migration_settling()
            if settling is not current:
                self.publish(settling)
            pos = (settling.epoch, settling.seq)
            lagging = await self._masters_at(pos, timeout)
            if lagging:
                log.warning("masters %s did not confirm view %d.%d within %.1f s; finishing the migration anyway", lagging, *pos, timeout)
            if not _same_move(self.view, view) or self._migration is not asyncio.current_task():
                return  # superseded meanwhile
            if self.view is settling:
                break
        members = dict(settling.members)
        for node_id, m in list(members.items()):
            if m.state == LEAVING:
                del members[node_id]  # its data has moved: it may go
                self._drop_state(node_id)
        done = settling.migration_done()
        if members != settling.members:
            done = done.bumped(members=members)
        self.publish(done)
        self._notify()
        self.migrator.schedule_drop(view, lambda: self.view)

    async def wait_settled(self, predicate: Callable[[ClusterView], bool], timeout: float) -> bool:
        """Wait until ``predicate(view)`` holds (bounded)."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.view))
        return True

    # -- membership ops -----------------------------------------------------------

    async def join(self, node_id: str, host: str, port: int, weight: float, known_epoch: int = 0) -> int:
        if self._before_me(known_epoch):
            # Admitted by an earlier coordinator: this one restarted. Gather it
            # with the others instead of building a ring of one node.
            self._recovery_joins[node_id] = Member(node_id, host, port, weight, UP, wall_ms())
            if self._recovery is None:
                self._recovery = self._spawn(self._recovery_window(), "recovery")
            if 0 < self.config.expect_aux <= len(self._recovery_joins):
                self._gathered.set()  # every node the operator expects is back: no need to wait out the window
            await self._recovered.wait()
        async with self._lock:
            members = dict(self.view.members)
            known = members.get(node_id)
            fenced = known is not None and known.state == FENCED
            if known is not None and (known.state == UP or fenced) and (known.host, known.port, known.weight) == (host, port, weight):
                return self.view.epoch  # a re-announcement: nothing changes (a fenced node stays fenced until reconciled)
            if known is not None and known.state == LEAVING:
                return self.view.epoch  # leaving nodes do not come back by announcing
            if known is not None and known.state == DOWN:
                # A down node comes back when this master's health checks reach
                # it again, not because it can reach this master: the path
                # from it may work while the one to it does not. One that moved
                # (a restart on another port) gets its new address checked, and
                # comes back the same way (_back: after a running migration,
                # and empty after a long outage).
                if (known.host, known.port, known.weight) != (host, port, weight):
                    members[node_id] = replace(known, host=host, port=port, weight=weight)
                    log.info("down aux node %s announces itself at %s:%d: health checks go there", node_id, host, port)
                    self.publish(self.view.bumped(members=members))
                return self.view.epoch
            if known is None and node_id in self.view.departed:
                await self._empty_departed(Member(node_id, host, port, weight))
            await self._after_settling()
            members = dict(self.view.members)
            members[node_id] = Member(node_id, host, port, weight, FENCED if fenced else UP, wall_ms())
            self._misses.pop(node_id, None)
            reason = "rejoin" if known is not None else "join"
            return self._change(members, f"{reason} of {node_id} at {host}:{port}").epoch

    async def leave(self, node_id: str) -> bool:
        async with self._lock:
            members = dict(self.view.members)
            m = members.get(node_id)
            if m is None:
                return True
            if m.state == DOWN:
                raise MembershipError(_down_cannot_leave(node_id, "is down"))
            if m.state != LEAVING:
                await self._after_settling()
                members = dict(self.view.members)
                m = members.get(node_id, m)
                members[node_id] = Member(m.node_id, m.host, m.port, m.weight, LEAVING, wall_ms())
                self._change(members, f"graceful leave of {node_id}")

        def over(v: ClusterView) -> bool:
            gone = v.members.get(node_id)
            return gone is None or gone.state == DOWN

        await self.wait_settled(over, timeout=self.config.shutdown_grace + 3600)
        if node_id in self.view.members:
            raise MembershipError(_down_cannot_leave(node_id, "was marked down while it was leaving"))
        # The node exits when this returns: first let every follower route by
        # a view without it, so none sends it a request after it has gone.
        pos, timeout = (self.view.epoch, self.view.seq), max(2.0, 4 * self.config.follow_interval)
        lagging = await self._masters_at(pos, timeout)
        if lagging:
            log.warning("masters %s did not confirm the view %d.%d within %.1f s; %s leaves anyway", lagging, *pos, timeout, node_id)
        return True

    async def forget(self, node_id: str, force: bool) -> int:
        async with self._lock:
            view = self.view
            why = forget_refusal(view, node_id, force)
            if why is not None:
                raise MembershipError(why)
            lost = view.share_without_copy(node_id)
            members = dict(view.members)
            del members[node_id]
            self._drop_state(node_id)
            what = f"forgotten{f' (forced: about {lost * 100:.1f}% of the keys lost)' if lost else ''}"
            self.health_events.append({"node_id": node_id, "state": "forgotten", "why": what, "at_ms": wall_ms()})
            del self.health_events[:-50]
            log.warning("aux node %s %s: it leaves the membership", node_id, what)
            # Down, it is in no ring: the ring keeps its layout and nothing moves.
            return self._change(members, f"{node_id} forgotten", migrate=False).epoch

    def _drop_state(self, node_id: str) -> None:
        """Forget what health checks and fences knew of a node that is no longer a member.

        A node that joins again later is a new process: its incarnation,
        compared with the old one, would fence it as restarted.
        """
        for state in (self._misses, self._incarnations, self._fence_since, self._restarts_seen):
            state.pop(node_id, None)
        self._waiting_back.discard(node_id)

    def mark(self, node_id: str, state: str, why: str) -> None:
        """Mark a member up or down and publish the resulting view."""
        members = dict(self.view.members)
        m = members.get(node_id)
        if m is None or m.state == state:
            return
        members[node_id] = Member(m.node_id, m.host, m.port, m.weight, state, wall_ms())
        event = {"node_id": node_id, "state": state, "why": why, "at_ms": wall_ms()}
        self.health_events.append(event)
        del self.health_events[:-50]
        log.warning("aux node %s marked %s: %s", node_id, state, why)
        self._change(members, f"{node_id} {state}: {why}")

    def _back(self, node_id: str) -> None:
        """A down node answers again: mark it up, unless a migration runs (then it waits for the end of it).

        A node that was down missed the writes made meanwhile, so it may only
        come back as a new owner that a migration fills (reads go to the
        previous owners until that is done). While a migration runs, its
        source ring stays authoritative, and that ring may hold the node (the
        move away from it, say): marked up then, the node would be read as
        an owner of data it never got. So it stays down until the migration
        is done; a later health round brings it back.
        """
        if self.view.prev_ring is not None:
            if node_id not in self._waiting_back:
                self._waiting_back.add(node_id)
                log.info("aux node %s answers pings again; it rejoins once the running migration is done", node_id)
            return
        since_ms = self.view.members[node_id].since_ms
        if wall_ms() - since_ms > EMPTY_AFTER_DOWN_MS and self._emptied.get(node_id) != since_ms:
            # Deletes made while it was down may have no tombstone left to
            # copy: it comes back empty, and the migration fills it.
            if node_id not in self._emptying:
                self._emptying[node_id] = self._spawn(self._empty(node_id, since_ms), f"empty-{node_id}")
            return
        self._waiting_back.discard(node_id)
        self.mark(node_id, UP, "answers pings again")

    async def _empty_departed(self, node: Member) -> None:
        """Empty a node that left the membership (LEAVE, FORGET) before it joins again; it is then filled like a new node.

        It still holds what it had when it left, and the cluster went on
        without it: a key overwritten and expired, evicted or flushed
        meanwhile has no copy left to correct it, and a delete's tombstone
        lasts 60 s; its old value would be read again. The link BINDs it
        first, so a node of another cluster is never emptied.

        Raises:
            UnavailableError: it could not be emptied (the node retries its JOIN).
        """
        link = self._open_link(node)
        link.start()
        try:
            dropped = await _drop_everything(link)
        except Exception as exc:
            raise UnavailableError(
                f"aux node {node.node_id} left the membership before: it is emptied before it joins again, "
                f"and that failed ({exc}); it will announce itself again"
            ) from None
        finally:
            await link.close()
        log.warning(
            "aux node %s left the membership before and joins again: dropped the %d keys it kept (they may be stale); "
            "it is filled from the current owners",
            node.node_id,
            dropped,
        )

    async def _empty(self, node_id: str, since_ms: int) -> None:
        """Empty a node that was down since ``since_ms`` (DROP of every key); the next health round lets it back."""
        try:
            link = self._links().get(node_id)
            if link is None:
                return
            dropped = await _drop_everything(link)
            self._emptied[node_id] = since_ms
            log.warning(
                "aux node %s was down for %.0f s, longer than deletes are remembered: dropped its %d keys; it rejoins empty",
                node_id,
                (wall_ms() - since_ms) / 1000,
                dropped,
            )
        except Exception as exc:
            log.warning("emptying aux node %s before it rejoins failed (%s); trying again", node_id, exc)
        finally:
            self._emptying.pop(node_id, None)

    def _mark_down(self, node_id: str, why: str) -> None:
        """Mark a silent node down, fenced first where it was read: down once every master stopped reading it.

        A down node gets no writes. Marked down at once, a follower that
        still routed by the view before read it while this master's writes
        skipped it: a value older than an acknowledged write. Fenced, it is
        still written and no longer read; down follows once every master
        routes by the fenced view (bounded as FENCE is).
        """
        if node_id in self._marking_down:
            return
        m = self.view.members.get(node_id)
        read = m is not None and m.state == UP  # fenced nodes are not read, leaving ones move their data away
        if read:
            self.fence(node_id, f"{why}: marking it down once no master reads it")
        self._marking_down[node_id] = self._spawn(self._down_when_unread(node_id, why, read), f"down-{node_id}")

    async def _down_when_unread(self, node_id: str, why: str, fenced: bool) -> None:
        try:
            if fenced:
                pos = (self.view.epoch, self.view.seq)
                timeout = max(1.0, 2 * self.config.follow_interval + 0.5)
                lagging = await self._masters_at(pos, timeout)
                if lagging:
                    log.warning(
                        "masters %s did not confirm the fence of %s within %.1f s; marking it down anyway", lagging, node_id, timeout
                    )
            await self._after_settling()
            if not await self._published(max(1.0, 2 * self.config.follow_interval + 0.5)):
                log.warning(
                    "aux node %s not marked down (%s): the other masters may not have this master's views (ZooKeeper out of "
                    "reach or slow); the health checks decide again",
                    node_id,
                    why,
                )
                return
            if self._misses.get(node_id, 0) >= self.config.health_failures:  # still silent
                self.mark(node_id, DOWN, why)
        finally:
            self._marking_down.pop(node_id, None)

    async def _published(self, timeout: float) -> bool:
        """Whether the other masters can get every view this coordinator published (waits up to ``timeout``).

        Embedded: at once, the followers poll them. A down mark waits for
        it: down, a node gets no writes and no hints, so a mark in a view
        that is later dropped loses the writes it skipped.
        """
        return True

    async def _after_settling(self) -> None:
        """Wait (bounded, as the settling itself is) until no migration settles before a change of the ring.

        While it settles, some masters read the current ring's owners and
        others, not there yet, the source ring's: a change now would stop
        writing one of the two (see ``ClusterView.with_members``).
        """
        timeout = max(3.0, self.config.follow_interval * 6) + 1.0
        try:
            await self.wait_settled(lambda v: not v.settling, timeout)
        except TimeoutError:
            log.warning("a migration still settles after %.1f s; changing the ring anyway", timeout)

    def on_aux_restart(self, node_id: str) -> None:
        # The health checks still know the old process: they learn the new one from their next round
        # (not one already under way, which may carry the old one's answer), and do not take it for
        # another restart (a second fence and pass, once this one is reconciled).
        self._incarnations.pop(node_id, None)
        self._restarts_seen[node_id] = self._restarts_seen.get(node_id, 0) + 1
        self.fence(node_id, "restarted: reconciling before it serves reads")

    def request_reconcile(self, node_id: str) -> None:
        self.fence(node_id, "missed writes whose hints were lost: reconciling before it serves reads")

    def ring_behind(self) -> None:
        """An aux node refused this coordinator's request as routed by an older ring: its floor is ahead of this ring's epoch.

        Only this coordinator raises floors, to its own epochs, so it
        restarted with its clock stepped back (a rebuilt ring starts from
        the wall clock): its epoch moves past the highest floor the nodes
        answered (EPOCH), or every request would be refused for good.
        """
        floor = max((link.floor for link in self._links().values()), default=0)
        view = self.view
        if floor <= view.epoch:
            return  # a refusal from before the view this coordinator routes by now
        epoch = floor + 1
        log.error(
            "aux nodes refuse ring epoch %d: their floor is %d, set by a ring this coordinator made before it restarted "
            "(its clock went back since?); moving to epoch %d",
            view.epoch,
            floor,
            epoch,
        )
        self.publish(replace(view, epoch=epoch, seq=0, ring=view.ring.with_epoch(epoch)))

    async def fence_missed(self, node_id: str, since_ms: int, why: str) -> int:
        self.fence(node_id, f"{why}: reconciling before it serves reads", since_version=max(0, since_ms) << 22)
        pos = (self.view.epoch, self.view.seq)
        timeout = max(1.0, 2 * self.config.follow_interval + 0.5)
        lagging = await self._masters_at(pos, timeout)
        if lagging:
            # They would still read the node by the ring before the fence once they resume (paused, cut off): the
            # write is acknowledged only once the aux nodes refuse that ring (its reconciliation raises the floor
            # too, but only after waiting longer for them: Migrator.run).
            log.warning("masters %s did not confirm the fence of %s within %.1f s; raising the ring floor", lagging, node_id, timeout)
            if not await self.migrator.raise_floor(pos[0]):
                # The fence is this master's alone (ZooKeeper out of reach): no floor may name it, and the others
                # read every owner while out of touch. The write is acknowledged with its hints (the caller logs it).
                raise UnavailableError(f"the fence of aux node {node_id} did not reach the other masters, and no ring floor can")
        return self.view.epoch

    def _epoch_published(self, epoch: int) -> bool:
        """Whether every master can learn a ring of ``epoch`` (a ring floor may name it): the coordinator's views are the cluster's."""
        return True

    def fence(self, node_id: str, why: str, since_version: int = 0) -> None:
        """Stop reading from a node until its co-owners' data has been copied to it.

        ``since_version`` > 0: the node is known to hold everything older
        (it only missed writes for a while), so only newer entries are copied.
        """
        members = dict(self.view.members)
        m = members.get(node_id)
        if m is not None and m.state == FENCED:
            # It missed another write while fenced: its reconciliation must
            # cover it (a pass that started after this miss, see _reconcile).
            self._fence_dirty.add(node_id)
            since = self._fence_since.get(node_id, 0)
            if since_version < since:  # it missed earlier writes than its reconciliation copies: start again
                self._fence_since[node_id] = since_version
                old = self._fences.get(node_id)
                if old is not None:
                    old.cancel()
                self._fences[node_id] = self._spawn(self._reconcile(node_id), f"fence-{node_id}")
                self._copy_again_without(node_id, since_version)
            return
        if m is None or m.state != UP:
            return
        self._fence_since[node_id] = since_version
        members[node_id] = Member(m.node_id, m.host, m.port, m.weight, FENCED, wall_ms())
        log.warning("aux node %s fenced: %s", node_id, why)
        self.health_events.append({"node_id": node_id, "state": FENCED, "why": why, "at_ms": wall_ms()})
        del self.health_events[:-50]
        view = self.view.with_members(members, migrate=False)
        if self.view.prev_ring is not None:  # keep a running migration's source ring, and its step
            # Settling, reads go to the new owners: back to copying they would go to the source ring's, which lack
            # the writes made since if the migration had ended (a view handed over by a follower one poll behind).
            # With one copy the fenced node has no co-owner to read instead: reads go back to the source ring.
            view = view.bumped(prev_ring=self.view.prev_ring, settling=self.view.settling and self.view.replicas > 1)
        self.publish(view)
        old = self._fences.get(node_id)
        if old is not None:
            old.cancel()
        self._fences[node_id] = self._spawn(self._reconcile(node_id), f"fence-{node_id}")
        self._copy_again_without(node_id, since_version)

    def _copy_again_without(self, node_id: str, since_version: int) -> None:
        """Start the running copy again if ``node_id``, one of its sources, may have lost what it held.

        A node fenced with ``since_version`` 0 restarted (or its missed
        writes are unknown): what it streamed since may lack keys it held
        before. The copy starts again under the current view, whose plan
        takes its ranges from owners that are not fenced (``Migrator.plan``).
        A node fenced for a few missed writes still holds everything older,
        and each write reached the new owners too: its streams go on.
        """
        if since_version or node_id not in self._copy_sources or self._migration is None or self._migration.done():
            return
        log.warning("aux node %s, a source of the running migration, restarted: copying again from other owners", node_id)
        self._start_migration()

    async def _reconcile(self, node_id: str) -> None:
        """Copy to a fenced node what its co-owners hold since it was fenced; then let it serve reads.

        Passes repeat while misses are reported during one (each later pass
        copies what is newer than the start of the one before, less a
        margin), so every write acknowledged without the node reaches it
        before it is read again.
        """
        while True:
            if self._fences.get(node_id) is not asyncio.current_task():
                return  # replaced by a reconciliation that covers a later miss (fence), its cancellation lost (_start_migration)
            view = self.view
            self._fence_dirty.discard(node_id)
            started = self._clock.next()
            try:
                since = self._fence_since.get(node_id, 0)
                await self.migrator.run(view, self.migrator.plan_fence(view, node_id), since_version=since)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciling %s failed; retrying in 1 s", node_id)
                self._fence_dirty.add(node_id)
                await asyncio.sleep(1.0)
                continue
            if self._fences.get(node_id) is not asyncio.current_task():
                return  # replaced meanwhile (as above)
            if node_id not in self._fence_dirty:
                break
            margin = (_FENCE_PASS_MARGIN_MS + self._clock.max_skew_ms) << 22
            self._fence_since[node_id] = max(self._fence_since.get(node_id, 0), started - margin)
        members = dict(self.view.members)
        m = members.get(node_id)
        if m is not None and m.state == FENCED:
            members[node_id] = Member(m.node_id, m.host, m.port, m.weight, UP, wall_ms())
            log.info("aux node %s reconciled: serving reads again", node_id)
            self.publish(self.view.bumped(members=members))
            self._notify()

    # -- health ------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        """A health round every ``health_interval`` seconds, each ping bounded by ``health_timeout``.

        Rounds do not wait for each other, so a stopped node is seen missing
        one ping per interval: with the defaults (0.4 s, 0.5 s timeout, 3
        misses) it is marked down at most 1.7 s after it stopped answering.
        """
        interval = self.config.health_interval
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            next_round += interval
            await asyncio.sleep(max(0.0, next_round - loop.time()))
            if loop.time() - next_round > interval:
                next_round = loop.time()  # the loop itself was late: do not fire the missed rounds at once
            self._spawn(self._health_round(), "health-round")

    async def _health_round(self) -> None:
        try:
            await self._health_check()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("health round failed")

    async def _health_check(self) -> None:
        cfg = self.config
        view = self.view
        links = self._links()
        nodes = [m for m in view.members.values() if m.node_id in links]
        restarts = [self._restarts_seen.get(m.node_id, 0) for m in nodes]
        hello = (PROTOCOL_VERSION, cfg.auth_token, "dcache-health")
        results = await asyncio.gather(
            *(asyncio.wait_for(links[m.node_id].call(Op.HELLO, *hello), cfg.health_timeout) for m in nodes),
            return_exceptions=True,
        )
        for m, r, seen in zip(nodes, results, restarts, strict=True):
            current = self.view.members.get(m.node_id)
            if current is None:
                continue  # gone meanwhile
            if self._restarts_seen.get(m.node_id, 0) != seen:
                continue  # restarted meanwhile (its link said so): the answer may be the old process's
            ok = not isinstance(r, BaseException)
            if ok:
                self._misses[m.node_id] = 0
                incarnation = r.get("incarnation") if isinstance(r, dict) else None
                known = self._incarnations.get(m.node_id)
                self._incarnations[m.node_id] = incarnation  # type: ignore[assignment]
                if current.state == DOWN:
                    self._back(m.node_id)
                elif current.state == UP and known is not None and incarnation != known:
                    self.fence(m.node_id, "restarted: reconciling before it serves reads")
                continue
            misses = self._misses.get(m.node_id, 0) + 1
            self._misses[m.node_id] = misses
            if current.state != DOWN and misses >= cfg.health_failures:
                assert isinstance(r, BaseException)
                why = r.__class__.__name__ if isinstance(r, TimeoutError) else f"{r.__class__.__name__}: {r}"
                self._mark_down(m.node_id, f"{misses} health checks failed in a row ({why})")

    # -- restart recovery ----------------------------------------------------------

    async def _recovery_window(self) -> None:
        window = self.config.recovery_window
        expected = self.config.expect_aux
        self.on_gathering(window)
        # With --expect-aux the restart is planned (dcache cluster): the normal case is quiet.
        log.log(
            logging.INFO if expected else logging.WARNING,
            "aux nodes announce ring epochs from before this coordinator started: it restarted; "
            "gathering their re-announcements for up to %.1f s%s (or a follower's ring) before changing the ring",
            window,
            f", until {expected} did" if expected else "",
        )
        waits = [asyncio.ensure_future(self._recovered.wait()), asyncio.ensure_future(self._gathered.wait())]
        try:
            await asyncio.wait(waits, timeout=window, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        gathered = self._gathered.is_set()
        if expected and not gathered and not self._recovered.is_set():
            log.warning(
                "only %d of the %d aux nodes expected (--expect-aux) re-announced within %.1f s: rebuilding the ring with them",
                len(self._recovery_joins),
                expected,
                window,
            )
        async with self._lock:
            if self._fresh and self._recovery_joins:
                members = dict(self.view.members)
                members.update(self._recovery_joins)
                # No migration: each node still holds the data of its ranges.
                view = self.view.with_members(members, migrate=False)
                if view.replicas > 1:
                    # Every master reads every owner of a key from the first read routed by this ring
                    # to the pass's end (``ClusterView.reconciling``, ``Router.read_every_owner``).
                    view = replace(view, reconciling=True)
                self.recovery = {"from": "re-announcements", "epoch": view.epoch, "members": sorted(self._recovery_joins)}
                log.log(
                    logging.INFO if gathered else logging.WARNING,
                    "ring rebuilt from the re-announcements of %s at epoch %d (no follower handed over the last ring)",
                    ", ".join(sorted(self._recovery_joins)),
                    view.epoch,
                )
                self.publish(view)
                self._notify()
                self._spawn(self._reconcile_rebuilt(), "recovery-reconcile")
            self._recovery_joins.clear()
            self._recovered.set()

    async def _reconcile_rebuilt(self) -> None:
        """Reconcile the owners of the rebuilt ring (``Migrator.recover``), then drop what each holds outside its arcs.

        The re-announcements carry no migration record: one that was copying
        when the old coordinator died left keys on their previous owners
        only, and every migration's previous owners keep their copies until
        they are dropped. Nor member states: a node that was down or fenced
        missed writes the old coordinator's hints held. Copied to the owners
        (last writer wins), those keys read again and read their newest
        value; dropped, no later ring change that gives the arcs back brings
        a stale copy with them. A ring change meanwhile starts it again on
        the new ring; only a pass that ended on the current ring drops.
        """
        assert self.recovery is not None
        self.recovery["reconciled"] = False
        while True:
            view = self.view
            try:
                foreign = await self.migrator.recover(view)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciling the rebuilt ring failed; retrying in 1 s")
                await asyncio.sleep(1.0)
                continue
            if dict(self.view.ring.nodes) == dict(view.ring.nodes):
                break
            log.info("the ring changed while the rebuilt ring was reconciled: reconciling again")
        self.recovery["reconciled"] = True
        if self.view.reconciling:
            self.publish(self.view.bumped(reconciling=False))  # every master reads one owner again
        await self.migrator.drop(foreign, lambda: dict(self.view.ring.nodes) == dict(view.ring.nodes))

    def _take_over(self, follower_id: str, theirs: ClusterView) -> None:
        """Take over a follower's view (this coordinator restarted and has none).

        A migration in flight is taken over in the step it was in: a settling
        one stays settling. The follower may be one poll behind the
        coordinator that finished it, whose last writes went to the new
        owners only; taken back to copying, reads would go to the source
        ring's owners again and miss those writes until the copy was redone.
        """
        epoch = max(self.view.epoch, theirs.epoch) + 1
        ring = theirs.ring.with_epoch(epoch)
        # The cluster's number of copies, not this process's flag: every key
        # is stored on that many owners, and reads fall back over that many.
        self.warn_replicas(theirs.replicas, f"the ring follower {follower_id} handed over")
        # Everything else as they handed it: a settling migration stays settling, the nodes that left stay listed.
        view = replace(theirs, epoch=epoch, seq=0, members=dict(theirs.members), ring=ring, coordinator=self.view.coordinator)
        self.recovery = {"from": f"follower {follower_id}", "epoch": view.epoch, "adopted_epoch": theirs.epoch}
        log.warning(
            "restarted coordinator: adopted the ring of epoch %d from follower %s as epoch %d (members %s)",
            theirs.epoch,
            follower_id,
            epoch,
            ", ".join(f"{m.node_id}({m.state})" for m in view.members.values()),
        )
        self._recovery_joins.clear()
        self._recovered.set()
        self.publish(view)
        if view.prev_ring is not None:
            log.info("resuming the migration to epoch %d%s", view.epoch, " (settling)" if view.settling else "")
            self._start_migration()
        else:
            self._notify()
        for node_id, m in view.members.items():
            if m.state == FENCED:
                self._fences[node_id] = self._spawn(self._reconcile(node_id), f"fence-{node_id}")
        if view.reconciling:
            # The coordinator before this one died during its pass over a rebuilt ring: run it again, or
            # every master would read every owner for good (the flag ends with a pass).
            log.info("the ring handed over was being reconciled: reconciling it again")
            self._spawn(self._reconcile_rebuilt(), "recovery-reconcile")

    # -- followers ------------------------------------------------------------------

    def sync(
        self, follower_id: str, epoch: int, seq: int, their_view: dict[str, Any] | None = None, reconcile: list[str] | None = None
    ) -> dict[str, Any] | None:
        self._followers[follower_id] = (epoch, seq, time.monotonic())
        for node_id in reconcile or ():
            self.fence(node_id, f"follower {follower_id} lost hints of writes it missed: reconciling before it serves reads")
        if self._before_me(epoch):
            if their_view is None:
                return {"want_view": True}
            try:
                theirs = ClusterView.from_dict(their_view, self.view)
            except (KeyError, TypeError, ValueError) as exc:
                raise BadArgumentsError(f"SYNC's view is malformed: {exc}") from None
            if (theirs.epoch, theirs.seq) != (epoch, seq):
                raise BadArgumentsError("SYNC's view does not have the epoch and seq the follower sent")
            self._take_over(follower_id, theirs)
        view = self.view
        if (view.epoch, view.seq) > (epoch, seq):
            return view.to_dict()
        return None

    async def _masters_at(self, pos: tuple[int, int], timeout: float) -> list[str]:
        """Wait (bounded) until every other master routes by the view ``pos`` (epoch, seq) or a later one.

        Embedded mode: the followers seen polling in the last 5 s. Returns
        the masters still behind when ``timeout`` ran out.
        """
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            lagging = [f for f, (e, q, seen) in self._followers.items() if (e, q) < pos and now - seen < 5.0]
            if not lagging or now >= deadline:
                return lagging
            await asyncio.sleep(0.05)

    async def _followers_caught_up(self, epoch: int, timeout: float) -> None:
        """Wait (bounded) until every recently seen follower routes by ``epoch``."""
        lagging = await self._masters_at((epoch, 0), timeout)
        if lagging:
            log.warning("masters %s did not confirm epoch %d within %.1f s; migrating anyway", lagging, epoch, timeout)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "role": self.role,
            "followers": {f: {"epoch": e, "seq": s, "seen_s_ago": round(now - t, 2)} for f, (e, s, t) in self._followers.items()},
            "migration": self.migrator.progress(),
            "health_events": self.health_events[-10:],
            "recovery": self.recovery,
        }


class Follower(Membership):
    """Another master decides; this one follows its views."""

    role = "follower"

    def __init__(
        self,
        config: MasterConfig,
        view: ClusterView,
        on_view: Callable[[ClusterView], None],
        node_id: Callable[[], str],
        *,
        ssl: SSLContext | None = None,
        on_written: Callable[[ClusterView], None] | None = None,
    ) -> None:
        """``ssl``: the master's peer context, for TLS to the coordinator (``None``: plain TCP)."""
        super().__init__(config, view, on_view, on_written=on_written)
        assert config.coordinator is not None
        self._ssl = ssl
        self._host, self._port = parse_address(config.coordinator)
        self._node_id = node_id
        self._conn: PeerConnection | None = None
        #: Aux nodes this master lost hints for, to name in the next SYNC.
        self._reconcile: set[str] = set()
        self.last_sync_ms = 0
        self.coordinator_error: str | None = "not contacted yet"
        #: The coordinator's cluster id (its HELLO's ``cluster_id``; ``None``: not contacted yet).
        self.cluster_id: str | None = None
        self._secret = config.secret()

    async def start(self) -> None:
        """Sync with the coordinator once (bounded), then follow it in the background.

        Raises:
            ConfigError: the coordinator has this master's node id, or is an aux node.
        """
        try:
            await asyncio.wait_for(self.sync_once(), 3.0)
        except ConfigError:
            raise
        except ServerError as exc:
            log.error("the coordinator refused this master at start (%s); will keep trying", exc.message)
            self.coordinator_error = str(exc)
        except Exception as exc:
            log.warning("coordinator not reachable at start (%s); will keep trying", exc)
            self.coordinator_error = str(exc)
        self._spawn(self._follow_loop(), "follow")

    async def _connection(self) -> PeerConnection:
        if self._conn is None or self._conn.is_closing:
            self._conn = await open_peer(
                self._host,
                self._port,
                name=f"coordinator {self._host}:{self._port}",
                auth_token=self.config.auth_token,
                client_name="dcache-follower",
                timeout=2.0,
                secret=self._secret,
                ssl=self._ssl,
            )
            info = self._conn.server_info
            if info.get("role") != "master":
                self._conn.close()
                raise ConfigError(
                    f"coordinator: {self._host}:{self._port} is an aux node ({info.get('node_id')}), not a master; "
                    "give --coordinator the coordinating master's address (7000 by default)"
                )
            cluster_id = info.get("cluster_id")
            if isinstance(cluster_id, str) and cluster_id:
                self.cluster_id = cluster_id
            if info.get("node_id") == self._node_id():
                self._conn.close()
                raise ConfigError(
                    f"node_id: the coordinator at {self._host}:{self._port} has this master's node id {self._node_id()!r}; "
                    "every master needs its own --node-id (one id would stamp two masters' writes with one version)"
                )
        return self._conn

    async def _call(self, op: int, *args: Any, timeout: float = 5.0) -> Any:
        try:
            conn = await self._connection()
            return await conn.call(op, *args, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise UnavailableError(f"coordinator {self._host}:{self._port} is unreachable: {str(exc) or 'timed out'}") from None

    def request_reconcile(self, node_id: str) -> None:
        self._reconcile.add(node_id)

    def on_aux_restart(self, node_id: str) -> None:
        """Fence the node in the local view (as the base does) and name it in the next SYNC, for the coordinator to reconcile.

        The coordinator may have seen the restart first, reconciled the node
        and let it back already: then no newer view would come to lift this
        master's own fence, and it would read the node's keys elsewhere for
        good (the fault campaign's ``aux-kill-fast``: the follower's link saw
        the new process 0.6 s after the coordinator's, which had let it back
        by then). Asked, the coordinator fences it again (a new view) and
        reconciles what it missed; in the common case, the restart still
        fenced there, the request adds a pass.
        """
        m = self.view.members.get(node_id)
        super().on_aux_restart(node_id)
        if m is not None and m.state == UP:
            self._reconcile.add(node_id)

    async def fence_missed(self, node_id: str, since_ms: int, why: str) -> int:
        timeout = max(1.0, 2 * self.config.follow_interval + 1.5)
        epoch = int(await self._call(Op.FENCE, node_id, since_ms, why, timeout=timeout))
        await self.sync_once()  # route by the fenced view before answering the write
        return epoch

    async def _read_ring_again(self) -> None:
        try:
            await self.sync_once()
        except Exception as exc:
            log.info("reading the ring again after a request refused as routed by an older one failed: %s", exc)

    async def sync_once(self) -> None:
        """Poll the coordinator once and adopt a newer view."""
        view = self.view
        timeout = max(2.0, self.config.follow_interval * 4)
        reconcile = sorted(self._reconcile)
        answer = await self._call(Op.SYNC, self._node_id(), view.epoch, view.seq, None, reconcile, timeout=timeout)
        self._reconcile.difference_update(reconcile)
        if isinstance(answer, dict) and answer.get("want_view"):
            log.warning("the coordinator restarted without a ring: handing it ours (epoch %d)", view.epoch)
            answer = await self._call(Op.SYNC, self._node_id(), view.epoch, view.seq, view.to_dict(), timeout=timeout)
        self.last_sync_ms = wall_ms()
        self.coordinator_error = None
        if answer is not None and not answer.get("want_view"):
            self.publish(ClusterView.from_dict(answer, self.view))

    async def _follow_loop(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.coordinator_error is None:
                    log.warning("lost the coordinator (%s); routing by the last ring (epoch %d)", exc, self.view.epoch)
                self.coordinator_error = str(exc)
            await asyncio.sleep(self.config.follow_interval)

    async def join(self, node_id: str, host: str, port: int, weight: float, known_epoch: int = 0) -> int:
        epoch = await self._call(Op.JOIN, node_id, host, port, weight, known_epoch, timeout=self.config.recovery_window + 5.0)
        return int(epoch)

    async def leave(self, node_id: str) -> bool:
        return bool(await self._call(Op.LEAVE, node_id, timeout=self.config.shutdown_grace + 3600))

    async def forget(self, node_id: str, force: bool) -> int:
        epoch = int(await self._call(Op.FORGET, node_id, force))
        await self.sync_once()  # answer once this master routes by the view without it
        return epoch

    async def close(self) -> None:
        await super().close()
        if self._conn is not None:
            self._conn.close()

    def status(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "coordinator": f"{self._host}:{self._port}",
            "coordinator_reachable": self.coordinator_error is None,
            "coordinator_error": self.coordinator_error,
            "last_sync_ms": self.last_sync_ms,
        }
