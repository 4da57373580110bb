"""bin/ringsim's figures against a direct recount, so the tool cannot silently report wrong numbers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dcache.master.view import ClusterView
from dcache.ring import HashRing
from dcache.tools.ringsim import JOIN_ID, collections_after, count_keys, main, measure_change, members, ownership_of, simulate

KEYS = 20_000
CHUNK = 3_001  # not a divisor of KEYS: the last chunk is short


def _recount(ring: HashRing) -> list[str]:
    """Owners of the simulated keys, through ``owner(key)`` (which hashes the key itself)."""
    return [ring.owner(b"key:%d" % i) for i in range(KEYS)]


def test_count_keys_matches_a_direct_recount():
    base = HashRing({m.node_id: m.weight for m in members(7)})
    joined, left = base.with_node(JOIN_ID), base.without_node("aux-3")
    base_owners, (on_join, on_leave) = count_keys(base, [(joined, JOIN_ID), (left, "aux-3")], KEYS, CHUNK)
    before, after_join, after_leave = _recount(base), _recount(joined), _recount(left)
    assert base_owners == Counter(before)
    assert on_join.owners == Counter(after_join)
    assert on_leave.owners == Counter(after_leave)
    assert on_join.moved == sum(a != b for a, b in zip(before, after_join, strict=True)) > 0
    assert on_leave.moved == sum(a != b for a, b in zip(before, after_leave, strict=True)) == before.count("aux-3")
    assert on_join.stray == on_leave.stray == 0
    # a change that is not about the named node: every move is a stray
    _, (other,) = count_keys(base, [(left, "aux-0")], KEYS, CHUNK)
    assert other.stray == sum(a != b and "aux-0" not in (a, b) for a, b in zip(before, after_leave, strict=True)) > 0


def test_report_is_consistent_with_a_recount():
    n = 6
    report = simulate(n, KEYS, chunk=CHUNK, replicas=2, weights=(1.0, 3.0), rounds=1, lookups=500)
    base = HashRing({m.node_id: m.weight for m in members(n)})
    shares = base.shares()
    assert report.leave.node == max(shares, key=lambda node: shares[node])
    before = _recount(base)
    after_join = _recount(base.with_node(JOIN_ID))
    after_leave = _recount(base.without_node(report.leave.node))
    assert report.join.moved == sum(a != b for a, b in zip(before, after_join, strict=True))
    assert report.leave.moved == sum(a != b for a, b in zip(before, after_leave, strict=True))
    assert report.join.fraction == report.join.moved / KEYS
    assert report.join.ideal == 1 / (n + 1) and report.leave.ideal == 1 / n
    assert report.leave.ratio == pytest.approx(report.leave.fraction * n, rel=1e-12)
    assert report.join.exact == base.with_node(JOIN_ID).shares()[JOIN_ID]
    # counted and exact agree within sampling noise (a share of 1/6 over 20k keys: sd ~0.0026)
    assert abs(report.join.fraction - report.join.exact) < 0.015
    assert abs(report.leave.fraction - report.leave.exact) < 0.015
    counts = Counter(before)
    assert report.equal.max_mean == pytest.approx(max(counts.values()) / (KEYS / n), rel=1e-12)
    assert report.equal.min_mean == pytest.approx(min(counts.values()) / (KEYS / n), rel=1e-12)
    assert report.equal.exact_max_mean == pytest.approx(max(shares.values()) * n, rel=1e-12)
    # weighted: the node of weight 3 should hold 3x a node of weight 1
    weights = {m.node_id: m.weight for m in members(n, (1.0, 3.0))}
    weighted = Counter(_recount(HashRing(weights)))
    per_weight = KEYS / sum(weights.values())
    assert report.weighted.max_mean == pytest.approx(max(weighted[node] / w / per_weight for node, w in weights.items()), rel=1e-12)
    assert report.weighted.max_mean < 1.15 and report.weighted.min_mean > 0.85
    assert report.build.points == n * base.vnodes_per_weight
    assert report.build.view_bytes > 0 and report.build.peak_bytes >= report.build.view_bytes
    assert report.lookup.lookup_ns > 0 and report.lookup.hash_ns > 0
    # the membership changes: the same join and leave, derived and built
    assert (report.join_cost.node, report.leave_cost.node) == (JOIN_ID, report.leave.node)
    for cost in (report.join_cost, report.leave_cost):
        assert cost.derive_s > 0 and cost.build_s > 0 and cost.moved_s > 0
        assert cost.ratio == cost.build_s / cost.derive_s
        assert cost.derived_bytes > 0 and cost.derive_gc_s >= 0 and cost.build_gc_s >= 0


def test_collections_after_counts_the_collections_that_walk_what_was_made():
    assert collections_after(lambda: [[i] for i in range(50_000)]) > 0


def test_measure_change_derives_the_ring_a_build_gives():
    base = HashRing({m.node_id: m.weight for m in members(9)}, epoch=4)
    nodes = {**base.nodes, JOIN_ID: 1.0}
    cost = measure_change(base, nodes, JOIN_ID, 2, 1, memory=False)
    assert cost.derived_bytes == -1 and cost.node == JOIN_ID
    derived = base.with_nodes(nodes)
    assert derived.fingerprint() == HashRing(nodes).fingerprint()
    assert derived.preference_table(2).prefs == HashRing(nodes).preference_table(2).prefs


def test_ownership_of_counts_absent_nodes_as_empty():
    assert ownership_of({"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 1.0, "c": 2.0}) == (3.0, 0.0)


def test_the_view_ringsim_times_routes_like_the_ring():
    view = ClusterView.initial(members(5), 2, 1)
    ring = view.ring
    assert all(view.read_candidates(b"key:%d" % i) == ring.owners(b"key:%d" % i, 2) for i in range(2000))
    assert view.bumped().read_candidates(b"key:1") is view.read_candidates(b"key:1")  # the table is shared


def test_main_prints_one_json_report_per_node_count(capsys):
    assert main(["--nodes", "3,4", "--keys", "500", "--chunk", "200", "--rounds", "1", "--lookups", "50", "--no-memory", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    reports = [json.loads(line) for line in lines]
    assert [r["nodes"] for r in reports] == [3, 4]
    assert all(r["keys"] == 500 and r["build"]["view_bytes"] == -1 for r in reports)
    assert all(r["join_cost"]["derived_bytes"] == -1 and r["leave_cost"]["derive_s"] > 0 for r in reports)
