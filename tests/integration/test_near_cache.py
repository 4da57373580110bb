"""The near cache keeps the cluster's promise: no stale read after an acknowledged write, across masters.

Two masters with ``--near-cache-size``, three aux nodes, two replicas. A
``LoadChecker`` writes (SET and DELETE) through master A and reads through
master B, on a few keys, so every key is hot on B and B answers most reads
from its near cache. Every read that starts after a write was acknowledged
must return that write or a newer one (``tests/faults/checker.py``): 0
stale reads, 0 resurrected deletes, 0 lost writes. The same holds while an
owner is killed and restarted, while an aux node joins, and while master B
is stopped (its subscriptions time out and it is cut off).

Each run also asserts that B did answer from its near cache, so a run that
never used it cannot pass for one that kept it coherent.

The KEEP_COPY runs (``kept_run``) write and read through both masters, so
each master's own SETs update its copies, and so do the other's (the owner
pushes the written value to a copy subscribed for values),
with one owner per key and with two, and while an owner is killed and
restarted; each asserts that both masters did write through their copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from dcache import Client
from dcache.protocol import Op
from dcache.protocol.limits import INVALIDATION_TIMEOUT_S
from tests.cluster import Cluster, settled, wait_ring
from tests.faults.checker import LoadChecker
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.slow

NODES = {"a1", "a2", "a3"}
#: Copies of every hot key whatever its write rate (no cool-down): the most invalidations, the hardest test.
NEAR = ["--near-cache-size", "4MB", "--near-cache-min-hits", "0"]
#: Operations (reads and writes) of each coherence run.
OPS = 100_000
#: Operations of each KEEP_COPY run (``kept_run``; three of them, on top of the runs above).
KEPT_OPS = 50_000


class NearCluster(Cluster):
    def up(self, aux: set[str] = NODES) -> tuple[str, str]:
        a = self.start_master("m1", *NEAR)
        b = self.start_master("m2", *NEAR, follow=a)
        for node in sorted(aux):
            self.start_aux(node)
        return a.addr, b.addr

    async def settle(self, nodes: set[str] = NODES, timeout: float = 30.0) -> None:
        for m in self.masters:
            await wait_ring(m.addr, settled(nodes), timeout=timeout, what=f"{m.addr}: {sorted(nodes)} up, settled")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NearCluster]:
    c = NearCluster(tmp_path, replicas=2)
    try:
        yield c
    finally:
        c.stop()
        print(c.logs()[-20000:])  # shown only when the test fails


def checker(a: str, b: str, seed: int) -> LoadChecker:
    """Writers through ``a``, readers through ``b``, on 6 keys (hot on ``b``)."""
    return LoadChecker([a], [b], writers=2, keys_per_writer=3, readers=4, delete_ratio=0.1, mget_ratio=0.2, pause_s=0.0, seed=seed)


async def stats(addr: str) -> dict[str, Any]:
    async with Client(addr, timeout=5.0) as c:
        st: dict[str, Any] = await c.stats()
        return st


def ops_done(chk: LoadChecker) -> int:
    s = chk.stats
    return s.sets_ok + s.deletes_ok + s.reads_ok


async def run_until(chk: LoadChecker, total: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while ops_done(chk) < total:
        chk.check_running()
        assert time.monotonic() < deadline, f"only {ops_done(chk)} of {total} operations in {timeout}s: {chk.report()}"
        await asyncio.sleep(0.05)


def assert_coherent(chk: LoadChecker) -> None:
    s = chk.stats
    assert (s.stale, s.resurrected, s.wrong, s.lost) == (0, 0, 0, 0), chk.report()


async def assert_near_used(b: str, at_least: int = 1000) -> dict[str, Any]:
    st = await stats(b)
    assert st["near_cache_hits"] >= at_least, {k: v for k, v in st.items() if k.startswith("near")}
    assert st["near_cache_invalidations"] > 0, "the writes through the other master invalidated nothing here"
    return st


async def coherent_run(
    a: str, b: str, seed: int, during: Callable[[LoadChecker], Awaitable[None]] | None = None, at_least: int = 1000
) -> dict[str, Any]:
    """``OPS`` operations of ``checker(a, b)``, with ``during`` run once a third are done: 0 problems, B's near cache used; B's STATS."""
    await checked_run(checker(a, b, seed=seed), [b], during)
    return await assert_near_used(b, at_least)


async def checked_run(
    chk: LoadChecker, verify: list[str], during: Callable[[LoadChecker], Awaitable[None]] | None, total: int = OPS
) -> None:
    """``total`` operations of ``chk``, with ``during`` run once a third are done, then every key read through ``verify``: 0 problems."""
    chk.start()
    try:
        await run_until(chk, total // 3)
        if during is not None:
            await during(chk)
        await run_until(chk, total)
    finally:
        await chk.stop()
    for addr in verify:
        await chk.verify(addr)
    assert_coherent(chk)
    print(chk.report())


async def test_two_masters_no_stale_read(cluster: NearCluster) -> None:
    a, b = cluster.up()
    await cluster.settle()
    st = await coherent_run(a, b, seed=31, at_least=OPS // 10)
    print({k: v for k, v in st.items() if k.startswith("near")})
    held = sum([(await stats(n.addr))["answers_held_for_invalidation"] for n in cluster.aux.values()])
    assert held > 0, "no write waited for an invalidation: the masters never subscribed"


def kill_and_restart(cluster: NearCluster, victim: str, total: int = OPS) -> Callable[[LoadChecker], Awaitable[None]]:
    """A ``during`` step: kill aux node ``victim``, run to two thirds of ``total`` operations without it, restart it on its port."""

    async def during(chk: LoadChecker) -> None:
        port = cluster.aux[victim].port
        cluster.aux[victim].kill()
        await cluster.settle(NODES - {victim})
        await run_until(chk, 2 * total // 3)
        restarted = cluster.start_aux(victim, port=port)
        assert restarted.port == port
        await cluster.settle()

    return during


async def test_no_stale_read_while_an_owner_is_killed_and_restarted(cluster: NearCluster) -> None:
    a, b = cluster.up()
    await cluster.settle()
    await coherent_run(a, b, seed=32, during=kill_and_restart(cluster, "a1"))


async def test_no_stale_read_while_an_aux_node_joins(cluster: NearCluster) -> None:
    a, b = cluster.up({"a1", "a2"})
    await cluster.settle({"a1", "a2"})

    async def join(chk: LoadChecker) -> None:
        cluster.start_aux("a3")
        await cluster.settle()

    await coherent_run(a, b, seed=33, during=join)


async def test_a_stopped_master_is_cut_off_and_never_serves_a_stale_copy(cluster: NearCluster) -> None:
    """Master B holds a copy and stops answering: a write through A waits for B's acknowledgement at most the timeout, then B is cut off; once B runs again it answers the new value."""
    a, b = cluster.up()
    await cluster.settle()
    async with Client(a, timeout=10.0) as ca, Client(b, timeout=10.0) as cb:
        await ca.set("hot", b"v1")
        for _ in range(200):  # hot on B, then filled
            assert await cb.get("hot") == b"v1"
        before = (await stats(b))["near_cache_hits"]
        for _ in range(50):
            assert await cb.get("hot") == b"v1"
        assert (await stats(b))["near_cache_hits"] >= before + 50, "B did not answer from its near cache"
        master_b = cluster.masters[1]
        master_b.signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            await ca.set("hot", b"v2")  # acknowledged only once B can no longer serve v1
            took = time.monotonic() - t0
        finally:
            master_b.signal(signal.SIGCONT)
        print(f"the write waited {took:.2f} s")
        assert INVALIDATION_TIMEOUT_S * 0.9 <= took <= INVALIDATION_TIMEOUT_S + 3.0, f"the write waited {took:.2f}s"
        for _ in range(20):
            assert await cb.get("hot") == b"v2"
        timeouts = sum([(await stats(n.addr))["invalidation_timeouts"] for n in cluster.aux.values()])
        assert timeouts >= 1
        assert (await stats(a))["partial_writes"] == 0, "A took the held answer for a missing owner"
        t0 = time.monotonic()
        await ca.set("hot", b"v3")  # B is cut off: no more waiting
        assert time.monotonic() - t0 < INVALIDATION_TIMEOUT_S * 0.5
        assert await cb.get("hot") == b"v3"


async def test_a_killed_master_holding_copies_fails_no_write(tmp_path: Path) -> None:
    """Master B holds copies on the only owner and is SIGKILLed: writes through A wait at most the invalidation bound, then succeed.

    The aux node holds their answers until B's lease has run out; A must not
    take that wait for a dead or slow node (an error with one owner, a
    partial write and a fence with more).
    """
    c = NearCluster(tmp_path, replicas=1)
    try:
        a, b = c.up({"a1"})
        await c.settle({"a1"})
        async with Client(a, timeout=10.0) as ca, Client(b, timeout=10.0) as cb:
            keys = [f"hot{i}" for i in range(4)]
            for k in keys:
                await ca.set(k, b"v1")
            for _ in range(100):  # hot on B, then copied
                for k in keys:
                    assert await cb.get(k) == b"v1"
            assert (await stats(b))["near_cache_keys"] >= 1, "B copied nothing"
            c.masters[1].signal(signal.SIGKILL)
            took = []
            for k in keys:  # one after the other, on an otherwise quiet link
                t0 = time.monotonic()
                await ca.set(k, b"v2")
                took.append(time.monotonic() - t0)
            print("the writes waited", [f"{t:.2f}" for t in took])
            assert max(took) <= INVALIDATION_TIMEOUT_S + 3.0, took
            for k in keys:
                assert await ca.get(k) == b"v2"
            st = await stats(a)
            assert st["partial_writes"] == 0, st
        await wait_ring(a, settled({"a1"}), timeout=5.0, what="a1 up and not fenced")
    finally:
        c.stop()
        print(c.logs()[-20000:])


async def test_tracking_table_is_bounded(cluster: NearCluster) -> None:
    """An aux node tracks at most --tracking-keys keys; one more invalidates the oldest, and reads stay right."""
    m = cluster.start_master("m1", *NEAR)
    cluster.start_aux("a1", "--tracking-keys", "4")
    await cluster.settle({"a1"})
    async with Client(m.addr, timeout=10.0) as c:
        keys = [f"k{i}" for i in range(10)]
        for k in keys:
            await c.set(k, k.encode())
        for _ in range(100):
            for k in keys:
                assert await c.get(k) == k.encode()
        st = await stats(cluster.aux["a1"].addr)
        assert st["tracked_keys"] <= 4
        assert st["tracking_overflows"] > 0
        for k in keys:
            await c.set(k, b"new-" + k.encode())
            assert await c.get(k) == b"new-" + k.encode()
        info = await c.execute(Op.HOTKEYS, 3)
        assert len(info) == 3 and all(k in {x.encode() for x in keys} for k, _ in info)


async def warm_copy(cb: Client, b: str, key: str, value: bytes) -> None:
    """Read ``key`` through master B until B answers it from its near cache (bounded)."""
    deadline = time.monotonic() + 10.0
    while True:
        before = (await stats(b))["near_cache_hits"]
        for _ in range(100):
            assert await cb.get(key) == value
        if (await stats(b))["near_cache_hits"] >= before + 50:
            return
        assert time.monotonic() < deadline, "B never answered the key from its near cache"


async def test_a_flush_on_an_aux_node_answers_after_the_near_caches_dropped_their_copies(cluster: NearCluster) -> None:
    """FLUSHDB on an aux node's RESP port is a change like any other: answered only once every copy is gone.

    The masters reach the aux node through a proxy that delays each way, so
    an invalidation reaches master B well after an answer that did not wait
    for it: before the fix, FLUSHDB answered at once and B answered the old
    value from its copy afterwards.
    """
    with FaultProxy(name="a1") as proxy:
        a = cluster.start_master("m1", *NEAR)
        b = cluster.start_master("m2", *NEAR, follow=a)
        aux = cluster.start_aux("a1", "--advertise", proxy.addr, "--resp-port", "0", "--resp-allow-flush", "true")
        proxy.set_upstream(aux.addr)
        await cluster.settle({"a1"})
        async with Client(a.addr, timeout=10.0) as ca, Client(b.addr, timeout=10.0) as cb:
            await ca.set("hot", b"v1")
            await warm_copy(cb, b.addr, "hot", b"v1")
            proxy.delay(0.15)  # a round trip of 0.3 s: leases still renew (1 s), pushes arrive late
            r = redis.Redis(host=aux.host, port=aux.resp_port)
            try:
                t0 = time.monotonic()
                assert await r.flushdb()
                took = time.monotonic() - t0
            finally:
                await r.aclose()
            assert await cb.get("hot") is None, f"B answered its copy after FLUSHDB was answered (in {took:.2f} s)"
            assert took >= 0.25, f"FLUSHDB answered in {took:.2f} s, before B could have acknowledged its invalidation"


async def test_a_resp_mget_of_keys_the_near_cache_holds_is_answered(tmp_path: Path) -> None:
    """A RESP MGET whose every key the master answers from its copies gets its reply.

    The master answers such an MGET before its handler returns; the RESP
    connection dropped that answer and the client waited for good (redis-py,
    Django's ``get_many`` of hot keys).
    """
    c = Cluster(tmp_path, replicas=1)
    try:
        m = c.start_master("m1", *NEAR, "--resp-port", "0")
        c.start_aux("a1")
        await wait_ring(m.addr, settled({"a1"}), timeout=30.0, what="a1 up")
        r = redis.Redis(host=m.host, port=m.resp_port)
        try:
            await r.mset({"k1": b"v1", "k2": b"v2"})
            deadline = time.monotonic() + 10.0
            while (await stats(m.addr))["near_cache_keys"] < 2:
                assert time.monotonic() < deadline, "the master never copied both keys"
                for k in ("k1", "k2"):
                    await r.get(k)
            before = (await stats(m.addr))["near_cache_hits"]
            assert await asyncio.wait_for(r.mget("k1", "k2"), 5.0) == [b"v1", b"v2"]
            assert (await stats(m.addr))["near_cache_hits"] >= before + 2  # answered from the copies
            pipe = r.pipeline(transaction=True)
            pipe.mget("k1", "k2")
            pipe.get("k1")
            assert await asyncio.wait_for(pipe.execute(), 5.0) == [[b"v1", b"v2"], b"v1"]
        finally:
            await r.aclose()
    finally:
        c.stop()
        print(c.logs()[-20000:])


def owners(tmp_path: Path, replicas: int) -> Iterator[NearCluster]:
    c = NearCluster(tmp_path, replicas=replicas)
    try:
        yield c
    finally:
        c.stop()
        print(c.logs()[-20000:])


@pytest.fixture
def one_owner(tmp_path: Path) -> Iterator[NearCluster]:
    """The near-cache cluster with one owner per key."""
    yield from owners(tmp_path, 1)


@pytest.fixture(params=[1, 2], ids=["one-owner", "two-owners"])
def any_owners(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NearCluster]:
    """The near-cache cluster with one, then two owners per key (KEEP_COPY to the first, a plain SETV to the other)."""
    yield from owners(tmp_path, request.param)


async def kept_run(a: str, b: str, seed: int, during: Callable[[LoadChecker], Awaitable[None]] | None = None) -> None:
    """``KEPT_OPS`` operations with writers and readers on both masters: 0 problems, and both kept copies through their own writes."""
    chk = LoadChecker([a, b], [a, b], writers=2, keys_per_writer=3, readers=4, delete_ratio=0.1, mget_ratio=0.2, pause_s=0.0, seed=seed)
    await checked_run(chk, [a, b], during, KEPT_OPS)
    for m in (a, b):
        st = await stats(m)
        print(m, {k: v for k, v in st.items() if k.startswith("near")})
        assert st["near_cache_write_throughs"] > 0, "no SET of a copied key updated its copy"
        assert st["near_cache_updates"] > 0, "no write through the other master updated a copy here (value pushes)"
        assert st["near_cache_hits"] >= 1000, st


async def test_own_writes_update_copies_and_no_read_is_stale(any_owners: NearCluster) -> None:
    """Each master writes some keys and reads all: its own SETs update its copies, the other's invalidate them; 0 stale reads."""
    a, b = any_owners.up()
    await any_owners.settle()
    await kept_run(a, b, seed=34)


async def test_own_writes_update_copies_while_an_owner_is_killed_and_restarted(cluster: NearCluster) -> None:
    """With two owners per key (``cluster``), one killed and restarted: writes keep going, copies stay coherent."""
    a, b = cluster.up()
    await cluster.settle()
    await kept_run(a, b, seed=35, during=kill_and_restart(cluster, "a2", KEPT_OPS))


@contextlib.asynccontextmanager
async def copied_on_both(cluster: NearCluster) -> AsyncIterator[tuple[str, str, Client, Client]]:
    """One aux node (a1) and both masters up; key "hot" holds v0 and each master answers it from its copy; a client per master."""
    a, b = cluster.up({"a1"})
    await cluster.settle({"a1"})
    async with Client(a, timeout=10.0) as ca, Client(b, timeout=10.0) as cb:
        await ca.set("hot", b"v0")
        await warm_copy(ca, a, "hot", b"v0")
        await warm_copy(cb, b, "hot", b"v0")
        yield a, b, ca, cb


async def test_a_set_through_the_master_holding_the_copy_is_read_from_the_new_copy(one_owner: NearCluster) -> None:
    """A master's SET of a key it holds a copy of: the next read answers the new value from its near cache, not the owner."""
    async with copied_on_both(one_owner) as (a, _, ca, cb):
        for i in range(1, 51):
            value = b"v%d" % i
            await ca.set("hot", value)
            before = await stats(a)
            assert await ca.get("hot") == value
            assert await cb.get("hot") == value  # B's copy was updated or dropped before A's SET was acknowledged
            after = await stats(a)
            assert after["near_cache_hits"] == before["near_cache_hits"] + 1, "A did not answer its own write from its copy"
        assert after["near_cache_write_throughs"] >= 50
        await ca.delete("hot")
        assert await ca.get("hot") is None
        assert await cb.get("hot") is None


async def test_a_hot_key_written_through_both_masters_keeps_a_copy_in_each(one_owner: NearCluster) -> None:
    """Value pushes: a write through one master updates the other's copy, so each read right after it is a near-cache hit on both."""
    async with copied_on_both(one_owner) as (a, b, ca, cb):
        for i in range(1, 41):
            writer, (reader, r) = (ca, (cb, b)) if i % 2 else (cb, (ca, a))
            value = b"v%d" % i
            await writer.set("hot", value)
            before = await stats(r)
            assert await reader.get("hot") == value  # the write was pushed before it was acknowledged
            after = await stats(r)
            assert after["near_cache_hits"] == before["near_cache_hits"] + 1, f"{r} read {i} from the owner, not its copy"
            assert await writer.get("hot") == value
        for m in (a, b):
            st = await stats(m)
            assert st["near_cache_updates"] >= 20 and st["near_cache_write_throughs"] >= 20, st
        aux = await stats(one_owner.aux["a1"].addr)
        assert aux["tracking_value_pushes"] >= 40, aux
        await cb.delete("hot")  # a delete still ends every copy
        assert await ca.get("hot") is None and await cb.get("hot") is None
