"""/metrics on real daemons: an aux node and a master started with --metrics-port."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dcache import Client
from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess, start_http, wait_for
from tests.integration.test_http_workers import _children, _pid

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

        hits = m[("dcache_near_cache_hits_total", ())]
        assert await c.set("hot", b"v2")  # this master's own SET: its answer updates the copy (KEEP_COPY)
        assert await c.get("hot") == b"v2"
        m = await asyncio.to_thread(scrape, master_url)
        assert m[("dcache_near_cache_write_throughs_total", ())] == 1
        assert m[("dcache_near_cache_hits_total", ())] == hits + 1 and m[("dcache_near_cache_keys", ())] == 1

        assert await c.delete("hot")  # the aux node invalidates the master's copy before it answers
        assert await c.get("hot") is None
        m = await asyncio.to_thread(scrape, master_url)
        a = await asyncio.to_thread(scrape, aux_url)
        assert m[("dcache_near_cache_invalidations_total", ())] >= 1
        assert a[("dcache_tracking_invalidations_total", ())] >= 1
        assert a[("dcache_tracking_timeouts_total", ())] == 0


# -- every role, scraped for real, against docs/METRICS.md and docs/OPERATIONS.md ---------------------

METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
OPERATIONS_DOC = METRICS_DOC.with_name("OPERATIONS.md")
_ROW = re.compile(r"^\| `(dcache_[a-z_]+)` \| (counter|gauge|histogram) \|\s*([a-z_, ]*?)\s*\|")
Documented = dict[str, tuple[str, tuple[str, ...]]]


def documented_tables() -> list[tuple[str, str, Documented]]:
    """``(section, first line of the paragraph before the table, {name: (type, labels)})`` for every table of METRICS.md."""
    tables: list[tuple[str, str, Documented]] = []
    section = intro = ""
    previous = ""
    for line in METRICS_DOC.read_text().splitlines():
        if line.startswith("## "):
            section, intro = line[3:], ""
        elif line and not line.startswith("|") and not previous:
            intro = line  # a paragraph starts
        if line.startswith("| Name | Type |"):
            tables.append((section, intro, {}))
        m = _ROW.match(line)
        if m:
            labels = tuple(sorted(x.strip() for x in m.group(3).split(",") if x.strip()))
            tables[-1][2][m.group(1)] = (m.group(2), labels)
        previous = line
    return tables


def documented_for(role: str, *, resp: bool = False, coordinating: bool = False) -> Documented:
    """What METRICS.md says a daemon exports: ``role`` is ``aux``, ``master`` or ``http`` (ZooKeeper mode is not covered here)."""
    out: Documented = {}
    for section, intro, table in documented_tables():
        wanted = {
            "Every daemon": role != "http",
            "RESP front door (`--resp-port`)": resp,
            "Aux nodes": role == "aux",
            "Masters": role == "master"
            and not intro.startswith("ZooKeeper mode only")
            and (coordinating or not intro.startswith("Coordinating")),
            "HTTP shim": role == "http",
        }
        assert section in wanted, f"METRICS.md section {section!r}: which daemons export it? (teach documented_for)"
        if wanted[section]:
            out.update(table)
    return out


def exported_families(url: str) -> dict[str, tuple[str, tuple[str, ...] | None]]:
    """name (counters with ``_total``) -> (type, labels or None without samples) of every ``dcache_*`` family at ``url``."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, tuple[str, tuple[str, ...] | None]] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        if not name.startswith("dcache_"):
            assert name.startswith(("process_", "python_")), name
            continue
        labels: set[str] = set()
        for s in fam.samples:
            labels |= set(s.labels) - {"le"}
        out[name] = (fam.type, tuple(sorted(labels)) if fam.samples else None)
    return out


class Roles:
    """Every kind of daemon, with metrics: a coordinating master (near cache, RESP), a follower, two aux nodes (one with RESP), a shim of 2 workers."""

    def __init__(self, cluster: Cluster, shim: DaemonProcess) -> None:
        self.cluster = cluster
        self.shim = shim
        self.coordinator, self.follower = cluster.masters
        self.urls = {
            "coordinator": metrics_url(self.coordinator),
            "follower": metrics_url(self.follower),
            "aux with resp": metrics_url(cluster.aux["a1"]),
            "aux": metrics_url(cluster.aux["a2"]),
            "http": f"http://{shim.addr}/metrics",
        }


@pytest.fixture(scope="module")
def roles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Roles]:
    cluster = Cluster(tmp_path_factory.mktemp("roles"))
    shim: DaemonProcess | None = None
    try:
        m1 = cluster.start_master("m1", "--metrics-port", "0", "--near-cache-size", "1MB", "--resp-port", "0")
        cluster.start_master("m2", "--metrics-port", "0", follow=m1)
        cluster.start_aux("a1", "--metrics-port", "0", "--resp-port", "0")
        cluster.start_aux("a2", "--metrics-port", "0")
        asyncio.run(wait_ring(m1.addr, settled({"a1", "a2"}), what="a1, a2 up"))
        shim = start_http(m1.addr, cluster.masters[1].addr, extra=["--workers", "2"])
        yield Roles(cluster, shim)
    except BaseException:
        print(cluster.logs() + ("\n--- http\n" + shim.stderr() if shim else ""))
        raise
    finally:
        if shim is not None:
            shim.kill()
        cluster.stop()


async def _traffic(roles: Roles) -> None:
    """Reads, writes and a hot key through both masters, and HTTP requests, so that families with labels have samples."""
    for master in (roles.coordinator, roles.follower):
        async with Client(master.addr, timeout=5.0) as c:
            assert all(await asyncio.gather(*(c.set(f"k{i}", b"v") for i in range(50))))
            assert await asyncio.gather(*(c.get(f"k{i}") for i in range(50))) == [b"v"] * 50
            assert await asyncio.gather(*(c.get("k0") for _ in range(200))) == [b"v"] * 200
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(f"http://{roles.shim.addr}/data/k1") as resp:
            assert resp.status == 200


@pytest.mark.parametrize(
    ("which", "role", "options"),
    [
        ("coordinator", "master", {"resp": True, "coordinating": True}),
        ("follower", "master", {}),
        ("aux with resp", "aux", {"resp": True}),
        ("aux", "aux", {}),
        ("http", "http", {}),
    ],
)
async def test_each_real_daemon_exports_what_metrics_md_documents(roles: Roles, which: str, role: str, options: dict[str, bool]) -> None:
    """Every documented family is there with its type and labels, and every exported ``dcache_*`` family is documented."""
    await _traffic(roles)
    got = await asyncio.to_thread(exported_families, roles.urls[which])
    docs = documented_for(role, **options)
    assert set(got) == set(docs), (
        f"{which}: exported, not in METRICS.md: {sorted(set(got) - set(docs))}; documented, not exported: {sorted(set(docs) - set(got))}"
    )
    for name, (kind, labels) in got.items():
        assert kind == docs[name][0], f"{which}: {name} is a {kind}, METRICS.md says {docs[name][0]}"
        if labels is not None:
            assert labels == docs[name][1], f"{which}: {name} has labels {labels}, METRICS.md says {docs[name][1]}"


async def test_http_workers_merged_counters_never_go_back(roles: Roles) -> None:
    """With ``--workers 2`` under load, scrapes answered by either worker (and across a worker's SIGKILL) never see a counter go down.

    Prometheus reads a counter that goes down as a restart: ``rate()`` then
    adds the whole counter as one spike.
    """
    url = f"http://{roles.shim.addr}"
    stop = asyncio.Event()

    async def load() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            i = 0
            while not stop.is_set():
                async with s.get(f"{url}/data/miss{i % 100}") as resp:
                    assert resp.status == 404
                i += 1

    async def requests_total() -> float:
        # A connection of its own each time, so that the kernel may give it to either worker.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), connector=connector) as s:
            async with s.get(f"{url}/metrics") as resp:
                text = await resp.text()
        return sum(
            x.value
            for f in text_string_to_metric_families(text)
            if f.name == "dcache_http_requests"
            for x in f.samples
            if x.name.endswith("_total")
        )

    async def scrapes(n: int, seen: list[float]) -> None:
        for _ in range(n):
            seen.append(await requests_total())
            await asyncio.sleep(0.02)

    loaders = [asyncio.create_task(load()) for _ in range(6)]
    seen: list[float] = []
    try:
        await scrapes(60, seen)
        victim = _children(_pid(roles.shim))[0]
        os.kill(victim, signal.SIGKILL)
        await scrapes(20, seen)
        await asyncio.to_thread(
            wait_for, lambda: len(_children(_pid(roles.shim))) == 2, timeout=60, message="the killed worker started again"
        )
        await scrapes(40, seen)
    finally:
        stop.set()
        await asyncio.gather(*loaders, return_exceptions=True)
    backwards = [(a, b) for a, b in pairwise(seen) if b < a]
    assert not backwards, f"{len(backwards)} of {len(seen)} scrapes went back, e.g. {backwards[:3]}"
    assert seen[-1] > seen[0]


def documented_stats() -> dict[str, tuple[set[str], set[str]]]:
    """OPERATIONS.md's "`dcache stats`" tables: ``every``, ``aux``, ``master`` -> (fields, fields present only in some setups).

    A row whose meaning starts ``with ...`` (TLS, ``--zookeeper``, ``--join``, ...) or
    ``coordinator:`` is present only then; ``zookeeper...`` stands for every ``zookeeper_*`` field.
    """
    text = OPERATIONS_DOC.read_text()
    section = text[text.index("### `dcache stats`") : text.index("### `dcache hotkeys`")]
    tables: dict[str, tuple[set[str], set[str]]] = {}
    current = ""
    for line in section.splitlines():
        for start, name in (("Every node", "every"), ("An **aux node**", "aux"), ("A **master**", "master")):
            if line.startswith(start):
                current = name
                tables[name] = (set(), set())
        if current and line.startswith("| `"):
            cells = line.split("|")
            names, meaning = cells[1], cells[2].strip()
            fields = set(re.findall(r"`([a-z_]+(?:\.\.\.)?)`", names))
            tables[current][0].update(fields)
            if meaning.startswith(("with ", "coordinator:")):
                tables[current][1].update(fields)
    assert set(tables) == {"every", "aux", "master"}, tables
    return tables


async def test_stats_fields_match_operations_md(roles: Roles) -> None:
    """Every STATS field of a real master (coordinator, follower) and aux node is documented, and every documented one is there unless conditional."""
    tables = documented_stats()
    for node in (roles.coordinator, roles.follower, *roles.cluster.aux.values()):
        async with Client(node.addr, timeout=5.0) as c:
            stats = await c.stats()
        role = stats["role"]
        fields, conditional = (a | b for a, b in zip(tables["every"], tables[role], strict=True))
        got = {"zookeeper..." if f not in fields and f.startswith("zookeeper_") else f for f in stats}
        assert not got - fields, f"{role} {stats['node_id']}: STATS fields OPERATIONS.md does not explain: {sorted(got - fields)}"
        missing = fields - got - conditional
        assert not missing, f"{role} {stats['node_id']}: documented, not in STATS: {sorted(missing)}"
