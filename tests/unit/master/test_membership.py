"""Embedded membership (``dcache.master.membership``): the coordinator's changes, health checks, SYNC and restart recovery; the follower.

The coordinator runs over ``fakecluster``: real aux handlers behind fake
links, so joins, leaves, fences and the migrations they start move real
data in memory. The follower talks to a coordinator over loopback (it
opens its connection with ``open_peer``), served by a small ``Service``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dcache.auxnode.node import AuxNode
from dcache.config import AuxConfig, MasterConfig
from dcache.errors import BadArgumentsError, MembershipError, Status, UnavailableError
from dcache.hlc import HybridClock, wall_ms
from dcache.master.membership import EMPTY_AFTER_DOWN_MS, Coordinator, Follower
from dcache.master.view import DOWN, FENCED, LEAVING, UP, ClusterView, Member
from dcache.protocol import Op
from dcache.server import Service, deferred
from tests.fakes import Reply

from .fakecluster import FakeCluster, Sink, until

SETTLE_S = 10.0


def config(**kw: Any) -> MasterConfig:
    settings: dict[str, Any] = {
        "port": 0,
        "replicas": 2,
        "health_interval": 0.02,
        "health_timeout": 0.1,
        "health_failures": 2,
        "follow_interval": 0.05,
        "recovery_window": 0.05,
        "aux_timeout": 0.2,
        "migration_batch": 50,
    }
    settings.update(kw)
    return MasterConfig(**settings)


def coordinator(cluster: FakeCluster, view: ClusterView | None = None, **kw: Any) -> Coordinator:
    return Coordinator(
        config(replicas=cluster.view.replicas, **kw),
        view or cluster.view,
        cluster.adopt,
        lambda: cluster.links,
        cluster.clock,
        cluster.new_link,
    )


def fill(cluster: FakeCluster, n: int = 200, clock: HybridClock | None = None) -> dict[bytes, int]:
    """Write ``n`` keys to their owners in the current view (versions from ``clock``, the cluster's by default); key -> version."""
    data = {}
    for i in range(n):
        key = b"key:%d" % i
        version = (clock or cluster.clock).next()
        for node in cluster.router.view.write_targets(key):
            cluster.put(node, key, b"v:" + key, version)
        data[key] = version
    return data


def assert_owners_hold(cluster: FakeCluster, view: ClusterView, data: dict[bytes, int]) -> None:
    for key, version in data.items():
        for node in view.write_targets(key):
            assert cluster.entry(node, key) == [b"v:" + key, 0, version], f"{node} lacks {key!r}"


@pytest.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    async with FakeCluster(spare=("a4",)) as c:
        yield c


# -- joins, leaves, marks, fences ------------------------------------------------------


async def test_a_join_migrates_the_new_nodes_ranges_to_it(cluster: FakeCluster) -> None:
    data = fill(cluster)
    coord = coordinator(cluster)
    try:
        first = coord.view.epoch
        assert await coord.join("a4", "127.0.0.1", 7110, 1.0) == first + 1
        joined = coord.view
        assert joined.members["a4"].state == UP and joined.prev_ring is not None
        assert cluster.views[0] is joined, "the view is published (on_view) before the join answers"
        await coord.wait_settled(lambda v: v.prev_ring is None, SETTLE_S)
        # two steps: settling (read the new owners, write both), then done
        assert [(v.seq, v.settling, v.prev_ring is not None) for v in cluster.views if v.epoch == joined.epoch][-2:] == [
            (joined.seq + 1, True, True),
            (joined.seq + 2, False, False),
        ]
        assert coord.view.epoch == joined.epoch and coord.view.seq == joined.seq + 2
        assert any("a4" in coord.view.write_targets(k) for k in data)
        assert_owners_hold(cluster, coord.view, data)
        progress = coord.status()["migration"]
        assert progress["migrations_total"] == 1 and progress["keys_moved"] > 0 and progress["state"] == "idle"
    finally:
        await coord.close()


async def test_a_leave_while_a_migration_settles_waits_for_its_end(cluster: FakeCluster) -> None:
    """No ring change while a migration settles: some masters read its new owners, others its old ones.

    A leave right after a join's copy went ahead at once: the new view
    wrote neither the owners a master still on the copying view read nor
    (before that) the ones a master on the settling view read, and deletes
    were read back (the fault campaign, bin/chaos.py:
    ``aux-join,a4,0,0;aux-leave,a2,1.14,0``).
    """
    data = fill(cluster)
    coord = coordinator(cluster)
    try:
        v = coord.view
        coord.sync("m2", v.epoch, v.seq)  # a follower that stays behind: the settling lasts its bound
        await coord.join("a4", "127.0.0.1", 7110, 1.0)
        await until(lambda: coord.view.settling, SETTLE_S, "the join's migration to settle")
        assert await asyncio.wait_for(coord.leave("a3"), 4 * SETTLE_S) is True
        first = next(i for i, v in enumerate(cluster.views) if "a3" in v.members and v.members["a3"].state == LEAVING)
        before = cluster.views[first - 1]
        assert not before.settling and before.prev_ring is None, "the leave changed the ring while the join's migration settled"
        assert_owners_hold(cluster, coord.view, data)
    finally:
        await coord.close()


async def test_announcements_that_change_nothing_publish_nothing(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        epoch = coord.view.epoch
        a1 = cluster.view.members["a1"]
        assert await coord.join("a1", a1.host, a1.port, a1.weight) == epoch  # a re-announcement
        assert cluster.views == []
        assert await coord.join("a1", "127.0.0.9", 7999, 1.0) == epoch + 1  # it moved: a rejoin
        assert coord.view.members["a1"].addr == "127.0.0.9:7999"
    finally:
        await coord.close()


async def test_a_leave_moves_the_nodes_data_away_before_it_is_removed(cluster: FakeCluster) -> None:
    data = fill(cluster)
    coord = coordinator(cluster)
    try:
        assert await asyncio.wait_for(coord.leave("a3"), SETTLE_S) is True
        assert "a3" not in coord.view.members and coord.view.prev_ring is None
        states = [v.members["a3"].state for v in cluster.views if "a3" in v.members]
        assert states and set(states) == {LEAVING}  # leaving (then settling), then gone
        assert_owners_hold(cluster, coord.view, data)
        assert await coord.leave("a3") is True  # gone already
        a3 = cluster.view.members["a3"]
        epoch = coord.view.epoch
        assert await coord.join("a3", a3.host, a3.port, a3.weight) == epoch + 1  # it may come back as a new member
    finally:
        await coord.close()


async def test_a_node_that_left_is_emptied_before_it_joins_again_then_filled(cluster: FakeCluster) -> None:
    """It kept its data when it left; a key overwritten and expired meanwhile (no copy, no tombstone) would be read again."""
    data = fill(cluster)
    coord = coordinator(cluster)
    try:
        assert await asyncio.wait_for(coord.leave("a3"), SETTLE_S) is True
        assert coord.view.departed == ("a3",)
        stale = b"stale"
        cluster.put("a3", stale, b"kept when it left")  # gone from the cluster since
        a3 = cluster.view.members["a3"]
        await coord.join("a3", a3.host, a3.port, a3.weight)
        assert coord.view.members["a3"].state == UP and not coord.view.departed
        assert cluster.entry("a3", stale) is None, "a3 rejoined with a key it kept when it left"
        await coord.wait_settled(lambda v: v.prev_ring is None, SETTLE_S)
        assert_owners_hold(cluster, coord.view, data)  # and filled again from the owners
    finally:
        await coord.close()


async def test_a_node_that_left_and_cannot_be_emptied_is_not_admitted(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        assert await asyncio.wait_for(coord.leave("a3"), SETTLE_S) is True
        epoch = coord.view.epoch
        cluster.fake.refused.add("a3")  # its JOIN reaches the master, the master does not reach it
        a3 = cluster.view.members["a3"]
        with pytest.raises(UnavailableError, match="left the membership before: it is emptied before it joins again"):
            await coord.join("a3", a3.host, a3.port, a3.weight)
        assert "a3" not in coord.view.members and coord.view.epoch == epoch and coord.view.departed == ("a3",)
    finally:
        await coord.close()


async def test_a_leaving_node_does_not_come_back_by_announcing(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        cluster.held.add("a3")  # its data cannot move yet: it stays leaving
        cluster.held.add("a1")
        cluster.held.add("a2")
        leave = asyncio.ensure_future(coord.leave("a3"))
        await until(lambda: coord.view.members["a3"].state == LEAVING)
        epoch = coord.view.epoch
        a3 = coord.view.members["a3"]
        assert await coord.join("a3", a3.host, a3.port, a3.weight) == epoch
        assert coord.view.members["a3"].state == LEAVING
        leave.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leave
    finally:
        await coord.close()


async def test_mark_publishes_a_view_and_records_the_event(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        epoch = coord.view.epoch
        coord.mark("a2", DOWN, "unit test")
        assert coord.view.members["a2"].state == DOWN and coord.view.epoch == epoch + 1
        assert "a2" not in coord.view.ring
        assert coord.health_events[-1]["node_id"] == "a2" and coord.health_events[-1]["why"] == "unit test"
        coord.mark("a2", DOWN, "again")  # no change: nothing published
        coord.mark("nobody", DOWN, "unknown")
        assert coord.view.epoch == epoch + 1 and len(coord.health_events) == 1
        await coord.wait_settled(lambda v: v.prev_ring is None, SETTLE_S)
        coord.mark("a2", UP, "back")
        assert coord.view.members["a2"].state == UP and "a2" in coord.view.ring
    finally:
        await coord.close()


async def test_a_down_node_is_forgotten_at_once_and_nothing_moves(cluster: FakeCluster) -> None:
    data = fill(cluster)
    coord = coordinator(cluster)
    try:
        coord.mark("a2", DOWN, "unit test")
        await coord.wait_settled(lambda v: v.prev_ring is None, SETTLE_S)  # a2's ranges copied from their replicas
        ring, epoch = coord.view.ring, coord.view.epoch
        assert await coord.forget("a2", False) == epoch + 1
        view = coord.view
        assert "a2" not in view.members and view.ring.nodes == ring.nodes and view.prev_ring is None
        assert coord.health_events[-1]["node_id"] == "a2" and coord.health_events[-1]["state"] == "forgotten"
        assert_owners_hold(cluster, view, data)  # every key still has its copies on the live nodes
        assert view.departed == ("a2",)
        cluster.put("a2", b"stale", b"kept while it was away")
        a2 = cluster.view.members["a2"]
        assert await coord.join("a2", a2.host, a2.port, a2.weight) == view.epoch + 1  # it may come back as a new member
        assert cluster.entry("a2", b"stale") is None, "a forgotten node comes back empty (then is filled)"
    finally:
        await coord.close()


async def test_forget_refuses_unknown_live_and_leaving_nodes_and_a_running_migration(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        epoch = coord.view.epoch
        with pytest.raises(MembershipError, match=r"unknown aux node 'nobody' \(members: a1, a2, a3\)"):
            await coord.forget("nobody", True)
        with pytest.raises(MembershipError, match="aux node a1 is up: only a down node can be forgotten"):
            await coord.forget("a1", True)
        coord.fence("a1", "unit test")
        with pytest.raises(MembershipError, match="aux node a1 is fenced"):
            await coord.forget("a1", True)
        cluster.held.update(("a1", "a2", "a3"))  # data cannot move: a3 stays leaving, the migration runs
        leave = asyncio.ensure_future(coord.leave("a3"))
        await until(lambda: coord.view.members["a3"].state == LEAVING)
        with pytest.raises(MembershipError, match="aux node a3 is leaving"):
            await coord.forget("a3", True)
        coord.mark("a2", DOWN, "unit test")
        with pytest.raises(MembershipError, match="a migration is running"):
            await coord.forget("a2", True)
        assert "a2" in coord.view.members and coord.view.epoch > epoch
        leave.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leave
    finally:
        await coord.close()


async def test_forgetting_the_only_copies_takes_force() -> None:
    async with FakeCluster(replicas=1) as cluster:
        coord = coordinator(cluster)
        try:
            coord.mark("a2", DOWN, "unit test")
            await coord.wait_settled(lambda v: v.prev_ring is None, SETTLE_S)
            share = cluster.view.ring.shares()["a2"]
            with pytest.raises(MembershipError, match=rf"about {share * 100:.1f}% of the keys had their only copies .* force"):
                await coord.forget("a2", False)
            assert "a2" in coord.view.members
            await coord.forget("a2", True)
            assert "a2" not in coord.view.members
            assert "forced" in coord.health_events[-1]["why"]
        finally:
            await coord.close()


async def test_leave_of_a_down_node_is_refused_at_once(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        coord.mark("a2", DOWN, "unit test")
        with pytest.raises(MembershipError, match=r"aux node a2 is down: a down node cannot hand its data over.*FORGET"):
            await asyncio.wait_for(coord.leave("a2"), SETTLE_S)
        assert coord.view.members["a2"].state == DOWN
    finally:
        await coord.close()


async def test_a_leave_ends_when_the_leaving_node_is_marked_down(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        cluster.held.update(("a1", "a2", "a3"))  # its data cannot move: it stays leaving
        leave = asyncio.ensure_future(coord.leave("a3"))
        await until(lambda: coord.view.members["a3"].state == LEAVING)
        coord.mark("a3", DOWN, "unit test")
        with pytest.raises(MembershipError, match="aux node a3 was marked down while it was leaving"):
            await asyncio.wait_for(leave, SETTLE_S)
    finally:
        await coord.close()


async def test_a_fenced_node_is_reconciled_from_its_co_owners_before_it_serves_reads(cluster: FakeCluster) -> None:
    data = fill(cluster)
    missed = [k for k in data if "a1" in cluster.view.write_targets(k)][:20]
    for key in missed:  # a1 restarted empty for these keys
        cluster.auxes["a1"].cache.delete(key)
    coord = coordinator(cluster)
    try:
        epoch = coord.view.epoch
        coord.fence("a1", "unit test")
        fenced = cluster.views[0]
        assert fenced.members["a1"].state == FENCED and fenced.epoch == epoch + 1 and fenced.prev_ring is None
        assert "a1" in fenced.ring and all("a1" not in fenced.read_candidates(k) for k in missed)
        await coord.wait_settled(lambda v: v.members["a1"].state == UP, SETTLE_S)
        assert_owners_hold(cluster, coord.view, data)
        assert [e["state"] for e in coord.health_events] == [FENCED]
        coord.mark("a2", DOWN, "unit test")
        coord.fence("a2", "not up: nothing to fence")
        assert coord.view.members["a2"].state == DOWN
    finally:
        await coord.close()


def _before_every_scan(cluster: FakeCluster, before: Callable[[], Reply | None]) -> None:
    """Call ``before()`` on every SCAN a1-a3 receive: a ``Reply`` it returns answers the SCAN, else the node does."""

    def scan(node: str) -> Any:
        def answer(msg: list[Any]) -> Reply:
            early = before()
            return early if early is not None else Reply(0, cluster.auxes[node].execute(msg))

        return answer

    for node in ("a1", "a2", "a3"):
        cluster.overrides[(node, Op.SCAN)] = scan(node)


async def test_a_failed_migration_is_retried_after_a_fence_that_keeps_its_move(
    cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A migration fails, and a node is fenced during the second before its retry: it is retried all the same.

    The fence publishes a view with the same move, which starts no
    migration of its own; the retry waited for the very view that failed,
    so the cluster stayed migrating for good and a node marked down never
    rejoined (seen in the fault campaign, bin/chaos.py).
    """
    data = fill(cluster)
    failing = [True]
    # refused at once while failing: the migration fails
    _before_every_scan(cluster, lambda: Reply(Status.BAD_ARGUMENTS, "scan cursor expired") if failing[0] else None)
    coord = coordinator(cluster)
    try:
        await coord.join("a4", "127.0.0.1", 7110, 1.0)
        await until(lambda: any("failed; retrying in 1 s" in r.getMessage() for r in caplog.records), SETTLE_S, "the migration to fail")
        coord.fence("a1", "unit test")
        assert coord.view.prev_ring is not None, "the fence keeps the move"
        failing[0] = False
        await coord.wait_settled(lambda v: v.prev_ring is None and all(m.state == UP for m in v.members.values()), SETTLE_S)
        assert coord.view.prev_ring is None, "the migration was never retried"
        assert_owners_hold(cluster, coord.view, data)
    finally:
        await coord.close()


async def test_a_source_that_restarts_while_a_migration_copies_from_it_is_replaced(cluster: FakeCluster) -> None:
    """An aux node restarts (empty) in the middle of streaming its ranges to a joining node: the copy starts again from the other owners.

    Otherwise its streams go on over the restarted process, find nothing,
    and the migration ends with the joining node missing those keys (the
    fault campaign's seed-15 schedule: an owner killed and restarted while
    a node joined; reads of the new owners then answered None).
    """
    data = fill(cluster, clock=HybridClock("m0", clock=lambda: wall_ms() - 60_000))  # older than a catch-up pass looks
    held: list[list[Any]] = []

    def scan_a3(msg: list[Any]) -> Reply | None:
        if not held:
            held.append(msg)
            return None  # answered below, by the restarted node
        return Reply(0, cluster.auxes["a3"].execute(msg))

    cluster.overrides[("a3", Op.SCAN)] = scan_a3
    coord = coordinator(cluster)
    try:
        await coord.join("a4", "127.0.0.1", 7110, 1.0)
        await until(lambda: held, SETTLE_S, "a3 streaming its ranges to a4")
        cluster.auxes["a3"] = AuxNode(AuxConfig(node_id="a3"))  # a new process, its snapshot lost
        coord.on_aux_restart("a3")
        cluster.fake.respond("a3", held[0], cluster.auxes["a3"].execute(held[0]))
        await coord.wait_settled(lambda v: v.prev_ring is None and all(m.state == UP for m in v.members.values()), SETTLE_S)
        assert_owners_hold(cluster, coord.view, data)
    finally:
        await coord.close()


async def test_a_migration_raises_every_nodes_ring_floor_to_its_epoch_before_it_copies(cluster: FakeCluster) -> None:
    """From then on a master still routing by the ring before (paused past the wait for it) cannot write where the copy passed."""
    fill(cluster)
    floors_at_scan: list[dict[str, int]] = []
    _before_every_scan(cluster, lambda: floors_at_scan.append(dict(cluster.fake.floors)))
    coord = coordinator(cluster)
    try:
        epoch = await coord.join("a4", "127.0.0.1", 7110, 1.0)
        await coord.wait_settled(lambda v: v.prev_ring is None, SETTLE_S)
        assert floors_at_scan, "the join copied nothing"
        assert all(f.get(n) == epoch for f in floors_at_scan for n in ("a1", "a2", "a3")), floors_at_scan[0]
    finally:
        await coord.close()


async def test_a_fence_a_master_did_not_confirm_raises_the_ring_floor_before_the_write_is_acknowledged(cluster: FakeCluster) -> None:
    """A write that missed a node is acknowledged when ``fence_missed`` returns: a master behind the fence must not read the node then.

    The wait for the other masters to route by the fenced view is bounded
    (1 s here); the reconciliation, which raises the floor before it copies,
    waits longer for them (3 s). Between the two, a master paused at the view
    before the fence that resumed would read the node that lacks the
    acknowledged write, by its old ring: now the nodes already refuse that
    ring (their floor is the fenced view's epoch) when the write is acknowledged.
    """
    fill(cluster)
    coord = coordinator(cluster)
    try:
        before = coord.view
        coord.sync("m2", before.epoch, before.seq)  # a follower that stays at the view before the fence (paused)
        await asyncio.wait_for(coord.fence_missed("a2", wall_ms(), "a write was acknowledged without it"), SETTLE_S)
        fenced = coord.view
        assert fenced.members["a2"].state == FENCED and fenced.epoch > before.epoch
        assert {n: cluster.fake.floors.get(n) for n in ("a1", "a2", "a3")} == dict.fromkeys(("a1", "a2", "a3"), fenced.epoch)
    finally:
        await coord.close()


async def test_no_ring_floor_names_an_epoch_the_other_masters_cannot_learn(cluster: FakeCluster) -> None:
    """A ZooKeeper leader cut off from ZooKeeper (not yet knowing it) fences a node in a view no other master can read.

    A floor at that epoch would have every node refuse every master for good
    once the view is dropped (the next leader goes on from the ring in
    ZooKeeper, at a lower epoch), and meanwhile refuse the reads of a master
    out of touch with ZooKeeper, which asks every owner and took the one
    stale copy that still answered (the fault campaign: `zk-stop` with a
    `link-cut`). The fence fails instead: the write is acknowledged with its
    hints, as when the leader cannot be reached.
    """
    fill(cluster)
    coord = coordinator(cluster)
    try:
        before = coord.view
        coord.migrator._floor_known = lambda epoch: epoch <= before.epoch  # what ZooKeeper holds: the fence's view is not written
        coord.sync("m2", before.epoch, before.seq)  # a master that cannot learn the fence
        with pytest.raises(UnavailableError, match="no ring floor can"):
            await asyncio.wait_for(coord.fence_missed("a2", wall_ms(), "a write was acknowledged without it"), SETTLE_S)
        assert coord.view.members["a2"].state == FENCED  # this master reads it no more
        assert not any(cluster.fake.floors.get(n) for n in ("a1", "a2", "a3"))
        assert not await coord.migrator.raise_floor(coord.view.epoch)  # nor does a migration's floor
        assert not any(cluster.fake.floors.get(n) for n in ("a1", "a2", "a3"))
        assert await coord.migrator.raise_floor(before.epoch)  # an epoch the others know is fine
        assert {cluster.fake.floors.get(n) for n in ("a1", "a3")} == {before.epoch}
    finally:
        await coord.close()


def _runs_that_outlive_their_cancellation(coord: Coordinator) -> tuple[list[tuple[str, asyncio.Event]], list[int]]:
    """Make ``coord``'s migrator runs wait for an event each and ignore a cancellation, as on Python 3.11.

    There ``asyncio.wait_for`` returns its inner call's result when that call
    ends as the caller is cancelled (a ZooKeeper read in a migration's wait
    for the other masters), so a task cancelled to be replaced may run on.
    Returns the runs, in order (the name of the task that runs each, its
    event), and the indexes of the runs that ended. Copies nothing.
    """
    gates: list[tuple[str, asyncio.Event]] = []
    ended: list[int] = []

    async def run(view: ClusterView, plan: Any = None, since_version: int = 0) -> None:
        gate = asyncio.Event()
        task = asyncio.current_task()
        gates.append((task.get_name() if task is not None else "", gate))
        i = len(gates) - 1
        while not gate.is_set():
            try:
                await gate.wait()
            except asyncio.CancelledError:
                if not gate.is_set():
                    continue  # the cancellation is lost (the test sets every gate before it closes the coordinator)
                raise
        ended.append(i)

    coord.migrator.run = run  # type: ignore[method-assign]
    return gates, ended


async def test_a_reconciliation_replaced_by_a_later_one_never_lets_the_node_serve_reads(cluster: FakeCluster) -> None:
    """A node missed an earlier write than its running reconciliation copies: that one is replaced, and even if it runs on it never unfences the node.

    The replacement's pass alone covers the earlier miss. The old task,
    cancelled but running on (its cancellation lost on Python 3.11), used to
    finish its pass, find no miss reported (the new pass had taken the mark),
    and let the node serve reads while it still lacked the write: a write
    acknowledged through a master that does not lead read back old in CI.
    """
    coord = coordinator(cluster)
    gates, ended = _runs_that_outlive_their_cancellation(coord)
    try:
        since = cluster.clock.next()
        coord.fence("a1", "a write was acknowledged without it", since_version=since)
        await until(lambda: len(gates) == 1, SETTLE_S, "the first reconciliation's pass")
        coord.fence("a1", "an earlier write was acknowledged without it", since_version=since - (5000 << 22))
        await until(lambda: len(gates) == 2, SETTLE_S, "the replacing reconciliation's pass")
        gates[0][1].set()
        await until(lambda: ended == [0], SETTLE_S, "the replaced pass to end")
        await asyncio.sleep(0)  # the replaced task goes on past its pass
        assert coord.view.members["a1"].state == FENCED, "unfenced by the replaced reconciliation"
        gates[1][1].set()
        await coord.wait_settled(lambda v: v.members["a1"].state == UP, SETTLE_S)
        assert ended == [0, 1] and len(gates) == 2
    finally:
        for _, gate in gates:
            gate.set()
        await coord.close()


async def test_a_migration_replaced_by_a_new_copy_never_ends_the_move(cluster: FakeCluster) -> None:
    """A source restarts during a join's copy: the copy starts again, and the one it replaced never ends the move, even if it runs on.

    Ended by the old copy, whose streams read the restarted (empty) source,
    the move would drop the old owners' ranges with the joining node missing
    keys (``_copy_again_without``); its cancellation may be lost on Python 3.11.
    """
    coord = coordinator(cluster)
    gates, ended = _runs_that_outlive_their_cancellation(coord)
    try:
        await coord.join("a4", "127.0.0.1", 7110, 1.0)
        await until(lambda: [name for name, _ in gates] == ["migration"], SETTLE_S, "the join's copy")
        source = sorted(coord._copy_sources)[0]
        coord.on_aux_restart(source)
        await until(lambda: sorted(name for name, _ in gates) == ["fence-" + source, "migration", "migration"], SETTLE_S, "a new copy")
        gates[0][1].set()
        await until(lambda: ended == [0], SETTLE_S, "the replaced copy to end")
        for _ in range(3):
            await asyncio.sleep(0)  # the replaced task goes on past its copy
        assert coord.view.prev_ring is not None and not coord.view.settling, "the replaced copy ended the move"
        for _, gate in gates:
            gate.set()
        await coord.wait_settled(lambda v: v.prev_ring is None and all(m.state == UP for m in v.members.values()), SETTLE_S)
    finally:
        for _, gate in gates:
            gate.set()
        await coord.close()


@pytest.mark.parametrize("how", ["on_aux_restart", "request_reconcile"])
async def test_restarts_and_lost_hints_fence_the_node(cluster: FakeCluster, how: str) -> None:
    coord = coordinator(cluster)
    try:
        getattr(coord, how)("a3")
        assert cluster.views[0].members["a3"].state == FENCED
        await coord.wait_settled(lambda v: v.members["a3"].state == UP, SETTLE_S)
    finally:
        await coord.close()


async def test_a_coordinator_whose_epochs_are_behind_the_nodes_floors_moves_past_them(cluster: FakeCluster) -> None:
    """Restarted with its clock stepped back, a lone coordinator rebuilds a ring at an epoch below the floors it set before.

    Every request it routes would be refused (STALE_RING) for good: told so,
    it moves its epoch past the highest floor its links learned (EPOCH answers).
    """
    coord = coordinator(cluster)
    try:
        epoch = coord.view.epoch
        coord.ring_behind()  # no floor ahead: nothing changes
        assert coord.view.epoch == epoch and cluster.views == []
        cluster.links["a2"].took_floor(0, epoch + 5000)
        cluster.links["a3"].took_floor(0, epoch + 7000)
        coord.ring_behind()
        assert coord.view.epoch == coord.view.ring.epoch == epoch + 7001
        assert coord.view.ring.nodes == cluster.view.ring.nodes and coord.view.members == cluster.view.members
        coord.ring_behind()  # past it now
        assert coord.view.epoch == epoch + 7001 and len(cluster.views) == 1
    finally:
        await coord.close()


async def test_views_only_move_forward(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        assert not coord.publish(cluster.view)
        assert coord.publish(cluster.view.bumped())
        assert not coord.publish(cluster.view)
        assert len(cluster.views) == 1
    finally:
        await coord.close()


# -- health ----------------------------------------------------------------------------


async def test_health_checks_mark_a_silent_node_down_and_up_again(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    await coord.start()
    try:
        cluster.fake.silent.add("a2")
        await until(lambda: coord.view.members["a2"].state == DOWN, SETTLE_S, "a2 to be marked down")
        why = coord.health_events[-1]["why"]
        assert why == "2 health checks failed in a row (TimeoutError)"
        assert all(coord.view.members[n].state == UP for n in ("a1", "a3"))
        cluster.fake.silent.discard("a2")
        await until(lambda: coord.view.members["a2"].state == UP, SETTLE_S, "a2 to be marked up")
        assert coord.health_events[-1]["why"] == "answers pings again"
    finally:
        await coord.close()


async def test_a_silent_node_is_fenced_until_every_master_stopped_reading_it_then_marked_down(cluster: FakeCluster) -> None:
    """Down (no more writes) only once every master routes by a view that does not read it.

    Marked down at once, a follower still on the view before read it while
    the coordinator's writes skipped it: the fault campaign (bin/chaos.py,
    ``link-delay,a1,0,1.72,0.33``) read values older than acknowledged
    writes through the follower.
    """
    coord = coordinator(cluster, follow_interval=2.0)  # the fence's wait is bounded by 4.5 s
    await coord.start()
    try:
        v = coord.view
        coord.sync("m2", v.epoch, v.seq)  # a follower at the current view
        cluster.fake.silent.add("a2")
        await until(lambda: coord.view.members["a2"].state == FENCED, SETTLE_S, "a2 to be fenced")
        fenced = coord.view
        hellos = _health_hellos(cluster, "a1")
        await until(lambda: _health_hellos(cluster, "a1") >= hellos + 3, SETTLE_S, "more health rounds")
        assert coord.view.members["a2"].state == FENCED, "marked down while a master may still read it"
        coord.sync("m2", fenced.epoch, fenced.seq)  # the follower routes by the fenced view
        await until(lambda: coord.view.members["a2"].state == DOWN, SETTLE_S, "a2 to be marked down")
        assert [e["state"] for e in coord.health_events] == [FENCED, DOWN]
    finally:
        await coord.close()


async def test_a_node_back_during_a_migration_rejoins_only_after_it(cluster: FakeCluster) -> None:
    """A node that was down missed writes: it must not come back as an owner of the running migration's rings.

    The migration away from it keeps the ring it was down from as its source
    (the authoritative one): a2 marked up in the middle would be that ring's
    owner again, read at once, and hold nothing of what was written while it
    was down. It waits, stays out of the ring, and rejoins with a migration
    of its own once the running one is done.
    """
    data = fill(cluster, 150)
    coord = coordinator(cluster, migration_rate=60, migration_batch=10)  # the move away from a2 takes seconds
    await coord.start()
    try:
        cluster.fake.silent.add("a2")
        await until(lambda: coord.view.members["a2"].state == DOWN, SETTLE_S, "a2 to be marked down")
        down = coord.view
        assert down.prev_ring is not None and "a2" in down.prev_ring and "a2" not in down.ring
        cluster.fake.silent.discard("a2")
        hellos = _health_hellos(cluster, "a2")
        await until(lambda: _health_hellos(cluster, "a2") >= hellos + 5, SETTLE_S, "a2 answering health checks")
        assert coord.view.members["a2"].state == DOWN, "a2 came back while the migration away from it ran"
        assert coord.view.prev_ring is not None, "the migration should still run (slow it down further)"
        await until(lambda: coord.view.members["a2"].state == UP, 4 * SETTLE_S, "a2 to rejoin")
        back = next(v for v in cluster.views if v.members["a2"].state == UP)
        before = [v for v in cluster.views if v.epoch == down.epoch]
        assert before[-1].prev_ring is None, "the migration away from a2 finished first"
        assert back.prev_ring is not None and "a2" not in back.prev_ring and "a2" in back.ring, "a2 gets its data by a migration"
        await coord.wait_settled(lambda v: v.prev_ring is None, 4 * SETTLE_S)
        assert_owners_hold(cluster, coord.view, data)
    finally:
        await coord.close()


async def test_a_node_down_for_longer_than_tombstones_last_comes_back_empty(cluster: FakeCluster) -> None:
    """A node back after EMPTY_AFTER_DOWN_MS holds no copy of a key deleted while it was away; a short outage keeps its data.

    Before, its old copy of a key deleted more than 60 s before it came
    back (no tombstone left anywhere to copy to it) was read again: 20 of
    20 such keys in a real cluster (docs/PROTOCOL.md).
    """
    data = fill(cluster)
    gone = next(b"gone:%d" % i for i in range(1000) if "a2" in cluster.view.write_targets(b"gone:%d" % i))
    cluster.put("a2", gone, b"deleted long ago", cluster.clock.next())  # its tombstone on the others has expired
    members = dict(cluster.view.members)
    a2 = members["a2"]
    members["a2"] = Member(a2.node_id, a2.host, a2.port, a2.weight, DOWN, wall_ms() - EMPTY_AFTER_DOWN_MS - 1000)
    coord = coordinator(cluster)
    coord.publish(cluster.view.with_members(members, migrate=False))
    await coord.start()
    try:
        await until(lambda: coord.view.members["a2"].state == UP, SETTLE_S, "a2 to come back")
        assert cluster.entry("a2", gone) is None, "a2 came back with a key deleted while it was away"
        await coord.wait_settled(lambda v: v.prev_ring is None, SETTLE_S)
        assert_owners_hold(cluster, coord.view, data)  # what it owns was copied to it again
        assert cluster.entry("a2", gone) is None
    finally:
        await coord.close()


async def test_a_down_node_that_announces_a_new_address_comes_back_through_health_checks(cluster: FakeCluster) -> None:
    """A down node restarted on another port: its address changes, it stays down (and out of the ring) until checked.

    It was admitted up at once: after a long outage it came back with its
    old copies of keys deleted meanwhile, past the check that empties it.
    """
    coord = coordinator(cluster)
    try:
        coord.mark("a2", DOWN, "unit test")
        epoch = coord.view.epoch
        assert await coord.join("a2", "127.0.0.9", 7999, 1.0) == epoch
        a2 = coord.view.members["a2"]
        assert (a2.state, a2.addr, coord.view.epoch) == (DOWN, "127.0.0.9:7999", epoch) and "a2" not in coord.view.ring
    finally:
        await coord.close()


async def test_health_checks_fence_a_node_that_restarted(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    await coord.start()
    try:
        # a few rounds have seen a2's first incarnation (rounds start 0.02 s apart; each is answered within an iteration)
        await until(lambda: _health_hellos(cluster, "a2") >= 3, SETTLE_S, "health rounds")
        cluster.fake.incarnations["a2"] = 2
        await until(lambda: any(e["state"] == FENCED for e in coord.health_events), SETTLE_S, "a2 to be fenced")
        assert coord.health_events[0]["node_id"] == "a2" and "restarted" in coord.health_events[0]["why"]
        await coord.wait_settled(lambda v: v.members["a2"].state == UP, SETTLE_S)
    finally:
        await coord.close()


async def test_a_restart_its_link_reported_is_not_fenced_again_by_the_health_checks(cluster: FakeCluster) -> None:
    """The link sees the new process first: once that fence is reconciled, the health checks' next answer is no second restart.

    They still knew the old process: a node reconciled before their next
    round was fenced and reconciled a second time (the fault campaign's
    logs: "fenced: restarted" twice for one restart).
    """
    coord = coordinator(cluster)
    await coord.start()
    try:
        await until(lambda: _health_hellos(cluster, "a2") >= 3, SETTLE_S, "health rounds")
        cluster.fake.incarnations["a2"] = 2
        coord.on_aux_restart("a2")  # as the link does when it reconnects to the new process
        await coord.wait_settled(lambda v: v.members["a2"].state == UP, SETTLE_S)
        seen = _health_hellos(cluster, "a2")
        await until(lambda: _health_hellos(cluster, "a2") >= seen + 3, SETTLE_S, "health rounds of the new process")
        assert [e["why"] for e in coord.health_events if e["node_id"] == "a2"] == ["restarted: reconciling before it serves reads"]
        assert coord.view.members["a2"].state == UP
    finally:
        await coord.close()


def _health_hellos(cluster: FakeCluster, node: str) -> int:
    """Health HELLOs that reached ``node`` (every HELLO but its link's own handshake)."""
    return sum(1 for t in cluster.fake.transports[node] for f in t.frames() if f[0] == Op.HELLO) - 1


# -- followers' SYNC and a restarted coordinator --------------------------------------------


async def test_sync_answers_newer_views_only_and_remembers_the_follower(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        v = coord.view
        answer = coord.sync("m2", 0, 0)
        assert answer is not None and ClusterView.from_dict(answer) == v
        assert coord.sync("m2", v.epoch, v.seq) is None
        assert coord.status()["followers"]["m2"]["epoch"] == v.epoch
    finally:
        await coord.close()


async def test_sync_with_reconcile_fences_the_named_nodes(cluster: FakeCluster) -> None:
    coord = coordinator(cluster)
    try:
        answer = coord.sync("m2", coord.view.epoch, coord.view.seq, None, ["a2"])
        assert answer is not None
        fenced = ClusterView.from_dict(answer)
        assert fenced.members["a2"].state == FENCED
        assert "follower m2 lost hints" in coord.health_events[-1]["why"]
        assert coord.sync("m2", fenced.epoch, fenced.seq) is None  # m2 routes by it: the reconciliation need not wait for it
        await coord.wait_settled(lambda v: v.members["a2"].state == UP, SETTLE_S)
    finally:
        await coord.close()


async def test_a_restarted_coordinator_takes_the_ring_from_a_follower(cluster: FakeCluster) -> None:
    old = cluster.view.bumped().bumped()  # what the follower routes by: epoch 1, seq 2
    fresh = ClusterView.initial([], 2, epoch=1000)  # the restarted coordinator knows nothing
    coord = coordinator(cluster, fresh)
    try:
        assert coord.sync("m2", old.epoch, old.seq) == {"want_view": True}
        with pytest.raises(BadArgumentsError, match="malformed"):
            coord.sync("m2", old.epoch, old.seq, {"epoch": 1})
        with pytest.raises(BadArgumentsError, match="epoch and seq"):
            coord.sync("m2", old.epoch, old.seq + 1, old.to_dict())
        answer = coord.sync("m2", old.epoch, old.seq, old.to_dict())
        assert answer is not None
        taken = ClusterView.from_dict(answer)
        assert taken.epoch == 1001 and taken.members == old.members and taken.ring.nodes == old.ring.nodes
        assert taken.prev_ring is None, "nothing moves: every node holds its own ranges"
        assert coord.recovery == {"from": "follower m2", "epoch": 1001, "adopted_epoch": old.epoch}
        assert coord.sync("m3", old.epoch, old.seq) == answer  # later followers just get the new view
    finally:
        await coord.close()


def _handed_a_finished_migration_settling(cluster: FakeCluster) -> tuple[Coordinator, ClusterView, bytes]:
    """A restarted coordinator to which follower m2 hands the settling view of a migration from a1 alone to all three.

    The old coordinator had finished it: a key written since went to its new
    owners a2 and a3 only. Returns the coordinator (close it), the source
    view and that key.
    """
    one = ClusterView.initial(cluster.members[:1], 2, epoch=1)  # the source ring: a1 alone
    settling = one.with_members({m.node_id: m for m in cluster.members}).migration_settling()
    key = cluster.key_owned_by("a2", "a3")
    version = cluster.put("a2", key, b"v")  # written once the migration was done: to the new owners only
    cluster.put("a3", key, b"v", version)
    coord = coordinator(cluster, ClusterView.initial([], 2, epoch=1000))
    assert coord.sync("m2", settling.epoch, settling.seq) == {"want_view": True}
    coord.sync("m2", settling.epoch, settling.seq, settling.to_dict())
    return coord, one, key


async def test_a_restarted_coordinator_handed_a_settling_migration_reads_its_new_owners(cluster: FakeCluster) -> None:
    """A follower one poll behind hands the settling view of a migration the coordinator had finished.

    Writes made after it finished went to the new owners only: taken back
    to copying, reads went to the source ring's owners and missed them.
    """
    coord, one, key = _handed_a_finished_migration_settling(cluster)
    try:
        taken = coord.view
        assert taken.prev_ring is not None and taken.prev_ring.nodes == one.ring.nodes  # the migration is resumed ...
        sink = Sink()
        cluster.router.get(sink, 1, key)
        assert await sink.answer() == (Status.OK, b"v")  # ... in the step it was in: read the new owners
        assert taken.settling
        coord.sync("m2", taken.epoch, taken.seq)  # m2 routes by it: the resumed migration need not wait for it
        await coord.wait_settled(lambda v: v.prev_ring is None, SETTLE_S)
        assert cluster.value("a2", key) == cluster.value("a3", key) == b"v"
    finally:
        await coord.close()


async def test_a_fence_during_a_settling_migration_keeps_it_settling(cluster: FakeCluster) -> None:
    """A node fenced while a migration settles (here, one taken over from a follower right after a restart) must not
    take the migration back to copying: reads would go to the source ring's owners again, which lack the writes made
    once the old coordinator had finished it. With two copies the fenced node's co-owner is read instead."""
    coord, one, key = _handed_a_finished_migration_settling(cluster)
    try:
        assert coord.view.settling
        coord.fence("a2", "a write was acknowledged without it")
        fenced = coord.view
        assert fenced.members["a2"].state == FENCED
        assert fenced.settling and fenced.prev_ring is not None and fenced.prev_ring.nodes == one.ring.nodes
        sink = Sink()
        cluster.router.get(sink, 1, key)
        assert await sink.answer() == (Status.OK, b"v")  # from a3, the unfenced new owner; not a miss on a1
    finally:
        await coord.close()


async def test_a_restarted_coordinator_gathers_reannouncements_into_one_ring(cluster: FakeCluster) -> None:
    fresh = ClusterView.initial([], 2, epoch=1000)
    coord = coordinator(cluster, fresh, recovery_window=0.05)
    try:
        joins = [coord.join(m.node_id, m.host, m.port, m.weight, known_epoch=1) for m in cluster.members]
        epochs = await asyncio.wait_for(asyncio.gather(*joins), SETTLE_S)
        assert epochs == [1001, 1001, 1001], "one change for all of them"
        assert set(coord.view.ring.nodes) == {"a1", "a2", "a3"} and coord.view.prev_ring is None
        assert coord.recovery is not None and coord.recovery["from"] == "re-announcements"
        assert coord.recovery["members"] == ["a1", "a2", "a3"]
    finally:
        await coord.close()


async def test_a_restarted_coordinator_says_when_its_ring_is_due_and_while_reads_must_ask_every_owner(cluster: FakeCluster) -> None:
    """The master holds requests until the window's end (``on_gathering``), and every master reads every owner of a
    key from the rebuilt ring's publication to the end of its reconciliation pass (the views' ``reconciling``: the
    rebuilt ring carries it, a view of the same ring clears it once the pass ended; two copies per key here)."""
    fresh = ClusterView.initial([], 2, epoch=1000)
    coord = Coordinator(
        config(replicas=2, recovery_window=0.05),
        fresh,
        lambda v: calls.append(("view", v.epoch, v.reconciling)),
        lambda: cluster.links,
        cluster.clock,
        cluster.new_link,
    )
    calls: list[Any] = []
    coord.on_gathering = lambda window: calls.append(("gathering", window))
    try:
        joins = [coord.join(m.node_id, m.host, m.port, m.weight, known_epoch=1) for m in cluster.members]
        assert await asyncio.wait_for(asyncio.gather(*joins), SETTLE_S) == [1001, 1001, 1001]
        await until(lambda: (coord.recovery or {}).get("reconciled") is True, SETTLE_S, "the rebuilt ring reconciled")
        assert calls == [("gathering", 0.05), ("view", 1001, True), ("view", 1001, False)]
    finally:
        await coord.close()


async def test_a_follower_reads_every_owner_while_the_coordinators_rebuilt_ring_is_reconciled(cluster: FakeCluster) -> None:
    async with Served(cluster, cluster.view.bumped(reconciling=True)) as served:
        f, seen = follower(served.address)
        try:
            await f.sync_once()
            assert f.view.reconciling is True
            served.coord.publish(served.coord.view.bumped(reconciling=False))  # what the pass's end publishes
            await f.sync_once()
            assert [v.reconciling for v in seen] == [True, False]
        finally:
            await f.close()


async def test_a_coordinator_that_takes_over_a_ring_being_reconciled_reconciles_it_again(cluster: FakeCluster) -> None:
    """The coordinator before it died during the pass: the flag ends only with a pass, so the new one runs it."""
    old = cluster.view.bumped(reconciling=True)
    async with Served(cluster, ClusterView.initial([], 2, epoch=1000)) as served:
        f, _ = follower(served.address, old)
        try:
            await f.sync_once()
            assert f.view.epoch == 1001 and f.view.reconciling is True
            await until(lambda: not served.coord.view.reconciling, SETTLE_S, "the taken-over ring reconciled")
            assert served.coord.recovery is not None and served.coord.recovery["reconciled"] is True
            await f.sync_once()
            assert f.view.reconciling is False
        finally:
            await f.close()


async def test_expected_reannouncements_end_the_recovery_window_early(cluster: FakeCluster) -> None:
    """--expect-aux (what dcache cluster passes): once that many nodes are back, the ring is rebuilt without waiting."""
    fresh = ClusterView.initial([], 2, epoch=1000)
    coord = coordinator(cluster, fresh, recovery_window=60.0, expect_aux=3)
    try:
        t0 = time.monotonic()
        joins = [coord.join(m.node_id, m.host, m.port, m.weight, known_epoch=1) for m in cluster.members]
        assert await asyncio.wait_for(asyncio.gather(*joins), SETTLE_S) == [1001, 1001, 1001]
        assert time.monotonic() - t0 < 5.0, "the 60 s window was waited out"
        assert set(coord.view.ring.nodes) == {"a1", "a2", "a3"} and coord.view.prev_ring is None
    finally:
        await coord.close()


async def test_fewer_reannouncements_than_expected_wait_out_the_window(cluster: FakeCluster) -> None:
    fresh = ClusterView.initial([], 2, epoch=1000)
    coord = coordinator(cluster, fresh, recovery_window=0.3, expect_aux=4)
    try:
        t0 = time.monotonic()
        joins = [coord.join(m.node_id, m.host, m.port, m.weight, known_epoch=1) for m in cluster.members]
        assert await asyncio.wait_for(asyncio.gather(*joins), SETTLE_S) == [1001, 1001, 1001]
        assert time.monotonic() - t0 >= 0.3
    finally:
        await coord.close()


# -- the follower -------------------------------------------------------------------------


class CoordinatorService(Service):
    """A master that serves a ``Coordinator``'s SYNC, JOIN and LEAVE (what a coordinating master node does)."""

    role = "master"

    def __init__(self, coord: Coordinator) -> None:
        super().__init__("coordinator", MasterConfig(port=0))
        self.handlers[Op.SYNC] = lambda conn, rid, args: coord.sync(*args)
        self.handlers[Op.JOIN] = lambda conn, rid, args: deferred(coord.join(*args))
        self.handlers[Op.LEAVE] = lambda conn, rid, node_id: deferred(coord.leave(node_id))


class Served:
    def __init__(self, cluster: FakeCluster, view: ClusterView | None = None) -> None:
        self.coord = coordinator(cluster, view)
        self.service = CoordinatorService(self.coord)
        self.server: asyncio.base_events.Server | None = None
        self.address = ""

    async def __aenter__(self) -> Served:
        self.server = await asyncio.get_running_loop().create_server(self.service.protocol_factory, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in list(self.service.state.connections):
            conn.close()
        await self.server.wait_closed()
        await self.coord.close()


def follower(address: str, view: ClusterView | None = None) -> tuple[Follower, list[ClusterView]]:
    seen: list[ClusterView] = []
    f = Follower(config(coordinator=address), view or ClusterView.initial([], 2, epoch=0), seen.append, lambda: "m2")
    return f, seen


async def test_a_follower_adopts_the_coordinators_views_and_forwards_joins(cluster: FakeCluster) -> None:
    async with Served(cluster) as served:
        f, seen = follower(served.address)
        try:
            await f.sync_once()
            assert seen == [served.coord.view] and f.view == served.coord.view
            assert f.status()["coordinator_reachable"] and f.status()["coordinator"] == served.address
            epoch = await f.join("a4", "127.0.0.1", 7110, 1.0)
            assert epoch == served.coord.view.epoch and "a4" in served.coord.view.members
            await f.sync_once()
            assert "a4" in f.view.members
            assert served.coord.status()["followers"]["m2"]["epoch"] < epoch  # it reported its old position
        finally:
            await f.close()


async def test_a_follower_hands_its_view_to_a_restarted_coordinator(cluster: FakeCluster) -> None:
    old = cluster.view.bumped()
    async with Served(cluster, ClusterView.initial([], 2, epoch=1000)) as served:
        f, _ = follower(served.address, old)
        try:
            await f.sync_once()
            assert f.view.epoch == 1001 and f.view.members == old.members
            assert served.coord.recovery == {"from": "follower m2", "epoch": 1001, "adopted_epoch": old.epoch}
        finally:
            await f.close()


async def test_a_follower_names_nodes_it_lost_hints_for_in_its_next_sync(cluster: FakeCluster) -> None:
    async with Served(cluster) as served:
        f, _ = follower(served.address)
        try:
            f.request_reconcile("a3")
            await f.sync_once()
            assert served.coord.view.members["a3"].state == FENCED
            assert f.view.members["a3"].state == FENCED
            await f.sync_once()  # reports that it routes by the fence: the reconciliation need not wait for it
            await served.coord.wait_settled(lambda v: v.members["a3"].state == UP, SETTLE_S)
            fenced_events = len(served.coord.health_events)
            await f.sync_once()  # named once: not fenced again
            assert len(served.coord.health_events) == fenced_events
        finally:
            await f.close()


async def test_a_follower_fences_a_restarted_node_locally_until_the_coordinator_speaks(cluster: FakeCluster) -> None:
    async with Served(cluster) as served:
        f, seen = follower(served.address)
        try:
            await f.sync_once()
            f.on_aux_restart("a1")
            local = seen[-1]
            assert local.members["a1"].state == FENCED and (local.epoch, local.seq) == (served.coord.view.epoch, served.coord.view.seq)
            served.coord.publish(served.coord.view.bumped())
            await f.sync_once()  # the coordinator's newer view replaces the local one (and, named in it, a1 is reconciled)
            assert (f.view.epoch, f.view.seq) > (local.epoch, local.seq)
            await served.coord.wait_settled(lambda v: v.members["a1"].state == UP, SETTLE_S)
            await f.sync_once()
            assert f.view.members["a1"].state == UP
        finally:
            await f.close()


async def test_a_follower_that_sees_a_restart_the_coordinator_already_reconciled_is_not_left_fenced(cluster: FakeCluster) -> None:
    """The coordinator saw the new process first and let it back; the follower's fence is lifted all the same.

    Its fence has the coordinator's (epoch, seq), and no newer view came:
    the follower read the node's keys elsewhere for good (the fault
    campaign's ``aux-kill-fast``, never settled in CI). Its next SYNC names
    the node; the coordinator fences and reconciles it, and the view that
    lets it back reaches the follower.
    """
    async with Served(cluster) as served:
        f, _seen = follower(served.address)
        try:
            await f.sync_once()
            before = (f.view.epoch, f.view.seq)
            f.on_aux_restart("a1")
            assert f.view.members["a1"].state == FENCED and (f.view.epoch, f.view.seq) == before
            await f.sync_once()  # names a1
            await served.coord.wait_settled(lambda v: (v.epoch, v.seq) > before and v.members["a1"].state == UP, SETTLE_S)
            await f.sync_once()
            assert f.view.members["a1"].state == UP
        finally:
            await f.close()


async def test_a_follower_without_its_coordinator_keeps_its_view_and_says_so(cluster: FakeCluster) -> None:
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()
    f, seen = follower(address, cluster.view)
    await f.start()
    try:
        status = f.status()
        assert not status["coordinator_reachable"] and status["coordinator_error"]
        assert f.view == cluster.view and seen == []
    finally:
        await f.close()
