"""Metrics of the HTTP shim: plain int counters, turned into Prometheus families at scrape time.

The label sets are bounded: methods outside a fixed set count as ``OTHER``
and requests that match no route as route ``unmatched``; statuses are the
few the shim answers with. Nothing is allocated per request once a
(method, route, status) triple has been seen.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..client.batcher import BatchStats

__all__ = ["HttpMetrics", "LATENCY_BUCKETS_S", "KNOWN_METHODS"]

#: Upper bounds (seconds) of the request latency histogram.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LE = (*(repr(b) for b in LATENCY_BUCKETS_S), "+Inf")
#: Methods counted under their own name; anything else is ``OTHER``.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class _Histogram:
    __slots__ = ("counts", "sum_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # the last slot is +Inf
        self.sum_s = 0.0


class HttpMetrics(Collector):
    """Request counts by method, route and status, a latency histogram by route, and read batch counts."""

    requests: dict[tuple[str, str, int], int]
    latency: dict[str, _Histogram]
    #: What the read batcher (``dcache.client.GetBatcher``) did; it adds to these.
    reads: BatchStats

    def __init__(self) -> None:
        self.requests = {}
        self.latency = {}
        self.reads = BatchStats()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request that took ``seconds``."""
        if method not in KNOWN_METHODS:
            method = "OTHER"
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = _Histogram()
        hist.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        hist.sum_s += seconds

    def collect(self) -> Iterator[Metric]:
        """Build the metric families (called by the registry at scrape time)."""
        requests = CounterMetricFamily(
            "dcache_http_requests", "HTTP requests answered, by method, route and status", labels=["method", "route", "status"]
        )
        for (method, route, status), n in sorted(self.requests.items()):
            requests.add_metric([method, route, str(status)], n)
        yield requests
        latency = HistogramMetricFamily(
            "dcache_http_request_duration_seconds", "Time from request received to response ready, by route", labels=["route"]
        )
        for route, hist in sorted(self.latency.items()):
            buckets = []
            total = 0
            for le, n in zip(_LE, hist.counts, strict=True):
                total += n
                buckets.append((le, total))
            latency.add_metric([route], buckets, hist.sum_s)
        yield latency
        reads = self.reads
        yield CounterMetricFamily(
            "dcache_http_read_batches",
            "Batches of key reads sent to the cluster (one MGET, or a GET for a lone key)",
            value=reads.batches,
        )
        yield CounterMetricFamily("dcache_http_read_batch_keys", "Keys read in those batches", value=reads.keys)
        yield CounterMetricFamily(
            "dcache_http_read_batch_fallbacks", "Batches read again key by key after the batch failed", value=reads.fallbacks
        )
