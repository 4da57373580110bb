"""Moving data between aux nodes after a ring change (run by the coordinator).

For a view whose ``prev_ring`` is set, ``Migrator.run``:

1. computes the hash ranges whose preference list changed
   (``moved_ranges(prev_ring, ring, replicas)``) and, for every node that
   gained a range, picks a live previous owner as the source: one *stream*
   per (source, destination) pair;
2. waits (bounded) until every follower master routes by the new view, so
   no master still writes only to the previous owners;
3. runs the streams: pages of ``SCAN`` on the source, ``APPLY`` /
   ``APPLY_DELETES`` on the destination (last writer wins, so a copy never
   overwrites a newer write made meanwhile, and pages may land in any
   order), pipelined: the next page is scanned while the last ones are
   applied. Pages travel packed: the source packs its entries once into
   one ``bin`` that the master hands to ``APPLY`` untouched (an older node
   that refuses the packed form gets the unpacked one).
   ``migration_rate`` paces the scans of each stream;
4. runs a second, catch-up pass over writes newer than the start of the
   first pass (a write in flight during the view change may have reached
   only a previous owner).

When it returns, the coordinator publishes the view with the migration
finished; afterwards ``schedule_drop`` removes the moved ranges from nodes
that no longer own them (so a later ring change can never bring back a stale
copy). Progress is kept for ``dcache ring`` and the metrics.

A ring rebuilt without its migration record (a restarted coordinator with no
follower, from the aux nodes' re-announcements) knows no previous ring: a
migration may have been copying when the old coordinator died, and its
sources still hold what the new owners lack; an owner that was down or
fenced then missed writes whose hints died with that coordinator. ``recover``
makes every live ring member a source of whatever it holds outside its own
arcs (``foreign_arcs``) and, with several copies per key, of its own arcs
too: one stream per node whose pages are routed key by key to the other
owners (last writer wins, tombstones included); ``drop`` then removes the
arcs outside its own from it. O(runs x replicas) to plan, one page per
stream in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..config import MasterConfig
from ..errors import BadArgumentsError, ServerError, UnknownOpError
from ..hlc import HybridClock
from ..protocol import Op, unpack_entries
from ..ring import hash64, moved_ranges
from .links import AuxLink
from .view import DOWN, FENCED, UP, ClusterView

__all__ = ["Migrator"]

log = logging.getLogger("dcache.master.migration")

#: Versions carry wall ms in their top bits (see dcache.hlc): this many
#: version units make one second.
_VERSION_UNITS_PER_S = 1000 << 22
_CATCH_UP_MARGIN_S = 5.0
_CONCURRENT_STREAMS = 4
#: Pages of one stream being applied while its next page is scanned.
_PAGES_IN_FLIGHT = 2


class Migrator:
    """Runs migrations and keeps their progress."""

    def __init__(
        self,
        config: MasterConfig,
        links: Callable[[], dict[str, AuxLink]],
        clock: HybridClock,
        followers_caught_up: Callable[[int, float], Awaitable[None]],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        floor_known: Callable[[int], bool] = lambda epoch: True,
    ) -> None:
        """``monotonic`` and ``sleep`` pace ``--migration-rate`` (tests pass fakes).

        ``floor_known(epoch)``: whether every master can learn a ring of that
        epoch (``raise_floor``); in ZooKeeper mode, once it is written there.
        """
        self.config = config
        self._monotonic = monotonic
        self._sleep = sleep
        self._links = links
        self._clock = clock
        self._followers_caught_up = followers_caught_up
        self._floor_known = floor_known
        self._drops: set[asyncio.Task[None]] = set()
        self.state = "idle"
        self.epoch = 0
        self.streams_total = 0
        self.streams_done = 0
        self.keys_moved = 0
        self.tombstones_moved = 0
        self.keys_moved_total = 0
        self.migrations_total = 0
        self.started_ms = 0
        self.finished_ms = 0
        self.streams: list[dict[str, Any]] = []

    def progress(self) -> dict[str, Any]:
        """A summary for operators."""
        return {
            "state": self.state,
            "epoch": self.epoch,
            "streams_total": self.streams_total,
            "streams_done": self.streams_done,
            "keys_moved": self.keys_moved,
            "tombstones_moved": self.tombstones_moved,
            "keys_moved_total": self.keys_moved_total,
            "migrations_total": self.migrations_total,
            "started_ms": self.started_ms,
            "finished_ms": self.finished_ms,
            "streams": self.streams,
        }

    def plan(self, view: ClusterView) -> dict[tuple[str, str], list[list[int]]]:
        """(source, destination) -> ranges to copy, for ``view``'s migration.

        A range's source is a live previous owner, one that is not fenced
        when there is one: a fenced node may have restarted with less than
        it held (it is reconciled before it is read), and a range copied
        from it would reach its new owners without what it lost.
        """
        assert view.prev_ring is not None
        streams: dict[tuple[str, str], list[list[int]]] = {}
        for move in moved_ranges(view.prev_ring, view.ring, view.replicas):
            src = _source(view, move.old_owners)
            if src is None:
                continue  # no live copy of this range: nothing to copy from
            for dst in move.new_owners:
                if dst in move.old_owners or not view.is_live(dst):
                    continue
                streams.setdefault((src, dst), []).append([move.start, move.end])
        return streams

    def plan_fence(self, view: ClusterView, node_id: str) -> dict[tuple[str, str], list[list[int]]]:
        """(source, ``node_id``) -> ranges: everything ``node_id`` owns, from nodes that hold all of it.

        Outside a migration those are its co-owners in the ring. While a
        migration copies (``prev_ring`` set, not settling), the previous
        ring's owners are the ones that hold everything (reads go to them);
        the current ring's new owners may not have their copy yet. So every
        range whose owners change and that ``node_id`` owns in either ring
        also comes from a live previous owner that is not fenced.
        """
        streams: dict[tuple[str, str], list[list[int]]] = {}
        if node_id not in view.ring:
            return streams
        others = view.ring.without_node(node_id)
        for move in moved_ranges(others, view.ring, view.replicas):
            if node_id not in move.new_owners:
                continue
            # ``old_owners`` also names the node that would own the range without ``node_id``: not a holder
            src = _source(view, [n for n in move.new_owners if n != node_id], fenced=False)
            if src is not None:
                streams.setdefault((src, node_id), []).append([move.start, move.end])
        prev = view.prev_ring
        if prev is not None and not view.settling:
            for move in moved_ranges(prev, view.ring, view.replicas):
                if node_id not in move.old_owners and node_id not in move.new_owners:
                    continue
                src = _source(view, [n for n in move.old_owners if n != node_id], fenced=False)
                if src is not None:
                    streams.setdefault((src, node_id), []).append([move.start, move.end])
        return streams

    def foreign_arcs(self, view: ClusterView) -> dict[str, list[list[int]]]:
        """Live ring member -> the arcs of ``view``'s ring it is not an owner of (``[start, end]``, start exclusive).

        Built from the ring's preference runs: each node's runs, in order,
        and the gaps between them. O(runs x replicas).
        """
        table = view.ring.preference_table(view.replicas)
        ends, prefs = table.ends, table.prefs
        owned: dict[str, list[int]] = {n: [] for n in view.ring.nodes if view.is_live(n)}
        for i, owners in enumerate(prefs):
            for n in owners:
                runs = owned.get(n)
                if runs is not None:
                    runs.append(i)
        foreign: dict[str, list[list[int]]] = {}
        for n, runs in owned.items():
            arcs: list[list[int]] = []
            # Run i is (ends[i - 1], ends[i]]; the gap after owned run a, up to the next owned run b, is (ends[a], ends[b - 1]].
            for a, b in zip(runs, runs[1:] + [runs[0] + len(ends)] if runs else [], strict=False):
                if b > a + 1:
                    arcs.append([ends[a], ends[(b - 1) % len(ends)]])
            if arcs:
                foreign[n] = arcs
        return foreign

    async def recover(self, view: ClusterView) -> dict[str, list[list[int]]]:
        """Reconcile the owners of a ring that came back without its migration record; return the arcs to drop per node.

        Each live ring member sends what it holds outside its own arcs to
        their owners (module note) and, when the ring keeps several copies
        per key, what it holds of its own arcs to their other owners: the
        writes one owner missed while it was down or fenced, whose hints
        (and fence) died with the old coordinator, come to it from the
        others. Entries and tombstones, last writer wins: a copy never
        overwrites a newer write. The caller drops the returned arcs (the
        ones outside each node's own, ``drop``) once no ring change made
        them stale.
        """
        foreign = self.foreign_arcs(view)
        r = view.replicas
        if r > 1:  # every node's whole content: its own arcs to the other owners too
            scans = {n: [[0, 0]] for n in view.ring.nodes if view.is_live(n)}
        else:
            scans = foreign

        def owners(src: str) -> Callable[[bytes], list[str]]:
            return lambda key: [n for n in view.ring.owners_for_hash(hash64(key), r) if n != src and view.is_live(n)]

        self._begin("recovering", view.epoch, len(scans))
        streams = [{"source": s, "destination": "owners", "ranges": len(a), "keys": 0, "done": False} for s, a in scans.items()]
        self.streams = streams
        sem = asyncio.Semaphore(_CONCURRENT_STREAMS)

        async def one(i: int, src: str, arcs: list[list[int]]) -> None:
            async with sem:
                await self._stream(streams[i], src, "", arcs, 0, True, owners(src))

        await asyncio.gather(*(one(i, s, a) for i, (s, a) in enumerate(scans.items())))
        self.state = "idle"
        self.finished_ms = time.time_ns() // 1_000_000
        log.info(
            "ring rebuilt at epoch %d reconciled: %d keys and %d tombstones copied to the other owners of each in %.2f s",
            view.epoch,
            self.keys_moved,
            self.tombstones_moved,
            (self.finished_ms - self.started_ms) / 1000,
        )
        return foreign

    def _begin(self, state: str, epoch: int, streams: int) -> None:
        """Reset the progress figures (STATS, ``dcache ring``) for a run of ``streams`` streams at ``epoch``."""
        self.state = state
        self.epoch = epoch
        self.streams_total = streams
        self.streams_done = 0
        self.keys_moved = 0
        self.tombstones_moved = 0
        self.started_ms = time.time_ns() // 1_000_000

    async def run(self, view: ClusterView, plan: dict[tuple[str, str], list[list[int]]] | None = None, since_version: int = 0) -> None:
        """Copy everything ``view``'s ring change implies (or ``plan``); return when done.

        ``since_version``: copy only entries (and tombstones) at least this
        new (a node that missed writes for a while has everything older).
        """
        cfg = self.config
        if plan is None:
            plan = self.plan(view)
        self._begin("waiting-for-followers", view.epoch, len(plan))
        # This run's own records: a run that starts meanwhile (a fenced node's
        # reconciliation beside a ring change's migration) replaces self.streams.
        streams = [{"source": s, "destination": d, "ranges": len(r), "keys": 0, "done": False} for (s, d), r in plan.items()]
        self.streams = streams
        log.info("migration to epoch %d: %d stream(s)", view.epoch, len(plan))
        await self._followers_caught_up(view.epoch, max(3.0, cfg.follow_interval * 6))
        await self.raise_floor(view.epoch)
        start_version = self._clock.next()
        self.state = "copying"
        sem = asyncio.Semaphore(_CONCURRENT_STREAMS)

        async def one(i: int, src: str, dst: str, ranges: list[list[int]], min_version: int, first: bool) -> None:
            async with sem:
                await self._stream(streams[i], src, dst, ranges, min_version, first)

        await asyncio.gather(*(one(i, s, d, r, since_version, True) for i, ((s, d), r) in enumerate(plan.items())))
        self.state = "catching-up"
        catch_up_from = max(since_version, start_version - int(_CATCH_UP_MARGIN_S * _VERSION_UNITS_PER_S))
        await asyncio.gather(*(one(i, s, d, r, catch_up_from, False) for i, ((s, d), r) in enumerate(plan.items())))
        for s in streams:
            s["done"] = True
        self.streams_done = self.streams_total
        self.state = "idle"
        self.finished_ms = time.time_ns() // 1_000_000
        self.migrations_total += 1
        log.info(
            "migration to epoch %d done: %d keys and %d tombstones moved in %.2f s",
            view.epoch,
            self.keys_moved,
            self.tombstones_moved,
            (self.finished_ms - self.started_ms) / 1000,
        )

    async def raise_floor(self, floor: int) -> bool:
        """Have every reachable aux node refuse requests routed by a ring older than ``floor`` (EPOCH), each bounded by ``--aux-timeout``.

        Only to an epoch every master can learn (``floor_known``): a floor
        above the cluster's ring would have the nodes refuse every master
        for good (a ZooKeeper leader's view that never reached ZooKeeper is
        dropped when it steps down; the next leader goes on from the ring
        there, at a lower epoch). Returns False, and raises nothing, when
        it may not.

        Called once the masters caught up with the view about to be copied
        for, or the wait for them ran out: a master that did not catch up
        (paused, or cut off) would write by its old ring to the old owners
        only, behind the copy, and read them; the nodes refuse those
        requests instead (``STALE_RING``), and it reads the ring again. A node that does not
        answer in time is logged and skipped: it is down or suspect, and
        gets no writes meanwhile. One from before EPOCH is skipped.
        """
        if not self._floor_known(floor):
            log.warning("not raising the ring floor to epoch %d: no other master can learn that ring yet (not in ZooKeeper)", floor)
            return False
        timeout = self.config.aux_timeout

        async def one(link: AuxLink) -> None:
            try:
                async with asyncio.timeout(timeout):
                    link.took_floor(0, await link.call(Op.EPOCH, max(link.routed_by, floor), floor))
            except UnknownOpError:
                link.epochs = False
            except (ServerError, OSError, TimeoutError) as exc:
                log.info("aux node %s did not take the ring floor of epoch %d: %s", link.node_id, floor, exc or "timed out")

        await asyncio.gather(*(one(link) for link in self._links().values() if link.epochs and link.usable))
        return True

    async def _stream(
        self,
        record: dict[str, Any],
        src: str,
        dst: str,
        ranges: list[list[int]],
        min_version: int,
        first: bool,
        route: Callable[[bytes], list[str]] | None = None,
    ) -> None:
        """Copy ``ranges`` from ``src`` to ``dst``: SCAN pages one after the other, APPLY them while the next is read.

        ``record`` is the stream's entry in its run's ``streams`` (progress).
        With ``route`` each entry goes to the nodes it names for its key instead of ``dst``.

        At most ``_PAGES_IN_FLIGHT`` pages are being applied at once (the
        memory held is bounded by pages, not keys); the stream returns once
        every page is applied, and raises the first failure.
        """
        cfg = self.config
        links = self._links()
        source, dest = links.get(src), links.get(dst)
        if source is None or (dest is None and route is None):
            return
        cursor = 0
        rate = cfg.migration_rate
        started = self._monotonic()
        scanned = 0
        packed = True
        applying: set[asyncio.Task[None]] = set()
        try:
            while True:
                entries: list[Any] | bytes
                if packed:
                    try:
                        cursor, entries, tombstones, n = await self._retry(
                            source, Op.SCAN, ranges, cursor, cfg.migration_batch, min_version, True
                        )
                    except BadArgumentsError:
                        packed = False  # an older node takes 4 arguments: ask again unpacked (a real error recurs)
                        continue
                else:
                    cursor, entries, tombstones = await self._retry(source, Op.SCAN, ranges, cursor, cfg.migration_batch, min_version)
                    n = len(entries)
                if n or tombstones:
                    while len(applying) >= _PAGES_IN_FLIGHT:
                        done, applying = await asyncio.wait(applying, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            task.result()  # a page that failed after its retries fails the stream
                    if route is not None:
                        page = self._apply_routed(record, route, entries, tombstones)
                    else:
                        assert dest is not None
                        page = self._apply_page(record, dest, entries, n, tombstones, first)
                    applying.add(asyncio.ensure_future(page))
                scanned += n
                if not cursor:
                    break
                if rate:
                    ahead = scanned / rate - (self._monotonic() - started)
                    if ahead > 0:
                        await self._sleep(ahead)
            while applying:
                done, applying = await asyncio.wait(applying, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        finally:
            for task in applying:
                task.cancel()
        if first:
            self.streams_done += 1
            record["done"] = True

    async def _apply_page(
        self, record: dict[str, Any], dest: AuxLink, entries: list[Any] | bytes, n: int, tombstones: list[Any], first: bool
    ) -> None:
        """APPLY one page's ``n`` entries (a list, or packed) and APPLY_DELETES its tombstones on ``dest``, and count them."""
        if n:
            try:
                await self._retry(dest, Op.APPLY, entries)
            except BadArgumentsError:
                if entries.__class__ is not bytes:
                    raise
                # An older node takes APPLY's entries unpacked only (a real error recurs).
                await self._retry(dest, Op.APPLY, unpack_entries(entries, "SCAN"))
            if first:
                self.keys_moved += n
                self.keys_moved_total += n
                record["keys"] += n
        if tombstones:
            await self._retry(dest, Op.APPLY_DELETES, tombstones)
            self.tombstones_moved += len(tombstones)

    async def _apply_routed(
        self, record: dict[str, Any], route: Callable[[bytes], list[str]], entries: list[Any] | bytes, tombstones: list[Any]
    ) -> None:
        """APPLY one page's entries and tombstones to the nodes ``route`` names for each key (``_apply_page`` per node)."""
        rows: list[Any] = unpack_entries(entries, "SCAN") if isinstance(entries, bytes) else entries
        by_node: dict[str, tuple[list[Any], list[Any]]] = {}
        for at, part in ((0, rows), (1, tombstones)):
            for row in part:
                for n in route(row[0]):
                    by_node.setdefault(n, ([], []))[at].append(row)
        links = self._links()
        await asyncio.gather(*(self._apply_page(record, links[n], e, len(e), t, True) for n, (e, t) in by_node.items() if n in links))

    async def _retry(self, link: AuxLink, op: int, *args: Any) -> Any:
        delay = 0.1
        for attempt in range(8):
            try:
                return await link.call(op, *args)
            except BadArgumentsError:
                raise  # the request itself is refused: sending it again changes nothing
            except (OSError, TimeoutError, ConnectionError) as exc:
                if attempt == 7:
                    raise
                log.info("migration: %s on %s failed (%s); retrying", Op(op).name, link.node_id, exc)
            except Exception as exc:
                if attempt == 7 or "cursor expired" in str(exc):
                    raise
                log.info("migration: %s on %s failed (%s); retrying", Op(op).name, link.node_id, exc)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
        raise AssertionError("unreachable")

    def schedule_drop(self, view: ClusterView, current: Callable[[], ClusterView]) -> None:
        """After a migration, drop the moved ranges from nodes that no longer own them.

        The drop goes on while the current view keeps ``view``'s ring layout
        and runs no migration: a fence, or a node marked up again, changes
        the epoch but not who owns what. A change of the layout stops it
        (the ranges must be worked out again; the node keeps the data): had
        every change of epoch stopped it, a fence during the wait left stale
        copies on the old owners for good, which a later change that gives
        a range back would serve again (a delete whose tombstone expired
        since, resurrected).
        """
        if view.prev_ring is None:
            return
        drops: dict[str, list[list[int]]] = {}
        for move in moved_ranges(view.prev_ring, view.ring, view.replicas):
            for n in move.old_owners:
                m = view.members.get(n)
                if n not in move.new_owners and m is not None and m.state == UP:
                    drops.setdefault(n, []).append([move.start, move.end])
        if not drops:
            return
        delay = self.config.follow_interval * 4 + self.config.aux_timeout

        async def drop_all() -> None:
            await asyncio.sleep(delay)  # let followers stop reading the previous owners
            # The ring changed again: ownership must be recomputed, keep the data.
            await self.drop(drops, lambda: _same_layout(current(), view))

        task = asyncio.ensure_future(drop_all())
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def drop(self, drops: dict[str, list[list[int]]], still: Callable[[], bool]) -> None:
        """DROP the given arcs from each node (page by page) while ``still()`` holds; a node that fails keeps its data (logged)."""
        links = self._links()
        for node, ranges in drops.items():
            link = links.get(node)
            if link is None:
                continue
            cursor, dropped = 0, 0
            try:
                while True:
                    if not still():
                        log.info("the ring changed: %s keeps the ranges it no longer owned (%d keys dropped)", node, dropped)
                        return
                    cursor, n = await link.call(Op.DROP, ranges, cursor)
                    dropped += n
                    if not cursor:
                        break
            except Exception as exc:
                log.info("dropping ranges it does not own from %s failed: %s", node, exc)
                continue
            log.info("dropped %d keys it does not own from %s", dropped, node)


def _same_layout(current: ClusterView, view: ClusterView) -> bool:
    """Whether ``current`` runs no migration and has ``view``'s ring layout (the same nodes and weights: the same owners)."""
    return current.prev_ring is None and current.ring.nodes == view.ring.nodes


def _source(view: ClusterView, owners: Sequence[str], *, fenced: bool = True) -> str | None:
    """The first of ``owners`` to copy from: a live one that is not fenced, else (with ``fenced``) a fenced one."""
    members = view.members
    first_fenced = None
    for n in owners:
        m = members.get(n)
        if m is None or m.state == DOWN:
            continue
        if m.state != FENCED:
            return n
        if first_fenced is None and fenced:
            first_fenced = n
    return first_fenced
