"""RESP's SCAN on a master: every key of the cluster through one small cursor.

A scan follows a **plan** fixed when it starts (cursor 0): the hash space is
cut at every point of the ring (and of the previous ring while data moves),
each arc is given to the node a read of it would go to first (its first live
owner, unfenced first, exactly as ``ClusterView.read_candidates``), and the
arcs are grouped by node. The scan then walks the plan node by node; on each
node it runs the native SCAN over that node's arcs (a session on the aux
node, which bounds each call's work: docs/PROTOCOL.md). With ``--replicas R``
every key is read from one owner only, so it is listed once.

The master keeps the plan, the node reached and that node's native cursor in
a session of its own; the RESP cursor is the session's number, so it stays a
small integer (redis-cli parses cursors as unsigned 64-bit). Sessions idle
for ``KEY_SCAN_TTL_S`` are dropped, as the aux nodes drop theirs, and at most
``MAX_KEY_SCANS`` are kept (opening another drops the least recently used).

What a client gets is Redis's guarantee while membership is stable: a key
present for the whole scan is returned (once); a key written or deleted
during it may or may not be. A membership change during a scan moves keys
between nodes, and keys that moved from a node not yet scanned to one
already scanned are missed: start again after one (``dcache ring`` shows
the epoch). The values travel from the aux nodes to the master with the
keys (the native SCAN's page) and stop there.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BadArgumentsError
from .view import ClusterView

__all__ = ["KEY_SCAN_TTL_S", "MAX_KEY_SCANS", "KeyScan", "KeyScans", "scan_plan"]

#: Seconds a key scan survives without a call (the aux nodes' scan sessions last as long).
KEY_SCAN_TTL_S = 60.0
#: Most key scans a master keeps at once.
MAX_KEY_SCANS = 64

#: One node's share of a scan: its id and the arcs ``[start, end]`` (start exclusive) it is read for.
Share = tuple[str, list[list[int]]]


def scan_plan(view: ClusterView, usable: Callable[[str], bool]) -> list[Share]:
    """Which node to read each arc of the hash space from, grouped by node (sorted by node id).

    ``usable(node_id)`` says whether the master trusts the node now (connected,
    not suspected); among an arc's read candidates the first usable one is
    chosen, or the first candidate if none is. Arcs with no live owner are
    left out. A ring of one point gives one node the whole circle (``[e, e]``).
    """
    rings = [view.ring]
    if view.prev_ring is not None and not view.settling:
        rings.append(view.prev_ring)
    ends = sorted({e for ring in rings if len(ring) for e in ring.preference_table(1).ends})
    if not ends:
        return []
    by_node: dict[str, list[list[int]]] = {}
    for i, end in enumerate(ends):
        candidates = view.read_candidates_for_hash(end)
        if not candidates:
            continue
        node = next((n for n in candidates if usable(n)), candidates[0])
        start = ends[i - 1]  # i == 0: the arc that wraps past zero (or the whole circle if one point)
        arcs = by_node.setdefault(node, [])
        if arcs and arcs[-1][1] == start:
            arcs[-1][1] = end  # adjacent to the previous arc of this node: one arc
        else:
            arcs.append([start, end])
    return sorted(by_node.items())


@dataclass(slots=True)
class KeyScan:
    """One scan in progress: the plan, the share reached, that node's native SCAN cursor."""

    plan: list[Share]
    index: int = 0
    cursor: int = 0
    last_used: float = 0.0


class KeyScans:
    """A master's scans in progress, by number (the RESP cursor), bounded in count and idle time."""

    __slots__ = ("_scans", "_next_id", "_monotonic")

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._scans: OrderedDict[int, KeyScan] = OrderedDict()
        self._next_id = 1
        self._monotonic = monotonic

    def __len__(self) -> int:
        return len(self._scans)

    def resume(self, cursor: int) -> KeyScan:
        """The scan a non-zero cursor names.

        Raises:
            BadArgumentsError: no such scan (never opened here, finished, or idle too long).
        """
        self._expire()
        scan = self._scans.get(cursor)
        if scan is None:
            raise BadArgumentsError(f"invalid cursor (unknown, finished, or idle for over {KEY_SCAN_TTL_S:.0f} s: start again from 0)")
        self._scans.move_to_end(cursor)
        return scan

    def keep(self, cursor: int, scan: KeyScan) -> int:
        """The cursor to answer after a page: 0 (and the scan forgotten) when it is complete, else its number."""
        if scan.index >= len(scan.plan):
            self._scans.pop(cursor, None)
            return 0
        scan.last_used = self._monotonic()
        if not cursor:
            cursor = self._next_id
            self._next_id += 1
            self._scans[cursor] = scan
            while len(self._scans) > MAX_KEY_SCANS:
                self._scans.popitem(last=False)
        return cursor

    def _expire(self) -> None:
        now = self._monotonic()
        scans = self._scans
        while scans:
            cursor, scan = next(iter(scans.items()))
            if now - scan.last_used < KEY_SCAN_TTL_S:
                break
            del scans[cursor]
