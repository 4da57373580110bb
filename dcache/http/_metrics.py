"""Metrics of the HTTP shim: plain int counters, turned into Prometheus families at scrape time.

The label sets are bounded: methods outside a fixed set count as ``OTHER``
and requests that match no route as route ``unmatched``; statuses are the
few the shim answers with. Nothing is allocated per request once a
(method, route, status) triple has been seen.

With ``--workers N`` each worker counts its own requests and writes a
snapshot of its counters (``snapshot``, JSON) to a directory the parent
gives, once a second and when it stops; the worker that answers a scrape
adds every other worker's last snapshot to its own live counters
(``WorkerMetrics``), after writing its own snapshot: what one scrape reports
of a worker is on disk for the next scrape, whichever worker answers it, and
snapshots of workers that died stay, so merged counters never go down. The
figures of other workers are at most a second old (docs/DECISIONS.md, "HTTP
workers").
"""

from __future__ import annotations

import json
import logging
import os
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..client.batcher import BatchStats

__all__ = ["HttpMetrics", "WorkerMetrics", "LATENCY_BUCKETS_S", "KNOWN_METHODS"]

log = logging.getLogger("dcache.http")

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
    """Request counts by method, route and status, a latency histogram by route, and read and write batch counts."""

    requests: dict[tuple[str, str, int], int]
    latency: dict[str, _Histogram]
    #: What the read batcher (``dcache.client.GetBatcher``) did; it adds to these.
    reads: BatchStats
    #: What the write batcher (``dcache.client.SetBatcher``) did; it adds to these.
    writes: BatchStats

    def __init__(self) -> None:
        self.requests = {}
        self.latency = {}
        self.reads = BatchStats()
        self.writes = BatchStats()

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

    def snapshot(self) -> dict[str, Any]:
        """Every counter, as plain JSON-able data (``add`` takes it)."""
        reads = self.reads
        writes = self.writes
        return {
            "requests": [[m, r, s, n] for (m, r, s), n in self.requests.items()],
            "latency": {route: [h.counts, h.sum_s] for route, h in self.latency.items()},
            "reads": [reads.batches, reads.keys, reads.fallbacks],
            "writes": [writes.batches, writes.keys, writes.fallbacks],
        }

    def add(self, snapshot: dict[str, Any]) -> None:
        """Add the counters of ``snapshot`` (another worker's) to these."""
        for method, route, status, n in snapshot["requests"]:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + n
        for route, (counts, sum_s) in snapshot["latency"].items():
            hist = self.latency.get(route)
            if hist is None:
                hist = self.latency[route] = _Histogram()
            hist.counts = [a + b for a, b in zip(hist.counts, counts, strict=True)]
            hist.sum_s += sum_s
        for stats, (batches, keys, fallbacks) in ((self.reads, snapshot["reads"]), (self.writes, snapshot["writes"])):
            stats.batches += batches
            stats.keys += keys
            stats.fallbacks += fallbacks

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
        yield from _batch_families("read", "Batches of key reads sent to the cluster (one MGET, or a GET for a lone key)", self.reads)
        yield from _batch_families(
            "write", "Batches of key writes sent to the cluster (one MSET per TTL, or a SET for a lone key)", self.writes
        )


def _batch_families(kind: str, batches_help: str, stats: BatchStats) -> Iterator[Metric]:
    """``dcache_http_{kind}_batches``, ``_batch_keys`` and ``_batch_fallbacks`` from one batcher's counters."""
    past = "read" if kind == "read" else "written"
    yield CounterMetricFamily(f"dcache_http_{kind}_batches", batches_help, value=stats.batches)
    yield CounterMetricFamily(f"dcache_http_{kind}_batch_keys", f"Keys {past} in those batches", value=stats.keys)
    yield CounterMetricFamily(
        f"dcache_http_{kind}_batch_fallbacks", f"Batches {past} again key by key after the batch failed", value=stats.fallbacks
    )


class WorkerMetrics(Collector):
    """One worker's ``HttpMetrics`` plus the last snapshot of every other worker of the same parent.

    Args:
        own: this worker's live counters.
        directory: where the workers' snapshots are (``worker-PID.json``).
    """

    def __init__(self, own: HttpMetrics, directory: Path) -> None:
        self.own = own
        self.directory = directory
        self.path = directory / f"worker-{os.getpid()}.json"

    def write(self) -> None:
        """Write this worker's snapshot (to a temporary file first, then renamed into place)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.own.snapshot()))
        os.replace(tmp, self.path)

    def merged(self) -> HttpMetrics:
        """This worker's counters and every other worker's last snapshot, added up."""
        total = HttpMetrics()
        total.add(self.own.snapshot())
        for path in sorted(self.directory.glob("worker-*.json")):
            if path == self.path:
                continue
            try:
                total.add(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as exc:  # a snapshot being replaced, or not ours
                log.warning("metrics snapshot %s could not be read: %s", path, exc)
        return total

    def collect(self) -> Iterator[Metric]:
        """The merged families (called by the registry at scrape time), after writing this worker's snapshot.

        Writing first keeps every merged counter monotonic: a scrape answered by
        another worker adds at least what this one reported, where adding this
        worker's older periodic snapshot would go back (a counter reset to
        Prometheus: a spike in every ``rate()``).
        """
        try:
            self.write()
        except OSError as exc:
            log.warning("cannot write the metrics snapshot %s: %s", self.path, exc)
        return self.merged().collect()
