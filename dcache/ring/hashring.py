"""Consistent hashing with virtual nodes: who owns a key, and what moves.

Design note
===========

Layout
    Every member is a stable node id (``str``, never an address) with a weight
    ``w > 0``. Node ``n`` puts ``max(1, round(vnodes_per_weight * w))`` points
    on a 64-bit circle; point ``i`` is ``hash64(f"{n}#{i}".encode())``. The
    string ``f"{n}#{i}"`` is injective (``i`` is all digits after the last
    ``#``), so two members never share a label, only by chance a hash value.

    All points are sorted by ``(point, node_id)``; an exact 64-bit collision
    between two nodes is thereby resolved in favour of the smaller id, the
    other point owning an empty arc. Consecutive points of one node are merged
    into a *run*; the ring stores only the run ends (``_ends``, ascending, an
    ``array('Q')``: 8 bytes a run) and a parallel list of owners
    (``_run_ids``). Merging changes no answer and guarantees that neighbouring
    runs have different owners, which keeps the preference-list walk short.

Bucket index
    ``_starts[b]`` is the first run whose end is ``>= b << _shift``, for the
    ``2**k`` buckets of the top ``k`` bits of a hash (``2**k`` between half
    the runs and all of them; ``_starts`` has one more entry, ``len(_ends)``). A lookup bisects
    only between ``_starts[h >> _shift]`` and the next bucket's start: about
    two probes, at any ring size. A plain bisect over 2M runs (1,000 nodes)
    made 21 probes into memory the CPU cache does not hold: ``read_candidates``
    cost 2.6 us there against 0.5 us at 10 nodes (bin/ringsim, BENCHMARKS.md
    "Ring at scale"). The index changes no answer, only its cost.

Ownership
    A hash ``h`` belongs to the first point clockwise with ``point >= h``,
    wrapping to the lowest point: ``bisect_left(_ends, h)`` (narrowed by the
    bucket index), index ``len`` meaning ``0``. A run with end ``e`` preceded by end ``s`` owns the arc
    ``(s, e]``; the first run owns the wrapping arc ``(_ends[-1], _ends[0]]``.
    Arcs are written ``(start_exclusive, end_inclusive)``; ``start > end``
    wraps through zero and ``start == end`` is the whole circle (a ring whose
    points all belong to one node). ``in_range`` implements this convention.

    The preference list ``owners(key, r)`` is the first ``r`` distinct nodes
    met walking clockwise from the key's run. ``preference_table(r)``
    computes it for every run once per ring (memoized: a new view over the
    same ring reuses it) and shares one list between runs with equal
    preference lists.

Invariants
    * The layout is a pure function of ``(nodes, vnodes_per_weight)``: no
      dependence on dict order, ``PYTHONHASHSEED`` (the builtin ``hash()`` is
      never used) or the process. ``fingerprint()`` digests it for comparison.
    * A ring is immutable. Every membership change (``with_node``,
      ``without_node``) returns a new ring with ``epoch + 1``; holders reject
      rings with an older epoch than theirs.
    * Adding a node only moves keys onto it; removing one only moves its keys.

Points per weight
    DESIGN.md suggests about 160 points per unit of weight. With random points
    a node's share has a relative standard deviation of about
    ``1 / sqrt(points)``: 7.9% at 160, so among 16 nodes the busiest one sits
    near +15% (measured max/mean over 100k keys for 3..16 nodes: 1.13 to
    1.24). The load bound we hold (max/mean <= 1.10) needs about 2% deviation,
    hence ``VNODES_PER_WEIGHT = 2048`` (measured max/mean 1.05 to 1.07 over
    several id schemes). Cheaper placements do not help: evenly spaced points
    with a per-node offset are as bad as one point per node, and stratified
    placement has the same variance as random placement. The cost is paid
    once per membership change: building 16 nodes (32k points) takes about
    20 ms, and the ring holds about 1.3 MB; 1,000 nodes (2M points) take
    about 2.5 s and hold 36 MiB (tracemalloc; bin/ringsim, BENCHMARKS.md "Ring at
    scale"). At 1,000 nodes the busiest node still carries only about 1.07x
    the mean, so the count stays 2048 (DECISIONS.md "The ring at 1,000 nodes").

Derived rings
    A membership change at 1,000 nodes would rebuild 2M points and a 2M-run
    preference table (seconds). ``with_nodes`` (and ``from_nodes`` with
    the rings a caller holds) derives the new ring from an old one instead.
    The points that differ are the labels of the nodes that joined or left
    and, for a re-weight, the labels between the two counts. Each lands in
    one old run (its *place*); a *window* of old runs covers the places with
    one untouched run on either side, which keeps its owner and differs
    from the runs outside, so rebuilding each window's points into runs
    alone gives the whole new run list. A window's points are its runs'
    ends, except for runs of several points: ``_multi`` records their point
    counts (about one run in ``N``), and only their owners' points are
    hashed again. The new arrays are the old ones copied stretch by stretch
    around the windows; the bucket index moves by the runs gained below
    each bucket (bisected inside windows); each memoized preference table
    is patched: new lists for the windows' runs and for the runs before a
    window whose walk reaches into it (just one for ``r == 2``), shared
    with the old table where the same list existed in the window. The
    result is identical to a build (the property tests compare them).

Garbage collection
    Builds and derivations make no reference cycles, only many objects
    (lists, tuples, the 2M-entry lists of a big ring). A collection of the
    young generations during one walks whatever of those is young, and a
    full collection, which enough survivors trigger, walks every table of
    the process. They run with the cyclic collector paused
    (``_collector_paused``; restored after, and left alone if it was off):
    at 1,000 nodes a build and its ``r = 2`` table took 3.6 s instead of
    5.8 s, a derivation for 20 nodes joining and leaving 0.6 s instead of
    1.5 s. The next young collection then walks what they kept.

Complexity (``P`` points, ``N`` nodes)
    Build ``O(P log P)``; derive ``O(C log P)`` Python work for ``C``
    changed points, plus copying ``O(P)`` entries in C; ``owner`` ``O(1)``
    expected (bucket index); ``owners(key, r)`` ``O(log P + walk)``, the walk being the runs visited until ``r`` distinct
    nodes are seen (about ``N * H(r) / (N - r + 1)``, small for the usual
    ``r`` of 2 or 3); ``shares``, ``ranges`` and ``fingerprint`` ``O(P)``;
    ``moved_ranges`` ``O(C log P * walk)`` between rings that differ in
    ``C`` points (a quarter of the old runs at most), else
    ``O((P_old + P_new) * walk)``.

This module is pure: no I/O, no clock, no logging, no asyncio.
"""

from __future__ import annotations

import functools
import gc
import math
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate, islice
from types import MappingProxyType
from typing import Any, NoReturn, ParamSpec, TypeVar

import xxhash

from ..errors import DCacheError

__all__ = [
    "DERIVE_MAX_CHANGED",
    "MAX_RING_POINTS",
    "RING_SIZE",
    "VNODES_PER_WEIGHT",
    "EmptyRingError",
    "HashRing",
    "PreferenceTable",
    "RangeMove",
    "hash64",
    "in_range",
    "moved_ranges",
]

VNODES_PER_WEIGHT = 2048
"""Points per unit of weight (see the design note for why not 160)."""

RING_SIZE = 1 << 64
"""Number of positions on the circle; hashes are ints in ``[0, RING_SIZE)``."""

MAX_RING_POINTS = 1 << 21
"""Upper bound on the points of one ring, so a bad weight cannot hang a build."""

DERIVE_MAX_CHANGED = 0.1
"""``HashRing.from_nodes`` derives from a known ring when at most this share of the new ring's points differ."""

_T = TypeVar("_T")
_P = ParamSpec("_P")


def _collector_paused(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Run ``fn`` with the cyclic garbage collector paused (see "Garbage collection" in the module note)."""

    @functools.wraps(fn)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return paused


#: The stable 64-bit hash of some bytes (xxh3), the same in every process:
#: ``hash64(data) -> int`` in ``[0, 2**64)``. It is xxhash's C function
#: itself, not a wrapper, because every routed request calls it.
hash64: Callable[[bytes], int] = xxhash.xxh3_64_intdigest
_xxh3_64 = hash64


def in_range(h: int, start: int, end: int) -> bool:
    """Tell whether hash ``h`` lies in the arc ``(start, end]`` of the circle.

    ``start > end`` wraps through zero, and ``start == end`` is the whole
    circle (the convention used by ``HashRing.ranges`` and ``moved_ranges``).

    :param h: a hash in ``[0, 2**64)``.
    :param start: exclusive start of the arc.
    :param end: inclusive end of the arc.
    :returns: ``True`` if ``h`` is in the arc.
    """
    if start < end:
        return start < h <= end
    if start > end:
        return h > start or h <= end
    return True


class EmptyRingError(DCacheError, LookupError):
    """Raised by ``HashRing.owner`` when the ring has no nodes."""


@dataclass(frozen=True, slots=True)
class RangeMove:
    """An arc of the hash space whose preference list changes between two rings.

    :ivar start: exclusive start of the arc (``start > end`` wraps through
        zero, ``start == end`` is the whole circle).
    :ivar end: inclusive end of the arc.
    :ivar old_owners: the preference list in the old ring (maybe empty).
    :ivar new_owners: the preference list in the new ring (maybe empty).
    """

    start: int
    end: int
    old_owners: tuple[str, ...]
    new_owners: tuple[str, ...]

    def __contains__(self, h: object) -> bool:
        return isinstance(h, int) and in_range(h, self.start, self.end)


@dataclass(frozen=True, slots=True)
class PreferenceTable:
    """Every run's preference list, for one bisect per lookup (``HashRing.preference_table``).

    ``prefs[run(h)]`` is ``owners_for_hash(h, r)`` where ``run(h)`` is
    ``bisect_left(ends, h, starts[h >> shift], starts[(h >> shift) + 1])``,
    ``len(ends)`` meaning 0 (``lookup`` does exactly this; hot paths inline
    it). Runs with equal preference lists share one list object (in a
    derived ring's table a few equal lists may stay apart: those a leave made
    neighbours, about 1,800 of 870k at 1,000 nodes). The table is shared by
    every holder of the ring, and its lists with derived rings' tables:
    nothing in it may be modified.

    :ivar ends: the ring's run ends, ascending.
    :ivar starts: the bucket index (see the module note).
    :ivar shift: ``64 - k`` for ``2**k`` buckets.
    :ivar prefs: the preference list of each run.
    """

    ends: array[int]
    starts: array[int]
    shift: int
    prefs: list[list[str]]

    def lookup(self, h: int) -> list[str]:
        """The preference list of hash ``h`` (``[]`` for an empty ring); do not modify it."""
        ends = self.ends
        if not ends:
            return []
        b = h >> self.shift
        i = bisect_left(ends, h, self.starts[b], self.starts[b + 1])
        return self.prefs[i if i < len(ends) else 0]


def _bad_r(r: int) -> NoReturn:
    raise ValueError(f"r must be >= 1, got {r!r}")


def _merge_circular(
    arcs: list[tuple[int, int, _T]],
) -> list[tuple[int, int, _T]]:
    """Merge neighbouring arcs with equal labels, wrap-around included.

    ``arcs`` are non-empty, contiguous and in clockwise order, together covering
    the circle; the first one may wrap. The result keeps that order.
    """
    out: list[tuple[int, int, _T]] = []
    for arc in arcs:
        if out and out[-1][2] == arc[2]:
            out[-1] = (out[-1][0], arc[1], arc[2])
        else:
            out.append(arc)
    if len(out) > 1 and out[0][2] == out[-1][2]:
        last = out.pop()
        out[0] = (last[0], out[0][1], last[2])
    return out


class _ListPool(dict[tuple[str, ...], list[str]]):
    """One shared list per distinct preference list (a missing key makes it)."""

    __slots__ = ()

    def __missing__(self, key: tuple[str, ...]) -> list[str]:
        value = self[key] = list(key)
        return value


def _walk(run_ids: list[str], i: int, want: int) -> tuple[list[str], int]:
    """The first ``want`` distinct owners of the runs from index ``i`` on, and how many runs past ``i`` that took.

    ``want`` is at most the number of distinct owners (``min(r, len(nodes))``).
    """
    n = len(run_ids)
    if want == 2 and i + 1 < n:  # neighbouring runs differ
        return [run_ids[i], run_ids[i + 1]], 1
    out = [run_ids[i]]
    steps = 0
    while len(out) < want and steps < n - 1:
        steps += 1
        node = run_ids[i + steps - n if i + steps >= n else i + steps]
        if node not in out:
            out.append(node)
    return out, steps


class HashRing:
    """An immutable consistent-hash ring with weighted virtual nodes and an epoch.

    :param nodes: node id -> weight (a float > 0). ``None`` or empty gives an
        empty ring. Iteration order does not matter.
    :param epoch: the membership version this ring represents (an int >= 0).
    :param vnodes_per_weight: points per unit of weight; every node gets
        ``max(1, round(vnodes_per_weight * weight))`` points.
    :raises ValueError: on an empty or non-string node id, a weight that is not
        a finite number > 0, a negative epoch, a ``vnodes_per_weight`` < 1, or
        more than ``MAX_RING_POINTS`` points in all.
    :raises TypeError: if a weight or the epoch is not a number.
    """

    __slots__ = ("_ends", "_epoch", "_multi", "_nodes", "_run_ids", "_shift", "_starts", "_tables", "_vnodes_per_weight")

    _epoch: int
    _vnodes_per_weight: int
    _nodes: dict[str, float]  # sorted by node id; never mutated
    _ends: array[int]  # run ends, ascending; never mutated
    _run_ids: list[str]  # owner of each run; neighbours differ
    _starts: array[int]  # bucket index: first run of each bucket, then len(_ends)
    _shift: int  # 64 - log2(buckets)
    _tables: dict[int, PreferenceTable]  # r -> table, filled on demand; shared with with_epoch copies
    _multi: dict[tuple[int, str], int]  # (end, owner) -> points, for the runs of more than one point; never mutated

    def __init__(
        self,
        nodes: Mapping[str, float] | None = None,
        *,
        epoch: int = 0,
        vnodes_per_weight: int = VNODES_PER_WEIGHT,
    ) -> None:
        _check_epoch(epoch)
        if type(vnodes_per_weight) is not int or vnodes_per_weight < 1:
            raise ValueError(f"vnodes_per_weight must be an int >= 1, got {vnodes_per_weight!r}")
        members = _validate_nodes(nodes or {})
        ends, run_ids, multi = _build(members, vnodes_per_weight)
        starts, shift = _bucket_index(ends)
        self._set(epoch, vnodes_per_weight, members, ends, run_ids, starts, shift, {}, multi)

    def _set(
        self,
        epoch: int,
        vnodes_per_weight: int,
        nodes: dict[str, float],
        ends: array[int],
        run_ids: list[str],
        starts: array[int],
        shift: int,
        tables: dict[int, PreferenceTable],
        multi: dict[tuple[int, str], int],
    ) -> None:
        setter = object.__setattr__
        setter(self, "_epoch", epoch)
        setter(self, "_vnodes_per_weight", vnodes_per_weight)
        setter(self, "_nodes", nodes)
        setter(self, "_ends", ends)
        setter(self, "_run_ids", run_ids)
        setter(self, "_starts", starts)
        setter(self, "_shift", shift)
        setter(self, "_tables", tables)
        setter(self, "_multi", multi)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"HashRing is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"HashRing is immutable (cannot delete {name!r})")

    # -- properties and dunders -------------------------------------------

    @property
    def epoch(self) -> int:
        """The membership version of this ring."""
        return self._epoch

    @property
    def vnodes_per_weight(self) -> int:
        """Points per unit of weight used to build this ring."""
        return self._vnodes_per_weight

    @property
    def nodes(self) -> Mapping[str, float]:
        """A read-only view of node id -> weight, ordered by node id."""
        return MappingProxyType(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return self._epoch == other._epoch and self._vnodes_per_weight == other._vnodes_per_weight and self._nodes == other._nodes

    def __hash__(self) -> int:
        return hash((self._epoch, self._vnodes_per_weight, tuple(self._nodes.items())))

    def __repr__(self) -> str:
        return f"HashRing({self._nodes!r}, epoch={self._epoch}, vnodes_per_weight={self._vnodes_per_weight})"

    def __copy__(self) -> HashRing:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> HashRing:
        return self

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return (HashRing.from_dict, (self.to_dict(),))

    # -- lookups (hot path) -----------------------------------------------

    def owner(self, key: bytes) -> str:
        """Return the primary owner of ``key``.

        :param key: the cache key.
        :returns: the node id owning ``hash64(key)``.
        :raises EmptyRingError: if the ring has no nodes.
        """
        return self.owner_for_hash(_xxh3_64(key))

    def owner_for_hash(self, h: int) -> str:
        """Return the primary owner of hash ``h`` (an int in ``[0, 2**64)``).

        :raises EmptyRingError: if the ring has no nodes.
        """
        ends = self._ends
        if not ends:
            raise EmptyRingError("the ring has no nodes")
        b = h >> self._shift
        i = bisect_left(ends, h, self._starts[b], self._starts[b + 1])
        return self._run_ids[i if i < len(ends) else 0]

    def owners(self, key: bytes, r: int = 1) -> list[str]:
        """Return the preference list of ``key``: its first ``r`` distinct nodes.

        :param key: the cache key.
        :param r: how many distinct nodes to return (replication factor).
        :returns: ``min(r, len(self))`` distinct node ids, the primary owner
            first, then the next distinct nodes clockwise; ``[]`` on an empty
            ring.
        :raises ValueError: if ``r < 1``.
        """
        return self.owners_for_hash(_xxh3_64(key), r)

    def owners_for_hash(self, h: int, r: int = 1) -> list[str]:
        """Return the preference list of hash ``h``; see ``owners``.

        :raises ValueError: if ``r < 1``.
        """
        if r < 1:
            _bad_r(r)
        ends = self._ends
        n = len(ends)
        if not n:
            return []
        return _walk(self._run_ids, self._run_index(h), min(r, len(self._nodes)))[0]

    def _run_index(self, h: int) -> int:
        """The index of the run owning hash ``h`` (the ring is not empty)."""
        ends = self._ends
        b = h >> self._shift
        i = bisect_left(ends, h, self._starts[b], self._starts[b + 1])
        return i if i < len(ends) else 0

    def preference_table(self, r: int = 1) -> PreferenceTable:
        """Every run's preference list of length ``r``, computed once per ring layout.

        ``table.lookup(h) == owners_for_hash(h, r)`` for every hash. Built on
        the first call (O(points * r)) and kept: later calls, and rings made
        by ``with_epoch``, return the same table; a ring made by
        ``with_nodes`` gets it patched from its base ring's. Runs with equal
        preference lists share one list (for ``r == 1``, one list per node;
        see ``PreferenceTable`` for derived rings).

        :raises ValueError: if ``r < 1``.
        """
        if r < 1:
            _bad_r(r)
        table = self._tables.get(r)
        if table is None:
            table = PreferenceTable(self._ends, self._starts, self._shift, self._preference_lists(r))
            self._tables[r] = table
        return table

    @_collector_paused
    def _preference_lists(self, r: int) -> list[list[str]]:
        run_ids = self._run_ids
        want = min(r, len(self._nodes))
        if want <= 1:
            single = {node: [node] for node in self._nodes}
            return list(map(single.__getitem__, run_ids))
        pool = _ListPool()
        if want > 2:
            return [pool[tuple(_walk(run_ids, i, want)[0])] for i in range(len(run_ids))]
        # neighbouring runs differ (but the last and the first may not): for r == 2 the next run is the second owner
        prefs = list(map(pool.__getitem__, zip(run_ids, islice(run_ids, 1, None), strict=False)))
        prefs.append(pool[tuple(_walk(run_ids, len(run_ids) - 1, 2)[0])])
        return prefs

    # -- derived views ------------------------------------------------------

    def ranges(self) -> list[tuple[int, int, str]]:
        """Return the primary arcs as ``(start_exclusive, end_inclusive, node_id)``.

        Neighbouring arcs of one node are merged, the wrap-around one included,
        and empty arcs (from hash collisions) are left out. The list is ordered
        by ``end``; its first arc may wrap (``start > end``). A ring where one
        node owns everything gives one arc with ``start == end``. ``in_range``
        tests membership. An empty ring gives ``[]``.
        """
        ends, run_ids = self._ends, self._run_ids
        if not ends:
            return []
        if ends[0] == ends[-1]:
            return [(ends[0], ends[0], run_ids[0])]
        arcs = [(ends[-1], ends[0], run_ids[0])]
        arcs.extend((ends[i - 1], ends[i], run_ids[i]) for i in range(1, len(ends)) if ends[i - 1] != ends[i])
        return _merge_circular(arcs)

    def shares(self) -> dict[str, float]:
        """Return the fraction of the hash space each node owns as primary.

        :returns: node id -> fraction in ``[0, 1]``; the fractions sum to 1.0
            (up to float rounding). An empty ring gives ``{}``.
        """
        sizes = dict.fromkeys(self._nodes, 0)
        for start, end, node in self.ranges():
            sizes[node] += (end - start) % RING_SIZE or RING_SIZE
        return {node: size / RING_SIZE for node, size in sizes.items()}

    def fingerprint(self) -> str:
        """Return a hex digest of the layout (members, weights and points).

        Two rings with the same fingerprint answer every lookup identically,
        in any process or version. The epoch is not part of it.
        """
        digest = xxhash.xxh3_128()
        digest.update(b"dcache-ring-v1\0%d\0" % self._vnodes_per_weight)
        ids = list(self._nodes)
        for node, weight in self._nodes.items():
            digest.update(b"%s\0%r\0" % (node.encode(), weight))
        index = {node: i for i, node in enumerate(ids)}
        ends = array("Q", self._ends)  # a copy: byteswap below must not touch the ring
        runs = array("Q", [index[node] for node in self._run_ids])
        if sys.byteorder == "big":  # digest little-endian bytes everywhere
            ends.byteswap()
            runs.byteswap()
        digest.update(ends.tobytes())
        digest.update(runs.tobytes())
        return digest.hexdigest()

    # -- new rings ------------------------------------------------------------

    def with_node(self, node_id: str, weight: float = 1.0) -> HashRing:
        """Return a ring with ``node_id`` added (or re-weighted), at ``epoch + 1``.

        :raises ValueError: on a bad node id or weight (see ``HashRing``).
        """
        nodes = dict(self._nodes)
        nodes[node_id] = weight
        return self.with_nodes(nodes)

    def without_node(self, node_id: str) -> HashRing:
        """Return a ring with ``node_id`` removed, at ``epoch + 1``.

        :raises KeyError: if ``node_id`` is not in the ring.
        """
        if node_id not in self._nodes:
            raise KeyError(node_id)
        nodes = dict(self._nodes)
        del nodes[node_id]
        return self.with_nodes(nodes)

    def with_nodes(self, nodes: Mapping[str, float], *, epoch: int | None = None) -> HashRing:
        """Return the ring of ``nodes``, derived from this ring's layout (see "Derived rings" in the module note).

        The result is identical to ``HashRing(nodes, epoch=epoch,
        vnodes_per_weight=self.vnodes_per_weight)``, memoized preference
        tables included: this ring's tables are patched around the runs that
        change instead of being rebuilt. The work grows with the points that
        differ, plus copying the arrays: a join, leave or re-weight of one
        node at 1,000 nodes costs about 90 ms with an ``r = 2`` table, against
        about 4 s for a build. When more than about a tenth of the points
        differ, ``HashRing(...)`` is cheaper (``from_nodes`` chooses).

        :param nodes: node id -> weight, as for ``HashRing``.
        :param epoch: the new ring's epoch (default ``self.epoch + 1``).
        :raises ValueError: on a bad node id, weight or epoch, or too many points (see ``HashRing``).
        :raises TypeError: if a weight or the epoch is not a number.
        """
        epoch = self._epoch + 1 if epoch is None else epoch
        _check_epoch(epoch)
        return _derive(self, _validate_nodes(nodes), epoch)

    def with_epoch(self, epoch: int) -> HashRing:
        """Return the same layout with another epoch (no rebuild).

        :raises TypeError: if ``epoch`` is not an int.
        :raises ValueError: if ``epoch`` is negative.
        """
        _check_epoch(epoch)
        return self._same_layout(self._nodes, epoch)

    def _same_layout(self, nodes: dict[str, float], epoch: int) -> HashRing:
        """This layout (and its memoized tables) with ``nodes`` (same ids and point counts) and ``epoch``."""
        ring = HashRing.__new__(HashRing)
        ring._set(epoch, self._vnodes_per_weight, nodes, self._ends, self._run_ids, self._starts, self._shift, self._tables, self._multi)
        return ring

    # -- transport --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"epoch", "nodes", "vnodes_per_weight"}``, msgpack/JSON-friendly.

        ``from_dict`` rebuilds an identical ring from it in any process.
        """
        return {
            "epoch": self._epoch,
            "nodes": dict(self._nodes),
            "vnodes_per_weight": self._vnodes_per_weight,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], known: Iterable[HashRing | None] = ()) -> HashRing:
        """Rebuild a ring from ``to_dict()`` output (for example after msgpack).

        :param known: rings the caller already holds, passed to
            ``from_nodes``: one with the same layout is reused, one that
            differs in a few nodes is derived from (a build takes seconds at
            1,000 nodes).
        :raises ValueError: if a field is missing, has the wrong type or is out
            of range.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"ring data must be a mapping, got {type(data).__name__}")
        missing = {"epoch", "nodes", "vnodes_per_weight"} - set(data)
        if missing:
            raise ValueError(f"ring data lacks {sorted(missing)}")
        epoch, nodes, vnodes = data["epoch"], data["nodes"], data["vnodes_per_weight"]
        if type(epoch) is not int:
            raise ValueError(f"ring data: epoch must be an int, got {epoch!r}")
        if not isinstance(nodes, Mapping):
            raise ValueError(f"ring data: nodes must be a mapping, got {nodes!r}")
        if any(type(w) not in (int, float) for w in nodes.values()):
            raise ValueError(f"ring data: weights must be numbers, got {nodes!r}")
        return cls.from_nodes(nodes, epoch=epoch, vnodes_per_weight=vnodes, known=known)

    @classmethod
    def from_nodes(
        cls,
        nodes: Mapping[str, float],
        *,
        epoch: int = 0,
        vnodes_per_weight: int = VNODES_PER_WEIGHT,
        known: Iterable[HashRing | None] = (),
    ) -> HashRing:
        """Return ``HashRing(nodes, epoch=epoch, vnodes_per_weight=...)``, made the cheapest way.

        Among the ``known`` rings with the same ``vnodes_per_weight``, one with
        the same members and weights is reused (with ``epoch``; its memoized
        preference tables come along); otherwise the one whose points differ
        least is derived from (``with_nodes``) if at most
        ``DERIVE_MAX_CHANGED`` of the points differ; otherwise the ring is
        built. The result is the same in every case.

        :param known: rings the caller already holds (``None`` entries are skipped).
        :raises ValueError: on a bad node id, weight, epoch or
            ``vnodes_per_weight``, or too many points (see ``HashRing``).
        :raises TypeError: if a weight or the epoch is not a number.
        """
        _check_epoch(epoch)
        if type(vnodes_per_weight) is not int or vnodes_per_weight < 1:
            raise ValueError(f"vnodes_per_weight must be an int >= 1, got {vnodes_per_weight!r}")
        members = _validate_nodes(nodes)
        limit = DERIVE_MAX_CHANGED * sum(_point_count(w, vnodes_per_weight) for w in members.values())
        base: HashRing | None = None
        for ring in known:
            if ring is None or ring._vnodes_per_weight != vnodes_per_weight:
                continue
            if ring._nodes == members:
                return ring if ring._epoch == epoch else ring._same_layout(members, epoch)
            changed = _changed_count(ring._nodes, members, vnodes_per_weight)
            if changed <= limit:
                base, limit = ring, changed
        if base is not None:
            return _derive(base, members, epoch)
        return cls(members, epoch=epoch, vnodes_per_weight=vnodes_per_weight)


def _check_epoch(epoch: int) -> None:
    if type(epoch) is not int:  # bool is an int subclass: refuse it too
        raise TypeError(f"epoch must be an int, got {epoch!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")


def _validate_nodes(nodes: Mapping[str, float]) -> dict[str, float]:
    """Check ids and weights; return a new dict sorted by node id."""
    members: dict[str, float] = {}
    for node_id in sorted(nodes):
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"node id must be a non-empty str, got {node_id!r}")
        raw = nodes[node_id]
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise TypeError(f"weight of node {node_id!r} must be a number, got {raw!r}")
        weight = float(raw)
        if not (math.isfinite(weight) and weight > 0.0):
            raise ValueError(f"weight of node {node_id!r} must be finite and > 0, got {raw!r}")
        members[node_id] = weight
    return members


def _point_count(weight: float, vnodes_per_weight: int) -> int:
    return max(1, round(vnodes_per_weight * weight))


def _bucket_index(ends: array[int]) -> tuple[array[int], int]:
    """``(starts, shift)``: the bucket index of ``ends`` (see the design note)."""
    k = max(0, len(ends).bit_length() - 1)  # 2**k buckets: more than half the runs, at most all of them
    shift = 64 - k
    counts = [0] * ((1 << k) + 1)
    for end in ends:
        counts[(end >> shift) + 1] += 1
    return array("I", accumulate(counts)), shift


def _check_total(members: dict[str, float], vnodes_per_weight: int) -> None:
    total = sum(_point_count(w, vnodes_per_weight) for w in members.values())
    if total > MAX_RING_POINTS:
        raise ValueError(f"the ring would have {total} points, more than {MAX_RING_POINTS}")


def _label_hashes(node_id: str, start: int, stop: int) -> list[int]:
    """The points ``start`` to ``stop - 1`` of ``node_id`` (see the design note), in label order."""
    prefix = node_id.encode() + b"#"
    return [_xxh3_64(prefix + b"%d" % i) for i in range(start, stop)]


@_collector_paused
def _build(members: dict[str, float], vnodes_per_weight: int) -> tuple[array[int], list[str], dict[tuple[int, str], int]]:
    """Hash every node's points and merge them into runs (see the design note): ``(ends, run_ids, multi)``."""
    _check_total(members, vnodes_per_weight)
    ids = list(members)  # sorted by node id, so rank order == id order
    # Pack (point, rank) into one int: sorting ints is about twice as fast as
    # sorting tuples, and the low bits break ties by node id.
    shift = max(1, (len(ids) - 1).bit_length())
    packed: list[int] = []
    for rank, (node_id, weight) in enumerate(members.items()):
        packed.extend([(h << shift) | rank for h in _label_hashes(node_id, 0, _point_count(weight, vnodes_per_weight))])
    packed.sort()
    mask = (1 << shift) - 1
    ends: list[int] = []
    run_ids: list[str] = []
    multi: dict[tuple[int, str], int] = {}
    last_rank = -1
    count = 0
    for value in packed:
        rank = value & mask
        if rank == last_rank:
            ends[-1] = value >> shift
            count += 1
        else:
            if count > 1:
                multi[ends[-1], run_ids[-1]] = count
            ends.append(value >> shift)
            run_ids.append(ids[rank])
            last_rank = rank
            count = 1
    if count > 1:
        multi[ends[-1], run_ids[-1]] = count
    return array("Q", ends), run_ids, multi


def _changed_count(old: dict[str, float], new: dict[str, float], vnodes_per_weight: int) -> int:
    """How many points differ between rings of ``old`` and ``new`` members (same points per weight)."""
    changed = 0
    for node in old.keys() | new.keys():
        before = _point_count(old[node], vnodes_per_weight) if node in old else 0
        after = _point_count(new[node], vnodes_per_weight) if node in new else 0
        changed += abs(after - before)
    return changed


_Entry = tuple[int, str]  # a point and its node: sorts like the packed ints of _build


def _changed_points(old: dict[str, float], new: dict[str, float], vnodes_per_weight: int) -> tuple[list[_Entry], list[_Entry]]:
    """``(removed, added)``: the points only ``old``'s ring has, and those only ``new``'s has.

    A node's points are its labels ``0 .. count - 1``, so a re-weight adds or
    drops the labels between the two counts.
    """
    removed: list[_Entry] = []
    added: list[_Entry] = []
    for node in old.keys() | new.keys():
        before = _point_count(old[node], vnodes_per_weight) if node in old else 0
        after = _point_count(new[node], vnodes_per_weight) if node in new else 0
        if after > before:
            added.extend([(h, node) for h in _label_hashes(node, before, after)])
        elif before > after:
            removed.extend([(h, node) for h in _label_hashes(node, after, before)])
    return removed, added


class _Window:
    """Old runs ``[a, b)`` that are rebuilt, the points they lose and gain, and the new runs ``[na, nb)``.

    ``made`` is where the new runs' ends and owners start in ``_Runs.ends``/``ids``.
    """

    __slots__ = ("a", "added", "b", "gone", "made", "na", "nb", "places")

    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b
        self.gone: list[_Entry] = []
        self.added: list[_Entry] = []
        self.places: list[int] = []  # the runs that lose or gain points
        self.na = self.nb = self.made = 0


def _windows(base: HashRing, removed: list[_Entry], added: list[_Entry]) -> list[_Window]:
    """Where the changed points fall, as sorted disjoint windows of old runs.

    A point's place is the first run whose last point sorts at or after it
    (``len`` for a point after the last run). A window covers the places of
    its points with one untouched run on either side where there is one:
    those keep their owner and differ from the runs outside, so rebuilding
    each window alone gives the whole new run list.
    """
    ends, run_ids, starts, shift = base._ends, base._run_ids, base._starts, base._shift
    n = len(ends)
    places: list[tuple[int, bool, _Entry]] = []
    for entries, adding in ((removed, False), (added, True)):
        for entry in entries:
            point, node = entry
            b = point >> shift
            i = bisect_left(ends, point, starts[b], starts[b + 1])
            while i < n and ends[i] == point and run_ids[i] < node:  # a collision: ties go by node id
                i += 1
            places.append((i, adding, entry))
    places.sort()
    windows: list[_Window] = []
    window = _Window(-1, -1)
    for i, adding, entry in places:
        if i - 1 < window.b:  # overlaps the current window
            window.b = min(n, i + 2)
        else:
            window = _Window(max(0, i - 1), min(n, i + 2))
            windows.append(window)
        (window.added if adding else window.gone).append(entry)
        if not window.places or window.places[-1] != i:
            window.places.append(i)
    return windows


class _Runs:
    """Rebuilds windows of a ring's runs from their points; collects the new runs and their point counts."""

    __slots__ = ("_base", "_born", "_counts", "_dead", "_points", "ends", "ids")

    ends: list[int]  # the ends of the rebuilt windows' new runs, window after window
    ids: list[str]  # their owners

    def __init__(self, base: HashRing) -> None:
        self._base = base
        self._counts = {node: _point_count(w, base._vnodes_per_weight) for node, w in base._nodes.items()}
        self._points: dict[str, list[int]] = {}  # node -> its points in base, sorted (nodes with a merged run in a window)
        self._dead: list[tuple[int, str]] = []  # base's multi keys of the rebuilt runs
        self._born: dict[tuple[int, str], int] = {}  # multi entries of the new runs
        self.ends = []
        self.ids = []

    def _points_of(self, end: int, node: str, count: int) -> list[tuple[int, str, int]]:
        """The points of the base's run of ``count`` points ending at ``end``, sorted, one entry each."""
        points = self._points.get(node)
        if points is None:
            points = self._points[node] = sorted(_label_hashes(node, 0, self._counts[node]))
        # the run's points are the node's last `count` points up to `end` (equal points sort together)
        k = bisect_right(points, end)
        return [(p, node, 1) for p in points[k - count : k]]

    def rebuild(self, window: _Window) -> None:
        """Append the runs that replace ``window``'s to ``ends``/``ids`` and set its ``na``/``nb``/``made``."""
        base = self._base
        ends, run_ids, multi = base._ends, base._run_ids, base._multi
        new_ends, new_ids, born = self.ends, self.ids, self._born
        window.made = len(new_ids)
        a = window.a
        if window.b - a == 3 and len(window.gone) + len(window.added) == 1:
            # The common case at scale: one point, in the middle of three runs of one point each.
            e0, e1, e2 = ends[a], ends[a + 1], ends[a + 2]
            x0, x1, x2 = run_ids[a], run_ids[a + 1], run_ids[a + 2]
            if (e0, x0) not in multi and (e1, x1) not in multi and (e2, x2) not in multi:
                if window.added:
                    point, node = window.added[0]
                    if node != x0 and node != x1:  # a run of its own, before run a + 1's point
                        new_ends += (e0, point, e1, e2)
                        new_ids += (x0, node, x1, x2)
                        return
                elif x0 != x2:  # run a + 1's only point left
                    new_ends += (e0, e2)
                    new_ids += (x0, x2)
                    return
                else:  # ... and its neighbours merged
                    new_ends.append(e2)
                    new_ids.append(x0)
                    born[e2, x0] = 2
                    return
        # (point, node, points it stands for): a run of several points that no point enters or leaves stays
        # one entry, at its end (it can only merge with a neighbour); the others' points are hashed again
        entries: list[tuple[int, str, int]] = []
        for j in range(window.a, window.b):
            end, node = ends[j], run_ids[j]
            count = multi.get((end, node))
            if count is None:
                entries.append((end, node, 1))
            else:
                self._dead.append((end, node))
                entries += self._points_of(end, node, count) if j in window.places else [(end, node, count)]
        if window.gone:  # both sorted, and every gone point is there: a merge
            gone = sorted((point, node, 1) for point, node in window.gone)
            kept: list[tuple[int, str, int]] = []
            k = 0
            for entry in entries:
                if k < len(gone) and entry == gone[k]:
                    k += 1
                else:
                    kept.append(entry)
            entries = kept
        if window.added:
            entries += [(point, node, 1) for point, node in window.added]
            entries.sort()
        last = ""
        total = 0
        for point, node, count in entries:
            if node == last:
                new_ends[-1] = point
                total += count
            else:
                if total > 1:
                    born[new_ends[-1], last] = total
                new_ends.append(point)
                new_ids.append(node)
                last = node
                total = count
        if total > 1:
            born[new_ends[-1], last] = total

    def multi(self) -> dict[tuple[int, str], int]:
        """The new ring's ``_multi``: the base's, less the rebuilt runs', plus the new runs'."""
        multi = dict(self._base._multi)
        for key in self._dead:
            del multi[key]
        multi.update(self._born)
        return multi


@_collector_paused
def _derive(base: HashRing, members: dict[str, float], epoch: int) -> HashRing:
    """The ring of ``members`` (validated) at ``epoch``, computed from ``base`` (see "Derived rings")."""
    vnodes = base._vnodes_per_weight
    _check_total(members, vnodes)
    removed, added = _changed_points(base._nodes, members, vnodes)
    if not removed and not added:
        return base._same_layout(members, epoch)
    if not base._ends or not members:
        return HashRing(members, epoch=epoch, vnodes_per_weight=vnodes)
    ends, run_ids = base._ends, base._run_ids
    windows = _windows(base, removed, added)
    runs = _Runs(base)
    moved = 0  # how far the runs after the current window moved
    for window in windows:
        runs.rebuild(window)
        window.na = window.a + moved
        window.nb = window.na + len(runs.ids) - window.made
        moved += (window.nb - window.na) - (window.b - window.a)
    size = len(ends) + moved
    shift = base._shift
    if 64 - max(0, size.bit_length() - 1) == shift:  # as many buckets as before: patch the index
        starts: array[int] | None = _patched_starts(base._starts, shift, ends, windows, runs.ends)
    else:  # the run count crossed a power of two: build it once the run ends are there
        starts = None
    patches: dict[int, _PrefsPatch] = {}
    for r, table in list(base._tables.items()):  # a snapshot: another thread may memoize a table meanwhile
        want = min(r, len(members))
        if want == min(r, len(base._nodes)):  # otherwise every list changes: build it on demand
            patches[r] = _PrefsPatch(table.prefs, windows, want, runs.ids, run_ids)
    # The new runs are the old ones with each window replaced.
    new_ends = array("Q", [0]) * size
    new_ids: list[str] = []
    done = 0
    with memoryview(ends) as old, memoryview(new_ends) as out, memoryview(array("Q", runs.ends)) as rebuilt:
        for w in windows:
            out[w.na - (w.a - done) : w.na] = old[done : w.a]
            out[w.na : w.nb] = rebuilt[w.made : w.made + w.nb - w.na]
            new_ids += run_ids[done : w.a]
            new_ids += runs.ids[w.made : w.made + w.nb - w.na]
            done = w.b
        out[size - (len(ends) - done) :] = old[done:]
    new_ids += run_ids[done:]
    if starts is None:
        starts, shift = _bucket_index(new_ends)
    tables = {r: PreferenceTable(new_ends, starts, shift, patch.apply(new_ids)) for r, patch in patches.items()}
    ring = HashRing.__new__(HashRing)
    ring._set(epoch, vnodes, members, new_ends, new_ids, starts, shift, tables, runs.multi())
    return ring


def _patched_starts(starts: array[int], shift: int, old_ends: array[int], windows: list[_Window], rebuilt: list[int]) -> array[int]:
    """The derived ring's bucket index, from ``starts``, the index of ``old_ends`` with the same ``shift``.

    ``rebuilt`` holds the windows' new run ends (``_Runs.ends``). A
    window's run ends, old or new, lie in ``[lo, hi]``. A bucket whose
    first hash is in no window's ``(lo, hi]`` moves by the runs gained in
    every window below it; the few inside one are bisected among the
    window's new runs. The per-bucket offsets are added as one big integer
    over the array's bytes, which cannot carry from one entry into the next
    since every result fits: about 15 ms for 2**20 buckets, against 60 ms
    for a per-bucket ``map``.
    """
    offsets: list[int] = []  # offsets[i] applies to the next counts[i] buckets (ints: no work for the collector)
    counts: list[int] = []
    done = moved = 0
    for w in windows:
        lo, hi = old_ends[w.a], old_ends[w.b - 1]
        first_new, stop_new = w.made, w.made + w.nb - w.na
        if stop_new > first_new:
            lo, hi = min(lo, rebuilt[first_new]), max(hi, rebuilt[stop_new - 1])
        first, stop = (lo >> shift) + 1, (hi >> shift) + 1
        offsets.append(moved)
        counts.append(first - done)
        for bucket in range(first, stop):
            offsets.append(w.na + bisect_left(rebuilt, bucket << shift, first_new, stop_new) - first_new - starts[bucket])
            counts.append(1)
        done, moved = stop, moved + (w.nb - w.na) - (w.b - w.a)
    offsets.append(moved)
    counts.append(len(starts) - done)
    # Every entry of the addend must be >= 0: subtract when no offset is positive, else add a bias and take it off.
    sign = -1 if max(offsets) <= 0 else 1
    bias = max(0, -min(offsets)) if sign > 0 else 0
    lanes: dict[int, bytes] = {}
    pieces = []
    for offset, count in zip(offsets, counts, strict=True):
        lane = lanes.get(offset)
        if lane is None:
            lane = lanes[offset] = array(starts.typecode, [sign * offset + bias]).tobytes()
        pieces.append(lane * count)
    order = sys.byteorder
    total = int.from_bytes(starts.tobytes(), order) + sign * int.from_bytes(b"".join(pieces), order)
    if bias:
        total -= int.from_bytes(array(starts.typecode, [bias]).tobytes() * len(starts), order)
    out = array(starts.typecode)
    out.frombytes(total.to_bytes(len(starts) * starts.itemsize, order))
    return out


def _pref_key(run_ids: list[str], j: int, want: int) -> tuple[str, ...]:
    if want == 1:
        return (run_ids[j],)
    if want == 2 and j + 1 < len(run_ids):  # neighbours differ
        return (run_ids[j], run_ids[j + 1])
    return tuple(_walk(run_ids, j, want)[0])


class _PrefsPatch:
    """One memoized preference table of the base ring, patched for the derived one.

    The windows' new runs get new lists; so do the runs before each window
    whose walk reaches into it (walking back from the window, the walks only
    get shorter, so the first one that stops short ends the scan: for ``r ==
    2`` that is the run just before). A list is shared with the old table
    where the same list existed in a window. The new lists are made before
    the new run list exists where the window's own runs tell them (all but a
    walk past the ring's last run, or ``r > 2``): a young garbage collection
    while they are made then walks no 2M-entry list.
    """

    __slots__ = ("_later", "_made", "_pool", "_prefs", "_want", "_windows")

    def __init__(self, prefs: list[list[str]], windows: list[_Window], want: int, rebuilt: list[str], old_ids: list[str]) -> None:
        self._prefs, self._windows, self._want = prefs, windows, want
        pool = self._pool = _ListPool()
        for w in windows:
            for j in range(w.a, w.b):
                pool.setdefault(tuple(prefs[j]), prefs[j])
        n = len(old_ids)
        self._made: list[list[list[str] | None]] = []
        self._later: list[tuple[list[list[str] | None], int, int]] = []  # (window's lists, k, run index)
        for w in windows:
            lists: list[list[str] | None] = []
            for k in range(w.nb - w.na):
                node = rebuilt[w.made + k]
                if want == 1:
                    lists.append(pool[(node,)])
                elif want == 2 and k + 1 < w.nb - w.na:
                    lists.append(pool[node, rebuilt[w.made + k + 1]])
                elif want == 2 and w.b < n:  # the next run is the old run after the window
                    lists.append(pool[node, old_ids[w.b]])
                else:
                    lists.append(None)
                    self._later.append((lists, k, w.na + k))
            self._made.append(lists)

    def apply(self, run_ids: list[str]) -> list[list[str]]:
        """The new table's lists, for the new ring's ``run_ids``."""
        pool, want, prefs = self._pool, self._want, self._prefs
        for lists, k, j in self._later:
            lists[k] = pool[_pref_key(run_ids, j, want)]
        out: list[list[str]] = []
        done = 0
        for w, lists in zip(self._windows, self._made, strict=True):
            out += prefs[done : w.a]
            out += lists  # type: ignore[arg-type]  # every None was filled above
            done = w.b
        out += prefs[done:]
        size = len(run_ids)
        if want > 1:
            for w in self._windows:
                for dist in range(1, size):
                    j = (w.na - dist) % size
                    owners, steps = _walk(run_ids, j, want)
                    if steps < dist:
                        break
                    if out[j] != owners:
                        out[j] = pool[tuple(owners)]
        return out


def moved_ranges(old: HashRing, new: HashRing, r: int = 1) -> list[RangeMove]:
    """Return the arcs whose preference list of length ``r`` differs.

    Every hash whose ``owners_for_hash(h, r)`` differs between ``old`` and
    ``new`` lies in exactly one returned arc, every other hash in none, and the
    arc's ``old_owners``/``new_owners`` are those two lists. Neighbouring arcs
    with identical owner tuples are merged, the wrap-around included, so the
    first arc may wrap (``start > end``); ``start == end`` is the whole circle.
    Arcs are ordered by ``end``.

    :param old: the ring before the change.
    :param new: the ring after the change.
    :param r: the length of the preference lists compared.
    :raises ValueError: if ``r < 1``.
    """
    if r < 1:
        _bad_r(r)
    bounds = _changed_bounds(old, new, r)
    if bounds is None:
        bounds = sorted(set(old._ends).union(new._ends))
    if not bounds:
        return []
    old_at = _OwnersAt(old, r)
    new_at = _OwnersAt(new, r)
    if len(bounds) == 1:
        b = bounds[0]
        arcs = [(b, b, (old_at(b), new_at(b)))]
    else:
        # Between neighbouring bounds no run of either ring starts or ends, so
        # each preference list is constant on (previous bound, bound].
        arcs = [(bounds[-1], bounds[0], (old_at(bounds[0]), new_at(bounds[0])))]
        arcs.extend((bounds[i - 1], bounds[i], (old_at(bounds[i]), new_at(bounds[i]))) for i in range(1, len(bounds)))
        arcs = _merge_circular(arcs)
    return [RangeMove(start, end, before, after) for start, end, (before, after) in arcs if before != after]


def _changed_bounds(old: HashRing, new: HashRing, r: int) -> list[int] | None:
    """The run ends ``moved_ranges`` needs to look at, when the rings differ in a few points; else ``None``.

    Preference lists can only differ on the windows of runs around the
    changed points (see "Derived rings") and on the runs before a window
    whose walk reaches into it, the same in both rings as those runs are.
    Each such stretch ``(s, e]`` gives its run ends in both rings and ``s``:
    the run ending at ``s`` is unchanged, so the arc that ends there and
    spans everything unchanged since the previous stretch has the same
    preference list in both rings and moves nothing. At 1,000 nodes this
    takes milliseconds where sorting the union of both rings' 2M ends and
    walking them took 13 s.
    """
    vnodes = old._vnodes_per_weight
    if vnodes != new._vnodes_per_weight or not old._ends or not new._ends:
        return None
    want = min(r, len(old._nodes))
    if want != min(r, len(new._nodes)) or 4 * _changed_count(old._nodes, new._nodes, vnodes) > len(old._ends):
        return None
    ends, run_ids = old._ends, old._run_ids
    n = len(ends)
    windows = _windows(old, *_changed_points(old._nodes, new._nodes, vnodes))
    found: set[int] = set()
    last = RING_SIZE - 1
    for k, w in enumerate(windows):
        room = (w.a - windows[k - 1].b) % n if len(windows) > 1 else n - (w.b - w.a)  # untouched runs before w
        first = w.a
        if want > 1:
            for dist in range(1, room + 1):
                if _walk(run_ids, (w.a - dist) % n, want)[1] < dist:
                    break
                first = w.a - dist
        if w.b - first >= n:
            return None  # the walks reach around the whole circle
        start, end = ends[(first - 1) % n], ends[w.b - 1] if w.b < n else last
        found.add(start)
        for ring_ends in (ends, new._ends):
            if start < end:
                found.update(ring_ends[bisect_right(ring_ends, start) : bisect_right(ring_ends, end)])
            else:
                found.update(ring_ends[bisect_right(ring_ends, start) :])
                found.update(ring_ends[: bisect_right(ring_ends, end)])
    return sorted(found) if len(found) > 1 else None


class _OwnersAt:
    """Preference lists of one ring at ascending hashes, cached per run."""

    __slots__ = ("_cached", "_index", "_ring", "_want")

    def __init__(self, ring: HashRing, r: int) -> None:
        self._ring = ring
        self._want = min(r, len(ring._nodes))
        self._index = -1
        self._cached: tuple[str, ...] = ()

    def __call__(self, h: int) -> tuple[str, ...]:
        ring = self._ring
        if not ring._ends:
            return ()
        i = ring._run_index(h)
        if i != self._index:
            self._index = i
            self._cached = tuple(_walk(ring._run_ids, i, self._want)[0])
        return self._cached
