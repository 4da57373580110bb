"""The cluster view: members, the ring, and the migration in progress (pure).

A ``ClusterView`` is an immutable value that every master routes by. The
coordinator (the master that decides membership) builds new views and the
other masters copy them (``to_dict``/``from_dict``); a view is only ever
replaced by one with a larger ``(epoch, seq)``.

* ``epoch`` grows with every membership change of the ring.
* ``seq`` grows with every other change (health, migration finished), so
  followers notice those too.
* ``prev_ring`` is set while data moves from the previous ring's owners to
  the current ring's owners. During that time the previous owners are
  authoritative for reads (they hold everything, and every write also goes
  to them), while writes go to the owners in both rings. A key therefore
  never misses because it has not been copied yet, and a node that comes back
  with stale data is not read before its data has been reconciled.
* ``settling`` is set once the copy is done: reads go to the current ring's
  owners while writes still go to both rings' owners. The coordinator waits
  until every master routes by this view before it drops ``prev_ring``, so
  no master still reading the previous owners ever misses a write.
* ``reconciling`` is set while a ring rebuilt from the aux nodes'
  re-announcements (a lone coordinator restarted) is reconciled: the owners
  of a key may disagree until the pass reaches it, and every master that
  routes by the view reads every owner of a key (``Router.read_every_owner``).
  The coordinator clears it (seq + 1) when the pass ends. Views carry it
  across ring changes (``with_members``), so a pass started again on a new
  ring keeps it set.
* ``departed`` names the nodes that left the membership (a graceful leave,
  FORGET), most recent last, at most ``MAX_DEPARTED``: every view built
  with other members keeps it up to date (``_departed``). Such a node still
  holds what it had when it left, in memory or in its data dir, and the
  cluster went on without it: the coordinator empties it before it joins
  again (``Coordinator.join``). The list travels with the view, so a
  coordinator that takes over (a follower's view, ZooKeeper's ring) knows it.

Routing helpers work per key and allocate only small lists. In the common
case they look the key up in the ring's ``PreferenceTable`` (two probes of
a bucket index, then one index), which the ring memoizes: a view that keeps
its ring (``bumped``, ``migration_done``) shares the table instead of
rebuilding it (2 s at 1,000 nodes before it was shared). A view whose
members change derives its ring, and the ring's table, from the rings it
had (``with_members``; ``from_dict`` with ``known``) instead of building them.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from dataclasses import dataclass, field, replace
from typing import Any

from ..ring import RING_SIZE, HashRing, hash64, moved_ranges

__all__ = ["Member", "ClusterView", "UP", "DOWN", "LEAVING", "FENCED", "MEMBER_STATES", "MAX_DEPARTED"]

UP = "up"
DOWN = "down"
LEAVING = "leaving"
#: In the ring and written to, but not read from until the data it may have
#: missed (it restarted) has been copied to it from the other owners.
FENCED = "fenced"
MEMBER_STATES = (UP, DOWN, LEAVING, FENCED)
_IN_RING = (UP, FENCED)
#: Most node ids a view remembers as departed (the oldest is forgotten first).
MAX_DEPARTED = 1000


@dataclass(frozen=True, slots=True)
class Member:
    """An aux node known to the cluster."""

    node_id: str
    host: str
    port: int
    weight: float = 1.0
    state: str = UP
    since_ms: int = 0  # wall ms of the last state change

    @property
    def addr(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-friendly form."""
        return {
            "node_id": self.node_id,
            "host": self.host,
            "port": self.port,
            "weight": self.weight,
            "state": self.state,
            "since_ms": self.since_ms,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Member:
        """Inverse of ``to_dict``."""
        return cls(
            str(d["node_id"]),
            str(d["host"]),
            int(d["port"]),
            float(d.get("weight", 1.0)),
            str(d.get("state", UP)),
            int(d.get("since_ms", 0)),
        )


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Members, the current ring, and the previous ring while data moves."""

    epoch: int
    seq: int
    replicas: int
    members: dict[str, Member] = field(default_factory=dict)
    ring: HashRing = field(default_factory=HashRing)
    prev_ring: HashRing | None = None
    coordinator: str = ""
    #: The copy to the current ring's owners is done: read them, keep writing both rings (see the module note).
    settling: bool = False
    #: Nodes that left the membership, most recent last (see the module note).
    departed: tuple[str, ...] = ()
    #: The owners of a rebuilt ring are being reconciled: read every owner of a key (see the module note).
    reconciling: bool = False
    #: The ring's ``PreferenceTable`` in the common case (no migration, every
    #: ring member up), unpacked for the hot path; ``_ends`` is empty otherwise.
    _ends: array[int] = field(default_factory=lambda: array("Q"), init=False, repr=False, compare=False)
    _starts: array[int] = field(default_factory=lambda: array("I"), init=False, repr=False, compare=False)
    _shift: int = field(default=64, init=False, repr=False, compare=False)
    _prefs: list[list[str]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        members = self.members
        simple = (
            self.prev_ring is None
            and len(self.ring) > 0
            and all(members.get(n) is not None and members[n].state == UP for n in self.ring.nodes)
        )
        if simple:
            table = self.ring.preference_table(self.replicas)
            object.__setattr__(self, "_ends", table.ends)
            object.__setattr__(self, "_starts", table.starts)
            object.__setattr__(self, "_shift", table.shift)
            object.__setattr__(self, "_prefs", table.prefs)

    # -- building ----------------------------------------------------------------

    @classmethod
    def initial(cls, members: list[Member], replicas: int, epoch: int, coordinator: str = "") -> ClusterView:
        """The first view: every given member up and in the ring."""
        ring = HashRing({m.node_id: m.weight for m in members if m.state in _IN_RING}, epoch=epoch)
        return cls(epoch, 0, replicas, {m.node_id: m for m in members}, ring, None, coordinator)

    def with_members(self, members: dict[str, Member], *, migrate: bool = True) -> ClusterView:
        """A new view (epoch + 1) whose ring holds the members that are up.

        With ``migrate`` the current ring becomes ``prev_ring``, unless a
        migration is still copying: its source ring stays authoritative. A
        settling migration has copied everything to the current ring's
        owners, and masters already read them: they stay written to, as the
        new ``prev_ring`` (the source ring's other owners got no read since).
        The ring is derived from this view's rings (``HashRing.from_nodes``):
        about 90 ms for one node at 1,000 nodes, where a build takes about 4 s.
        """
        epoch = self.epoch + 1
        nodes = {m.node_id: m.weight for m in members.values() if m.state in _IN_RING}
        ring = HashRing.from_nodes(nodes, epoch=epoch, known=(self.ring, self.prev_ring))
        prev = (self.prev_ring if self.prev_ring is not None and not self.settling else self.ring) if migrate else None
        if prev is not None and prev.nodes == ring.nodes:
            prev = None
        departed = _departed(self.departed, self.members, members)
        return replace(self, epoch=epoch, seq=0, members=dict(members), ring=ring, prev_ring=prev, settling=False, departed=departed)

    def migration_settling(self) -> ClusterView:
        """The same rings once the copy is done (seq + 1): reads move to the current owners, writes still go to both."""
        return replace(self, seq=self.seq + 1, settling=True)

    def migration_done(self) -> ClusterView:
        """The same ring with the migration finished (seq + 1)."""
        return replace(self, seq=self.seq + 1, prev_ring=None, settling=False)

    def bumped(self, **changes: Any) -> ClusterView:
        """A copy with ``changes`` and seq + 1 (``departed`` follows a change of ``members``)."""
        if "members" in changes and "departed" not in changes:
            changes["departed"] = _departed(self.departed, self.members, changes["members"])
        return replace(self, seq=self.seq + 1, **changes)

    # -- routing -----------------------------------------------------------------

    def is_live(self, node_id: str) -> bool:
        """Whether the node may be sent requests (known and not down)."""
        m = self.members.get(node_id)
        return m is not None and m.state != DOWN

    def read_candidates_for_hash(self, h: int) -> list[str]:
        """``read_candidates`` of a key hash (``read_candidates`` inlines it: it runs once per read)."""
        ends = self._ends
        if ends:
            b = h >> self._shift
            i = bisect_left(ends, h, self._starts[b], self._starts[b + 1])
            return self._prefs[i if i < len(ends) else 0]
        return self._read_candidates(h)

    def read_candidates(self, key: bytes) -> list[str]:
        """Nodes to read ``key`` from, in order (see the module note).

        The returned list may be shared: callers must not modify it.
        """
        h = hash64(key)
        ends = self._ends
        if ends:  # the common case, precomputed: one short bisect
            b = h >> self._shift
            i = bisect_left(ends, h, self._starts[b], self._starts[b + 1])
            return self._prefs[i if i < len(ends) else 0]
        return self._read_candidates(h)

    def _read_candidates(self, h: int) -> list[str]:
        r = self.replicas
        prev = self.prev_ring
        members = self.members
        if prev is not None and not self.settling:
            old = [n for n in prev.owners_for_hash(h, r) if n in members and members[n].state != DOWN]
            if old:
                return _unfenced_first(old, members)
        return _unfenced_first([n for n in self.ring.owners_for_hash(h, r) if n in members and members[n].state != DOWN], members)

    def write_targets(self, key: bytes) -> list[str]:
        """Live nodes a write of ``key`` goes to: owners in the ring and, while moving, in the previous ring.

        The returned list may be shared: callers must not modify it.
        """
        h = hash64(key)
        ends = self._ends
        if ends:  # the common case: reads and writes go to the same owners
            b = h >> self._shift
            i = bisect_left(ends, h, self._starts[b], self._starts[b + 1])
            return self._prefs[i if i < len(ends) else 0]
        return self._write_targets(h)

    def _write_targets(self, h: int) -> list[str]:
        r = self.replicas
        members = self.members
        targets = [n for n in self.ring.owners_for_hash(h, r) if n in members and members[n].state != DOWN]
        prev = self.prev_ring
        if prev is not None:
            for n in prev.owners_for_hash(h, r):
                if n not in targets and n in members and members[n].state != DOWN:
                    targets.append(n)
        return targets

    def share_without_copy(self, node_id: str) -> float:
        """The fraction of the hash space that ``node_id`` owned and no live node holds a copy of.

        The ring with every down member put back (as it was before they went
        down, if nothing else changed meanwhile) is compared with the current
        one: an arc of ``node_id``'s whose every owner there is down had its
        keys on down nodes only (with ``replicas`` 1, all of its arcs). 0.0
        for a node that is not a down member.
        """
        m = self.members.get(node_id)
        if m is None or m.state != DOWN:
            return 0.0
        nodes = dict(self.ring.nodes)
        nodes.update({n.node_id: n.weight for n in self.members.values() if n.state == DOWN})
        whole = HashRing.from_nodes(nodes, vnodes_per_weight=self.ring.vnodes_per_weight, known=(self.ring,))
        lost = 0
        for move in moved_ranges(whole, self.ring, self.replicas):
            if node_id in move.old_owners and not any(n in self.ring for n in move.old_owners):
                lost += (move.end - move.start) % RING_SIZE or RING_SIZE
        return lost / RING_SIZE

    # -- transport ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A msgpack-friendly form (rings travel as their member lists)."""
        return {
            "epoch": self.epoch,
            "seq": self.seq,
            "replicas": self.replicas,
            "coordinator": self.coordinator,
            "members": [m.to_dict() for m in self.members.values()],
            "ring": self.ring.to_dict(),
            "prev_ring": self.prev_ring.to_dict() if self.prev_ring is not None else None,
            "settling": self.settling,
            "departed": list(self.departed),
            "reconciling": self.reconciling,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], known: ClusterView | None = None) -> ClusterView:
        """Inverse of ``to_dict``; raises ``ValueError``/``KeyError`` on a malformed view.

        ``known`` (the view the caller routes by) lends its rings where the
        layout is the same, so a follower adopting a view that only changed
        ``seq`` (health, migration) rebuilds neither ring nor table.
        """
        members = {m.node_id: m for m in (Member.from_dict(x) for x in d["members"])}
        prev = d.get("prev_ring")
        rings = (known.ring, known.prev_ring) if known is not None else ()
        return cls(
            int(d["epoch"]),
            int(d["seq"]),
            int(d["replicas"]),
            members,
            HashRing.from_dict(d["ring"], rings),
            HashRing.from_dict(prev, rings) if prev is not None else None,
            str(d.get("coordinator", "")),
            bool(d.get("settling", False)),
            tuple(str(n) for n in d.get("departed", ())[-MAX_DEPARTED:]),
            bool(d.get("reconciling", False)),  # absent in a view from a master older than 2026-12-07
        )

    def newer_than(self, other: ClusterView) -> bool:
        """Whether this view supersedes ``other``."""
        return (self.epoch, self.seq) > (other.epoch, other.seq)


def _departed(departed: tuple[str, ...], old: dict[str, Member], new: dict[str, Member]) -> tuple[str, ...]:
    """``departed`` after the members go from ``old`` to ``new``: those that left are added, those that came back removed."""
    gone = [n for n in old if n not in new]
    if not gone and not any(n in new for n in departed):
        return departed
    kept = [n for n in departed if n not in new and n not in gone]
    return tuple([*kept, *gone][-MAX_DEPARTED:])


def _unfenced_first(nodes: list[str], members: dict[str, Member]) -> list[str]:
    """Drop fenced nodes from a read list, unless nothing else is left."""
    readable = [n for n in nodes if members[n].state != FENCED]
    return readable or nodes
