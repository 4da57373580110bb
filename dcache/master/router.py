"""Routing of client ops to aux nodes by the current ``ClusterView``.

Reads go to the first live candidate (``ClusterView.read_candidates``) and
fall back to the next one on a miss or an error, so a request in flight to a
node that just died is retried on its replica. A miss on one candidate with
a hit on a later one repairs the earlier one in the background (last writer
wins, so a repair can never overwrite newer data).

Writes are stamped with a version from this master's hybrid logical clock
and sent in parallel to every live target (``ClusterView.write_targets``).
A write is acknowledged once every live target applied it (or
``write_quorum`` of them); a target that turns out unreachable does not fail
the write if another applied it, since the coordinator re-replicates its
ranges when it marks the node down.

MGET and MSET are split per node, sent in parallel and reassembled in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from ..errors import (
    NotAnIntegerError,
    UnavailableError,
    UpstreamTimeoutError,
)
from ..hlc import HybridClock
from ..protocol import Op
from .links import AuxLink
from .view import ClusterView

__all__ = ["Router", "RouterStats"]

log = logging.getLogger("dcache.master.router")

#: SETV answers
_STORED = 1
_CONDITION_FAILED = 0


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class RouterStats:
    """Plain counters of the router (turned into metrics at scrape time)."""

    __slots__ = ("fallbacks", "repairs", "unavailable", "partial_writes")

    def __init__(self) -> None:
        self.fallbacks = 0
        self.repairs = 0
        self.unavailable = 0
        self.partial_writes = 0


_TRANSIENT = (UnavailableError, UpstreamTimeoutError, ConnectionError, OSError)


class Router:
    """Sends each op to the right aux nodes and combines their answers."""

    def __init__(self, view: ClusterView, links: dict[str, AuxLink], clock: HybridClock, write_quorum: int = 0) -> None:
        self.view = view
        self.links = links
        self.clock = clock
        self.write_quorum = write_quorum
        self.stats = RouterStats()
        #: Batches first-owner GETs into MGETs (``dcache.master.node.GetBatcher``).
        self.get_batcher: Any = None
        self._background: set[asyncio.Future[Any]] = set()

    # -- helpers -------------------------------------------------------------

    def _link(self, node_id: str) -> AuxLink:
        link = self.links.get(node_id)
        if link is None:
            raise UnavailableError(f"no link to aux node {node_id}")
        return link

    def _spawn(self, fut: Any) -> None:
        task = asyncio.ensure_future(fut)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("background repair failed: %s", task.exception())

    def _repair(self, nodes: list[str], key: bytes, entry: list[Any]) -> None:
        value, expires_at, version = entry
        for node in nodes:
            link = self.links.get(node)
            if link is not None:
                self.stats.repairs += 1
                self._spawn(link.request(Op.APPLY, [[key, value, expires_at, version]]))

    # -- reads ----------------------------------------------------------------

    async def getv(self, key: bytes) -> list[Any] | None:
        """``[value, expires_at, version]`` of ``key`` or None, with fallback and repair."""
        candidates = self.view.read_candidates(key)
        if not candidates:
            self.stats.unavailable += 1
            raise UnavailableError("no aux node is available for this key")
        missed: list[str] = []
        error: BaseException | None = None
        for node in candidates:
            try:
                entry = await self._link(node).request(Op.GETV, key)
            except _TRANSIENT as exc:
                error = exc
                self.stats.fallbacks += 1
                continue
            if entry is None:
                missed.append(node)
                continue
            if missed:
                self._repair(missed, key, entry)
            return cast(list[Any], entry)
        if error is not None and not missed:
            self.stats.unavailable += 1
            raise UnavailableError(f"no owner of the key answered: {error}")
        return None

    async def get(self, key: bytes) -> bytes | None:
        entry = await self.getv(key)
        return None if entry is None else entry[0]

    async def exists(self, key: bytes) -> bool:
        return await self.getv(key) is not None

    async def ttl(self, key: bytes) -> int:
        entry = await self.getv(key)
        if entry is None:
            return -2
        expires_at = entry[1]
        if not expires_at:
            return -1
        return max(0, int(expires_at) - _wall_ms())

    async def mget(self, keys: list[bytes]) -> list[bytes | None]:
        view = self.view
        groups: dict[str, list[int]] = {}
        out: list[bytes | None] = [None] * len(keys)
        retry: list[int] = []
        for i, key in enumerate(keys):
            candidates = view.read_candidates(key)
            if not candidates:
                self.stats.unavailable += 1
                raise UnavailableError("no aux node is available for some keys")
            if len(candidates) > 1:
                retry.append(i)  # misses get the full fallback path
            groups.setdefault(candidates[0], []).append(i)
        nodes = list(groups)
        results = await asyncio.gather(
            *(self._link(n).request(Op.MGETV, [keys[i] for i in groups[n]]) for n in nodes),
            return_exceptions=True,
        )
        fallback: list[int] = []
        for node, result in zip(nodes, results, strict=True):
            idxs = groups[node]
            if isinstance(result, BaseException):
                if not isinstance(result, _TRANSIENT):
                    raise result
                fallback.extend(idxs)
                continue
            for i, entry in zip(idxs, result, strict=True):
                if entry is not None:
                    out[i] = entry[0]
        retry_set = set(retry)
        for i in range(len(keys)):
            if out[i] is None and i in retry_set and i not in fallback:
                fallback.append(i)
        if fallback:
            entries = await asyncio.gather(*(self.getv(keys[i]) for i in fallback))
            for i, entry in zip(fallback, entries, strict=True):
                out[i] = None if entry is None else entry[0]
        return out

    # -- writes ---------------------------------------------------------------

    async def _write_all(self, targets: list[str], op: int, *args: Any) -> list[Any]:
        """Send one write to every target; return the answers of those that applied it."""
        if not targets:
            self.stats.unavailable += 1
            raise UnavailableError("no aux node is available for this key")
        if len(targets) == 1:
            try:
                return [await self._link(targets[0]).request(op, *args)]
            except _TRANSIENT as exc:
                self.stats.unavailable += 1
                raise UnavailableError(f"the owner of the key did not apply the write: {exc}") from None
        results = await asyncio.gather(*(self._link(n).request(op, *args) for n in targets), return_exceptions=True)
        ok: list[Any] = []
        timeouts = 0
        first_error: BaseException | None = None
        for r in results:
            if isinstance(r, BaseException):
                if not isinstance(r, _TRANSIENT):
                    raise r
                if isinstance(r, UpstreamTimeoutError):
                    timeouts += 1
                first_error = first_error or r
            else:
                ok.append(r)
        if not ok:
            self.stats.unavailable += 1
            raise UnavailableError(f"no owner of the key applied the write: {first_error}")
        if len(ok) < len(targets):
            self.stats.partial_writes += 1
        quorum = self.write_quorum
        if quorum and len(ok) < quorum:
            raise UnavailableError(f"the write reached {len(ok)} of the {quorum} owners the quorum needs")
        if not quorum and timeouts:
            raise UpstreamTimeoutError(f"{timeouts} owner(s) did not confirm the write in time")
        return ok

    async def set(self, key: bytes, value: bytes, ttl_ms: int, flags: int) -> bool:
        version = self.clock.next()
        expires_at = _wall_ms() + ttl_ms if ttl_ms else 0
        view = self.view
        targets = view.write_targets(key)
        if not flags:
            await self._write_all(targets, Op.SETV, key, value, expires_at, 0, version)
            return True
        # NX/XX: the authoritative owner decides, the others copy its outcome
        candidates = view.read_candidates(key)
        if not candidates:
            self.stats.unavailable += 1
            raise UnavailableError("no aux node is available for this key")
        primary = candidates[0]
        try:
            status = await self._link(primary).request(Op.SETV, key, value, expires_at, flags, version)
        except _TRANSIENT as exc:
            raise UnavailableError(f"the owner of the key is unavailable: {exc}") from None
        if status == _CONDITION_FAILED:
            return False
        others = [n for n in targets if n != primary]
        if others:
            await self._write_all(others, Op.APPLY, [[key, value, expires_at, version]])
        return True

    async def delete(self, key: bytes) -> bool:
        version = self.clock.next()
        answers = await self._write_all(self.view.write_targets(key), Op.DELV, key, version)
        return any(answers)

    async def expire(self, key: bytes, ttl_ms: int) -> bool:
        answers = await self._write_all(self.view.write_targets(key), Op.EXPIRE, key, ttl_ms)
        return any(answers)

    async def touch(self, key: bytes) -> bool:
        candidates = self.view.read_candidates(key)
        for node in candidates:
            try:
                return bool(await self._link(node).request(Op.TOUCH, key))
            except _TRANSIENT:
                continue
        raise UnavailableError("no owner of the key is available")

    async def incr(self, key: bytes, delta: int) -> int:
        view = self.view
        candidates = view.read_candidates(key)
        if not candidates:
            raise UnavailableError("no aux node is available for this key")
        version = self.clock.next()
        primary = candidates[0]
        try:
            value, expires_at = await self._link(primary).request(Op.INCRV, key, delta, version)
        except NotAnIntegerError:
            raise
        except _TRANSIENT as exc:
            raise UnavailableError(f"the owner of the key is unavailable: {exc}") from None
        others = [n for n in view.write_targets(key) if n != primary]
        if others:
            try:
                await self._write_all(others, Op.APPLY, [[key, str(value).encode(), expires_at, version]])
            except UnavailableError:
                pass  # the primary has it; re-replication repairs the copies
        return int(value)

    async def mset(self, pairs: list[tuple[bytes, bytes]], ttl_ms: int) -> int:
        version = self.clock.next()
        expires_at = _wall_ms() + ttl_ms if ttl_ms else 0
        view = self.view
        per_node: dict[str, list[list[Any]]] = {}
        per_pair_targets: list[list[str]] = []
        for key, value in pairs:
            targets = view.write_targets(key)
            if not targets:
                raise UnavailableError("no aux node is available for some keys")
            per_pair_targets.append(targets)
            entry = [key, value, expires_at, version]
            for n in targets:
                per_node.setdefault(n, []).append(entry)
        nodes = list(per_node)
        results = await asyncio.gather(*(self._link(n).request(Op.APPLY, per_node[n]) for n in nodes), return_exceptions=True)
        failed = set()
        for node, r in zip(nodes, results, strict=True):
            if isinstance(r, BaseException):
                if not isinstance(r, _TRANSIENT):
                    raise r
                failed.add(node)
        if failed:
            for targets in per_pair_targets:
                if all(n in failed for n in targets):
                    raise UnavailableError(f"aux node(s) {', '.join(sorted(failed))} did not apply the write")
            self.stats.partial_writes += 1
        return len(pairs)

    async def apply_entries(self, entries: list[list[Any]]) -> int:
        """Versioned, last-writer-wins copies (restore): each entry to its owners.

        Returns how many entries their first owner applied (the rest were
        older than what the cluster holds, or expired).
        """
        view = self.view
        first: dict[str, list[list[Any]]] = {}
        rest: dict[str, list[list[Any]]] = {}
        for entry in entries:
            targets = view.write_targets(entry[0])
            if not targets:
                raise UnavailableError("no aux node is available for some keys")
            first.setdefault(targets[0], []).append(entry)
            for n in targets[1:]:
                rest.setdefault(n, []).append(entry)
        nodes = list(first)
        counts = await asyncio.gather(*(self._link(n).request(Op.APPLY, first[n]) for n in nodes))
        if rest:
            await asyncio.gather(*(self._link(n).request(Op.APPLY, rest[n]) for n in rest), return_exceptions=True)
        return sum(int(c) for c in counts)

    # -- cluster-wide --------------------------------------------------------

    async def gather_stats(self) -> dict[str, dict[str, Any]]:
        """STATS of every live aux node (nodes that fail are left out)."""
        view = self.view
        nodes = [n for n in view.members if view.is_live(n) and n in self.links]
        results = await asyncio.gather(*(self.links[n].request(Op.STATS) for n in nodes), return_exceptions=True)
        return {n: r for n, r in zip(nodes, results, strict=True) if not isinstance(r, BaseException)}
