"""``dcache cluster`` (what ``make run`` starts) and the operator views ``dcache ring`` / ``dcache stats``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import aiohttp
import pytest
import redis

from dcache import Client
from tests.harness import reap, start_cluster_cmd, wait_for

pytestmark = pytest.mark.slow


def dcache(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "dcache", *args], capture_output=True, timeout=60)


@pytest.fixture
def local_cluster(tmp_path):
    proc, lines = start_cluster_cmd(
        "--port", "0", "--masters", "2", "--aux", "3", "--replicas", "2",
        "--data-dir", str(tmp_path / "data"), "--log-level", "warning", "--resp-port", "0",
    )  # fmt: skip
    yield proc, lines
    reap(proc)


async def test_local_cluster_serves_and_stops_on_ctrl_c(local_cluster):
    proc, lines = local_cluster
    masters = [line.split()[2] for line in lines if line.startswith("master ")]
    aux = [line.split()[2] for line in lines if line.startswith("aux ")]
    assert len(masters) == 2 and len(aux) == 3
    http = [line.split()[1] for line in lines if line.startswith("http ")]
    assert len(http) == 1 and http[0].startswith("http://127.0.0.1:"), lines
    async with Client(masters) as c:
        assert await c.mset({f"c:{i}": b"%d" % i for i in range(1000)}) == 1000
    async with Client(masters[1]) as c:  # the follower serves the same data
        assert await c.mget([f"c:{i}" for i in range(1000)]) == [b"%d" % i for i in range(1000)]
    resp_addrs = [w[5:] for line in lines if line.startswith("master ") for w in line.split() if w.startswith("resp=")]
    assert len(resp_addrs) == 2 and lines[-1].endswith(f" resp={resp_addrs[0]}"), lines
    assert any(line.startswith("redis clients: redis-cli -h 127.0.0.1 -p ") for line in lines), lines
    with redis.Redis(port=int(resp_addrs[1].rpartition(":")[2]), socket_timeout=10) as r:  # Redis clients, through the follower
        assert r.get("c:7") == b"7"

    r = dcache("ring", "--addr", masters[0])
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    for node in ("a1", "a2", "a3"):
        assert node in out
    assert "replicas 2" in out and "stable" in out
    info = json.loads(dcache("ring", "--addr", masters[1], "--json").stdout)
    assert {n["node_id"] for n in info["nodes"]} == {"a1", "a2", "a3"}
    assert sum(n["items"] for n in info["nodes"]) == 2000  # two copies of each key
    assert info["membership"]["role"] == "follower"

    stats = json.loads(dcache("stats", "--addr", masters[0], "--json").stdout)
    assert stats["role"] == "master" and stats["aux_items"] == 2000 and stats["aux_nodes_answering"] == 3

    async with aiohttp.ClientSession() as session:  # the HTTP shim in front of both masters
        async with session.get(f"{http[0]}/health") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok", "masters": dict.fromkeys(masters, True)}
        async with session.post(f"{http[0]}/data", json={"key": "greeting", "value": "hello"}) as resp:
            assert resp.status == 201
        async with session.get(f"{http[0]}/data/c:7") as resp:
            assert await resp.json() == {"key": "c:7", "value": "7"}

    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert b"stopped" in proc.stderr.read()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # a zombie has stopped
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_daemons_stop_when_the_cluster_command_is_killed(tmp_path):
    """A `dcache cluster` killed outright (SIGKILL: no handler runs) leaves no daemon holding its ports."""
    proc, lines = start_cluster_cmd(
        "--port", "0", "--masters", "1", "--aux", "2", "--replicas", "1",
        "--data-dir", str(tmp_path / "data"), "--log-level", "warning",
    )  # fmt: skip
    try:
        kids = _children(proc.pid)
        assert len(kids) == 4, (kids, lines)  # a master, two aux nodes, the shim
        proc.kill()
        proc.wait(10)
        wait_for(lambda: all(_gone(k) for k in kids), timeout=30, message="the daemons to stop after their parent died")
    finally:
        reap(proc)
        for k in kids:
            if not _gone(k):
                os.kill(k, signal.SIGKILL)


def test_a_closed_output_stops_the_cluster(tmp_path):
    """`dcache cluster | head -1`: once nobody reads its output, it stops the daemons instead of leaving them behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcache", "cluster", "--port", "0", "--masters", "1", "--aux", "1", "--replicas", "1",
         "--data-dir", str(tmp_path / "data"), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.close()  # the reader is gone before the cluster prints its endpoints
        assert proc.wait(60) == 1
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "its output was closed; stopping the cluster" in err and "stopped." in err and "Traceback" not in err, err
    finally:
        reap(proc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and SO_REUSEPORT as Linux has them")
async def test_http_workers_serve_and_stop_with_the_cluster(tmp_path):
    """`dcache cluster --http-workers 2`: two shim processes answer on the one port, and Ctrl-C stops them all."""
    proc, lines = start_cluster_cmd(
        "--port", "0", "--masters", "1", "--aux", "1", "--replicas", "1", "--http-workers", "2",
        "--data-dir", str(tmp_path / "data"), "--log-level", "warning",
    )  # fmt: skip
    try:
        [http] = [line.split()[1] for line in lines if line.startswith("http ")]
        [shim] = [k for k in _children(proc.pid) if b"\0http\0" in _cmdline(k)]
        workers = [k for k in _children(shim) if b"spawn_main" in _cmdline(k)]  # not multiprocessing's tracker
        assert len(workers) == 2, workers
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{http}/data", json={"key": "w", "value": "x"}) as resp:
                assert resp.status == 201
            for _ in range(20):  # new connections: the kernel spreads them over the workers
                async with aiohttp.ClientSession() as fresh, fresh.get(f"{http}/data/w") as resp:
                    assert await resp.json() == {"key": "w", "value": "x"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        wait_for(lambda: all(_gone(k) for k in [shim, *workers]), timeout=30, message="the shim and its workers to stop")
    finally:
        reap(proc)
