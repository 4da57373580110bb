"""The plan of a RESP SCAN on a master (every hash read from exactly its first read candidate) and the scan sessions."""

from __future__ import annotations

import pytest

from dcache.errors import BadArgumentsError
from dcache.master.keyscan import KEY_SCAN_TTL_S, MAX_KEY_SCANS, KeyScan, KeyScans, scan_plan
from dcache.master.view import DOWN, UP, ClusterView, Member
from dcache.ring import compile_ranges, hash64

KEYS = [b"key:%d" % i for i in range(3000)]


def members(*ids: str, **states: str) -> list[Member]:
    return [Member(n, "10.0.0.1", 7100 + i, 1.0, states.get(n, UP)) for i, n in enumerate(ids)]


class Readers:
    """Which nodes' arcs in a plan hold a key."""

    def __init__(self, plan: list[tuple[str, list[list[int]]]]) -> None:
        self.matchers = [(node, compile_ranges([(a, b) for a, b in arcs])) for node, arcs in plan]

    def __call__(self, key: bytes) -> list[str]:
        h = hash64(key)
        return [node for node, match in self.matchers if match is None or match(h)]


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_every_key_is_read_from_exactly_its_first_read_candidate(replicas: int) -> None:
    view = ClusterView.initial(members("a1", "a2", "a3", "a4"), replicas, epoch=5)
    plan = scan_plan(view, lambda n: True)
    assert [n for n, _ in plan] == ["a1", "a2", "a3", "a4"]
    readers = Readers(plan)
    for key in KEYS:
        assert readers(key) == [view.read_candidates(key)[0]]


def test_an_unusable_first_owner_hands_its_arcs_to_the_next_owner() -> None:
    view = ClusterView.initial(members("a1", "a2", "a3"), 2, epoch=5)
    plan = scan_plan(view, lambda n: n != "a2")  # suspected, or not connected
    assert [n for n, _ in plan] == ["a1", "a3"]
    readers = Readers(plan)
    for key in KEYS:
        candidates = view.read_candidates(key)
        assert readers(key) == [candidates[1] if candidates[0] == "a2" else candidates[0]]


def test_a_down_node_is_not_read_and_a_lone_node_reads_the_whole_circle() -> None:
    view = ClusterView.initial(members("a1", "a2"), 2, epoch=5)
    view = view.bumped(members={m.node_id: m for m in members("a1", "a2", a2=DOWN)})
    plan = scan_plan(view, lambda n: True)
    assert [n for n, _ in plan] == ["a1"] and all(Readers(plan)(k) == ["a1"] for k in KEYS[:200])
    lone = scan_plan(ClusterView.initial(members("a1"), 1, epoch=5), lambda n: True)
    assert lone[0][0] == "a1" and all(Readers(lone)(k) == ["a1"] for k in KEYS[:200])
    assert scan_plan(ClusterView.initial([], 1, epoch=5), lambda n: True) == []


def test_during_a_migration_keys_are_read_where_reads_go() -> None:
    view = ClusterView.initial(members("a1", "a2"), 1, epoch=5)
    moving = view.with_members({m.node_id: m for m in members("a1", "a2", "a3")})  # a3 joins: the old ring stays the read ring
    assert moving.prev_ring is not None
    plan = scan_plan(moving, lambda n: True)
    readers = Readers(plan)
    for key in KEYS:
        assert readers(key) == [moving.read_candidates(key)[0]]


def test_scans_are_numbered_bounded_and_expire() -> None:
    now = [0.0]
    scans = KeyScans(lambda: now[0])
    plan = [("a1", [[0, 0]])]
    assert scans.keep(0, KeyScan(plan, index=1)) == 0 and len(scans) == 0  # complete in one page: nothing kept
    first = scans.keep(0, KeyScan(plan))
    assert first > 0 and scans.resume(first).plan == plan
    done = scans.resume(first)
    done.index = 1
    assert scans.keep(first, done) == 0 and len(scans) == 0
    with pytest.raises(BadArgumentsError, match="invalid cursor"):
        scans.resume(first)
    cursors = [scans.keep(0, KeyScan(plan)) for _ in range(MAX_KEY_SCANS + 5)]
    assert len(scans) == MAX_KEY_SCANS and len(set(cursors)) == len(cursors)
    with pytest.raises(BadArgumentsError):
        scans.resume(cursors[0])  # the least recently used went first
    now[0] += KEY_SCAN_TTL_S + 1
    with pytest.raises(BadArgumentsError):
        scans.resume(cursors[-1])
    assert len(scans) == 0
