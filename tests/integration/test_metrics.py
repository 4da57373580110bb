"""/metrics on real daemons: an aux node and a master started with --metrics-port."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dcache import Client
from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess, wait_for

pytestmark = pytest.mark.slow

_URL = re.compile(r"serves metrics at (http://\S+/metrics)")


@pytest.fixture
def cluster(tmp_path):
    cl = Cluster(tmp_path)
    yield cl
    cl.stop()
    print(cl.logs()[-20000:])  # shown by pytest only when the test fails


def metrics_url(p: DaemonProcess) -> str:
    """The URL the daemon logged at start-up (it picked a free port: --metrics-port 0)."""
    found: list[str] = []

    def logged() -> bool:
        for line in list(p.stderr_lines):
            m = _URL.search(line)
            if m:
                found.append(m.group(1))
                return True
        return False

    wait_for(logged, timeout=10, message=f"the metrics URL in the {p.role}'s log")
    return found[0]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def test_metrics_move_with_traffic(cluster: Cluster) -> None:
    master = cluster.start_master("m1", "--metrics-port", "0")
    aux = cluster.start_aux("a1", "--metrics-port", "0")
    await wait_ring(master.addr, settled({"a1"}), what="a1 up")
    master_url, aux_url = metrics_url(master), metrics_url(aux)

    before = await asyncio.to_thread(scrape, master_url)
    async with Client(master.addr, timeout=5.0) as c:
        for i in range(10):
            assert await c.set(f"k{i}", b"v")
        for i in range(10):
            assert await c.get(f"k{i}") == b"v"
        for i in range(5):
            assert await c.get(f"missing{i}") is None
        assert await c.delete("k0")

    m = await asyncio.to_thread(scrape, master_url)
    a = await asyncio.to_thread(scrape, aux_url)

    def master_requests(op: str, s: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
        return s[("dcache_requests_total", (("op", op), ("role", "master")))]

    assert master_requests("set", m) - master_requests("set", before) == 10
    assert master_requests("get", m) - master_requests("get", before) == 15
    assert master_requests("delete", m) - master_requests("delete", before) == 1
    assert m[("dcache_errors_total", (("op", "get"), ("role", "master")))] == 0
    assert m[("dcache_ring_epoch", ())] > 0
    assert m[("dcache_aux_up", (("node", "a1"),))] == 1
    assert m[("dcache_ring_members", (("state", "up"),))] == 1
    assert m[("dcache_upstream_requests_total", (("node", "a1"),))] >= 26
    assert m[("dcache_batch_seconds_count", (("role", "master"),))] > 0

    # the master routes SET as SETV, GET as GET, DELETE as DELV to the aux node
    assert a[("dcache_requests_total", (("op", "setv"), ("role", "aux")))] == 10
    assert a[("dcache_requests_total", (("op", "get"), ("role", "aux")))] == 15
    assert a[("dcache_cache_hits_total", ())] == 10
    assert a[("dcache_cache_misses_total", ())] == 5
    assert a[("dcache_cache_items", ())] >= 9  # the deleted key may stay as a tombstone
    assert a[("dcache_cache_bytes", ())] > 0

    # a node marked down shows in dcache_aux_up
    aux.kill()
    await wait_ring(master.addr, lambda info: not any(n["state"] == "up" for n in info["nodes"]), what="a1 down")
    m = await asyncio.to_thread(scrape, master_url)
    assert m[("dcache_aux_up", (("node", "a1"),))] == 0
    assert m[("dcache_ring_members", (("state", "down"),))] == 1


def test_metrics_port_flag_in_help() -> None:
    for role in ("aux", "master"):
        out = subprocess.run([sys.executable, "-m", "dcache", role, "--help"], capture_output=True, text=True, timeout=30, check=True)
        assert "--metrics-port" in out.stdout
        assert "DCACHE_METRICS_PORT" in out.stdout


async def test_near_cache_and_tracking_metrics_move_with_hot_reads(cluster: Cluster) -> None:
    master = cluster.start_master("m1", "--metrics-port", "0", "--near-cache-size", "1MB")
    aux = cluster.start_aux("a1", "--metrics-port", "0")
    await wait_ring(master.addr, settled({"a1"}), what="a1 up")
    master_url, aux_url = metrics_url(master), metrics_url(aux)
    async with Client(master.addr, timeout=5.0) as c:
        assert await c.set("hot", b"v1")
        for _ in range(10):  # 2,000 reads: hot after 32, then answered from the near cache
            assert await asyncio.gather(*(c.get("hot") for _ in range(200))) == [b"v1"] * 200
        m = await asyncio.to_thread(scrape, master_url)
        a = await asyncio.to_thread(scrape, aux_url)
        assert m[("dcache_near_cache_fills_total", ())] >= 1 and m[("dcache_near_cache_keys", ())] == 1
        assert m[("dcache_near_cache_hits_total", ())] > 1000
        assert m[("dcache_near_cache_max_bytes", ())] == 1_000_000
        assert m[("dcache_hot_key_reads_per_second", (("key", "hot"),))] > 0
        assert a[("dcache_tracking_keys", ())] == 1 and a[("dcache_tracking_subscribers", ())] == 1

        assert await c.set("hot", b"v2")  # the aux node invalidates the master's copy before it answers
        assert await c.get("hot") == b"v2"
        m = await asyncio.to_thread(scrape, master_url)
        a = await asyncio.to_thread(scrape, aux_url)
        assert m[("dcache_near_cache_invalidations_total", ())] >= 1
        assert a[("dcache_tracking_invalidations_total", ())] >= 1
        assert a[("dcache_tracking_timeouts_total", ())] == 0
