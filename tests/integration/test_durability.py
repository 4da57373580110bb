"""Catastrophic restart: every process killed at once, then restarted from the snapshots."""

from __future__ import annotations

import asyncio
import time

import pytest

from dcache import Client
from tests.cluster import Cluster, settled, wait_ring

pytestmark = pytest.mark.slow


async def test_catastrophic_restart_brings_every_key_back(tmp_path):
    cluster = Cluster(tmp_path, replicas=1, snapshot_interval=0.5)
    aux_ids = ["a1", "a2", "a3"]
    try:
        m1 = cluster.start_master("m1")
        m2 = cluster.start_master("m2", follow=m1)
        for n in aux_ids:
            cluster.start_aux(n)
        await wait_ring(m1.addr, settled(set(aux_ids)))
        await wait_ring(m2.addr, settled(set(aux_ids)))
        async with Client([m1.addr, m2.addr], timeout=10) as c:
            for start in range(0, 20_000, 1000):
                plain = {f"d:{i}": b"value-%d" % i for i in range(start, start + 1000) if i % 10}
                assert await c.mset(plain) == len(plain)
            long_ttl = {f"d:{i}": b"ttl-%d" % i for i in range(0, 20_000, 10) if i % 20 == 0}
            short_ttl = {f"d:{i}": b"short-%d" % i for i in range(0, 20_000, 10) if i % 20 == 10}
            assert await c.mset(long_ttl, ttl=600) == len(long_ttl)
            assert await c.mset(short_ttl, ttl=1.5) == len(short_ttl)
            written_at = time.monotonic()
        # Every node has written a snapshot that started after the writes: a
        # snapshot finishing first may have copied the cache before the last
        # writes, so wait for two new generations.
        snaps = [tmp_path / n / "snapshot.msgpack" for n in aux_ids]
        deadline = time.monotonic() + 10
        for _ in range(2):
            before = {p: p.stat().st_mtime_ns if p.exists() else 0 for p in snaps}
            while any(not p.exists() or p.stat().st_mtime_ns <= before[p] for p in snaps):
                assert time.monotonic() < deadline, "snapshots were not refreshed"
                await asyncio.sleep(0.05)
        ports = {n: cluster.aux[n].port for n in aux_ids}
        for p in [*cluster.masters, *cluster.aux.values()]:
            p.kill()  # SIGKILL, all at once
        cluster.masters.clear()
        m1 = cluster.start_master("m1")
        m2 = cluster.start_master("m2", follow=m1)
        for n in aux_ids:
            cluster.start_aux(n, port=ports[n])
        info = await wait_ring(m1.addr, settled(set(aux_ids)), timeout=30)
        # The aux nodes' snapshots carry the epoch that admitted them: the new
        # coordinator sees it restarted and admits them in one change, moving nothing.
        assert info["membership"]["recovery"]["from"] == "re-announcements", info["membership"]
        assert set(info["membership"]["recovery"]["members"]) == set(aux_ids)
        await wait_ring(m2.addr, settled(set(aux_ids)), timeout=10)
        while time.monotonic() - written_at < 2.0:  # the short TTLs have passed
            await asyncio.sleep(0.05)
        async with Client([m1.addr, m2.addr], timeout=10) as c:
            keys = [f"d:{i}" for i in range(20_000)]
            values = []
            for start in range(0, 20_000, 1000):
                values += await c.mget(keys[start : start + 1000])
            for i, v in enumerate(values):
                if i % 10:
                    assert v == b"value-%d" % i, (i, v)
                elif i % 20 == 0:
                    assert v == b"ttl-%d" % i, (i, v)
                else:
                    assert v is None, (i, v)  # expired while everything was down
            ttl = await c.ttl("d:0")
            assert ttl is not None and 500 < ttl <= 600
    finally:
        cluster.stop()


def _dcache(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dcache", *args], capture_output=True, timeout=120)


async def test_dump_and_restore_into_a_cluster_of_another_size(tmp_path):
    src = Cluster(tmp_path / "src", replicas=2)
    dst = Cluster(tmp_path / "dst", replicas=1)
    try:
        m = src.start_master("m1")
        for n in ("a1", "a2", "a3"):
            src.start_aux(n)
        await wait_ring(m.addr, settled({"a1", "a2", "a3"}))
        async with Client(m.addr, timeout=10) as c:
            assert await c.mset({f"x:{i}": b"v%d" % i for i in range(3000)}) == 3000
            assert await c.mset({f"t:{i}": b"t%d" % i for i in range(100)}, ttl=300) == 100
            await c.delete("x:7")
            await c.set("x:8", b"old")
        dump_file = tmp_path / "cluster.dump"
        r = _dcache("dump", "--addr", m.addr, "--out", str(dump_file))
        assert r.returncode == 0, r.stderr
        assert b"keys: 3099" in r.stdout  # every key once, although each is stored twice
        src.stop()

        md = dst.start_master("d1")
        for n in ("b1", "b2"):
            dst.start_aux(n)
        await wait_ring(md.addr, settled({"b1", "b2"}))
        async with Client(md.addr, timeout=10) as c:
            await c.set("x:8", b"newer")  # written after the dump: the restore must not overwrite it
        r = _dcache("restore", "--addr", md.addr, "--in", str(dump_file))
        assert r.returncode == 0, r.stderr
        assert b"applied: 3098" in r.stdout and b"not_applied_newer_present: 1" in r.stdout
        async with Client(md.addr, timeout=10) as c:
            values = await c.mget([f"x:{i}" for i in range(3000)])
            for i, v in enumerate(values):
                if i == 7:
                    assert v is None
                elif i == 8:
                    assert v == b"newer"
                else:
                    assert v == b"v%d" % i
            assert await c.mget([f"t:{i}" for i in range(100)]) == [b"t%d" % i for i in range(100)]
            ttl = await c.ttl("t:5")
            assert ttl is not None and 250 < ttl <= 300
        again = _dcache("restore", "--addr", md.addr, "--in", str(dump_file))
        assert again.returncode == 0 and b"applied: 0" in again.stdout  # idempotent
        dump_file.write_bytes(dump_file.read_bytes()[:-10])
        bad = _dcache("restore", "--addr", md.addr, "--in", str(dump_file))
        assert bad.returncode == 2 and b"is not a valid dcache dump: truncated" in bad.stderr  # a truncated file is refused whole
    finally:
        src.stop()
        dst.stop()
