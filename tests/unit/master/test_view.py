"""ClusterView: where reads and writes go in every member state and during a migration; transport; ordering."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache.master.view import DOWN, FENCED, LEAVING, MAX_DEPARTED, MEMBER_STATES, UP, ClusterView, Member
from dcache.ring import HashRing

KEYS = [b"key:%d" % i for i in range(300)]


def members(*ids: str, **states: str) -> list[Member]:
    return [Member(n, "10.0.0.1", 7100 + i, 1.0, states.get(n, UP)) for i, n in enumerate(ids)]


def view_of(ids: tuple[str, ...], replicas: int, **states: str) -> ClusterView:
    """A view whose ring holds ``ids`` (as if they were all up when it was built), with ``states`` applied after."""
    view = ClusterView.initial(members(*ids), replicas, epoch=5)
    if states:
        ms = {m.node_id: m for m in members(*ids, **states)}
        view = view.bumped(members=ms)  # same ring: what a mark or a fence does before any rebuild
    return view


def state_of(view: ClusterView, node: str) -> str:
    return view.members[node].state


# -- every member up --------------------------------------------------------------


def test_all_up_reads_and_writes_go_to_the_ring_owners_in_order() -> None:
    view = view_of(("a1", "a2", "a3", "a4"), 2)
    for key in KEYS:
        owners = view.ring.owners(key, 2)
        assert view.read_candidates(key) == owners
        assert view.write_targets(key) == owners
        assert len(set(owners)) == 2


def test_replicas_above_the_member_count_give_every_member_once() -> None:
    view = view_of(("a1", "a2"), 3)
    for key in KEYS[:20]:
        assert sorted(view.read_candidates(key)) == ["a1", "a2"]
        assert sorted(view.write_targets(key)) == ["a1", "a2"]


def test_an_empty_view_routes_nowhere() -> None:
    view = ClusterView.initial([], 2, epoch=1)
    assert view.read_candidates(b"k") == []
    assert view.write_targets(b"k") == []


# -- down, fenced, leaving ----------------------------------------------------


def test_a_down_node_gets_neither_reads_nor_writes() -> None:
    view = view_of(("a1", "a2", "a3"), 2, a2=DOWN)
    for key in KEYS:
        owners = view.ring.owners(key, 2)
        live = [n for n in owners if n != "a2"]
        assert view.read_candidates(key) == live
        assert view.write_targets(key) == live
    assert not view.is_live("a2") and view.is_live("a1") and not view.is_live("nobody")


def test_every_owner_down_routes_nowhere() -> None:
    view = view_of(("a1", "a2"), 2, a1=DOWN, a2=DOWN)
    for key in KEYS[:20]:
        assert view.read_candidates(key) == []
        assert view.write_targets(key) == []


def test_a_fenced_node_is_written_but_not_read_while_another_owner_can_serve() -> None:
    view = view_of(("a1", "a2", "a3"), 2, a1=FENCED)
    fenced_keys = [k for k in KEYS if "a1" in view.ring.owners(k, 2)]
    assert fenced_keys
    for key in fenced_keys:
        owners = view.ring.owners(key, 2)
        assert view.read_candidates(key) == [n for n in owners if n != "a1"]
        assert view.write_targets(key) == owners


def test_a_fenced_node_that_is_the_only_live_owner_is_read_rather_than_nothing() -> None:
    view = view_of(("a1", "a2"), 2, a1=FENCED, a2=DOWN)
    for key in KEYS[:20]:
        assert view.read_candidates(key) == ["a1"]
        assert view.write_targets(key) == ["a1"]


def test_rebuilding_the_ring_keeps_fenced_nodes_in_it_and_drops_down_and_leaving_ones() -> None:
    view = view_of(("a1", "a2", "a3", "a4"), 2)
    ms = {m.node_id: m for m in members("a1", "a2", "a3", "a4", a1=FENCED, a2=DOWN, a3=LEAVING)}
    after = view.with_members(ms)
    assert set(after.ring.nodes) == {"a1", "a4"}


# -- migration --------------------------------------------------------------------


def test_with_members_starts_a_migration_from_the_current_ring() -> None:
    view = view_of(("a1", "a2", "a3"), 2)
    ms = {m.node_id: m for m in members("a1", "a2", "a3", "a4")}
    moving = view.with_members(ms)
    assert (moving.epoch, moving.seq) == (view.epoch + 1, 0)
    assert moving.prev_ring == view.ring
    assert set(moving.ring.nodes) == {"a1", "a2", "a3", "a4"}
    assert moving.ring.epoch == moving.epoch
    moved = 0
    for key in KEYS:
        old = view.ring.owners(key, 2)
        new = moving.ring.owners(key, 2)
        # the previous owners hold everything: they are read until the data moved
        assert moving.read_candidates(key) == old
        # every write reaches both: the new owners first, then the old ones not among them
        assert moving.write_targets(key) == new + [n for n in old if n not in new]
        moved += old != new
    assert moved  # some keys change owners, or this test proves nothing


def test_a_second_change_during_a_migration_keeps_its_source_ring() -> None:
    view = view_of(("a1", "a2", "a3"), 2)
    first = view.with_members({m.node_id: m for m in members("a1", "a2", "a3", "a4")})
    second = first.with_members({m.node_id: m for m in members("a1", "a2", "a3", "a4", "a5")})
    assert second.prev_ring == view.ring  # what the nodes hold is still the original ring's layout


def test_a_change_while_a_migration_settles_keeps_writing_the_owners_masters_read() -> None:
    """A join while the last migration settles: every owner a master on the settling view reads is still written.

    The new view went back to the settling migration's source ring: the
    owners of the settling ring (whose copy was done, and which masters
    read) stopped getting writes, and a master still on the settling view
    read a value older than an acknowledged delete there (the fault
    campaign, bin/chaos.py: ``link-cut,a3,0,0.88;aux-join,a4,2.19,0``).
    """
    view = view_of(("a1", "a2", "a3"), 2)
    down = view.with_members({m.node_id: m for m in members("a1", "a2", "a3", a3=DOWN)})
    settling = down.migration_settling()
    joined = settling.with_members({m.node_id: m for m in members("a1", "a2", "a3", "a4", a3=DOWN)})
    assert joined.prev_ring == settling.ring and not joined.settling
    for key in KEYS:
        assert set(settling.read_candidates(key)) <= set(joined.write_targets(key)), key
        assert set(joined.read_candidates(key)) <= set(joined.write_targets(key)), key


def test_a_change_that_keeps_the_ring_members_starts_no_migration() -> None:
    view = view_of(("a1", "a2", "a3"), 2)
    ms = dict(view.members)
    ms["a2"] = Member("a2", "10.0.0.9", 9999)  # moved address, same ring
    after = view.with_members(ms)
    assert after.prev_ring is None
    assert after.epoch == view.epoch + 1


def test_without_migrate_the_ring_changes_at_once() -> None:
    view = view_of(("a1", "a2", "a3"), 2)
    after = view.with_members({m.node_id: m for m in members("a1", "a2")}, migrate=False)
    assert after.prev_ring is None
    for key in KEYS[:50]:
        assert after.read_candidates(key) == after.ring.owners(key, 2)


def test_a_leaving_node_still_serves_reads_until_its_data_moved() -> None:
    view = view_of(("a1", "a2", "a3"), 1)
    leaving = view.with_members({m.node_id: m for m in members("a1", "a2", "a3", a3=LEAVING)})
    assert "a3" not in leaving.ring
    keys = [k for k in KEYS if view.ring.owners(k, 1) == ["a3"]]
    assert keys
    for key in keys:
        new_owner = leaving.ring.owners(key, 1)
        assert leaving.read_candidates(key) == ["a3"]
        assert leaving.write_targets(key) == [*new_owner, "a3"]
    done = leaving.migration_done()
    assert (done.epoch, done.seq, done.prev_ring) == (leaving.epoch, leaving.seq + 1, None)
    for key in keys:
        assert done.read_candidates(key) == done.ring.owners(key, 1)


def test_during_a_migration_down_previous_owners_fall_back_to_the_new_ring() -> None:
    view = view_of(("a1", "a2", "a3"), 1)
    ms = {m.node_id: m for m in members("a1", "a2", "a3", "a4")}
    moving = view.with_members(ms)
    keys = [k for k in KEYS if view.ring.owners(k, 1) == ["a1"] and moving.ring.owners(k, 1) != ["a1"]]
    assert keys
    ms["a1"] = Member("a1", "10.0.0.1", 7100, 1.0, DOWN)
    broken = moving.bumped(members=ms)
    assert broken.prev_ring == view.ring
    for key in keys:
        assert broken.read_candidates(key) == broken.ring.owners(key, 1)
        assert "a1" not in broken.write_targets(key)


# -- seq, epoch, transport -------------------------------------------------------------


def test_newer_than_orders_by_epoch_then_seq() -> None:
    v = view_of(("a1",), 1)
    assert v.bumped().newer_than(v)
    assert not v.newer_than(v)
    assert not v.newer_than(v.bumped())
    later_epoch = v.with_members(dict(v.members))
    assert later_epoch.seq == 0
    assert later_epoch.newer_than(v.bumped().bumped())


def test_to_dict_from_dict_round_trips_through_msgpack_with_a_migration_and_every_state() -> None:
    view = view_of(("a1", "a2", "a3", "a4"), 2)
    ms = {m.node_id: m for m in members("a1", "a2", "a3", "a4", "a5", a2=FENCED, a3=LEAVING, a4=DOWN)}
    ms["a5"] = Member("a5", "::1", 7200, 2.5, UP, 1234)
    moving = view.with_members(ms)
    moving = ClusterView(moving.epoch, 3, 2, moving.members, moving.ring, moving.prev_ring, "m1")
    wire = msgpack.unpackb(msgpack.packb(moving.to_dict(), use_bin_type=True), raw=False, strict_map_key=True)
    copy = ClusterView.from_dict(wire)
    assert copy == moving  # dataclass equality: members, rings, epoch, seq, replicas, coordinator
    assert copy.members["a5"].weight == 2.5 and copy.members["a5"].since_ms == 1234
    for key in KEYS:
        assert copy.read_candidates(key) == moving.read_candidates(key)
        assert copy.write_targets(key) == moving.write_targets(key)


def test_to_dict_from_dict_without_a_migration() -> None:
    view = view_of(("a1", "a2"), 1)
    copy = ClusterView.from_dict(view.to_dict())
    assert copy == view and copy.prev_ring is None


def test_departed_names_the_nodes_that_left_until_they_come_back() -> None:
    view = view_of(("a1", "a2", "a3"), 1)
    ms = dict(view.members)
    a3 = ms.pop("a3")
    without = view.with_members(ms)
    assert without.departed == ("a3",)
    down = dict(without.members)
    down["a2"] = Member("a2", "10.0.0.1", 7101, 1.0, DOWN)
    assert without.bumped(members=down).departed == ("a3",)  # a state change is no departure
    forgotten = without.bumped(members={"a1": without.members["a1"]})  # as the end of a leave does
    assert forgotten.departed == ("a3", "a2")
    back = forgotten.with_members({**forgotten.members, "a3": a3})
    assert back.departed == ("a2",)
    assert back.settling is False and back.bumped().departed == ("a2",)  # other changes keep it


def test_departed_is_bounded_and_travels_with_the_view_and_an_older_view_has_none() -> None:
    ids = tuple(f"n{i}" for i in range(MAX_DEPARTED + 5))
    # Members down (out of the ring): a ring of 1,005 nodes takes seconds to build, and the ring plays no part here.
    view = view_of(("n0",), 1).bumped(members={m.node_id: m for m in members(*ids, **dict.fromkeys(ids[1:], DOWN))})
    left = view.with_members({"n0": view.members["n0"]})
    assert len(left.departed) == MAX_DEPARTED and left.departed[-1] == ids[-1]
    wire = msgpack.unpackb(msgpack.packb(left.to_dict(), use_bin_type=True), raw=False, strict_map_key=True)
    assert ClusterView.from_dict(wire).departed == left.departed
    older = left.to_dict()
    del older["departed"]  # a view from a 0.1.0 master
    assert ClusterView.from_dict(older).departed == ()


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d.pop("members"),
        lambda d: d.pop("epoch"),
        lambda d: d.update(epoch="soon"),
        lambda d: d.update(ring={"nodes": {}}),
        lambda d: d["members"].append({"host": "h", "port": 1}),
        lambda d: d["members"].append({"node_id": "x", "host": "h", "port": "p"}),
    ],
)
def test_from_dict_refuses_a_malformed_view(damage) -> None:
    d = view_of(("a1", "a2"), 1).to_dict()
    damage(d)
    with pytest.raises((KeyError, ValueError, TypeError)):
        ClusterView.from_dict(d)


def test_member_round_trip_and_address() -> None:
    m = Member("a1", "::1", 7100, 0.5, FENCED, 42)
    assert Member.from_dict(m.to_dict()) == m
    assert Member.from_dict({"node_id": "a1", "host": "h", "port": 1}) == Member("a1", "h", 1)
    assert Member("a1", "10.0.0.1", 7100).addr == "10.0.0.1:7100"


# -- properties over any member states ---------------------------------------------------

_IDS = ("a1", "a2", "a3", "a4", "a5")


@st.composite
def views(draw: st.DrawFn) -> ClusterView:
    n = draw(st.integers(1, len(_IDS)))
    ids = _IDS[:n]
    replicas = draw(st.integers(1, 3))
    before = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=n, unique=True))
    states = {i: draw(st.sampled_from(MEMBER_STATES)) for i in ids}
    ms = {i: Member(i, "h", 1, 1.0, states[i]) for i in ids}
    ring = HashRing({i: 1.0 for i in ids if states[i] in (UP, FENCED)}, epoch=2)
    prev = HashRing({i: 1.0 for i in before}, epoch=1) if draw(st.booleans()) else None
    return ClusterView(2, draw(st.integers(0, 3)), replicas, ms, ring, prev)


@settings(max_examples=60, deadline=None)
@given(view=views(), key=st.binary(min_size=1, max_size=8))
def test_routing_invariants_in_any_state(view: ClusterView, key: bytes) -> None:
    reads = view.read_candidates(key)
    writes = view.write_targets(key)
    assert len(set(reads)) == len(reads) and len(set(writes)) == len(writes)
    assert set(reads) <= set(writes), "every node read from is also written to"
    for node in writes:
        assert state_of(view, node) != DOWN
    live_owners = [n for n in view.ring.owners(key, view.replicas) if state_of(view, n) != DOWN] if len(view.ring) else []
    assert set(live_owners) <= set(writes), "every live owner in the current ring is written to"
    if any(state_of(view, n) != FENCED for n in reads):
        assert all(state_of(view, n) != FENCED for n in reads), "fenced nodes are not read while another can serve"
    if view.prev_ring is not None:
        old_live = [n for n in view.prev_ring.owners(key, view.replicas) if state_of(view, n) != DOWN]
        if old_live:
            assert set(reads) <= set(old_live), "during a migration the previous owners are authoritative"
    copy = ClusterView.from_dict(view.to_dict())
    assert copy.read_candidates(key) == reads and copy.write_targets(key) == writes


def test_from_dict_with_the_known_view_shares_its_ring_table():
    view = ClusterView.initial([Member(f"n{i}", "127.0.0.1", 7000 + i) for i in range(4)], 2, 1)
    bumped = view.bumped()
    copy = ClusterView.from_dict(bumped.to_dict(), view)
    assert copy == bumped and copy.read_candidates(b"k") is view.read_candidates(b"k")
    fresh = ClusterView.from_dict(bumped.to_dict())
    assert fresh == bumped and fresh.read_candidates(b"k") == view.read_candidates(b"k")


def test_membership_changes_derive_the_ring_and_its_table_from_the_rings_the_view_has():
    ids = tuple(f"a{i}" for i in range(12))  # one node of 13 is 8% of the points: derived (HashRing.from_nodes)
    view = view_of(ids, 2)
    table = view.ring.preference_table(2)
    lists = {id(p) for p in table.prefs}
    joined = view.with_members({m.node_id: m for m in members(*ids, "a12")})
    done = joined.migration_settling().migration_done()
    # the same routing as a ring built from scratch ...
    built = HashRing(dict(joined.ring.nodes), epoch=joined.epoch)
    assert joined.ring.fingerprint() == built.fingerprint()
    assert done.ring.preference_table(2).prefs == built.preference_table(2).prefs
    assert all(done.read_candidates(key) == built.owners(key, 2) for key in KEYS)
    # ... through a table patched from the previous one: most of its lists are the previous table's
    shared = sum(id(p) in lists for p in done.ring.preference_table(2).prefs)
    assert shared > len(table.prefs) // 2
    # a follower that knows the previous view derives the same ring from it
    follower = ClusterView.from_dict(msgpack.unpackb(msgpack.packb(done.to_dict()), raw=False), view)
    assert follower == done and follower.ring.fingerprint() == built.fingerprint()
    assert sum(id(p) in lists for p in follower.ring.preference_table(2).prefs) == shared
    # a node marked down leaves the ring: derived too
    down = done.with_members({m.node_id: m for m in members(*ids, "a12", a3=DOWN)}, migrate=False)
    assert down.ring.fingerprint() == HashRing(dict.fromkeys([*ids, "a12"], 1.0)).without_node("a3").fingerprint()
    assert all(down.read_candidates(key) == [n for n in built.owners(key, 3) if n != "a3"][:2] for key in KEYS)


def test_reconciling_travels_with_the_view_and_its_later_versions_and_an_older_view_has_none() -> None:
    view = view_of(("a1", "a2"), 2).bumped(reconciling=True)
    wire = msgpack.unpackb(msgpack.packb(view.to_dict(), use_bin_type=True), raw=False, strict_map_key=True)
    assert ClusterView.from_dict(wire).reconciling is True
    # A ring change during the pass keeps it (the pass starts again on the new ring); the pass's end clears it.
    assert view.with_members({m.node_id: m for m in members("a1", "a2", "a3")}).reconciling is True
    assert view.bumped(reconciling=False).reconciling is False
    older = view.to_dict()
    del older["reconciling"]  # a view from a master older than the field
    assert ClusterView.from_dict(older).reconciling is False
    # An older master reads the fields it knows by name: one it does not know is ignored, as this one ignores this.
    newer = view.to_dict() | {"a_later_field": [1, 2]}
    assert ClusterView.from_dict(newer) == view
