"""HashRing: determinism, balance, minimal movement, preference lists, moved ranges."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import msgpack
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from dcache.errors import DCacheError
from dcache.ring import (
    MAX_RING_POINTS,
    RING_SIZE,
    VNODES_PER_WEIGHT,
    EmptyRingError,
    HashRing,
    RangeMove,
    hash64,
    in_range,
    moved_ranges,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
KEY_COUNT = 100_000
MAX_HASH = RING_SIZE - 1
SCHEMES = ["node-{}", "aux-{}.dc1"]


@cache
def _hashes() -> tuple[int, ...]:
    return tuple(hash64(b"key:%d" % i) for i in range(KEY_COUNT))


@cache
def _ring(scheme: str, n: int) -> HashRing:
    return HashRing({scheme.format(i): 1.0 for i in range(n)})


@cache
def _owner_list(scheme: str, n: int) -> tuple[str, ...]:
    owner = _ring(scheme, n).owner_for_hash
    return tuple(owner(h) for h in _hashes())


# -- hash and golden layout -------------------------------------------------


def test_hash64_is_xxh3_and_stable():
    assert hash64(b"key:0") == xxhash.xxh3_64_intdigest(b"key:0") == 12998776638210854528
    assert hash64(b"") == 3244421341483603138


def test_layout_is_pinned():
    # Changing the point scheme moves almost every key in a running cluster:
    # if this fails on purpose, the change needs a migration plan.
    ring = HashRing({"a": 1.0, "b": 1.0, "c": 2.0})
    assert ring.fingerprint() == "e3528da56ee5d86ade137d1d2b2cb54a"
    assert [ring.owner(b"key:%d" % i) for i in range(8)] == ["c", "c", "c", "c", "a", "c", "b", "c"]


# -- determinism ----------------------------------------------------------------

_SUMMARY_SCRIPT = """
import xxhash
from dcache.ring import HashRing

def summary():
    # Set iteration order over str depends on PYTHONHASHSEED.
    ids = {"node-%d" % i for i in range(7)} | {"aux-x", "b", "zz", "x#1"}
    ring = HashRing({n: 1.0 + (len(n) % 3) * 0.5 for n in ids}, epoch=3)
    owners = ";".join(",".join(ring.owners(b"key:%d" % i, 3)) for i in range(1000))
    return " ".join([
        ring.fingerprint(),
        xxhash.xxh3_64_hexdigest(repr(ring.ranges()).encode()),
        xxhash.xxh3_64_hexdigest(owners.encode()),
    ])
"""


def _summary_here() -> str:
    namespace: dict[str, object] = {}
    exec(_SUMMARY_SCRIPT, namespace)
    return namespace["summary"]()  # type: ignore[operator,no-any-return]


def test_same_ring_in_every_process():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    code = _SUMMARY_SCRIPT + "\nprint(summary())\n"
    results = set()
    for seed in ("0", "1", "4242"):
        env["PYTHONHASHSEED"] = seed
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
        results.add(out.stdout.strip())
    assert results == {_summary_here()}


def test_insertion_order_does_not_matter():
    a = HashRing({"x": 1.0, "y": 2.0, "z": 0.5})
    b = HashRing({"z": 0.5, "x": 1.0, "y": 2.0})
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert a.ranges() == b.ranges()
    assert list(a.nodes) == ["x", "y", "z"]


# -- balance and movement (100k keys) -----------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", range(3, 17))
def test_balance(scheme, n):
    counts = Counter(_owner_list(scheme, n))
    assert len(counts) == n
    ratio = max(counts.values()) / (KEY_COUNT / n)
    assert ratio <= 1.10, f"{n} nodes: max/mean = {ratio:.4f}"


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", range(3, 17))
def test_adding_a_node_moves_few_keys_and_only_onto_it(scheme, n):
    new_node = scheme.format(n)
    grown = _ring(scheme, n).with_node(new_node)
    assert grown.epoch == 1
    assert grown.fingerprint() == _ring(scheme, n + 1).fingerprint()
    before, after = _owner_list(scheme, n), _owner_list(scheme, n + 1)
    moved = [new for old, new in zip(before, after, strict=True) if old != new]
    assert set(moved) <= {new_node}
    assert len(moved) <= 1.2 / (n + 1) * KEY_COUNT, f"{n} -> {n + 1} nodes moved {len(moved)} keys"


@pytest.mark.parametrize("n", range(3, 17))
def test_removing_a_node_moves_only_its_keys(n):
    scheme = SCHEMES[0]
    gone = scheme.format(1)
    shrunk = _ring(scheme, n + 1).without_node(gone)
    assert shrunk.epoch == 1
    assert gone not in shrunk and len(shrunk) == n
    owner = shrunk.owner_for_hash
    for h, old in zip(_hashes(), _owner_list(scheme, n + 1), strict=True):
        new = owner(h)
        assert new == old or old == gone
        assert new != gone


@pytest.mark.parametrize("n", [3, 8, 16])
def test_preference_lists_change_minimally(n):
    r = 3
    old_ring = _ring(SCHEMES[0], n)
    new_node = "fresh"
    new_ring = old_ring.with_node(new_node)
    back = new_ring.without_node(new_node)
    for h in _hashes()[:20_000]:
        old, new = old_ring.owners_for_hash(h, r), new_ring.owners_for_hash(h, r)
        if new_node in new:
            # the new node is inserted somewhere, the last one falls off
            assert [x for x in new if x != new_node] == old[: r - 1]
        else:
            assert new == old
        assert back.owners_for_hash(h, r) == old  # removing it restores the list


def test_weights_scale_shares():
    ring = HashRing({"a": 1.0, "b": 2.0, "c": 1.0, "d": 1.0, "e": 0.5})
    shares = ring.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    unit = (shares["a"] + shares["c"] + shares["d"]) / 3
    assert 1.8 <= shares["b"] / unit <= 2.2
    assert 0.4 <= shares["e"] / unit <= 0.6
    counts = Counter(ring.owner_for_hash(h) for h in _hashes()[:50_000])
    assert 1.8 <= counts["b"] / ((counts["a"] + counts["c"] + counts["d"]) / 3) <= 2.2


def test_shares_match_key_counts():
    ring = _ring(SCHEMES[0], 5)
    counts = Counter(_owner_list(SCHEMES[0], 5))
    for node, share in ring.shares().items():
        assert counts[node] / KEY_COUNT == pytest.approx(share, abs=0.01)


# -- preference lists (properties) ------------------------------------------

node_ids = st.one_of(st.sampled_from(["a", "b", "c", "node-1", "node-10", "x#1", "x", "é"]), st.text(min_size=1, max_size=6))
members = st.dictionaries(node_ids, st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0]), max_size=8)
small_vnodes = st.integers(min_value=1, max_value=24)
hashes = st.integers(min_value=0, max_value=MAX_HASH)


@settings(deadline=None, max_examples=200)
@given(members, small_vnodes, st.binary(max_size=24), st.integers(min_value=1, max_value=10))
def test_owners_properties(nodes, vnodes, key, r):
    ring = HashRing(nodes, vnodes_per_weight=vnodes)
    owners = ring.owners(key, r)
    assert len(owners) == min(r, len(ring)) == len(set(owners))
    assert all(node in ring for node in owners)
    if owners:
        assert owners[0] == ring.owner(key) == ring.owner_for_hash(hash64(key))
    for k in range(1, r):
        assert ring.owners(key, k) == owners[:k]
    assert ring.owners_for_hash(hash64(key), r) == owners


@settings(deadline=None, max_examples=20)
@given(st.dictionaries(node_ids, st.sampled_from([0.5, 1.0, 2.0]), min_size=1, max_size=6), st.binary(max_size=16))
def test_owners_with_default_vnodes(nodes, key):
    ring = HashRing(nodes)
    assert ring.vnodes_per_weight == VNODES_PER_WEIGHT
    owners = ring.owners(key, len(nodes) + 2)
    assert sorted(owners) == sorted(nodes)
    assert owners[0] == ring.owner(key)


def _naive_owner(nodes: dict[str, float], vnodes: int, h: int) -> str:
    """The design note's rule from scratch: the first point clockwise with ``point >= h`` (ties: smaller id)."""
    points = sorted((hash64(b"%s#%d" % (n.encode(), i)), n) for n, w in nodes.items() for i in range(max(1, round(vnodes * w))))
    after = [p for p in points if p[0] >= h]
    return (after or points)[0][1]


@settings(deadline=None, max_examples=200)
@given(
    st.dictionaries(node_ids, st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=1, max_size=8), small_vnodes, st.lists(hashes, max_size=10)
)
def test_bucket_index_finds_the_same_owner_as_the_rule(nodes, vnodes, probes):
    ring = HashRing(nodes, vnodes_per_weight=vnodes)
    ends = [e for _, e, _ in ring.ranges()] if len(ring) > 1 else []
    # every run end, its neighbours, both ends of the circle and random hashes
    for h in {0, MAX_HASH, *probes, *ends, *(e + 1 for e in ends if e < MAX_HASH), *(e - 1 for e in ends if e)}:
        assert ring.owner_for_hash(h) == _naive_owner(nodes, vnodes, h)


@settings(deadline=None, max_examples=100)
@given(
    st.dictionaries(node_ids, st.sampled_from([0.5, 1.0, 2.0]), min_size=1, max_size=8),
    small_vnodes,
    st.lists(hashes, max_size=20),
    st.integers(1, 5),
)
def test_preference_table_answers_like_owners_for_hash(nodes, vnodes, probes, r):
    ring = HashRing(nodes, vnodes_per_weight=vnodes)
    table = ring.preference_table(r)
    ends = list(table.ends)
    for h in {0, MAX_HASH, *probes, *ends, *(e + 1 for e in ends if e < MAX_HASH)}:
        assert table.lookup(h) == ring.owners_for_hash(h, r)
    # one list per distinct preference list, and one table per ring layout
    assert len({id(p) for p in table.prefs}) == len({tuple(p) for p in table.prefs})
    assert ring.preference_table(r) is table
    assert ring.with_epoch(ring.epoch + 5).preference_table(r) is table


def test_preference_table_at_default_vnodes_and_empty():
    ring = HashRing({f"n{i}": 1.0 for i in range(12)})
    for r in (1, 2, 3):
        table = ring.preference_table(r)
        assert all(table.lookup(h) == ring.owners_for_hash(h, r) for h in _hashes()[:5000])
    assert len({id(p) for p in ring.preference_table(1).prefs}) == 12
    assert HashRing().preference_table(2).lookup(123) == []
    with pytest.raises(ValueError):
        ring.preference_table(0)


def test_owners_rejects_bad_r():
    ring = HashRing({"a": 1.0})
    with pytest.raises(ValueError):
        ring.owners(b"k", 0)
    with pytest.raises(ValueError):
        moved_ranges(ring, ring, 0)


@settings(deadline=None, max_examples=200)
@given(members, small_vnodes, st.lists(hashes, max_size=20))
def test_ranges_partition_the_ring(nodes, vnodes, probes):
    ring = HashRing(nodes, vnodes_per_weight=vnodes)
    ranges = ring.ranges()
    if not nodes:
        assert ranges == [] and ring.shares() == {}
        return
    # chained end to start, neighbours differ, ordered by end
    for (_, end, node), (start, _, next_node) in zip(ranges, ranges[1:] + ranges[:1], strict=True):
        assert end == start
        assert node != next_node or len(ranges) == 1
    assert [end for _, end, _ in ranges] == sorted(end for _, end, _ in ranges)
    edges = [e for _, e, _ in ranges]
    for h in probes + edges + [(e + 1) % RING_SIZE for e in edges] + [0, MAX_HASH]:
        containing = [node for start, end, node in ranges if in_range(h, start, end)]
        assert containing == [ring.owner_for_hash(h)]
    shares = ring.shares()
    assert set(shares) == set(nodes)
    assert sum(shares.values()) == pytest.approx(1.0)


# -- moved ranges -----------------------------------------------------------


@st.composite
def ring_pairs(draw):
    pool = draw(st.lists(node_ids, min_size=1, max_size=8, unique=True))
    weights = st.sampled_from([0.5, 1.0, 2.0])
    old = draw(st.dictionaries(st.sampled_from(pool), weights))
    new = draw(st.dictionaries(st.sampled_from(pool), weights))
    vnodes = draw(small_vnodes)
    new_vnodes = draw(st.one_of(st.just(vnodes), small_vnodes))
    return HashRing(old, vnodes_per_weight=vnodes), HashRing(new, epoch=1, vnodes_per_weight=new_vnodes)


@settings(deadline=None, max_examples=300)
@given(ring_pairs(), st.integers(min_value=1, max_value=4), st.lists(hashes, max_size=30), st.data())
def test_moved_ranges_cover_exactly_the_changed_hashes(pair, r, probes, data):
    old, new = pair
    moves = moved_ranges(old, new, r)
    edges = [e for ring in pair for _, e, _ in ring.ranges()]
    if edges:
        picked = data.draw(st.lists(st.sampled_from(edges), max_size=10))
        probes += [(e + d) % RING_SIZE for e in picked for d in (-1, 0, 1)]
    for h in [*probes, 0, MAX_HASH]:
        before = tuple(old.owners_for_hash(h, r))
        after = tuple(new.owners_for_hash(h, r))
        containing = [m for m in moves if h in m]
        if before == after:
            assert containing == []
        else:
            assert len(containing) == 1
            assert (containing[0].old_owners, containing[0].new_owners) == (before, after)
    # adjacent arcs with identical owners are merged, wrap-around included
    for a, b in zip(moves, moves[1:] + moves[:1], strict=True):
        if a.end == b.start and a is not b:
            assert (a.old_owners, a.new_owners) != (b.old_owners, b.new_owners)


def test_moved_ranges_identical_rings_move_nothing():
    ring = _ring(SCHEMES[0], 4)
    assert moved_ranges(ring, ring.with_epoch(9), 3) == []
    assert moved_ranges(HashRing(), HashRing()) == []


def test_moved_ranges_from_empty_is_whole_ring():
    new = HashRing({"a": 1.0}, vnodes_per_weight=3)
    (move,) = moved_ranges(HashRing(), new, 2)
    assert move.start == move.end  # the whole circle
    assert (move.old_owners, move.new_owners) == ((), ("a",))
    assert all(h in move for h in (0, 1, MAX_HASH, move.end))


def test_moved_ranges_on_add_all_go_to_new_node():
    old = _ring(SCHEMES[0], 5)
    new = old.with_node("fresh")
    moves = moved_ranges(old, new)
    assert moves and all(m.new_owners == ("fresh",) for m in moves)
    moved_space = sum((m.end - m.start) % RING_SIZE for m in moves) / RING_SIZE
    assert moved_space == pytest.approx(new.shares()["fresh"])
    assert isinstance(moves[0], RangeMove)
    with pytest.raises(AttributeError):
        moves[0].start = 0  # type: ignore[misc]


def test_in_range():
    assert in_range(5, 4, 5) and not in_range(4, 4, 5) and not in_range(6, 4, 5)
    assert in_range(0, MAX_HASH - 1, 3) and in_range(MAX_HASH, MAX_HASH - 1, 3) and in_range(3, MAX_HASH - 1, 3)
    assert not in_range(4, MAX_HASH - 1, 3) and not in_range(MAX_HASH - 1, MAX_HASH - 1, 3)
    assert in_range(123, 7, 7)  # start == end: the whole circle


# -- epochs, transport, construction ---------------------------------------------


def test_epochs():
    ring = HashRing({"a": 1.0}, epoch=5)
    grown = ring.with_node("b", 2.0)
    assert grown.epoch == 6 and grown.nodes == {"a": 1.0, "b": 2.0}
    reweighted = grown.with_node("b", 1.0)
    assert reweighted.epoch == 7 and reweighted.nodes["b"] == 1.0
    shrunk = reweighted.without_node("a")
    assert shrunk.epoch == 8 and list(shrunk.nodes) == ["b"]
    assert ring.epoch == 5 and list(ring.nodes) == ["a"]  # the original is unchanged
    with pytest.raises(KeyError):
        ring.without_node("zz")
    moved = grown.with_epoch(42)
    assert moved.epoch == 42 and moved.fingerprint() == grown.fingerprint() and moved != grown
    assert moved.with_epoch(6) == grown
    with pytest.raises(ValueError):
        ring.with_epoch(-1)


@pytest.mark.parametrize(
    "dumps, loads",
    [(json.dumps, json.loads), (msgpack.packb, lambda b: msgpack.unpackb(b, raw=False, strict_map_key=True))],
)
def test_to_dict_round_trip(dumps, loads):
    ring = HashRing({"a": 1.0, "node-2": 2.5, "é": 0.5}, epoch=17, vnodes_per_weight=300)
    data = ring.to_dict()
    assert data == {"epoch": 17, "nodes": {"a": 1.0, "node-2": 2.5, "é": 0.5}, "vnodes_per_weight": 300}
    back = HashRing.from_dict(loads(dumps(data)))
    assert back == ring and hash(back) == hash(ring)
    assert back.fingerprint() == ring.fingerprint() and back.ranges() == ring.ranges()
    assert HashRing.from_dict(HashRing().to_dict()) == HashRing()


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"epoch": 1, "nodes": {}},
        {"epoch": "1", "nodes": {}, "vnodes_per_weight": 10},
        {"epoch": 1, "nodes": [], "vnodes_per_weight": 10},
        {"epoch": 1, "nodes": {"a": "1"}, "vnodes_per_weight": 10},
        {"epoch": 1, "nodes": {"a": -1.0}, "vnodes_per_weight": 10},
        {"epoch": 1, "nodes": {"a": 1.0}, "vnodes_per_weight": 0},
        {"epoch": -1, "nodes": {"a": 1.0}, "vnodes_per_weight": 10},
        [1, 2, 3],
    ],
)
def test_from_dict_rejects_bad_data(data):
    with pytest.raises(ValueError):
        HashRing.from_dict(data)


def test_constructor_validation():
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            HashRing({"a": weight})
    with pytest.raises(TypeError):
        HashRing({"a": True})
    with pytest.raises(ValueError):
        HashRing({"": 1.0})
    with pytest.raises(ValueError):
        HashRing({1: 1.0})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        HashRing({"a": 1.0}, vnodes_per_weight=0)
    with pytest.raises(ValueError):
        HashRing({"a": 1.0}, epoch=-1)
    with pytest.raises(TypeError):
        HashRing({"a": 1.0}, epoch=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HashRing({"a": MAX_RING_POINTS / VNODES_PER_WEIGHT + 1})
    assert HashRing({"a": 1e-9}, vnodes_per_weight=4).ranges()  # at least one point


def test_empty_ring():
    ring = HashRing()
    assert len(ring) == 0 and "a" not in ring
    with pytest.raises(EmptyRingError) as info:
        ring.owner(b"k")
    assert isinstance(info.value, LookupError) and isinstance(info.value, DCacheError)
    with pytest.raises(EmptyRingError):
        ring.owner_for_hash(0)
    assert ring.owners(b"k", 3) == [] and ring.ranges() == [] and ring.shares() == {}


def test_single_node_owns_everything():
    ring = HashRing({"solo": 1.0})
    ((start, end, node),) = ring.ranges()
    assert start == end and node == "solo"
    assert ring.shares() == {"solo": 1.0}
    assert ring.owners(b"k", 3) == ["solo"]


def test_ring_is_immutable():
    ring = HashRing({"a": 1.0, "b": 1.0})
    with pytest.raises(AttributeError):
        ring._epoch = 3
    with pytest.raises(AttributeError):
        ring.epoch = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ring.nodes["c"] = 1.0  # type: ignore[index]
    assert copy.copy(ring) is ring and copy.deepcopy(ring) is ring
    assert pickle.loads(pickle.dumps(ring)) == ring
    assert "epoch=0" in repr(ring)


def test_from_dict_reuses_a_known_layout():
    ring = HashRing({"a": 1.0, "b": 2.0}, epoch=3)
    table = ring.preference_table(2)
    again = HashRing.from_dict({"epoch": 5, "nodes": {"b": 2, "a": 1.0}, "vnodes_per_weight": VNODES_PER_WEIGHT}, [None, ring])
    assert again == ring.with_epoch(5) and again.preference_table(2) is table
    assert HashRing.from_dict(ring.to_dict(), [ring]) is ring
    other = HashRing.from_dict({"epoch": 5, "nodes": {"a": 1.0, "b": 1.0}, "vnodes_per_weight": VNODES_PER_WEIGHT}, [ring])
    assert other.preference_table(2) is not table and other.fingerprint() == HashRing({"a": 1.0, "b": 1.0}).fingerprint()
    with pytest.raises(ValueError):
        HashRing.from_dict({"epoch": -1, "nodes": {"a": 1.0, "b": 2.0}, "vnodes_per_weight": VNODES_PER_WEIGHT}, [ring])
