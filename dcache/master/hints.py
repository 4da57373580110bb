"""Hinted handoff: writes an owner missed, kept by the master until the owner can take them.

When a write is acknowledged without one of its owners (the owner was
suspected, timed out or was not connected, while another owner applied it),
the master keeps a *hint* for that owner: the entry as applied elsewhere,
``[key, value, expires_at, version]``, or a delete ``[key, version]``. Only
the newest hint per key is kept. While an owner has hints on a master, that
master does not read from it (it may be stale); once the owner answers
again, ``HintReplayer`` sends the hints as ``APPLY`` / ``APPLY_DELETES``,
which are last-writer-wins, so a hint never overwrites a newer write and
replaying twice changes nothing.

Hints are bounded (``MAX_HINTS_PER_NODE`` keys, ``MAX_HINT_BYTES`` bytes per
node). Past the bound the owner's hints are dropped and ``overflowed`` is
set: the owner must then be reconciled in full from its co-owners (the
coordinator fences it, see ``dcache.master.membership``). Hints for a node
that leaves the view, is marked down or is fenced are dropped once every
master can get that view (``Membership`` ``on_written``: at once in embedded
mode, once it is in ZooKeeper for the leader's own): coming back, a node is
re-filled from the other owners by the migration the view change starts, a
fenced one by its reconciliation. A view that is dropped instead (a leader
cut off from ZooKeeper) refills nothing, so the hints stay until replayed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..protocol import Op

__all__ = ["Hints", "MAX_HINTS_PER_NODE", "MAX_HINT_BYTES", "REPLAY_BATCH"]

log = logging.getLogger("dcache.master.hints")

#: Most keys hinted for one node.
MAX_HINTS_PER_NODE = 100_000
#: Most bytes of hinted keys and values for one node.
MAX_HINT_BYTES = 64 * 1024 * 1024
#: Entries per APPLY while replaying.
REPLAY_BATCH = 500

_DELETE = None  # the value slot of a delete hint


class _NodeHints:
    __slots__ = ("entries", "bytes", "overflowed", "replaying")

    def __init__(self) -> None:
        #: key -> (value or None for a delete, expires_at, version)
        self.entries: OrderedDict[bytes, tuple[bytes | None, int, int]] = OrderedDict()
        self.bytes = 0
        self.overflowed = False
        self.replaying = False


class Hints:
    """The hints this master keeps, per aux node.

    ``on_overflow(node_id)`` is called when a node's hints pass the bound
    (they are dropped; the node needs a full reconciliation).
    """

    def __init__(self, on_overflow: Callable[[str], None] | None = None) -> None:
        #: node id -> its hints; a node in here is not read from by this master.
        self.by_node: dict[str, _NodeHints] = {}
        self.on_overflow = on_overflow
        self.hinted_total = 0
        self.replayed_total = 0
        self.overflows_total = 0

    def __contains__(self, node_id: object) -> bool:
        """Whether ``node_id`` has hints (or lost some): this master must not read from it."""
        return node_id in self.by_node

    @property
    def nodes(self) -> list[str]:
        """Nodes with hints."""
        return list(self.by_node)

    def count(self, node_id: str) -> int:
        """Hints held for ``node_id``."""
        h = self.by_node.get(node_id)
        return len(h.entries) if h is not None else 0

    def total(self) -> int:
        """Hints held for every node."""
        return sum(len(h.entries) for h in self.by_node.values())

    def add_set(self, node_id: str, key: bytes, value: bytes, expires_at: int, version: int) -> None:
        """Keep a hint that ``node_id`` missed a write of ``key``."""
        self._add(node_id, key, value, expires_at, version)

    def add_delete(self, node_id: str, key: bytes, version: int) -> None:
        """Keep a hint that ``node_id`` missed a delete of ``key``."""
        self._add(node_id, key, _DELETE, 0, version)

    def _add(self, node_id: str, key: bytes, value: bytes | None, expires_at: int, version: int) -> None:
        h = self.by_node.get(node_id)
        if h is None:
            h = self.by_node[node_id] = _NodeHints()
        if h.overflowed:
            return
        old = h.entries.get(key)
        if old is not None:
            if old[2] >= version:
                return
            h.bytes -= len(key) + (len(old[0]) if old[0] is not None else 0)
        h.entries[key] = (value, expires_at, version)
        h.entries.move_to_end(key)
        h.bytes += len(key) + (len(value) if value is not None else 0)
        self.hinted_total += 1
        if len(h.entries) > MAX_HINTS_PER_NODE or h.bytes > MAX_HINT_BYTES:
            self.overflows_total += 1
            h.entries.clear()
            h.bytes = 0
            h.overflowed = True
            log.warning("aux node %s missed more writes than this master keeps hints for: it needs a full reconciliation", node_id)
            if self.on_overflow is not None:
                self.on_overflow(node_id)

    def drop(self, node_id: str) -> None:
        """Forget the hints of ``node_id`` (it left, was marked down, or was reconciled in full)."""
        if self.by_node.pop(node_id, None) is not None:
            log.info("dropped the hints kept for aux node %s", node_id)

    async def replay(self, node_id: str, call: Callable[..., Any]) -> bool:
        """Send ``node_id`` its hints with ``call(op, *args)``; return whether it has none left.

        Hints added meanwhile stay for the next replay; a hint replaced by a
        newer one while its batch was in flight is kept.
        """
        h = self.by_node.get(node_id)
        if h is None:
            return True
        if h.overflowed:
            return False
        if h.replaying:
            return False
        h.replaying = True
        try:
            while h.entries and self.by_node.get(node_id) is h:
                batch = []
                for key, hint in h.entries.items():
                    batch.append((key, hint))
                    if len(batch) >= REPLAY_BATCH:
                        break
                sets = [[k, v, e, ver] for k, (v, e, ver) in batch if v is not None]
                deletes = [[k, ver] for k, (v, _, ver) in batch if v is None]
                if sets:
                    await call(Op.APPLY, sets)
                if deletes:
                    await call(Op.APPLY_DELETES, deletes)
                for key, hint in batch:
                    if h.entries.get(key) == hint:
                        del h.entries[key]
                        h.bytes -= len(key) + (len(hint[0]) if hint[0] is not None else 0)
                        self.replayed_total += 1
        finally:
            h.replaying = False
        if not h.entries and not h.overflowed and self.by_node.get(node_id) is h:
            del self.by_node[node_id]
            log.info("aux node %s is up to date: its hints were replayed", node_id)
            return True
        return False

    def status(self) -> dict[str, Any]:
        """Per node: hints held and whether some were lost, for RING and STATS."""
        return {n: {"hints": len(h.entries), "overflowed": h.overflowed} for n, h in self.by_node.items()}


async def replay_forever(hints: Hints, node_id: str, call: Callable[..., Any], usable: Callable[[], bool], interval: float) -> None:
    """Replay ``node_id``'s hints whenever it is usable, until it has none (a background task)."""
    while node_id in hints:
        if usable():
            try:
                if await hints.replay(node_id, call):
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("replaying hints to %s failed (%s); retrying", node_id, exc)
        await asyncio.sleep(interval)
