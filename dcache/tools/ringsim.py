"""``bin/ringsim``: the real ring and cluster view at 10 to 1,000 aux nodes, with no processes.

For each node count ``N`` it builds ``HashRing``/``ClusterView`` exactly as a
master does (``ClusterView.initial``: the ring, then the preference table
the router looks keys up in) and reports:

* movement: the share of keys whose primary owner changes when node
  ``ringsim-new`` joins, and when the node owning the largest share leaves
  (the worst leave), against the ideal ``1/(N+1)`` and ``1/N``; plus the
  keys that moved anywhere but onto the joining node / off the leaving one
  (consistent hashing promises none);
* ownership: max/mean and min/mean of each node's load divided by its weight,
  with every weight 1 and with the ``--weights`` pattern; both exact (the
  hash-space share, ``HashRing.shares``) and counted over the simulated keys;
* the time to build a view (``ClusterView.initial``) and to replace it by one
  with the same ring (``ClusterView.bumped``: a health or migration change),
  and the memory both hold (``tracemalloc``: retained and peak);
* the cost of a membership change: the join and the leave above made as a
  master makes them, derived from the previous ring and its preference
  table (``HashRing.with_nodes``: the ring and its patched table), next to
  building both from scratch, with the memory the derived ring holds beyond
  what it shares with the previous one, the time the garbage collector then
  spends walking each while it is young, and ``moved_ranges`` between the
  two rings (the migration's plan);
* the cost of one lookup with the master's hot-path function
  (``ClusterView.read_candidates``), next to ``hash64`` alone, timed in the
  same run.

Keys are ``b"key:%d" % i`` for ``i < --keys``, hashed with the ring's own
``hash64`` in chunks of ``--chunk`` keys, so memory stays bounded at 10M
keys. Counting is exact, not sampled; the counted shares still differ from
the exact ones by sampling noise, about ``sqrt(N / keys)`` relative per node
(1% at 1,000 nodes and 10M keys), which the counted max/mean includes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial

from ..master.view import ClusterView, Member
from ..ring import HashRing, PreferenceTable, hash64, moved_ranges

__all__ = [
    "JOIN_ID",
    "BuildCost",
    "ChangeCost",
    "collections_after",
    "Count",
    "LookupCost",
    "Movement",
    "Ownership",
    "Report",
    "count_keys",
    "key_hashes",
    "main",
    "measure_build",
    "measure_change",
    "measure_lookup",
    "members",
    "node_ids",
    "ownership_of",
    "simulate",
]

#: Id of the node that joins in the join scenario.
JOIN_ID = "ringsim-new"


def node_ids(n: int) -> list[str]:
    """``n`` node ids shaped like real ones (``aux-0`` ... ``aux-{n-1}``)."""
    return [f"aux-{i}" for i in range(n)]


def members(n: int, weights: Sequence[float] = (1.0,)) -> list[Member]:
    """``n`` up members; node ``i`` has weight ``weights[i % len(weights)]``."""
    return [Member(node, "10.0.0.1", 7000 + i, weights[i % len(weights)]) for i, node in enumerate(node_ids(n))]


def key_hashes(start: int, stop: int) -> list[int]:
    """The ring hashes of the simulated keys ``b"key:%d" % i`` for ``start <= i < stop``."""
    return [hash64(b"key:%d" % i) for i in range(start, stop)]


def _chunks(keys: int, chunk: int) -> Iterator[list[int]]:
    for start in range(0, keys, chunk):
        yield key_hashes(start, min(keys, start + chunk))


@dataclass(frozen=True, slots=True)
class Movement:
    """Keys whose primary owner changed between two rings.

    :ivar moved: keys that changed owner (counted).
    :ivar stray: of those, keys that did not move onto the joining node (or
        off the leaving one): 0 for consistent hashing.
    :ivar fraction: ``moved / keys``.
    :ivar exact: the hash-space share that changed owner (the joining node's
        share in the new ring, the leaving node's in the old one).
    :ivar ideal: ``1/(N+1)`` for a join, ``1/N`` for a leave.
    :ivar ratio: ``fraction / ideal`` (the aim is <= 1.1).
    :ivar exact_ratio: ``exact / ideal``.
    """

    node: str
    moved: int
    stray: int
    fraction: float
    exact: float
    ideal: float
    ratio: float
    exact_ratio: float


@dataclass(frozen=True, slots=True)
class Ownership:
    """Load per unit of weight over the nodes, relative to its mean.

    :ivar max_mean: the busiest node's load per weight over the mean (counted).
    :ivar min_mean: the idlest node's (counted).
    :ivar exact_max_mean: the same from the hash-space shares.
    :ivar exact_min_mean: the same from the hash-space shares.
    """

    max_mean: float
    min_mean: float
    exact_max_mean: float
    exact_min_mean: float


def ownership_of(load: dict[str, float], weights: dict[str, float]) -> tuple[float, float]:
    """``(max, min)`` over nodes of ``load / weight``, each divided by the mean of ``load / weight`` over nodes of total weight.

    The mean is ``sum(load) / sum(weights)``: a node of weight ``w`` should
    carry ``w / sum(weights)`` of the load. Nodes absent from ``load`` carry 0.
    """
    per_weight = sum(load.values()) / sum(weights.values())
    ratios = [load.get(node, 0.0) / weight / per_weight for node, weight in weights.items()]
    return max(ratios), min(ratios)


@dataclass(frozen=True, slots=True)
class Count:
    """Keys counted in one ring, compared with the base ring.

    :ivar owners: node -> keys it owns as primary.
    :ivar moved: keys whose primary owner differs from the base ring's.
    :ivar stray: of those, keys where neither owner is the node the change
        was about (the joining or leaving node): 0 for consistent hashing.
    """

    owners: Counter[str]
    moved: int
    stray: int


def count_keys(base: HashRing, changed: Sequence[tuple[HashRing, str]], keys: int, chunk: int) -> tuple[Counter[str], list[Count]]:
    """Count the simulated keys per primary owner in ``base`` and in each changed ring, and what moved.

    :param changed: ``(ring, node)`` pairs; ``node`` is the node whose join or
        leave made ``ring`` from ``base`` (strays are moves not involving it).
    :returns: ``(base_owners, counts)``, one ``Count`` per changed ring. Every
        lookup goes through ``HashRing.owner_for_hash``.
    """
    base_owners: Counter[str] = Counter()
    counts = [Count(Counter(), 0, 0) for _ in changed]
    moved = [0] * len(changed)
    stray = [0] * len(changed)
    for hashes in _chunks(keys, chunk):
        before = list(map(base.owner_for_hash, hashes))
        base_owners.update(before)
        for k, (ring, node) in enumerate(changed):
            after = list(map(ring.owner_for_hash, hashes))
            counts[k].owners.update(after)
            diff = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
            moved[k] += len(diff)
            stray[k] += sum(1 for a, b in diff if a != node and b != node)
    return base_owners, [Count(c.owners, m, s) for c, m, s in zip(counts, moved, stray, strict=True)]


def _movement(node: str, count: Count, keys: int, exact: float, ideal: float) -> Movement:
    fraction = count.moved / keys
    return Movement(node, count.moved, count.stray, fraction, exact, ideal, fraction / ideal, exact / ideal)


@dataclass(frozen=True, slots=True)
class BuildCost:
    """Building a view (ring + preference table) as a master does.

    :ivar points: points on the ring (every node's virtual points).
    :ivar ring_s: seconds for ``HashRing(...)`` alone (best of the rounds).
    :ivar view_s: seconds for ``ClusterView.initial`` (ring and table).
    :ivar bump_s: seconds for ``view.bumped()`` (same ring, seq + 1).
    :ivar view_bytes: bytes the view holds once built (``tracemalloc``), or -1 if not measured.
    :ivar peak_bytes: peak bytes allocated while building it, or -1.
    """

    points: int
    ring_s: float
    view_s: float
    bump_s: float
    view_bytes: int
    peak_bytes: int


def _best(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
        del result  # freeing what was made is not part of making it
    return best


def measure_build(nodes: list[Member], replicas: int, rounds: int, memory: bool) -> tuple[ClusterView, BuildCost]:
    """Time (and with ``memory`` trace) building a view of ``nodes`` with ``replicas`` copies; return one built view."""
    weights = {m.node_id: m.weight for m in nodes}
    ring_s = _best(lambda: HashRing(weights, epoch=1), rounds)
    view_s = _best(lambda: ClusterView.initial(nodes, replicas, 1), rounds)
    view = ClusterView.initial(nodes, replicas, 1)
    bump_s = _best(view.bumped, rounds)
    view_bytes = peak_bytes = -1
    if memory:
        del view
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        view = ClusterView.initial(nodes, replicas, 1)
        now, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        view_bytes, peak_bytes = now - base, peak - base
    points = sum(max(1, round(view.ring.vnodes_per_weight * w)) for w in weights.values())
    return view, BuildCost(points, ring_s, view_s, bump_s, view_bytes, peak_bytes)


@dataclass(frozen=True, slots=True)
class ChangeCost:
    """One membership change (a join or a leave): derived from the previous ring, against a build.

    :ivar node: the node that joined or left.
    :ivar derive_s: seconds for ``ring.with_nodes(nodes)`` on a ring whose
        ``r = replicas`` table is memoized (the new ring and its patched table),
        best of the rounds.
    :ivar build_s: seconds for ``HashRing(nodes)`` and its ``preference_table(replicas)``, best of the rounds.
    :ivar ratio: ``build_s / derive_s``.
    :ivar moved_s: seconds for ``moved_ranges(old, new, replicas)`` (what a migration plans), best of the rounds.
    :ivar derived_bytes: bytes the derived ring and table hold beyond what they
        share with the previous ring (``tracemalloc``), or -1 if not measured.
    :ivar derive_gc_s: seconds the garbage collector then spends while the
        derived ring is young (``collections_after``).
    :ivar build_gc_s: the same after a build.
    """

    node: str
    derive_s: float
    build_s: float
    ratio: float
    moved_s: float
    derived_bytes: int
    derive_gc_s: float
    build_gc_s: float


#: Small lists allocated (and kept) by ``collections_after``: enough for ten young collections.
_GC_FILLER = 20_000


def collections_after(make: Callable[[], object]) -> float:
    """Seconds the cyclic collector spends from ``make()`` on, while what it made is young.

    Keeps ``make()``'s result, then allocates small lists (as a busy loop
    does, at most ``_GC_FILLER``) until a collection of the middle or oldest
    generation has run, and sums every collection's duration
    (``gc.callbacks``): the young collection and the middle one that walk a
    new ring's lists while they are young.
    """
    durations: list[float] = []
    started = [0.0]
    older = [False]
    filler: list[list[int]] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            durations.append(time.perf_counter() - started[0])
            older[0] = older[0] or info["generation"] > 0

    gc.collect()
    gc.callbacks.append(on_gc)  # before make(): its first allocation after may run the first collection
    try:
        kept = make()
        while not older[0] and len(filler) < _GC_FILLER:
            filler.append([len(filler)])
    finally:
        gc.callbacks.remove(on_gc)
    del kept
    return sum(durations)


def measure_change(base: HashRing, nodes: dict[str, float], node: str, replicas: int, rounds: int, memory: bool) -> ChangeCost:
    """Time the change from ``base`` to ``nodes`` both ways (see ``ChangeCost``); ``node`` names the change."""
    base.preference_table(replicas)

    def build() -> tuple[HashRing, PreferenceTable]:
        ring = HashRing(nodes, epoch=base.epoch + 1)
        return ring, ring.preference_table(replicas)

    derive_s = _best(lambda: base.with_nodes(nodes), rounds)
    build_s = _best(build, rounds)
    changed = base.with_nodes(nodes)
    moved_s = _best(partial(moved_ranges, base, changed, replicas), rounds)
    derived_bytes = -1
    if memory:
        del changed
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        changed = base.with_nodes(nodes)
        derived_bytes = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    del changed
    derive_gc_s = collections_after(lambda: base.with_nodes(nodes))
    build_gc_s = collections_after(build)
    return ChangeCost(node, derive_s, build_s, build_s / derive_s, moved_s, derived_bytes, derive_gc_s, build_gc_s)


@dataclass(frozen=True, slots=True)
class LookupCost:
    """One lookup on the master's hot path, against the hash alone (same keys, same run).

    :ivar lookup_ns: ns per ``view.read_candidates(key)`` (hash + find the preference list).
    :ivar hash_ns: ns per ``hash64(key)``, the reference.
    """

    lookup_ns: float
    hash_ns: float


def measure_lookup(view: ClusterView, count: int, rounds: int) -> LookupCost:
    """Time ``read_candidates`` and ``hash64`` over ``count`` keys, best of ``rounds`` each."""
    keys = [b"key:%d" % i for i in range(count)]
    lookup = view.read_candidates

    def run_lookup() -> None:
        for key in keys:
            lookup(key)

    def run_hash() -> None:
        for key in keys:
            hash64(key)

    return LookupCost(_best(run_lookup, rounds) / count * 1e9, _best(run_hash, rounds) / count * 1e9)


@dataclass(frozen=True, slots=True)
class Report:
    """Everything ringsim measures for one node count."""

    nodes: int
    keys: int
    replicas: int
    weights: list[float]
    join: Movement
    leave: Movement
    equal: Ownership
    weighted: Ownership
    build: BuildCost
    lookup: LookupCost
    join_cost: ChangeCost
    leave_cost: ChangeCost


def simulate(
    n: int,
    keys: int,
    *,
    chunk: int = 1_000_000,
    replicas: int = 2,
    weights: Sequence[float] = (0.5, 1.0, 1.5),
    rounds: int = 3,
    lookups: int = 200_000,
    memory: bool = True,
) -> Report:
    """Run every measurement for ``n`` nodes and ``keys`` simulated keys (see the module note)."""
    equal_members = members(n)
    view, build = measure_build(equal_members, replicas, rounds, memory)
    lookup = measure_lookup(view, lookups, rounds)
    base = view.ring
    del view
    shares = base.shares()
    leaving = max(shares, key=lambda node: (shares[node], node))
    join_cost = measure_change(base, {**base.nodes, JOIN_ID: 1.0}, JOIN_ID, replicas, rounds, memory)
    leave_cost = measure_change(base, {n: w for n, w in base.nodes.items() if n != leaving}, leaving, replicas, rounds, memory)
    joined = base.with_node(JOIN_ID)
    left = base.without_node(leaving)
    weighted_members = members(n, weights)
    weighted = HashRing({m.node_id: m.weight for m in weighted_members})
    base_owners, (on_join, on_leave, on_weights) = count_keys(base, [(joined, JOIN_ID), (left, leaving), (weighted, "")], keys, chunk)
    join = _movement(JOIN_ID, on_join, keys, joined.shares()[JOIN_ID], 1 / (n + 1))
    leave = _movement(leaving, on_leave, keys, shares[leaving], 1 / n)
    equal_weights = {m.node_id: m.weight for m in equal_members}
    unequal_weights = {m.node_id: m.weight for m in weighted_members}
    equal = Ownership(*ownership_of(dict(base_owners), equal_weights), *ownership_of(shares, equal_weights))
    unequal = Ownership(*ownership_of(dict(on_weights.owners), unequal_weights), *ownership_of(weighted.shares(), unequal_weights))
    return Report(n, keys, replicas, list(weights), join, leave, equal, unequal, build, lookup, join_cost, leave_cost)


def _format(report: Report) -> str:
    r, b = report, report.build
    mib = 1 << 20
    memory = f"{b.view_bytes / mib:.1f} MiB held, {b.peak_bytes / mib:.1f} MiB peak" if b.view_bytes >= 0 else "memory not measured"
    return "\n".join(
        [
            f"N={r.nodes}: {b.points} points, {r.keys} keys, replicas={r.replicas}",
            f"  join  {r.join.node}: moved {r.join.fraction:.5f} (ideal {r.join.ideal:.5f}, x{r.join.ratio:.3f}; exact x{r.join.exact_ratio:.3f}), stray {r.join.stray}",
            f"  leave {r.leave.node}: moved {r.leave.fraction:.5f} (ideal {r.leave.ideal:.5f}, x{r.leave.ratio:.3f}; exact x{r.leave.exact_ratio:.3f}), stray {r.leave.stray}",
            f"  equal weights: max/mean {r.equal.max_mean:.3f} min/mean {r.equal.min_mean:.3f} (exact {r.equal.exact_max_mean:.3f} / {r.equal.exact_min_mean:.3f})",
            f"  weights {r.weights}: max/mean {r.weighted.max_mean:.3f} min/mean {r.weighted.min_mean:.3f} (exact {r.weighted.exact_max_mean:.3f} / {r.weighted.exact_min_mean:.3f})",
            f"  build: ring {b.ring_s * 1e3:.0f} ms, view {b.view_s * 1e3:.0f} ms, bump {b.bump_s * 1e3:.1f} ms; {memory}",
            f"  lookup: read_candidates {r.lookup.lookup_ns:.0f} ns/key, hash64 alone {r.lookup.hash_ns:.0f} ns/key",
            *(_format_change(kind, cost, r.replicas) for kind, cost in (("join", r.join_cost), ("leave", r.leave_cost))),
        ]
    )


def _format_change(kind: str, cost: ChangeCost, replicas: int) -> str:
    held = f", derived ring holds {cost.derived_bytes / (1 << 20):.1f} MiB more" if cost.derived_bytes >= 0 else ""
    return (
        f"  {kind} {cost.node}: derived ring + r={replicas} table {cost.derive_s * 1e3:.1f} ms, built {cost.build_s * 1e3:.0f} ms"
        f" (x{cost.ratio:.1f}); moved_ranges {cost.moved_s * 1e3:.1f} ms{held};"
        f" collections after: {cost.derive_gc_s * 1e3:.0f} ms derived, {cost.build_gc_s * 1e3:.0f} ms built"
    )


def _int_list(text: str) -> list[int]:
    values = [int(x.replace("_", "")) for x in text.split(",") if x]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _weights(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x]
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``bin/ringsim``; every flag says what it sets."""
    parser = argparse.ArgumentParser(
        prog="ringsim",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--nodes", type=_int_list, default=[10, 100, 1000], help="aux node counts to simulate, comma-separated (default 10,100,1000)"
    )
    parser.add_argument("--keys", type=_positive, default=10_000_000, help="simulated keys b'key:0'.. counted per ring (default 10000000)")
    parser.add_argument(
        "--chunk", type=_positive, default=1_000_000, help="keys hashed and looked up per batch; bounds memory (default 1000000)"
    )
    parser.add_argument(
        "--replicas", type=_positive, default=2, help="preference-list length of the view's table, as the master's --replicas (default 2)"
    )
    parser.add_argument(
        "--weights",
        type=_weights,
        default=[0.5, 1.0, 1.5],
        help="weights given to nodes in turn for the weighted ownership figures (default 0.5,1,1.5: mean 1)",
    )
    parser.add_argument(
        "--rounds",
        type=_positive,
        default=3,
        help="timed repetitions of each build and lookup measurement; the best is reported (default 3)",
    )
    parser.add_argument("--lookups", type=_positive, default=200_000, help="keys timed through read_candidates and hash64 (default 200000)")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc build (it is slow: about 8x the untraced build)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per node count instead of text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bin/ringsim``; prints one report per node count and returns 0."""
    args = build_parser().parse_args(argv)
    for n in args.nodes:
        report = simulate(
            n,
            args.keys,
            chunk=args.chunk,
            replicas=args.replicas,
            weights=args.weights,
            rounds=args.rounds,
            lookups=args.lookups,
            memory=not args.no_memory,
        )
        print(json.dumps(asdict(report)) if args.json else _format(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
