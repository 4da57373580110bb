"""Forgetting a dead aux node (FORGET, ``dcache forget``) in embedded mode: real masters, aux nodes, SIGKILL and the CLI.

The ZooKeeper-mode test is in tests/integration/test_zookeeper.py (it shares
that module's ZooKeeper server).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from dcache import Client
from dcache.errors import MembershipError
from dcache.protocol import Op
from tests.cluster import Cluster, key_of, populate, ring, settled, up_nodes, value_of, wait_ring

pytestmark = pytest.mark.slow

N_KEYS = 2000
#: Slow enough that the copies after a SIGKILL take a few seconds (a FORGET meanwhile is refused).
SLOW_MIGRATION = ("--migration-rate", "200")


async def dcache(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``dcache`` command (bounded) off the loop."""
    cmd = [sys.executable, "-m", "dcache", *args]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)


def node_ids(info: dict[str, Any]) -> set[str]:
    return {n["node_id"] for n in info["nodes"]}


async def all_readable(addr: str, n: int) -> None:
    async with Client(addr, timeout=10) as c:
        values = await c.mget([key_of(i) for i in range(n)])
    missing = [i for i, v in enumerate(values) if v != value_of(i)]
    assert missing == [], f"{len(missing)} keys unreadable, e.g. {missing[:5]}"


async def members(addr: str) -> tuple[int, int]:
    async with Client(addr, timeout=10) as c:
        stats = await c.stats()
    return stats["members"], stats["members_up"]


@pytest.fixture
def cluster(tmp_path):
    cl = Cluster(tmp_path, replicas=2)
    yield cl
    cl.stop()
    print(cl.logs()[-20000:])  # shown by pytest only when the test fails


async def test_a_sigkilled_node_is_forgotten_every_key_survives_and_a_later_join_works(cluster: Cluster) -> None:
    m1 = cluster.start_master("m1", *SLOW_MIGRATION)
    m2 = cluster.start_master("m2", *SLOW_MIGRATION, follow=m1)
    for n in ("a1", "a2", "a3"):
        cluster.start_aux(n)
    for m in (m1, m2):
        await wait_ring(m.addr, settled({"a1", "a2", "a3"}), what=f"a1-a3 settled on {m.addr}")
    async with Client(m2.addr, timeout=10) as c:
        await populate(c, N_KEYS)

    # Refusals: a live node, an unknown id, an aux node's address.
    r = await dcache("forget", "--addr", m1.addr, "a2")
    assert r.returncode == 4, r
    assert r.stderr == (
        f"dcache forget: the master at {m1.addr} refused: aux node a2 is up: only a down node can be forgotten; "
        "remove a live one with SIGTERM (graceful leave)\n"
    )
    r = await dcache("forget", "--addr", m2.addr, "a9")  # through the follower: the coordinator's refusal
    assert r.returncode == 4 and "unknown aux node 'a9' (members: a1, a2, a3)" in r.stderr and r.stderr.count("\n") == 1, r
    r = await dcache("forget", "--addr", cluster.aux["a1"].addr, "a2")
    assert r.returncode == 2 and "forget needs a master" in r.stderr, r

    cluster.aux["a3"].kill()  # SIGKILL: its machine is gone
    await wait_ring(m1.addr, lambda i: "a3" not in up_nodes(i) and i["migrating"], what="a3 down, its ranges being copied")
    r = await dcache("forget", "--addr", m1.addr, "a3")  # the copies from the replicas are not all in place yet
    assert r.returncode == 4 and "a migration is running" in r.stderr, r
    async with Client(m1.addr, timeout=10) as c:  # LEAVE of a down node answers at once
        with pytest.raises(MembershipError, match="aux node a3 is down: a down node cannot hand its data over"):
            await asyncio.wait_for(c.execute(Op.LEAVE, "a3"), 5)
    await wait_ring(m1.addr, lambda i: not i["migrating"], timeout=30, what="the copies from the replicas done")
    assert await members(m1.addr) == (3, 2)

    r = await dcache("forget", "--addr", m2.addr, "a3")  # through the follower
    assert r.returncode == 0, r
    info = await ring(m2.addr)
    assert r.stdout == f"forgot aux node a3: ring epoch {info['epoch']}\n"
    for m in (m1, m2):
        info = await wait_ring(m.addr, lambda i: "a3" not in node_ids(i), what=f"a3 gone on {m.addr}")
        assert node_ids(info) == {"a1", "a2"} and set(info["ring"]["nodes"]) == {"a1", "a2"}
        assert await members(m.addr) == (2, 2)
    events = (await ring(m1.addr))["membership"]["health_events"]
    assert events[-1]["node_id"] == "a3" and events[-1]["state"] == "forgotten", events
    await all_readable(m1.addr, N_KEYS)
    await all_readable(m2.addr, N_KEYS)
    r = await dcache("forget", "--addr", m1.addr, "a3")  # once only
    assert r.returncode == 4 and "unknown aux node 'a3'" in r.stderr, r

    cluster.start_aux("a4")  # the replacement, under a new id
    for m in (m1, m2):
        await wait_ring(m.addr, settled({"a1", "a2", "a4"}), timeout=60, what=f"a4 joined on {m.addr}")
        assert await members(m.addr) == (3, 3)
    await all_readable(m2.addr, N_KEYS)
    info = await ring(m1.addr)
    a4 = next(n for n in info["nodes"] if n["node_id"] == "a4")
    assert a4["items"] > 0.5 * N_KEYS, a4  # with 3 nodes and 2 copies, a4 holds about 2/3 of the keys
    assert "Task exception was never retrieved" not in cluster.logs()


async def test_forgetting_a_node_with_one_copy_takes_force(tmp_path) -> None:
    cluster = Cluster(tmp_path, replicas=1)
    try:
        m1 = cluster.start_master("m1")
        for n in ("a1", "a2"):
            cluster.start_aux(n)
        await wait_ring(m1.addr, settled({"a1", "a2"}))
        async with Client(m1.addr, timeout=10) as c:
            await populate(c, N_KEYS)
        cluster.aux["a2"].kill()
        await wait_ring(
            m1.addr,
            lambda i: {n["node_id"]: n["state"] for n in i["nodes"]}.get("a2") == "down" and not i["migrating"],
            what="a2 down (not only fenced)",
        )
        r = await dcache("forget", "--addr", m1.addr, "a2")
        assert r.returncode == 4 and "had their only copies on down nodes including a2 (replicas 1)" in r.stderr, r
        assert "--force" in r.stderr and r.stderr.count("\n") == 1
        assert await members(m1.addr) == (2, 1)
        r = await dcache("forget", "--addr", m1.addr, "a2", "--force")
        assert r.returncode == 0 and r.stdout.startswith("forgot aux node a2: ring epoch "), r
        assert await members(m1.addr) == (1, 1)
        async with Client(m1.addr, timeout=10) as c:
            values = await c.mget([key_of(i) for i in range(N_KEYS)])
        kept = sum(v is not None for v in values)
        assert 0 < kept < N_KEYS  # a2's keys are gone for good; a1's are served
        assert all(v == value_of(i) for i, v in enumerate(values) if v is not None)
    finally:
        cluster.stop()
        print(cluster.logs()[-20000:])
