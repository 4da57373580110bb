"""Prometheus metrics of the daemons: custom collectors and a small ``/metrics`` server.

The daemons keep their figures as plain ints (``Service.op_requests``, the
cache's ``hits``, the router's ``RouterStats``, ...); nothing here runs per
request. At scrape time a collector reads those ints and yields metric
families (client_python's "Custom Collectors"), so the label sets are fixed:
op names, member states and aux node ids, never anything taken from a
request. ``ServiceCollector`` has the families every daemon shares; each
role's collector sits next to the role (``dcache.auxnode.metrics``,
``dcache.master.metrics``) and extends it. docs/METRICS.md lists every
family.

``start_metrics_server`` serves ``GET /metrics`` with aiohttp on the
daemon's ``--host`` and ``--metrics-port``. This module is imported only
when metrics are enabled: prometheus_client and aiohttp.web cost a few
hundred milliseconds to import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
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

from .address import format_address
from .protocol import Op
from .server import UNKNOWN_OP, Histogram, Service
from .tls import TlsContexts, TlsListener

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "MetricsServer",
    "ServiceCollector",
    "counter",
    "gauge",
    "histogram",
    "op_name",
    "plain_counter",
    "plain_gauge",
    "registry_for",
    "start_metrics_server",
    "tls_families",
]

log = logging.getLogger("dcache.metrics")

_OP_NAMES = {int(op): op.name.lower() for op in Op}
_OP_NAMES[UNKNOWN_OP] = "unknown"


def op_name(op: int) -> str:
    """The ``op`` label of an op number (``unknown`` for requests no handler took)."""
    return _OP_NAMES.get(op, str(op))


def histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
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
                histogram(latency, [role, op_name(op)], h)
        yield latency
        batch = HistogramMetricFamily(
            "dcache_batch_seconds",
            "Time to decode, run and answer all the requests one read delivered (one data_received call).",
            labels=["role"],
        )
        histogram(batch, [role], s.batch_latency)
        yield batch
        yield gauge("dcache_connections", "Client connections open now.", role, len(s.state.connections))
        yield counter("dcache_connections_accepted", "Client connections accepted.", role, s.state.total_connections)
        yield counter("dcache_protocol_errors", "Connections closed for a framing or protocol error.", role, s.protocol_errors_total)
        yield counter(
            "dcache_connections_rejected", "Connections refused at the connection limit (--max-connections).", role, s.rejected_connections
        )
        yield counter("dcache_idle_timeouts", "Connections closed after --idle-timeout without a request.", role, s.idle_timeouts)
        yield counter(
            "dcache_frame_timeouts", "Connections closed for a frame not completed within --frame-timeout.", role, s.frame_timeouts
        )
        yield counter(
            "dcache_input_overflows", "Connections closed because partial frames exceeded --max-input-buffer.", role, s.input_overflows
        )
        yield gauge("dcache_input_buffered_bytes", "Bytes of partial frames buffered across every connection.", role, s.buffered_input)
        yield counter(
            "dcache_output_overflows",
            "Connections cut off because answers held for clients that do not read them exceeded --max-output-buffer.",
            role,
            s.output_overflows,
        )
        yield gauge(
            "dcache_output_buffered_bytes",
            "Bytes of answers held for clients that do not read them, across every connection.",
            role,
            s.buffered_output,
        )
        yield counter("dcache_auth_failures", "HELLO tokens and cluster-secret proofs that were wrong.", role, s.auth_failures)
        yield counter(
            "dcache_auth_throttled",
            "Authentication attempts refused unchecked: too many failures from the address.",
            role,
            s.auth_throttled,
        )
        yield counter(
            "dcache_versions_refused", "Requests refused because a version was too far ahead (--max-clock-skew).", role, s.versions_refused
        )
        resp = s.resp_stats
        if resp is not None:
            commands = CounterMetricFamily(
                "dcache_resp_commands", "RESP commands received (--resp-port), by command.", labels=["role", "command"]
            )
            for name, n in resp.commands.items():
                commands.add_metric([role, name.lower()], n)
            yield commands
            yield counter("dcache_resp_errors", "RESP replies that were errors.", role, resp.errors)
            yield gauge("dcache_resp_connections", "RESP client connections open now (also in dcache_connections).", role, resp.connections)
            yield counter("dcache_resp_connections_accepted", "RESP client connections accepted.", role, resp.connections_total)
            yield counter("dcache_resp_protocol_errors", "RESP connections closed for a malformed stream.", role, resp.protocol_errors)
        yield from tls_families(role, s.tls_listener, s.tls)


def tls_families(role: str, listener: TlsListener | None, contexts: TlsContexts | None) -> Iterator[Metric]:
    """The TLS families of a daemon (zeros without TLS, so the set of families never changes)."""
    yield counter("dcache_tls_handshakes", "TLS handshakes completed on the listener.", role, listener.handshakes if listener else 0)
    failures = CounterMetricFamily(
        "dcache_tls_handshake_failures",
        "TLS handshakes that failed on the listener, by reason: refused (not TLS, or a certificate not accepted), "
        "timeout (--tls-handshake-timeout), dropped (the peer went away).",
        labels=["role", "reason"],
    )
    for reason in TlsListener.REASONS:
        failures.add_metric([role, reason], listener.failures[reason] if listener else 0)
    yield failures
    yield gauge(
        "dcache_tls_handshakes_in_progress", "TLS handshakes started and not finished.", role, listener.in_progress if listener else 0
    )
    yield counter("dcache_tls_reloads", "Certificate reloads (SIGHUP) that took effect.", role, contexts.reloads if contexts else 0)
    yield counter(
        "dcache_tls_reload_failures",
        "Certificate reloads (SIGHUP) refused: a file was missing or bad; the certificate in use stayed.",
        role,
        contexts.reload_failures if contexts else 0,
    )


def gauge(name: str, doc: str, role: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["role"])
    g.add_metric([role], value)
    return g


def counter(name: str, doc: str, role: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["role"])
    c.add_metric([role], value)
    return c


def plain_gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def plain_counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


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
        return f"http://{format_address(self.host, self.port)}/metrics"

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
