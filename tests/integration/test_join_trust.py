"""An aux node joining or rejoining: no call fails while it joins, and it never brings back what it held before it left.

Real masters and aux nodes on loopback (``tests.cluster``), real signals, bounded waits.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from dcache import Client
from dcache.protocol import Op
from tests.cluster import Cluster, Tally, key_owned_by, native_load, outlive, ring, settled, stop_loads, up_nodes, wait_ring

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    cl = Cluster(tmp_path)
    yield cl
    cl.stop()
    print(cl.logs()[-20000:])  # shown by pytest only when the test fails


#: Joins, each followed by a graceful leave: each opens the master's link to the node (HELLO, then BIND) anew.
JOINS = 8
#: Paced loads through a master.
LOADS = 4
#: Keys in each MGET of the cold load: one call reads from every node of the ring.
KEYS_PER_CALL = 32


async def _cold_load(addr: str, stop: asyncio.Event, tally: Tally) -> None:
    """MGET keys that were never written, until ``stop``: a cold cache read while it grows."""
    async with Client(addr) as c:
        i = 0
        while not stop.is_set():
            keys = [f"cold:{i}:{j}" for j in range(KEYS_PER_CALL)]
            try:
                got = await c.mget(keys)
            except Exception as exc:
                tally.failures.append(f"mget {keys[0]}...: {exc!r}")
            else:
                if got != [None] * KEYS_PER_CALL:
                    tally.wrong.append(keys[0])
                tally.ok += 1
            i += 1
            await asyncio.sleep(0.001)


async def _join_and_leave(cluster: Cluster, masters: list[str], nodes: list[str]) -> None:
    """Start each of ``nodes`` in turn, wait until every master routes to it with its link open, stop it with SIGTERM (a graceful leave)."""
    for node in nodes:
        joined = cluster.start_aux(node)
        for addr in masters:
            await wait_ring(addr, settled({"a1", node}), timeout=30, what=f"{addr}: {node} joined")
        joined.signal(signal.SIGTERM)
        assert await asyncio.to_thread(joined.wait, 30) == 0
        for addr in masters:
            await wait_ring(addr, settled({"a1"}), timeout=30, what=f"{addr}: {node} left")


async def test_a_node_joining_a_cold_cluster_under_load_fails_no_call(cluster: Cluster) -> None:
    """Nothing to migrate: the join's migration ends at once, and reads go to the new node while its link may still connect.

    A request routed to a link still connecting waits for it (bounded)
    instead of failing with "not connected".
    """
    m = cluster.start_master("m1")
    cluster.start_aux("a1")
    await wait_ring(m.addr, settled({"a1"}))
    stop, tally = asyncio.Event(), Tally()
    loads = [asyncio.ensure_future(_cold_load(m.addr, stop, tally)) for _ in range(LOADS)]
    try:
        await tally.reach(100)
        # A new node each time: its first BIND writes its data dir's cluster
        # file (fsync), which keeps its link opening for a few milliseconds.
        await _join_and_leave(cluster, [m.addr], [f"n{i}" for i in range(JOINS)])
        await tally.reach(tally.ok + 100)
    finally:
        await stop_loads(stop, loads)
    assert (tally.failures[:5], len(tally.failures), tally.wrong) == ([], 0, [])


async def test_a_node_joining_under_write_load_is_not_fenced_and_fails_no_call(cluster: Cluster) -> None:
    """Writes through the coordinator and a follower while a node joins and leaves: none fails, and none misses the new node.

    A write that missed the new node (its link still connecting) would be
    acknowledged with a hint and the node fenced cluster-wide, to be
    reconciled before it serves reads: a join would cost a reconciliation.
    A node that rejoins is a new process, not one that restarted in place:
    it is not fenced either.
    """
    m1 = cluster.start_master("m1")
    m2 = cluster.start_master("m2", follow=m1)
    cluster.start_aux("a1")
    for m in (m1, m2):
        await wait_ring(m.addr, settled({"a1"}))
    stop, tally = asyncio.Event(), Tally()
    loads = [asyncio.ensure_future(native_load(f"{m.port}-{i}", m.addr, stop, tally)) for m in (m1, m2) for i in range(LOADS)]
    started_ms = time.time() * 1000
    try:
        await tally.reach(200)
        await _join_and_leave(cluster, [m1.addr, m2.addr], ["a2", "a2"])  # the second time a2 rejoins: not "restarted"
        await tally.reach(tally.ok + 100)
    finally:
        await stop_loads(stop, loads)
    assert (tally.failures[:5], len(tally.failures), tally.wrong) == ([], 0, [])
    events = (await ring(m1.addr))["membership"]["health_events"]
    assert [e for e in events if e["at_ms"] >= started_ms] == []


@pytest.mark.parametrize("away", ["leave", "forget"])
async def test_a_node_that_left_the_ring_rejoins_empty(cluster: Cluster, away: str) -> None:
    """A node removed from the membership (a graceful leave, or FORGET after it stopped) keeps its data dir; it rejoins empty.

    While it was away its key ``k`` was overwritten with a value that then
    expired: no copy and no tombstone is left to tell its old value is
    stale (a delete's tombstone lasts 60 s: the same after a minute). Back
    with its snapshot, it served ``k``'s old value again.
    """
    m = cluster.start_master("m1")
    for n in ("a1", "a2"):
        cluster.start_aux(n)
    await wait_ring(m.addr, settled({"a1", "a2"}))
    k = key_owned_by("a2", ["a1", "a2"], "k")
    async with Client(m.addr, timeout=10) as c:
        assert await c.set(k, b"v1") is True
        a2 = cluster.aux["a2"]
        if away == "leave":
            a2.signal(signal.SIGTERM)  # hands its data over, then a final snapshot
            assert await asyncio.to_thread(a2.wait, 30) == 0
            await wait_ring(m.addr, settled({"a1"}), timeout=30, what="a2 left")
            assert await c.get(k) == b"v1"  # handed over
        else:
            a2.signal(signal.SIGINT)  # a final snapshot, no hand-over: its keys miss (one copy)
            assert await asyncio.to_thread(a2.wait, 30) == 0
            await wait_ring(m.addr, lambda i: "a2" not in up_nodes(i) and not i["migrating"], timeout=30, what="a2 down")
            assert await c.execute(Op.FORGET, "a2", True) > 0  # forced: its keys had their only copy on it
            await wait_ring(m.addr, lambda i: {n["node_id"] for n in i["nodes"]} == {"a1"}, what="a2 forgotten")
        await outlive(c, k)
        cluster.start_aux("a2")  # the same --data-dir
        await wait_ring(m.addr, settled({"a1", "a2"}), timeout=30, what="a2 rejoined")
        assert await c.get(k) is None
    info = await ring(m.addr)
    assert next(n for n in info["nodes"] if n["node_id"] == "a2")["items"] == 0
