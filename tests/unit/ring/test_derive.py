"""Derived rings (``with_nodes``, ``from_nodes``) and ``moved_ranges`` between them: identical to a build.

A derived ring patches the old ring's runs, bucket index and memoized
preference tables around the points that changed. Every property here
compares it with ``HashRing(nodes)`` built from scratch: the run ends and
owners, the bucket index, every memoized table's lists, the fingerprint, and
``moved_ranges`` against the plain definition (every run end of both rings).
Small ``vnodes_per_weight`` makes runs of several points common; a coarse
point hash makes exact collisions (ties broken by node id) common too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache.ring import DERIVE_MAX_CHANGED, RING_SIZE, HashRing, RangeMove, hashring, moved_ranges

MAX_HASH = RING_SIZE - 1
POOL = ["a", "b", "c", "x", "x#1", "node-1", "node-10", "é"]
weights = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0])


def layout(ring: HashRing) -> tuple[list[int], list[int], int, list[str]]:
    """Run ends, bucket index, shift and run owners, through the public table of ``r = 1``."""
    table = ring.preference_table(1)
    return list(table.ends), list(table.starts), table.shift, [pref[0] for pref in table.prefs]


def assert_same_as_built(ring: HashRing, memoized: tuple[int, ...]) -> HashRing:
    """Check ``ring`` against a build of its members; return the build."""
    built = HashRing(dict(ring.nodes), epoch=ring.epoch, vnodes_per_weight=ring.vnodes_per_weight)
    assert ring == built and ring.fingerprint() == built.fingerprint()
    for r in memoized:  # patched (or, when min(r, len) changed, built on demand): same lists either way
        table, expected = ring.preference_table(r), built.preference_table(r)
        assert table.prefs == expected.prefs, f"r={r}"
        assert (list(table.ends), list(table.starts), table.shift) == (list(expected.ends), list(expected.starts), expected.shift)
    assert layout(ring) == layout(built)
    return built


def reference_moved_ranges(old: HashRing, new: HashRing, r: int) -> list[RangeMove]:
    """``moved_ranges`` by its definition: the preference lists at every run end of both rings."""
    bounds = sorted({*old.preference_table(1).ends, *new.preference_table(1).ends})
    if not bounds:
        return []
    label = [(tuple(old.owners_for_hash(b, r)), tuple(new.owners_for_hash(b, r))) for b in bounds]
    arcs = [((bounds[i - 1] if i else bounds[-1]), bounds[i], label[i]) for i in range(len(bounds))]
    merged: list[tuple[int, int, tuple[tuple[str, ...], tuple[str, ...]]]] = []
    for arc in arcs:
        if merged and merged[-1][2] == arc[2]:
            merged[-1] = (merged[-1][0], arc[1], arc[2])
        else:
            merged.append(arc)
    if len(merged) > 1 and merged[0][2] == merged[-1][2]:
        last = merged.pop()
        merged[0] = (last[0], merged[0][1], last[2])
    return [RangeMove(start, end, before, after) for start, end, (before, after) in merged if before != after]


@contextmanager
def coarse_points(bits: int) -> Iterator[None]:
    """Keep only the top ``bits`` bits of every point, so that points of different nodes collide often."""
    real = hashring._label_hashes
    drop = 64 - bits

    def coarse(node_id: str, start: int, stop: int) -> list[int]:
        return [h >> drop << drop for h in real(node_id, start, stop)]

    with mock.patch.object(hashring, "_label_hashes", coarse):
        yield


@st.composite
def changes(draw: st.DrawFn) -> list[dict[str, float]]:
    """A start membership and the memberships after each step: joins, leaves, re-weights, several at once."""
    nodes = draw(st.dictionaries(st.sampled_from(POOL), weights, max_size=5))
    steps = [dict(nodes)]
    for _ in range(draw(st.integers(1, 6))):
        nodes = dict(nodes)
        kind = draw(st.sampled_from(["join", "leave", "reweight", "several"]))
        if kind == "join" or (kind in ("leave", "reweight") and not nodes):
            nodes[draw(st.sampled_from(POOL))] = draw(weights)
        elif kind == "leave":
            del nodes[draw(st.sampled_from(sorted(nodes)))]
        elif kind == "reweight":
            nodes[draw(st.sampled_from(sorted(nodes)))] = draw(weights)
        else:
            for node in draw(st.lists(st.sampled_from(POOL), min_size=2, max_size=4, unique=True)):
                if draw(st.booleans()):
                    nodes[node] = draw(weights)
                else:
                    nodes.pop(node, None)
        steps.append(nodes)
    return steps


def run_sequence(steps: list[dict[str, float]], vnodes: int, memoized: tuple[int, ...], probes: list[int]) -> None:
    ring = HashRing(steps[0], epoch=3, vnodes_per_weight=vnodes)
    for r in memoized:
        ring.preference_table(r)
    for nodes in steps[1:]:
        derived = ring.with_nodes(nodes)
        assert derived.epoch == ring.epoch + 1
        built = assert_same_as_built(derived, memoized)
        for r in (1, 2, 3, 4):
            assert moved_ranges(ring, derived, r) == moved_ranges(ring, built, r) == reference_moved_ranges(ring, built, r)
            table = derived.preference_table(r)
            for h in {0, MAX_HASH, *probes, *table.ends, *(e + 1 for e in table.ends if e < MAX_HASH)}:
                assert table.lookup(h) == derived.owners_for_hash(h, r) == built.owners_for_hash(h, r)
        ring = derived


@settings(deadline=None, max_examples=300)
@given(changes(), st.integers(1, 12), st.sampled_from([(), (1,), (2,), (1, 2, 3), (3, 4)]), st.lists(st.integers(0, MAX_HASH), max_size=8))
def test_a_derived_ring_is_the_ring_built_from_scratch(steps, vnodes, memoized, probes):
    run_sequence(steps, vnodes, memoized, probes)


@settings(deadline=None, max_examples=200)
@given(changes(), st.integers(1, 8), st.sampled_from([(1, 2), (2, 3)]), st.integers(2, 6))
def test_a_derived_ring_is_the_ring_built_from_scratch_when_points_collide(steps, vnodes, memoized, bits):
    with coarse_points(bits):
        run_sequence(steps, vnodes, memoized, [])


def test_derivation_patches_the_tables_it_had_and_shares_their_lists():
    nodes = {f"n{i}": 1.0 for i in range(40)}
    ring = HashRing(nodes, vnodes_per_weight=64)
    pair_lists = {id(p) for p in ring.preference_table(2).prefs}
    joined = ring.with_node("n-new", 1.5)
    assert_same_as_built(joined, (2,))
    shared = sum(id(p) in pair_lists for p in joined.preference_table(2).prefs)
    assert shared > 0.9 * len(joined.preference_table(2).prefs)  # only the lists around the new points are new
    left = joined.without_node("n7")
    assert_same_as_built(left, (2,))
    reweighted = left.with_nodes({**left.nodes, "n3": 2.5}, epoch=9)
    assert reweighted.epoch == 9
    assert_same_as_built(reweighted, (2,))


def test_a_change_of_weight_that_keeps_every_point_count_keeps_the_layout():
    ring = HashRing({"a": 1.0, "b": 2.0}, vnodes_per_weight=10)
    table = ring.preference_table(2)
    same = ring.with_nodes({"a": 1.01, "b": 2.0})  # still 10 points for "a"
    assert same.nodes["a"] == 1.01 and same.preference_table(2) is table
    assert same.fingerprint() == HashRing({"a": 1.01, "b": 2.0}, vnodes_per_weight=10).fingerprint()


def test_derivations_from_and_to_empty_rings():
    empty = HashRing(vnodes_per_weight=5)
    one = empty.with_node("a")
    assert_same_as_built(one, (1, 2))
    assert_same_as_built(one.without_node("a"), (1, 2))
    assert len(one.with_nodes({"b": 1.0, "c": 2.0})) == 2


def test_with_nodes_validates_like_the_constructor():
    ring = HashRing({"a": 1.0})
    with pytest.raises(ValueError):
        ring.with_nodes({"a": 0.0})
    with pytest.raises(ValueError):
        ring.with_nodes({"": 1.0})
    with pytest.raises(TypeError):
        ring.with_nodes({"a": "1"})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        ring.with_nodes({"a": 1.0}, epoch=-1)
    with pytest.raises(ValueError):
        ring.with_nodes({"a": 1.0, "b": 2000.0})  # more than MAX_RING_POINTS


@settings(deadline=None, max_examples=100)
@given(st.dictionaries(st.sampled_from(POOL), weights, min_size=1, max_size=6), changes(), st.integers(1, 12))
def test_from_nodes_reuses_or_derives_from_the_closest_known_ring(start, steps, vnodes):
    known = [None, HashRing(start, vnodes_per_weight=vnodes), HashRing(steps[0], vnodes_per_weight=vnodes), HashRing(start)]
    for ring in known[1:3]:
        assert ring is not None
        ring.preference_table(2)
    for epoch, nodes in enumerate(steps[1:], start=1):
        ring = HashRing.from_nodes(nodes, epoch=epoch, vnodes_per_weight=vnodes, known=known)
        assert ring.epoch == epoch
        assert_same_as_built(ring, (2,))
        same = [k for k in known[1:3] if k is not None and k.nodes == nodes]
        if same:  # the same members: a layout and its table are reused
            assert any(ring.preference_table(2) is k.preference_table(2) for k in same)


def test_from_nodes_builds_when_too_much_changed():
    old = HashRing({f"n{i}": 1.0 for i in range(4)}, vnodes_per_weight=32)
    table = old.preference_table(2)
    # 2 of 5 nodes differ: 40% of the points, more than DERIVE_MAX_CHANGED
    assert DERIVE_MAX_CHANGED < 0.4
    built = HashRing.from_nodes({"n0": 1.0, "n1": 1.0, "n2": 1.0, "m": 1.0, "k": 1.0}, vnodes_per_weight=32, known=[old])
    assert all(id(p) not in {id(q) for q in table.prefs} for p in built.preference_table(2).prefs)
    assert_same_as_built(built, (2,))


@pytest.mark.parametrize("vnodes", [1, 2])
def test_moved_ranges_between_tiny_rings_match_the_definition(vnodes):
    # every join and leave among up to 6 nodes of 1-2 points, for every r: walks that go
    # around the whole circle, windows at both ends, rings of one or two runs
    pool = POOL[:6]
    for size in range(1, 6):
        for start in itertools.combinations(pool, size):
            old = HashRing(dict.fromkeys(start, 1.0), vnodes_per_weight=vnodes)
            targets = [set(start) | {node} for node in pool if node not in start]
            targets += [set(start) - {node} for node in start if len(start) > 1]
            for nodes in targets:
                new = old.with_nodes(dict.fromkeys(nodes, 1.0))
                for r in range(1, 6):
                    assert moved_ranges(old, new, r) == reference_moved_ranges(old, new, r), (start, sorted(nodes), r)
