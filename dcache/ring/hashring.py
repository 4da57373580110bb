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

Complexity (``P`` points, ``N`` nodes)
    Build ``O(P log P)``; ``owner`` ``O(1)`` expected (bucket index); ``owners(key, r)``
    ``O(log P + walk)``, the walk being the runs visited until ``r`` distinct
    nodes are seen (about ``N * H(r) / (N - r + 1)``, small for the usual
    ``r`` of 2 or 3); ``shares``, ``ranges`` and ``fingerprint`` ``O(P)``;
    ``moved_ranges`` ``O((P_old + P_new) * walk)``.

This module is pure: no I/O, no clock, no logging, no asyncio.
"""

from __future__ import annotations

import math
import sys
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

import xxhash

from ..errors import DCacheError

__all__ = [
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

_T = TypeVar("_T")

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
    it). Runs with equal preference lists share one list object. The table is
    shared by every holder of the ring: nothing in it may be modified.

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

    __slots__ = ("_ends", "_epoch", "_nodes", "_run_ids", "_shift", "_starts", "_tables", "_vnodes_per_weight")

    _epoch: int
    _vnodes_per_weight: int
    _nodes: dict[str, float]  # sorted by node id; never mutated
    _ends: array[int]  # run ends, ascending; never mutated
    _run_ids: list[str]  # owner of each run; neighbours differ
    _starts: array[int]  # bucket index: first run of each bucket, then len(_ends)
    _shift: int  # 64 - log2(buckets)
    _tables: dict[int, PreferenceTable]  # r -> table, filled on demand; shared with with_epoch copies

    def __init__(
        self,
        nodes: Mapping[str, float] | None = None,
        *,
        epoch: int = 0,
        vnodes_per_weight: int = VNODES_PER_WEIGHT,
    ) -> None:
        if type(epoch) is not int:  # bool is an int subclass: refuse it too
            raise TypeError(f"epoch must be an int, got {epoch!r}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if type(vnodes_per_weight) is not int or vnodes_per_weight < 1:
            raise ValueError(f"vnodes_per_weight must be an int >= 1, got {vnodes_per_weight!r}")
        members = _validate_nodes(nodes or {})
        ends, run_ids = _build(members, vnodes_per_weight)
        starts, shift = _bucket_index(ends)
        self._set(epoch, vnodes_per_weight, members, ends, run_ids, starts, shift, {})

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
        return self._walk(self._run_index(h), r)

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
        by ``with_epoch``, return the same table. Runs with equal preference
        lists share one list (for ``r == 1``, one list per node).

        :raises ValueError: if ``r < 1``.
        """
        if r < 1:
            _bad_r(r)
        table = self._tables.get(r)
        if table is None:
            table = PreferenceTable(self._ends, self._starts, self._shift, self._preference_lists(r))
            self._tables[r] = table
        return table

    def _preference_lists(self, r: int) -> list[list[str]]:
        run_ids = self._run_ids
        if r == 1 or len(self._nodes) == 1:
            single = {node: [node] for node in self._nodes}
            return [single[node] for node in run_ids]
        shared: dict[tuple[str, ...], list[str]] = {}
        prefs: list[list[str]] = []
        walk = self._walk
        last = len(run_ids) - 1
        for i in range(last + 1):
            # neighbouring runs differ (but the last and the first may not): for r == 2 the next run is the second owner
            pref = (run_ids[i], run_ids[i + 1]) if r == 2 and i < last else tuple(walk(i, r))
            same = shared.get(pref)
            if same is None:
                same = shared[pref] = list(pref)
            prefs.append(same)
        return prefs

    def _walk(self, i: int, r: int) -> list[str]:
        """The first ``r`` distinct owners of the runs from index ``i`` on."""
        run_ids = self._run_ids
        out = [run_ids[i]]
        want = min(r, len(self._nodes))
        if want == 1:
            return out
        n = len(run_ids)
        for _ in range(n - 1):
            i += 1
            if i == n:
                i = 0
            node = run_ids[i]
            if node not in out:
                out.append(node)
                if len(out) == want:
                    break
        return out

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
        return HashRing(
            nodes,
            epoch=self._epoch + 1,
            vnodes_per_weight=self._vnodes_per_weight,
        )

    def without_node(self, node_id: str) -> HashRing:
        """Return a ring with ``node_id`` removed, at ``epoch + 1``.

        :raises KeyError: if ``node_id`` is not in the ring.
        """
        if node_id not in self._nodes:
            raise KeyError(node_id)
        nodes = dict(self._nodes)
        del nodes[node_id]
        return HashRing(
            nodes,
            epoch=self._epoch + 1,
            vnodes_per_weight=self._vnodes_per_weight,
        )

    def with_epoch(self, epoch: int) -> HashRing:
        """Return the same layout with another epoch (no rebuild).

        :raises TypeError: if ``epoch`` is not an int.
        :raises ValueError: if ``epoch`` is negative.
        """
        if type(epoch) is not int:
            raise TypeError(f"epoch must be an int, got {epoch!r}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        ring = HashRing.__new__(HashRing)
        ring._set(epoch, self._vnodes_per_weight, self._nodes, self._ends, self._run_ids, self._starts, self._shift, self._tables)
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

        :param known: rings the caller already holds; if one has the same
            members, weights and points per weight, its layout (and its
            memoized preference tables) is reused with ``data``'s epoch
            instead of being built again (seconds at 1,000 nodes).
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
        if epoch >= 0:
            for ring in known:
                if ring is not None and ring._vnodes_per_weight == vnodes and ring._nodes == _validate_nodes(nodes):
                    return ring if ring._epoch == epoch else ring.with_epoch(epoch)
        return cls(nodes, epoch=epoch, vnodes_per_weight=vnodes)


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


def _build(members: dict[str, float], vnodes_per_weight: int) -> tuple[array[int], list[str]]:
    """Hash every node's points and merge them into runs (see the design note)."""
    total = sum(_point_count(w, vnodes_per_weight) for w in members.values())
    if total > MAX_RING_POINTS:
        raise ValueError(f"the ring would have {total} points, more than {MAX_RING_POINTS}")
    ids = list(members)  # sorted by node id, so rank order == id order
    # Pack (point, rank) into one int: sorting ints is about twice as fast as
    # sorting tuples, and the low bits break ties by node id.
    shift = max(1, (len(ids) - 1).bit_length())
    packed: list[int] = []
    for rank, (node_id, weight) in enumerate(members.items()):
        prefix = node_id.encode() + b"#"
        packed.extend((_xxh3_64(prefix + b"%d" % i) << shift) | rank for i in range(_point_count(weight, vnodes_per_weight)))
    packed.sort()
    mask = (1 << shift) - 1
    ends: list[int] = []
    run_ids: list[str] = []
    last_rank = -1
    for value in packed:
        rank = value & mask
        if rank == last_rank:
            ends[-1] = value >> shift
        else:
            ends.append(value >> shift)
            run_ids.append(ids[rank])
            last_rank = rank
    return array("Q", ends), run_ids


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


class _OwnersAt:
    """Preference lists of one ring at ascending hashes, cached per run."""

    __slots__ = ("_cached", "_index", "_r", "_ring")

    def __init__(self, ring: HashRing, r: int) -> None:
        self._ring = ring
        self._r = r
        self._index = -1
        self._cached: tuple[str, ...] = ()

    def __call__(self, h: int) -> tuple[str, ...]:
        ring = self._ring
        if not ring._ends:
            return ()
        i = ring._run_index(h)
        if i != self._index:
            self._index = i
            self._cached = tuple(self._ring._walk(i, self._r))
        return self._cached
