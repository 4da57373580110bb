"""``dcache http --workers N``: real worker processes on one port, in front of a real master and aux node."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import Cluster, settled, wait_ring
from tests.harness import DaemonProcess, start_http, wait_for

pytestmark = pytest.mark.slow

MISS_404 = 'dcache_http_requests_total{method="GET",route="/data/{key}",status="404"}'


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = Cluster(tmp_path_factory.mktemp("workers"))
    try:
        cluster.start_master("m1")
        cluster.start_aux("a1")
        asyncio.run(wait_ring(cluster.coordinator.addr, settled({"a1"}), what="a1 up"))
        yield cluster.coordinator.addr
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


def _children(pid: int) -> list[int]:
    """The worker processes of the shim ``pid`` (its children running multiprocessing's spawn_main)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _established(pid: int, port: int) -> int:
    """How many TCP connections to local ``port`` process ``pid`` holds (its socket inodes in /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local_port = int(cols[1].rpartition(":")[2], 16)
        if local_port == port and cols[3] == "01" and cols[9] in inodes:  # 01: ESTABLISHED
            count += 1
    return count


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def _scrape(url: str) -> str:
    # A connection of its own each time, so that the kernel may give it to any worker.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(f"{url}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


async def _misses(url: str, connections: int, per_connection: int) -> None:
    """``connections`` open at once, each answering ``per_connection`` GETs of missing keys (404)."""

    async def one(i: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            for j in range(per_connection):
                async with s.get(f"{url}/data/miss-{i}-{j}") as resp:
                    assert resp.status == 404, await resp.text()

    await asyncio.gather(*(one(i) for i in range(connections)))


def _pid(shim: DaemonProcess) -> int:
    assert shim.proc is not None
    return shim.proc.pid


def _start(master: str, workers: int = 2) -> DaemonProcess:
    shim = start_http(master, extra=["--workers", str(workers)])
    wait_for(lambda: len(_children(_pid(shim))) == workers, timeout=30, message=f"{workers} workers")
    return shim


def test_workers_share_the_port_and_all_serve(master: str) -> None:
    shim = _start(master, workers=2)
    try:
        workers = _children(_pid(shim))
        url = f"http://{shim.addr}"

        async def hold() -> dict[int, int]:
            sessions = [aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) for _ in range(40)]
            try:
                for s in sessions:  # each session keeps its one connection open
                    async with s.get(f"{url}/data/anything") as resp:
                        assert resp.status == 404
                return {pid: _established(pid, shim.port) for pid in workers}
            finally:
                for s in sessions:
                    await s.close()

        held = asyncio.run(hold())
        assert sum(held.values()) == 40, held
        assert all(n > 0 for n in held.values()), held  # with 40 connections, one worker alone: odds 2**-39
    finally:
        assert shim.terminate() == 0, shim.stderr()
    assert not any(_running(pid) for pid in workers)


def test_merged_metrics_count_every_workers_requests(master: str) -> None:
    shim = _start(master, workers=2)
    try:
        url = f"http://{shim.addr}"
        asyncio.run(_misses(url, connections=20, per_connection=5))
        # Each worker's figures reach the others within a second (its snapshot): then whichever worker answers says 100.
        wait_for(
            lambda: all(_metric(asyncio.run(_scrape(url)), MISS_404) == 100 for _ in range(6)), timeout=15, message="100 misses counted"
        )
        # A worker that dies is started again, and what it had counted still counts.
        victim = _children(_pid(shim))[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in _children(_pid(shim)) and len(_children(_pid(shim))) == 2, timeout=60, message="worker restarted")
        assert "exited with status -9" in shim.stderr()
        asyncio.run(_misses(url, connections=4, per_connection=5))
        wait_for(lambda: _metric(asyncio.run(_scrape(url)), MISS_404) == 120, timeout=30, message="120 misses counted")
    finally:
        assert shim.terminate() == 0, shim.stderr()


def test_killing_the_parent_stops_every_worker(master: str) -> None:
    shim = _start(master, workers=2)
    workers = _children(_pid(shim))
    port = shim.port
    shim.signal(signal.SIGKILL)
    shim.wait()
    wait_for(lambda: not any(_running(pid) for pid in workers), timeout=30, message="workers gone after the parent")
    shim.kill()  # close the pipes
    # And the port is free again.
    with socket.socket() as s:
        deadline = time.monotonic() + 10
        while s.connect_ex(("127.0.0.1", port)) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_sigterm_stops_parent_and_workers_gracefully(master: str) -> None:
    shim = _start(master, workers=2)
    workers = _children(_pid(shim))
    assert shim.terminate() == 0, shim.stderr()
    assert not any(_running(pid) for pid in workers)
    assert shim.stderr().count("shutting down") >= 3  # the parent and each worker


def test_sighup_without_tls_keeps_parent_and_workers_serving(master: str) -> None:
    """Without TLS files there is nothing to reload: SIGHUP's default action used to kill the parent on the spot."""
    shim = _start(master, workers=2)
    workers = _children(_pid(shim))
    try:
        shim.signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP" in shim.stderr(), timeout=10, message="the SIGHUP log line")
        assert shim.alive and all(_running(pid) for pid in workers), shim.stderr()
        with urllib.request.urlopen(f"http://{shim.addr}/health", timeout=10) as resp:
            assert resp.status == 200
        assert shim.terminate() == 0, shim.stderr()
    finally:
        shim.kill()


def test_bad_settings_stop_the_start_before_any_worker(master: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    cmd = [sys.executable, "-m", "dcache", "http", "--port", "0", "--master", master, "--workers", "2"]
    r = subprocess.run([*cmd, "--tls-cert", missing, "--tls-key", missing], capture_output=True, timeout=60)
    assert r.returncode == 2 and b"missing.pem" in r.stderr and b"READY" not in r.stdout, r.stderr
    with socket.socket() as taken:  # a port another program listens on, without SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = subprocess.run([*cmd[:5], str(taken.getsockname()[1]), *cmd[6:]], capture_output=True, timeout=60)
    assert r.returncode == 2 and b"--port" in r.stderr and b"READY" not in r.stdout, r.stderr
