"""The migrator (``dcache.master.migration``): pipelined, packed streams, and ``--migration-rate`` pacing them.

Runs over ``fakecluster``: real aux handlers behind fake links, so pages
really move. Time is a fake monotonic clock that only the migrator's
``sleep`` advances, so the pacing is checked exactly, without timing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dcache.config import MasterConfig
from dcache.errors import Status
from dcache.hlc import HybridClock, wall_ms
from dcache.master.migration import Migrator
from dcache.master.view import DOWN, FENCED, ClusterView, Member
from dcache.protocol import Op, unpack_entries
from dcache.ring import hash64, in_range
from tests.fakes import Reply

from .fakecluster import FakeCluster, until

KEYS = 600
BATCH = 20


class FakeTime:
    """A monotonic clock that moves only when the migrator sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def nobody_to_wait_for(epoch: int, timeout: float) -> None:
    """No follower masters."""


async def migrate(rate: int, *, older: bool = False) -> tuple[FakeTime, list[tuple[float, int]], FakeCluster]:
    """Join a2 to a1 holding ``KEYS`` keys written over a minute ago; return the time, a2's APPLYs and the cluster.

    ``older``: both nodes answer as a node that knows no packed pages does.
    """
    async with FakeCluster(("a1",), replicas=1, spare=("a2",)) as cluster:
        old = HybridClock("m0", clock=lambda: wall_ms() - 60_000)  # older than the catch-up pass looks
        for i in range(KEYS):
            cluster.put("a1", b"key:%d" % i, b"v%d" % i, old.next())
        members = dict(cluster.view.members)
        members["a2"] = Member("a2", "127.0.0.1", 7101)
        view = cluster.view.with_members(members)
        cluster.adopt(view)
        time = FakeTime()
        applied: list[tuple[float, int]] = []

        def apply_on_a2(msg: list[Any]) -> Reply:
            if older and msg[2].__class__ is not list:
                return Reply(Status.BAD_ARGUMENTS, "APPLY takes a list of [key, value, expires_at, version] entries")
            assert (msg[2].__class__ is bytes) != older, "pages travel packed to a node that takes them"
            applied.append((time.now, len(unpack_entries(msg[2], "APPLY") if msg[2].__class__ is bytes else msg[2])))
            return Reply(0, cluster.auxes["a2"].execute(msg))

        def scan_on_a1(msg: list[Any]) -> Reply:
            if older and len(msg) != 6:
                return Reply(Status.BAD_ARGUMENTS, "SCAN takes [ranges, cursor, count, min_version]")
            return Reply(0, cluster.auxes["a1"].execute(msg))

        cluster.overrides[("a2", Op.APPLY)] = apply_on_a2
        cluster.overrides[("a1", Op.SCAN)] = scan_on_a1
        config = MasterConfig(port=0, replicas=1, migration_batch=BATCH, migration_rate=rate)
        migrator = Migrator(config, lambda: cluster.links, cluster.clock, nobody_to_wait_for, monotonic=time.monotonic, sleep=time.sleep)
        await migrator.run(view)
        moved = migrator.progress()["keys_moved"]
        assert moved == sum(n for _, n in applied) > KEYS // 4
        for i in range(KEYS):
            key = b"key:%d" % i
            if view.ring.owners(key, 1) == ["a2"]:
                assert cluster.value("a2", key) == b"v%d" % i
        return time, applied, cluster


@pytest.mark.parametrize("rate", [50, 400])
async def test_migration_rate_paces_each_stream(rate: int) -> None:
    time, applied, _ = await migrate(rate)
    moved = sum(n for _, n in applied)
    start = 100.0
    sent = 0
    for at, n in applied:
        sent += n
        # a page is scanned once the keys before it fit the rate: at most one page ahead of it
        assert sent <= rate * (at - start) + BATCH, (sent, at - start)
    # and it did wait: the last page was scanned once every key before it was due
    assert time.now - start >= (moved - BATCH) / rate


async def test_unthrottled_migration_never_sleeps() -> None:
    time, applied, _ = await migrate(0)
    assert time.sleeps == [] and len(applied) > 1


async def test_nodes_that_know_no_packed_pages_get_them_unpacked() -> None:
    """An older source refuses SCAN's fifth argument, an older destination a packed APPLY: the data moves all the same."""
    _, applied, cluster = await migrate(0, older=True)
    assert sum(n for _, n in applied) > KEYS // 4
    scans = cluster.sent("a1", Op.SCAN)
    sizes = [len(m) for m in scans]
    assert sizes[0] == 7 and sizes.count(7) == 2 and sizes.count(6) > 2, "one packed try per pass (copy, catch-up), then unpacked"


@pytest.mark.parametrize("paused", ["waiting-for-followers", "applying-a-page"])
async def test_a_run_started_meanwhile_does_not_break_one_in_flight(paused: str) -> None:
    """A fenced node's reconciliation starting while a migration waits for its followers or applies a page (one migrator, two runs).

    The second run replaced the progress records the first indexed, and
    the first failed with an IndexError (seen in the fault campaign,
    bin/chaos.py: the migration or reconciliation was retried a second
    later, or never, see test_membership).
    """
    async with FakeCluster(("a1",), replicas=1, spare=("a2",)) as cluster:
        for i in range(KEYS):
            cluster.put("a1", b"key:%d" % i, b"v%d" % i, cluster.clock.next())
        members = dict(cluster.view.members)
        members["a2"] = Member("a2", "127.0.0.1", 7101)
        view = cluster.view.with_members(members)
        cluster.adopt(view)
        held: list[list[Any]] = []
        followers = asyncio.Event()
        waiting: list[int] = []

        async def followers_caught_up(epoch: int, timeout: float) -> None:
            waiting.append(epoch)
            if paused == "waiting-for-followers" and len(waiting) == 1:
                await followers.wait()

        def apply(msg: list[Any]) -> Reply | None:
            if paused == "applying-a-page" and not held:
                held.append(msg)
                return None  # answered below
            return Reply(0, cluster.auxes["a2"].execute(msg))

        cluster.overrides[("a2", Op.APPLY)] = apply
        config = MasterConfig(port=0, replicas=1, migration_batch=KEYS)
        migrator = Migrator(config, lambda: cluster.links, cluster.clock, followers_caught_up)
        first = asyncio.ensure_future(migrator.run(view))
        await until(lambda: held if paused == "applying-a-page" else waiting, what=paused)
        await migrator.run(view, {})  # a run with no stream starts and ends meanwhile
        if held:
            cluster.fake.respond("a2", held[0], cluster.auxes["a2"].execute(held[0]))
        followers.set()
        await asyncio.wait_for(first, 5)
        moved = [i for i in range(KEYS) if view.ring.owners(b"key:%d" % i, 1) == ["a2"]]
        assert moved and all(cluster.value("a2", b"key:%d" % i) == b"v%d" % i for i in moved)


@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_rebuilt_ring_gets_every_nodes_foreign_keys_to_their_owners(replicas: int) -> None:
    """``recover``: whatever a node holds outside its arcs reaches the owners (newer wins, tombstones included),
    and the arcs it returns per node are exactly those the node does not own."""
    async with FakeCluster(("a1", "a2", "a3"), replicas=replicas) as cluster:
        view = cluster.view
        owners = {i: view.ring.owners(b"key:%d" % i, replicas) for i in range(KEYS)}
        stale = cluster.clock.next()
        newer = cluster.clock.next()
        # Every key on a node that does not own it (the source of a migration cut short); a third of them written
        # again meanwhile, and one deleted, on their owners (as a master writes them).
        for i, own in owners.items():
            key = b"key:%d" % i
            cluster.put(next(n for n in ("a1", "a2", "a3") if n not in own), key, b"old%d" % i, stale)
            for n in own:
                if i == 1:
                    cluster.auxes[n].execute([Op.DELV, 1, key, newer])
                elif i % 3 == 0:
                    cluster.put(n, key, b"new%d" % i, newer)
        config = MasterConfig(port=0, replicas=replicas, migration_batch=BATCH)
        migrator = Migrator(config, lambda: cluster.links, cluster.clock, nobody_to_wait_for)
        foreign = await migrator.recover(view)
        for i, own in owners.items():
            want = None if i == 1 else b"new%d" % i if i % 3 == 0 else b"old%d" % i
            assert [cluster.value(n, b"key:%d" % i) for n in own] == [want] * len(own), i
        progress = migrator.progress()
        assert progress["state"] == "idle"
        if replicas == 1:
            assert progress["keys_moved"] == KEYS
        else:  # the owners' own copies go to the other owners too (with what reached them meanwhile)
            assert progress["keys_moved"] >= KEYS * replicas
        assert set(foreign) == {"a1", "a2", "a3"}
        for n, arcs in foreign.items():
            for i in range(KEYS):
                h = hash64(b"key:%d" % i)
                assert any(in_range(h, s, e) for s, e in arcs) == (n not in view.ring.owners_for_hash(h, replicas))


async def test_a_rebuilt_ring_brings_each_owner_the_writes_it_missed() -> None:
    """``recover`` with two copies per key: an owner that missed writes (down or fenced when the old coordinator
    died, its hints gone with it) gets them from the other owner, deletes included; no owner keeps an older copy."""
    async with FakeCluster(("a1", "a2", "a3"), replicas=2) as cluster:
        view = cluster.view
        old = cluster.clock.next()
        new = cluster.clock.next()
        for i in range(KEYS):
            key = b"key:%d" % i
            behind, ahead = view.ring.owners(key, 2)[:: 1 if i % 2 else -1]
            cluster.put(behind, key, b"old%d" % i, old)
            if i % 7 == 0:
                cluster.put(ahead, key, b"old%d" % i, old)
                cluster.auxes[ahead].execute([Op.DELV, 1, key, new])
            else:
                cluster.put(ahead, key, b"new%d" % i, new)
        config = MasterConfig(port=0, replicas=2, migration_batch=BATCH)
        migrator = Migrator(config, lambda: cluster.links, cluster.clock, nobody_to_wait_for)
        await migrator.recover(view)
        for i in range(KEYS):
            want = None if i % 7 == 0 else b"new%d" % i
            assert [cluster.value(n, b"key:%d" % i) for n in view.ring.owners(b"key:%d" % i, 2)] == [want, want], i


@pytest.mark.parametrize("then", ["a fence", "a node leaving"])
async def test_the_moved_ranges_are_dropped_unless_the_ring_layout_changed_before_the_drop(then: str) -> None:
    """Between a migration's end and its drop, a fence (a new epoch, the same owners) lets the drop go on; a new layout stops it.

    Any new epoch used to stop it: the old owners kept their copies of the
    moved ranges for good, which a later change giving a range back would
    serve again (a delete whose tombstone expired since, resurrected).
    """
    async with FakeCluster(("a1", "a2", "a3"), replicas=2, spare=("a4",)) as cluster:
        keys = [b"key:%d" % i for i in range(KEYS)]
        for key in keys:
            version = cluster.clock.next()
            for n in cluster.view.ring.owners(key, 2):
                cluster.put(n, key, key + b"-value", version)
        members = dict(cluster.view.members)
        members["a4"] = Member("a4", "127.0.0.1", 7103)
        view = cluster.view.with_members(members)
        cluster.adopt(view)
        config = MasterConfig(port=0, replicas=2, migration_batch=BATCH, follow_interval=0.01, aux_timeout=0.05)
        migrator = Migrator(config, lambda: cluster.links, cluster.clock, nobody_to_wait_for)
        await migrator.run(view)
        done = view.migration_done()
        current = [done]
        migrator.schedule_drop(view, lambda: current[0])
        changed = dict(done.members)
        if then == "a fence":
            changed["a1"] = Member("a1", "127.0.0.1", 7100, 1.0, FENCED)
            current[0] = done.with_members(changed, migrate=False)
            assert current[0].epoch > view.epoch and current[0].ring.nodes == view.ring.nodes
        else:
            del changed["a2"]
            current[0] = done.with_members(changed)
        await until(lambda: not migrator._drops, what="the drop")
        assert view.prev_ring is not None
        left = [
            (n, k) for k in keys for n in view.prev_ring.owners(k, 2) if n not in view.ring.owners(k, 2) and cluster.value(n, k) is not None
        ]
        moved = [k for k in keys if view.prev_ring.owners(k, 2) != view.ring.owners(k, 2)]
        assert moved
        if then == "a fence":
            assert left == [], left[:5]
        else:
            assert len(left) == len(moved)  # every old owner keeps what it held
        for k in keys:
            assert all(cluster.value(n, k) == k + b"-value" for n in view.ring.owners(k, 2))


def _fenced_empty_a3_while_a4_joins(cluster: FakeCluster) -> tuple[ClusterView, list[bytes]]:
    """a1-a3 hold every key on its two owners; a3 restarts empty and is fenced; a4 joins. Returns the view and the keys.

    The seed-15 schedule of bin/chaos.py: ``aux-kill-fast`` of a3 with ``aux-join`` of a4.
    """
    keys = [b"key:%d" % i for i in range(KEYS)]
    for key in keys:
        version = cluster.clock.next()
        for n in cluster.view.ring.owners(key, 2):
            if n != "a3":  # a3 lost everything in its restart
                cluster.put(n, key, key + b"-value", version)
    members = dict(cluster.view.members)
    a3 = members["a3"]
    members["a3"] = Member("a3", a3.host, a3.port, a3.weight, FENCED)
    members["a4"] = Member("a4", "127.0.0.1", 7103)
    view = cluster.view.with_members(members)
    cluster.adopt(view)
    assert view.prev_ring is not None and not view.settling
    return view, keys


async def test_a_migration_copies_from_a_previous_owner_that_is_not_fenced() -> None:
    """Where a range's first previous owner is fenced (it may have restarted with less), another one is the source.

    Copied from the fenced node, the keys a4 gains from a3's ranges reached
    it empty: once reads moved to the new owners they answered None (21
    stale reads in the fault campaign), and the old owners' copies were then
    dropped.
    """
    async with FakeCluster(("a1", "a2", "a3"), replicas=2, spare=("a4",)) as cluster:
        view, keys = _fenced_empty_a3_while_a4_joins(cluster)
        config = MasterConfig(port=0, replicas=2, migration_batch=BATCH)
        migrator = Migrator(config, lambda: cluster.links, cluster.clock, nobody_to_wait_for)
        plan = migrator.plan(view)
        assert plan and all(src != "a3" for src, _ in plan)
        await migrator.run(view, plan)
        gained = [k for k in keys if "a4" in view.ring.owners(k, 2)]
        assert gained and [cluster.value("a4", k) for k in gained] == [k + b"-value" for k in gained]


async def test_a_node_fenced_during_a_copy_is_reconciled_from_the_previous_owners() -> None:
    """A fenced node's reconciliation, while a migration copies, takes what it owns from the previous ring's owners.

    Its co-owners in the new ring may be new owners still waiting for their
    copy: reconciled from them, the node came back with nothing for those
    keys, and reads (which go to the previous owners while the copy runs)
    answered None.
    """
    async with FakeCluster(("a1", "a2", "a3"), replicas=2, spare=("a4",)) as cluster:
        view, keys = _fenced_empty_a3_while_a4_joins(cluster)
        config = MasterConfig(port=0, replicas=2, migration_batch=BATCH)
        migrator = Migrator(config, lambda: cluster.links, cluster.clock, nobody_to_wait_for)
        await migrator.run(view, migrator.plan_fence(view, "a3"))  # before the join's copy reaches a4
        assert view.prev_ring is not None
        owned = [k for k in keys if "a3" in view.ring.owners(k, 2) or "a3" in view.prev_ring.owners(k, 2)]
        assert owned and [cluster.value("a3", k) for k in owned] == [k + b"-value" for k in owned]


async def test_a_fenced_node_outside_a_migration_is_reconciled_from_its_co_owners_only() -> None:
    """Outside a migration a fenced node's ranges come from its co-owners, never from a node that does not own them."""
    async with FakeCluster(("a1", "a2", "a3", "a4"), replicas=2) as cluster:
        members = dict(cluster.view.members)
        members["a3"] = Member("a3", "127.0.0.1", 7102, 1.0, FENCED)
        members["a1"] = Member("a1", "127.0.0.1", 7100, 1.0, DOWN)
        view = cluster.view.bumped(members=members)
        config = MasterConfig(port=0, replicas=2, migration_batch=BATCH)
        migrator = Migrator(config, lambda: cluster.links, cluster.clock, nobody_to_wait_for)
        plan = migrator.plan_fence(view, "a3")
        assert plan and {dst for _, dst in plan} == {"a3"}
        for (src, _), ranges in plan.items():
            assert src in ("a2", "a4")
            for _, end in ranges:  # an arc's last hash has the arc's owners
                assert src in view.ring.owners_for_hash(end, 2) and "a3" in view.ring.owners_for_hash(end, 2)
