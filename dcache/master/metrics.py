"""Prometheus metrics of a master: the common families plus ring, health, routing, migration, links, near cache and hot keys."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..keytext import printable_key
from ..metrics import ServiceCollector, plain_counter, plain_gauge
from .view import MEMBER_STATES, UP

if TYPE_CHECKING:
    from ..server import RequestGate, Service
    from .links import AuxLink
    from .membership import Membership
    from .router import Router

__all__ = ["MasterCollector", "HOT_KEYS_SHOWN", "HOT_KEY_LABEL_CHARS"]

#: Keys ``dcache_hot_key_reads_per_second`` shows (its label set is bounded by this).
HOT_KEYS_SHOWN = 10
#: Longest ``key`` label of ``dcache_hot_key_reads_per_second`` (``printable_key``: escaped, cut with ``...``).
HOT_KEY_LABEL_CHARS = 100


class MasterCollector(ServiceCollector):
    """A master's metrics: the common families plus ring, health, routing, migration and links."""

    def __init__(self, service: Service, router: Router, links: dict[str, AuxLink], membership: Membership, gate: RequestGate) -> None:
        super().__init__(service)
        self.gate = gate
        self.router = router
        self.links = links
        self.membership = membership

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        view = self.router.view
        yield plain_gauge("dcache_ring_epoch", "Epoch of the cluster view this master routes by.", view.epoch)
        yield plain_gauge("dcache_ring_seq", "Sequence number of the view within its epoch.", view.seq)
        yield plain_gauge("dcache_ring_replicas", "Copies kept of each key.", view.replicas)
        members = GaugeMetricFamily("dcache_ring_members", "Aux nodes in the view, by state.", labels=["state"])
        counts = dict.fromkeys(MEMBER_STATES, 0)
        for m in view.members.values():
            counts[m.state] = counts.get(m.state, 0) + 1
        for state, n in counts.items():
            members.add_metric([state], n)
        yield members
        up = GaugeMetricFamily("dcache_aux_up", "1 if the aux node is up in the view (answers health checks), else 0.", labels=["node"])
        for node_id, m in sorted(view.members.items()):
            up.add_metric([node_id], 1 if m.state == UP else 0)
        yield up
        yield plain_gauge(
            "dcache_migrating", "1 while data moves between aux nodes after a ring change, else 0.", int(view.prev_ring is not None)
        )
        rs = self.router.stats
        yield plain_counter("dcache_read_hits", "Reads this master answered with a value (GET, MGET keys, EXISTS, TTL).", rs.hits)
        yield plain_counter("dcache_read_misses", "Reads this master answered with nothing: no owner held the key.", rs.misses)
        yield plain_counter("dcache_read_fallbacks", "Reads retried on the next owner after one did not answer.", rs.fallbacks)
        yield plain_counter("dcache_read_repairs", "Copies written back to owners that missed a key another owner had.", rs.repairs)
        yield plain_counter("dcache_unavailable", "Requests answered UNAVAILABLE: no owner of the key answered.", rs.unavailable)
        yield plain_counter("dcache_partial_writes", "Writes acknowledged although some live owner did not apply them.", rs.partial_writes)
        yield plain_counter(
            "dcache_fences_failed",
            "Fences of an owner that missed a write which failed or timed out; the write was acknowledged anyway.",
            rs.fences_failed,
        )
        yield plain_counter("dcache_writes_superseded", "Writes answered SUPERSEDED: an owner held a newer version.", rs.superseded)
        yield plain_counter(
            "dcache_superseded_retries", "Writes sent again with a newer version because an owner held a newer one.", rs.superseded_retries
        )
        yield plain_counter(
            "dcache_stale_ring_requests",
            "Requests an owner refused (STALE_RING): this master routed them by a ring older than its floor.",
            rs.stale_ring,
        )
        hints = self.router.hints
        yield plain_counter("dcache_hints_replayed", "Hints replayed to aux nodes that answered again.", hints.replayed_total)
        yield plain_counter("dcache_hint_overflows", "Times an aux node missed more writes than the hints hold.", hints.overflows_total)
        yield plain_counter(
            "dcache_ring_waits", "Data requests held because this master had no ring yet (since it started).", self.gate.held_total
        )
        yield plain_counter(
            "dcache_ring_wait_refusals",
            "Data requests answered UNAVAILABLE because this master still had no ring.",
            self.gate.expired_total,
        )
        yield from self._links()
        yield from self._near_cache()
        yield self._hot_keys()
        yield from self._migration()
        yield from self._membership()

    def _near_cache(self) -> Iterable[Metric]:
        """The near cache's families: zeros while it is off (``--near-cache-size`` 0), so the set of families never changes."""
        near = self.router.near
        st = near.stats() if near is not None else {}
        n = st.get
        return [
            plain_counter("dcache_near_cache_hits", "GETs answered from the near cache's copy of a hot key.", n("near_cache_hits", 0)),
            plain_counter(
                "dcache_near_cache_misses", "GETs that found no live copy in the near cache (most GETs).", n("near_cache_misses", 0)
            ),
            plain_counter("dcache_near_cache_fills", "Copies of hot keys stored in the near cache.", n("near_cache_fills", 0)),
            plain_counter(
                "dcache_near_cache_fills_discarded",
                "Copies not stored because the key changed while they were read.",
                n("near_cache_fills_discarded", 0),
            ),
            plain_counter(
                "dcache_near_cache_invalidations",
                "Copies dropped because the key changed (an aux node's push, this master's write, a new ring).",
                n("near_cache_invalidations", 0),
            ),
            plain_counter(
                "dcache_near_cache_evictions",
                "Copies dropped (oldest first) to stay within --near-cache-size.",
                n("near_cache_evictions", 0),
            ),
            plain_counter(
                "dcache_near_cache_lease_lapses",
                "Copies dropped at a read because their owner had not answered within the lease.",
                n("near_cache_lease_lapses", 0),
            ),
            plain_counter(
                "dcache_near_cache_cooled",
                "Times a key was kept out of the near cache for a second: its copy was invalidated before it paid off.",
                n("near_cache_cooled", 0),
            ),
            plain_counter(
                "dcache_near_cache_write_throughs",
                "SETs through this master of a key it held a copy of, sent so that their answer updates the copy.",
                n("near_cache_write_throughs", 0),
            ),
            plain_counter(
                "dcache_near_cache_updates",
                "Copies updated in place by a value an owner pushed for another master's write (value-push).",
                n("near_cache_updates", 0),
            ),
            plain_gauge("dcache_near_cache_keys", "Copies of hot keys held now.", n("near_cache_keys", 0)),
            plain_gauge("dcache_near_cache_bytes", "Bytes the copies are charged (key, value, overhead).", n("near_cache_bytes", 0)),
            plain_gauge(
                "dcache_near_cache_max_bytes", "The near cache's budget (--near-cache-size; 0 = off).", n("near_cache_max_bytes", 0)
            ),
        ]

    def _hot_keys(self) -> Metric:
        """The ``HOT_KEYS_SHOWN`` hottest keys read through this master: a bounded label set (a cut label shared by two keys shows the hotter)."""
        family = GaugeMetricFamily(
            "dcache_hot_key_reads_per_second",
            f"Estimated GETs per second of this master's {HOT_KEYS_SHOWN} hottest keys (key: escaped, at most {HOT_KEY_LABEL_CHARS} chars).",
            labels=["key"],
        )
        hot = self.router.hot
        if hot is not None:
            seen: set[str] = set()
            for key, rate in hot.hottest(HOT_KEYS_SHOWN):
                label = printable_key(key, HOT_KEY_LABEL_CHARS)
                if label not in seen:
                    seen.add(label)
                    family.add_metric([label], round(rate, 1))
        return family

    def _links(self) -> Iterable[Metric]:
        links = sorted(self.links.items())
        requests = CounterMetricFamily("dcache_upstream_requests", "Requests sent to the aux node.", labels=["node"])
        failures = CounterMetricFamily(
            "dcache_upstream_failures", "Requests to the aux node that failed (not connected, timed out).", labels=["node"]
        )
        in_flight = GaugeMetricFamily("dcache_upstream_in_flight", "Requests sent to the aux node and not yet answered.", labels=["node"])
        conns = GaugeMetricFamily("dcache_upstream_connections", "Open connections to the aux node.", labels=["node"])
        suspected = GaugeMetricFamily("dcache_aux_suspected", "1 while this master suspects the aux node, else 0.", labels=["node"])
        hinted = GaugeMetricFamily("dcache_hints", "Writes kept for the aux node because it missed them.", labels=["node"])
        hints = self.router.hints
        size = GaugeMetricFamily("dcache_upstream_pool_size", "Connections kept to each aux node (--aux-connections).", labels=["node"])
        for node_id, link in links:
            requests.add_metric([node_id], link.requests)
            failures.add_metric([node_id], link.failures_total)
            in_flight.add_metric([node_id], link.in_flight)
            conns.add_metric([node_id], link.open_connections)
            size.add_metric([node_id], link.pool_size)
            suspected.add_metric([node_id], int(link.suspect))
            hinted.add_metric([node_id], hints.count(node_id))
        return [requests, failures, in_flight, conns, size, suspected, hinted]

    def _membership(self) -> Iterable[Metric]:
        membership = self.membership
        leading = membership.role in ("coordinator", "zk-leader")
        out: list[Metric] = [
            plain_gauge(
                "dcache_coordinating", "1 if this master decides membership (coordinator or ZooKeeper leader), else 0.", int(leading)
            )
        ]
        zk = getattr(membership, "zk", None)
        if zk is not None:
            st = zk.status()
            out.append(
                plain_gauge(
                    "dcache_zookeeper_connected", "1 while the ZooKeeper session is connected, else 0.", int(st["zookeeper_connected"])
                )
            )
            out.append(
                plain_gauge(
                    "dcache_zookeeper_disconnected_seconds",
                    "Seconds since the ZooKeeper connection was lost (0 while connected); the master routes by its last ring meanwhile.",
                    st["zookeeper_disconnected_s"],
                )
            )
            out.append(plain_counter("dcache_zookeeper_sessions", "ZooKeeper sessions established since start.", st["zookeeper_sessions"]))
        return out

    def _migration(self) -> Iterable[Metric]:
        migrator = getattr(self.membership, "migrator", None)
        if migrator is None:  # a follower: the coordinator moves the data
            return []
        return [
            plain_gauge(
                "dcache_migration_streams", "Streams (source, destination pairs) of the current or last migration.", migrator.streams_total
            ),
            plain_gauge("dcache_migration_streams_done", "Streams of the current or last migration that finished.", migrator.streams_done),
            plain_gauge("dcache_migration_progress_keys", "Keys copied by the current or last migration.", migrator.keys_moved),
            plain_counter("dcache_migration_keys_moved", "Keys copied by all migrations since start.", migrator.keys_moved_total),
            plain_counter("dcache_migrations", "Migrations run since start.", migrator.migrations_total),
        ]
