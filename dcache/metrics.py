"""Prometheus metrics of the daemons: custom collectors and a small ``/metrics`` server.

The daemons keep their figures as plain ints (``Service.op_requests``, the
cache's ``hits``, the router's ``RouterStats``, ...); nothing here runs per
request. At scrape time ``AuxCollector`` and ``MasterCollector`` read those
ints and yield metric families (client_python's "Custom Collectors"), so the
label sets are fixed: op names, member states and aux node ids, never
anything taken from a request. docs/METRICS.md lists every family.

``start_metrics_server`` serves ``GET /metrics`` with aiohttp on the
daemon's ``--host`` and ``--metrics-port``. This module is imported only
when metrics are enabled: prometheus_client and aiohttp.web cost a few
hundred milliseconds to import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from .protocol import Op
from .server import UNKNOWN_OP, Histogram, Service

if TYPE_CHECKING:
    from aiohttp import web

    from .auxnode.node import AuxNode
    from .master.node import MasterNode

__all__ = ["AuxCollector", "MasterCollector", "MetricsServer", "start_metrics_server", "registry_for", "op_name"]

log = logging.getLogger("dcache.metrics")

_OP_NAMES = {int(op): op.name.lower() for op in Op}
_OP_NAMES[UNKNOWN_OP] = "unknown"


def op_name(op: int) -> str:
    """The ``op`` label of an op number (``unknown`` for requests no handler took)."""
    return _OP_NAMES.get(op, str(op))


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    """Add a plain ``Histogram`` to ``family`` (cumulative buckets, as Prometheus wants)."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(h.bounds, h.counts, strict=False):
        total += count
        buckets.append((repr(float(bound)), total))
    total += h.counts[-1]
    buckets.append(("+Inf", total))
    family.add_metric(labels, buckets, h.sum)


class ServiceCollector(Collector):
    """The families every daemon has: requests, errors, latency, connections."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service
        role = s.role
        info = GaugeMetricFamily("dcache_node_info", "Identity of this daemon (always 1).", labels=["role", "node_id"])
        info.add_metric([role, s.node_id], 1)
        yield info
        start = GaugeMetricFamily("dcache_start_time_seconds", "Unix time the daemon started.", labels=["role"])
        start.add_metric([role], getattr(s, "started_at", 0.0))
        yield start
        requests = CounterMetricFamily("dcache_requests", "Requests received, by op.", labels=["role", "op"])
        errors = CounterMetricFamily("dcache_errors", "Requests answered with an error status, by op.", labels=["role", "op"])
        ops = sorted({UNKNOWN_OP, int(Op.HELLO), *map(int, s.handlers), *(op for op, n in s.op_requests.items() if n)})
        for op in ops:
            name = op_name(op)
            requests.add_metric([role, name], s.op_requests[op])
            errors.add_metric([role, name], s.op_errors[op])
        yield requests
        yield errors
        latency = HistogramMetricFamily(
            "dcache_request_seconds",
            f"Time from reading a request to queueing its answer, for 1 in {s.sample_every} requests, by op.",
            labels=["role", "op"],
        )
        for op, h in s.op_latency.items():
            if any(h.counts):
                _histogram(latency, [role, op_name(op)], h)
        yield latency
        batch = HistogramMetricFamily(
            "dcache_batch_seconds",
            "Time to decode, run and answer all the requests one read delivered (one data_received call).",
            labels=["role"],
        )
        _histogram(batch, [role], s.batch_latency)
        yield batch
        yield _gauge("dcache_connections", "Client connections open now.", role, len(s.state.connections))
        yield _counter("dcache_connections_accepted", "Client connections accepted.", role, s.state.total_connections)
        yield _counter("dcache_protocol_errors", "Connections closed for a framing or protocol error.", role, s.protocol_errors_total)


def _gauge(name: str, doc: str, role: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["role"])
    g.add_metric([role], value)
    return g


def _counter(name: str, doc: str, role: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["role"])
    c.add_metric([role], value)
    return c


def _plain_gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _plain_counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class AuxCollector(ServiceCollector):
    """An aux node's metrics: the common families plus the cache and snapshots."""

    def __init__(self, node: AuxNode) -> None:
        super().__init__(node)
        self.node = node

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        c = self.node.cache
        yield _plain_counter("dcache_cache_hits", "Reads that found a live key.", c.hits)
        yield _plain_counter("dcache_cache_misses", "Reads that found no live key.", c.misses)
        yield _plain_counter("dcache_cache_evictions", "Entries evicted to stay within --max-memory / --max-items.", c.evictions)
        yield _plain_counter("dcache_cache_expirations", "Entries removed because their TTL passed.", c.expirations)
        yield _plain_gauge("dcache_cache_items", "Entries held (live or not yet swept).", len(c))
        yield _plain_gauge("dcache_cache_bytes", "Bytes accounted to entries (keys, values, per-entry overhead).", c.bytes_used)
        yield _plain_gauge("dcache_cache_max_bytes", "The byte budget (--max-memory).", c.max_bytes)
        yield _plain_gauge("dcache_cache_max_items", "The entry cap (--max-items; 0 = none).", c.max_items)
        snap = self.node.snapshots
        st = snap.stats()
        yield _plain_gauge("dcache_snapshot_age_seconds", "Age of the newest snapshot on disk; -1 if there is none.", st["snapshot_age_s"])
        yield _plain_gauge("dcache_snapshot_duration_seconds", "Time the last successful snapshot took.", snap.last_duration_s)
        yield _plain_counter("dcache_snapshots_taken", "Snapshots written successfully.", st["snapshots_taken"])
        yield _plain_counter("dcache_snapshot_failures", "Snapshots that failed to be written.", st["snapshot_failures"])
        yield _plain_counter("dcache_snapshots_rejected", "Snapshot files found invalid at load time.", st["snapshots_rejected"])
        yield _plain_gauge("dcache_snapshot_loaded_keys", "Keys loaded from a snapshot at start-up.", st["snapshot_loaded_keys"])


class MasterCollector(ServiceCollector):
    """A master's metrics: the common families plus ring, health, routing, migration and links."""

    def __init__(self, node: MasterNode) -> None:
        super().__init__(node)
        self.node = node

    def collect(self) -> Iterator[Metric]:
        from .master.view import MEMBER_STATES, UP

        yield from super().collect()
        node = self.node
        view = node.router.view
        yield _plain_gauge("dcache_ring_epoch", "Epoch of the cluster view this master routes by.", view.epoch)
        yield _plain_gauge("dcache_ring_seq", "Sequence number of the view within its epoch.", view.seq)
        yield _plain_gauge("dcache_ring_replicas", "Copies kept of each key.", view.replicas)
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
        yield _plain_gauge(
            "dcache_migrating", "1 while data moves between aux nodes after a ring change, else 0.", int(view.prev_ring is not None)
        )
        rs = node.router.stats
        yield _plain_counter("dcache_read_fallbacks", "Reads retried on the next owner after one did not answer.", rs.fallbacks)
        yield _plain_counter("dcache_read_repairs", "Copies written back to owners that missed a key another owner had.", rs.repairs)
        yield _plain_counter("dcache_unavailable", "Requests answered UNAVAILABLE: no owner of the key answered.", rs.unavailable)
        yield _plain_counter("dcache_partial_writes", "Writes acknowledged although some live owner did not apply them.", rs.partial_writes)
        yield from self._links()
        yield from self._migration()
        yield from self._membership()

    def _links(self) -> Iterable[Metric]:
        links = sorted(self.node.links.items())
        requests = CounterMetricFamily("dcache_upstream_requests", "Requests sent to the aux node.", labels=["node"])
        failures = CounterMetricFamily(
            "dcache_upstream_failures", "Requests to the aux node that failed (not connected, timed out).", labels=["node"]
        )
        in_flight = GaugeMetricFamily("dcache_upstream_in_flight", "Requests sent to the aux node and not yet answered.", labels=["node"])
        conns = GaugeMetricFamily("dcache_upstream_connections", "Open connections to the aux node.", labels=["node"])
        size = GaugeMetricFamily("dcache_upstream_pool_size", "Connections kept to each aux node (--aux-connections).", labels=["node"])
        for node_id, link in links:
            requests.add_metric([node_id], link.requests)
            failures.add_metric([node_id], link.failures_total)
            in_flight.add_metric([node_id], link.in_flight)
            conns.add_metric([node_id], link.open_connections)
            size.add_metric([node_id], link.pool_size)
        return [requests, failures, in_flight, conns, size]

    def _membership(self) -> Iterable[Metric]:
        membership = self.node.membership
        leading = membership.role in ("coordinator", "zk-leader")
        out: list[Metric] = [
            _plain_gauge(
                "dcache_coordinating", "1 if this master decides membership (coordinator or ZooKeeper leader), else 0.", int(leading)
            )
        ]
        zk = getattr(membership, "zk", None)
        if zk is not None:
            st = zk.status()
            out.append(
                _plain_gauge(
                    "dcache_zookeeper_connected", "1 while the ZooKeeper session is connected, else 0.", int(st["zookeeper_connected"])
                )
            )
            out.append(
                _plain_gauge(
                    "dcache_zookeeper_disconnected_seconds",
                    "Seconds since the ZooKeeper connection was lost (0 while connected); the master routes by its last ring meanwhile.",
                    st["zookeeper_disconnected_s"],
                )
            )
            out.append(_plain_counter("dcache_zookeeper_sessions", "ZooKeeper sessions established since start.", st["zookeeper_sessions"]))
        return out

    def _migration(self) -> Iterable[Metric]:
        migrator = getattr(self.node.membership, "migrator", None)
        if migrator is None:  # a follower: the coordinator moves the data
            return []
        return [
            _plain_gauge(
                "dcache_migration_streams", "Streams (source, destination pairs) of the current or last migration.", migrator.streams_total
            ),
            _plain_gauge("dcache_migration_streams_done", "Streams of the current or last migration that finished.", migrator.streams_done),
            _plain_gauge("dcache_migration_progress_keys", "Keys copied by the current or last migration.", migrator.keys_moved),
            _plain_counter("dcache_migration_keys_moved", "Keys copied by all migrations since start.", migrator.keys_moved_total),
            _plain_counter("dcache_migrations", "Migrations run since start.", migrator.migrations_total),
        ]


def registry_for(collector: Collector, *, process: bool = True) -> CollectorRegistry:
    """A registry holding ``collector`` (and the standard ``process_*`` metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """A running ``/metrics`` endpoint."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``GET /metrics`` (text format, or OpenMetrics when asked) on ``host:port``."""
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        t0 = time.perf_counter()
        body = encoder(registry)
        elapsed = time.perf_counter() - t0
        if elapsed > 0.05:
            log.warning("a metrics scrape took %.3f s", elapsed)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound: Any = runner.addresses[0] if runner.addresses else (host, port)
    return MetricsServer(runner, bound[0], bound[1])
