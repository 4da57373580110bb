"""Prometheus metrics of an aux node: the common families plus the cache, its snapshots and near-cache tracking."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import Metric

from ..metrics import ServiceCollector, plain_counter, plain_gauge

if TYPE_CHECKING:
    from ..lru import LRUCache
    from ..server import Service
    from .snapshots import SnapshotManager
    from .tracking import Tracker

__all__ = ["AuxCollector"]


class AuxCollector(ServiceCollector):
    """An aux node's metrics: the common families plus the cache, snapshots and near-cache tracking."""

    def __init__(self, service: Service, cache: LRUCache, snapshots: SnapshotManager, tracker: Tracker) -> None:
        super().__init__(service)
        self.cache = cache
        self.snapshots = snapshots
        self.tracker = tracker

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        c = self.cache
        yield plain_counter("dcache_cache_hits", "Reads that found a live key.", c.hits)
        yield plain_counter("dcache_cache_misses", "Reads that found no live key.", c.misses)
        yield plain_counter("dcache_cache_evictions", "Entries evicted to stay within --max-memory / --max-items.", c.evictions)
        yield plain_counter("dcache_cache_expirations", "Entries removed because their TTL passed.", c.expirations)
        yield plain_gauge("dcache_cache_items", "Entries held (live or not yet swept).", len(c))
        yield plain_gauge("dcache_cache_bytes", "Bytes charged against --max-memory: what entries and tombstones cost.", c.bytes_used)
        yield plain_gauge("dcache_cache_max_bytes", "The byte budget (--max-memory).", c.max_bytes)
        yield plain_gauge("dcache_cache_max_items", "The entry cap (--max-items; 0 = none).", c.max_items)
        snap = self.snapshots
        st = snap.stats()
        yield plain_gauge("dcache_snapshot_age_seconds", "Age of the newest snapshot on disk; -1 if there is none.", st["snapshot_age_s"])
        yield plain_gauge("dcache_snapshot_duration_seconds", "Time the last successful snapshot took.", snap.last_duration_s)
        yield plain_counter("dcache_snapshots_taken", "Snapshots written successfully.", st["snapshots_taken"])
        yield plain_counter("dcache_snapshot_failures", "Snapshots that failed to be written.", st["snapshot_failures"])
        yield plain_counter("dcache_snapshots_rejected", "Snapshot files found invalid at load time.", st["snapshots_rejected"])
        yield plain_gauge(
            "dcache_snapshot_loaded_keys",
            "Keys loaded from a snapshot at start-up and kept (not evicted to fit --max-memory).",
            st["snapshot_loaded_keys"],
        )
        yield plain_counter(
            "dcache_snapshot_versions_refused",
            "Snapshot entries skipped at start-up: their version was too far ahead of the clock.",
            st["snapshot_versions_refused"],
        )
        t = self.tracker
        yield plain_gauge("dcache_tracking_keys", "Keys some master's near cache holds a copy of (subscribed).", len(t.table))
        yield plain_gauge("dcache_tracking_max_keys", "Most keys tracked (--tracking-keys; 0 = tracking refused).", t.max_keys)
        yield plain_gauge("dcache_tracking_subscribers", "Master connections subscribed to at least one key.", t.subscribers)
        yield plain_counter("dcache_tracking_invalidations", "Tracked keys that changed, each ending its subscriptions.", t.invalidations)
        yield plain_counter("dcache_tracking_pushes", "INVALIDATE frames pushed to masters.", t.pushes)
        yield plain_counter(
            "dcache_tracking_value_pushes",
            "Written values pushed to masters' copies subscribed for values (they stay subscribed).",
            t.value_updates,
        )
        yield plain_counter(
            "dcache_tracking_unheld", "Subscriptions for values ended because the master named the key as no longer copied.", t.unheld
        )
        yield plain_counter(
            "dcache_tracking_answers_held", "Answers of writes held until the masters holding a copy acknowledged.", t.held_answers
        )
        yield plain_counter("dcache_tracking_overflows", "Keys invalidated to make room in a full table (--tracking-keys).", t.overflows)
        yield plain_counter("dcache_tracking_timeouts", "Masters cut off for not acknowledging an invalidation in time.", t.timeouts)
        floor, refused = self.service.ring_floor, self.service.stale_refused
        yield plain_gauge(
            "dcache_ring_floor_epoch", "Masters' requests routed by an older ring epoch are refused (EPOCH; 0: none yet).", floor
        )
        yield plain_counter("dcache_stale_ring_refusals", "Masters' requests refused: routed by a ring older than the floor.", refused)
