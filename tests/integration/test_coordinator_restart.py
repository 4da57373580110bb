"""A coordinator that restarts gets the ring back whole: from a follower, or from the aux nodes' re-announcements."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
import redis.asyncio

from dcache import Client
from dcache.cli import _format_ring
from dcache.ring import HashRing
from tests.cluster import (
    Cluster,
    Reader,
    Tally,
    assert_served_while_ringless,
    copying_to,
    key_of,
    native_load,
    outlive,
    populate,
    resp_load,
    settled,
    stop_loads,
    up_nodes,
    value_of,
    wait_ring,
)
from tests.harness import DaemonProcess

pytestmark = pytest.mark.slow

N_KEYS = 5000
AUX = {"a1", "a2", "a3"}


@pytest.fixture
def cluster(tmp_path):
    cl = Cluster(tmp_path, replicas=2)
    yield cl
    cl.stop()
    print(cl.logs()[-20000:])  # shown by pytest only when the test fails


def _items(info: dict[str, Any]) -> dict[str, int]:
    return {n["node_id"]: n["items"] for n in info["nodes"]}


def _counted(info: dict[str, Any]) -> bool:
    """Every node answered the master's STATS (a link just opened may not have yet)."""
    return all(n["items"] is not None for n in info["nodes"])


async def test_a_follower_hands_the_ring_to_a_restarted_coordinator(cluster: Cluster):
    m1 = cluster.start_master("m1")
    m2 = cluster.start_master("m2", follow=m1)
    for n in sorted(AUX):
        cluster.start_aux(n)
    await wait_ring(m1.addr, settled(AUX))
    await wait_ring(m2.addr, settled(AUX), timeout=5)
    async with Client(m2.addr) as c:
        await populate(c, N_KEYS)
    before = await wait_ring(m2.addr, _counted, timeout=10, what="key counts from every node")
    reader = Reader(m2.addr, N_KEYS)
    reader.start()
    await reader.full_passes(1)

    port = m1.port
    m1.kill()
    m1 = cluster.start_master("m1", port=port)  # same address, no memory of the ring
    info = await wait_ring(
        m1.addr, lambda i: up_nodes(i) == AUX and i["epoch"] > before["epoch"], timeout=15, what="the coordinator has the ring back"
    )
    assert info["membership"]["recovery"]["from"] == "follower m2"
    assert info["membership"]["recovery"]["adopted_epoch"] == before["epoch"]
    assert not info["migrating"]
    await wait_ring(m2.addr, lambda i: i["epoch"] == info["epoch"], timeout=5, what="the follower at the coordinator's epoch")
    await reader.full_passes(2)
    await reader.stop()
    assert (reader.misses, reader.wrong, reader.errors) == (0, 0, [])
    counted = await wait_ring(m1.addr, _counted, timeout=10, what="key counts from every node")
    assert _items(counted) == _items(before)  # nothing moved

    async with Client(m1.addr) as c:  # the restarted coordinator serves every key ...
        assert await c.mget([key_of(i) for i in range(N_KEYS)]) == [value_of(i) for i in range(N_KEYS)]
    cluster.start_aux("a4")  # ... and still decides membership
    await wait_ring(m1.addr, settled(AUX | {"a4"}), timeout=30, what="a4 joined after the restart")
    async with Client(m2.addr) as c:
        assert await c.mget([key_of(i) for i in range(N_KEYS)]) == [value_of(i) for i in range(N_KEYS)]


async def _populated(cluster: Cluster, nodes: set[str], n_keys: int) -> DaemonProcess:
    """Master m1 and the aux nodes ``nodes`` of ``cluster`` started, the ring settled, keys 0 to ``n_keys - 1`` written; m1."""
    m1 = cluster.start_master("m1")
    for n in sorted(nodes):
        cluster.start_aux(n)
    await wait_ring(m1.addr, settled(nodes))
    async with Client(m1.addr) as c:
        await populate(c, n_keys)
    return m1


async def test_a_lone_restarted_coordinator_rebuilds_the_ring_in_one_change(tmp_path):
    cluster = Cluster(tmp_path, replicas=1)
    try:
        m1 = await _populated(cluster, AUX, N_KEYS)
        before = await wait_ring(m1.addr, _counted, timeout=10, what="key counts from every node")

        port = m1.port
        m1.kill()
        m1 = cluster.start_master("m1", "--recovery-window", "4", port=port)
        # No follower: the aux nodes re-announce (every 3 s) with the epoch the
        # old coordinator admitted them at, and the ring comes back in one change.
        info = await wait_ring(m1.addr, lambda i: settled(AUX)(i) and _counted(i), timeout=20, what="the ring rebuilt")
        assert info["membership"]["recovery"]["from"] == "re-announcements"
        assert set(info["membership"]["recovery"]["members"]) == AUX
        assert info["epoch"] == info["membership"]["recovery"]["epoch"]  # one change, nothing after it
        assert _items(info) == _items(before)  # nothing moved
        async with Client(m1.addr) as c:
            assert await c.mget([key_of(i) for i in range(N_KEYS)]) == [value_of(i) for i in range(N_KEYS)]
        assert "restarted" in m1.stderr() or "re-announcements" in m1.stderr()
    finally:
        cluster.stop()


async def test_a_restarted_coordinator_keeps_the_clusters_replicas_and_says_so(cluster: Cluster):
    """A new ``--replicas`` on a restarted coordinator would add owners that were never filled (their stale copies of
    deleted keys read again): the cluster keeps its count, and the coordinator logs why its flag is ignored."""
    m1 = cluster.start_master("m1")
    m2 = cluster.start_master("m2", follow=m1)
    for n in sorted(AUX):
        cluster.start_aux(n)
    before = await wait_ring(m1.addr, settled(AUX))
    await wait_ring(m2.addr, lambda i: i["epoch"] == before["epoch"], timeout=5, what="the follower at the coordinator's epoch")

    port = m1.port
    await asyncio.to_thread(m1.terminate)
    m1 = cluster.start_master("m1", "--replicas", "3", port=port)
    info = await wait_ring(m1.addr, lambda i: i["membership"].get("recovery") is not None, timeout=15, what="the ring back")
    assert info["membership"]["recovery"]["from"] == "follower m2"
    assert up_nodes(info) == AUX
    assert info["replicas"] == 2
    await wait_ring(m2.addr, lambda i: i["epoch"] == info["epoch"] and i["replicas"] == 2, timeout=5, what="the follower at 2 copies")
    deadline = time.monotonic() + 5
    while "--replicas 3 ignored: the cluster keeps 2 copies per key" not in m1.stderr():
        assert time.monotonic() < deadline, m1.stderr()
        await asyncio.sleep(0.05)


async def _reached_before_the_ring(addr: str, tally: Tally, timeout: float = 10.0) -> None:
    """Wait (bounded) until the master at ``addr`` held a request for its ring, or a call failed (before the ring wait)."""
    deadline = time.monotonic() + timeout
    async with Client(addr) as c:
        while (await c.stats()).get("ring_waits", 0) == 0 and not tally.failures:
            assert time.monotonic() < deadline, "no client reached the restarted coordinator before its ring"
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_a_restarted_coordinator_fails_no_call_while_its_ring_comes(tmp_path, how: str):
    """Clients that reach the coordinator after its restart, before a follower hands it the ring, wait for the ring
    (``RequestGate``) instead of getting ``UNAVAILABLE``: no failed call, no lost write, over both front doors."""
    cluster = Cluster(tmp_path, replicas=2)
    stop = asyncio.Event()
    tally = Tally()
    loads: list[asyncio.Task[None]] = []
    try:
        m1 = cluster.start_master("m1", "--resp-port", "0")
        m2 = cluster.start_master("m2", follow=m1)
        for n in sorted(AUX):
            cluster.start_aux(n)
        before = await wait_ring(m1.addr, settled(AUX))
        await wait_ring(m2.addr, lambda i: i["epoch"] == before["epoch"], timeout=5, what="the follower at the coordinator's epoch")
        # A client listing both masters runs throughout: it moves to m2 while m1 is away.
        loads.append(asyncio.create_task(native_load("both", [m1.addr, m2.addr], stop, tally)))
        await tally.reach(50)

        port, resp_port = m1.port, m1.resp_port
        if how == "SIGKILL":
            m1.kill()
        else:
            await asyncio.to_thread(m1.terminate)
        # The follower's next poll hands the restarted coordinator the ring, within --follow-interval: the
        # clients below reach it before that in most restarts, not all. The follower is stopped until they
        # did, so that every run covers that window (the client on both masters waits for it meanwhile).
        m2.signal(signal.SIGSTOP)
        try:
            m1 = await asyncio.to_thread(cluster.start_master, "m1", "--resp-port", str(resp_port), port=port)
            # Clients whose first calls reach the restarted coordinator, before it has the ring:
            # one listing it first, one listing only it, and one over RESP.
            loads.append(asyncio.create_task(native_load("fresh", [m1.addr, m2.addr], stop, tally)))
            loads.append(asyncio.create_task(native_load("only", m1.addr, stop, tally)))
            loads.append(asyncio.create_task(resp_load("resp", m1.host, resp_port, stop, tally)))
            await _reached_before_the_ring(m1.addr, tally)
        finally:
            m2.signal(signal.SIGCONT)
        info = await wait_ring(m1.addr, lambda i: i["membership"].get("recovery") is not None, timeout=15, what="the ring back")
        assert info["membership"]["recovery"]["from"] == "follower m2"
        await tally.reach(tally.ok + 300)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loads), 15)

        await assert_served_while_ringless(tally, [m1.addr, m2.addr], m1.addr, AUX)
    finally:
        await stop_loads(stop, loads)
        cluster.stop()
        print(cluster.logs()[-20000:])  # shown by pytest only when the test fails


async def test_a_lone_restarted_coordinator_fails_no_call_while_it_gathers_re_announcements(tmp_path):
    """No follower, no ``--expect-aux``: the ring comes back from the aux nodes' re-announcements, after the recovery
    window (4 s). Clients whose calls reach the coordinator as soon as it listens, over both front doors, wait for
    that ring (the window plus a margin) instead of getting ``UNAVAILABLE`` after ``RING_WAIT_S`` (3 s), and the aux
    nodes, which lost their connection to it, re-announce within ``_RETRY_S`` of its start, not up to 3 s later: no
    call fails, with the client's default 5 s timeout."""
    cluster = Cluster(tmp_path, replicas=2)
    stop = asyncio.Event()
    tally = Tally()
    loads: list[asyncio.Task[None]] = []
    try:
        m1 = cluster.start_master("m1", "--resp-port", "0")
        for n in sorted(AUX):
            cluster.start_aux(n)
        await wait_ring(m1.addr, settled(AUX))
        port, resp_port = m1.port, m1.resp_port
        m1.kill()
        m1 = await asyncio.to_thread(cluster.start_master, "m1", "--resp-port", str(resp_port), port=port)
        for i in range(3):
            loads.append(asyncio.create_task(native_load(f"native{i}", m1.addr, stop, tally)))
        loads.append(asyncio.create_task(resp_load("resp", m1.host, resp_port, stop, tally)))
        await _reached_before_the_ring(m1.addr, tally)
        info = await wait_ring(m1.addr, lambda i: i["membership"].get("recovery") is not None, timeout=20, what="the ring back")
        assert info["membership"]["recovery"]["from"] == "re-announcements"
        assert set(info["membership"]["recovery"]["members"]) == AUX
        await tally.reach(tally.ok + 300)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loads), 15)

        await assert_served_while_ringless(tally, [m1.addr], m1.addr, AUX)
    finally:
        await stop_loads(stop, loads)
        cluster.stop()
        print(cluster.logs()[-20000:])  # shown by pytest only when the test fails


async def test_a_coordinator_restarted_after_a_migration_reads_what_it_wrote_once_done(tmp_path):
    """The follower hands over the migration's settling view (it had not polled the end yet): the writes made once
    the migration was done went to the new owners only, and read back at once, before the ring settles again."""
    cluster = Cluster(tmp_path, replicas=1)
    try:
        m1 = cluster.start_master("m1")
        m2 = cluster.start_master("m2", "--follow-interval", "2.0", follow=m1)  # polls slower than the test watches it
        for n in ("a1", "a2"):
            cluster.start_aux(n)
        await wait_ring(m2.addr, settled({"a1", "a2"}), timeout=30, what="a1 and a2 settled on the follower")
        cluster.start_aux("a3")
        # The copy to a3 is done and m2 routes by the settling view: stopped there, it never sees the end.
        await wait_ring(m2.addr, lambda i: "a3" in i["ring"]["nodes"] and i["migrating"] and i["seq"] >= 1, what="m2 settling")
        m2.signal(signal.SIGSTOP)
        try:
            done = await wait_ring(m1.addr, settled(AUX), timeout=15, what="the migration done on the coordinator")
            async with Client(m1.addr) as c:  # written to the new owners only
                await populate(c, N_KEYS)
            port = m1.port
            m1.kill()
            m1 = cluster.start_master("m1", port=port)
        finally:
            m2.signal(signal.SIGCONT)
        info = await wait_ring(m1.addr, lambda i: i["membership"].get("recovery") is not None, timeout=15, what="the ring back")
        assert info["membership"]["recovery"] == {"from": "follower m2", "epoch": info["epoch"], "adopted_epoch": done["epoch"]}
        async with Client(m1.addr) as c:
            got = await c.mget([key_of(i) for i in range(N_KEYS)])
        missed = [key_of(i) for i, v in enumerate(got) if v != value_of(i)]
        assert missed == [], (len(missed), missed[:10])
        assert f"resuming the migration to epoch {info['epoch']} (settling)" in m1.stderr()
    finally:
        cluster.stop()
        print(cluster.logs()[-20000:])  # shown by pytest only when the test fails


async def _read_all(c: Client, n: int) -> list[bytes | None]:
    """The values of keys 0 to ``n - 1``, 5,000 a call."""
    got: list[bytes | None] = []
    for at in range(0, n, 5000):
        got += await c.mget([key_of(i) for i in range(at, min(n, at + 5000))])
    return got


def _reconciled(info: dict[str, Any]) -> bool:
    """A ring rebuilt from re-announcements, and what the nodes held outside their ranges copied to the owners."""
    return (info["membership"].get("recovery") or {}).get("reconciled") is True


async def test_a_lone_coordinator_killed_mid_migration_gets_every_key_back(tmp_path):
    """No follower hands the migration record over: the ring rebuilt from the re-announcements holds the joined node,
    which had only part of its ranges. What the nodes hold outside their own ranges is copied to the owners (every key
    reads back), then dropped there: when the joined node leaves, a key that vanished meanwhile does not come back."""
    n_keys = 20_000
    cluster = Cluster(tmp_path, replicas=1)
    try:
        # 100 keys a page at 500 a second: the copy to a3 takes several seconds.
        m1 = cluster.start_master("m1", "--migration-rate", "500", "--migration-batch", "100")
        for n in ("a1", "a2"):
            cluster.start_aux(n)
        await wait_ring(m1.addr, settled({"a1", "a2"}))
        async with Client(m1.addr) as c:
            await populate(c, n_keys)
        cluster.start_aux("a3")
        await wait_ring(m1.addr, copying_to("a3"), timeout=30, what="the copy to a3 running")
        port = m1.port
        m1.kill()
        m1 = cluster.start_master("m1", port=port)
        info = await wait_ring(m1.addr, lambda i: i["membership"].get("recovery") is not None, timeout=20, what="the ring back")
        assert info["membership"]["recovery"]["from"] == "re-announcements"
        assert set(info["ring"]["nodes"]) == AUX  # the ring with a3, and no migration record
        async with Client(m1.addr) as c:
            # Keys a3 had not got yet miss until the nodes' copies outside their ranges reach it (bounded).
            deadline = time.monotonic() + 30
            while True:
                got = await _read_all(c, n_keys)
                missed = [key_of(i) for i, v in enumerate(got) if v != value_of(i)]
                if not missed or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert missed == [], (len(missed), missed[:10])
            info = await wait_ring(m1.addr, _reconciled, timeout=10, what="the rebuilt ring reconciled")
            assert "copies outside their ranges moved to their owners" in _format_ring(info)  # what `dcache ring` shows
            # Each key on its owner only: the copies outside it are dropped.
            await wait_ring(m1.addr, lambda i: _counted(i) and sum(_items(i).values()) == n_keys, timeout=10, what="no copy left")
            # A key that a1 or a2 held before a3 joined vanishes from a3 (expired: no copy, no tombstone) ...
            owners = HashRing(dict.fromkeys(sorted(AUX), 1.0))
            gone = next(key_of(i) for i in range(n_keys) if owners.owner(key_of(i).encode()) == "a3")
            await outlive(c, gone)
        # ... and when a3 leaves, its ranges go back to a1 and a2: the key stays gone, the others read back.
        await asyncio.to_thread(cluster.aux["a3"].terminate)
        await wait_ring(m1.addr, settled({"a1", "a2"}), timeout=60, what="a3 left")
        async with Client(m1.addr) as c:
            got = await _read_all(c, n_keys)
        wrong = [key_of(i) for i, v in enumerate(got) if v != (None if key_of(i) == gone else value_of(i))]
        assert wrong == [], (len(wrong), wrong[:10])
    finally:
        cluster.stop()
        print(cluster.logs()[-20000:])  # shown by pytest only when the test fails


async def _kill_while_a1_missed_writes(cluster: Cluster, n_keys: int, *master_args: str) -> tuple[DaemonProcess, list[bytes | None]]:
    """Two copies of every key on a1 and a2, no follower. a1 stops answering and is marked down; the keys are
    overwritten and every tenth deleted on a2 only (the coordinator's hints for a1 die with it). The coordinator is
    killed, a1 answers again, and the coordinator restarts (``master_args``) with its port; it and what each key
    must read are returned."""
    m1 = await _populated(cluster, {"a1", "a2"}, n_keys)
    cluster.aux["a1"].signal(signal.SIGSTOP)
    try:
        await wait_ring(m1.addr, lambda i: up_nodes(i) == {"a2"}, timeout=15, what="a1 marked down")
        async with Client(m1.addr) as c:
            assert await c.mset({key_of(i): b"new-%d" % i for i in range(n_keys)}) == n_keys
            for i in range(0, n_keys, 10):
                assert await c.delete(key_of(i)) is True
        port = m1.port
        m1.kill()
    finally:
        cluster.aux["a1"].signal(signal.SIGCONT)
    m1 = cluster.start_master("m1", *master_args, port=port)
    return m1, [None if i % 10 == 0 else b"new-%d" % i for i in range(n_keys)]


async def test_a_node_down_when_the_lone_coordinator_died_gets_the_writes_it_missed(tmp_path):
    """Two copies of every key, no follower. a1 stops answering and is marked down; the keys are overwritten and
    some deleted on a2 only (the coordinator's hints for a1 die with it). The coordinator is killed, a1 answers
    again, and the ring rebuilt from the re-announcements has a1 up with its old values: the reconciliation pass
    brings a2's newer writes and deletes to it, so no read through any owner returns an old value afterwards."""
    n_keys = 2000
    nodes = {"a1", "a2"}
    cluster = Cluster(tmp_path, replicas=2)
    try:
        m1, want = await _kill_while_a1_missed_writes(cluster, n_keys)
        info = await wait_ring(m1.addr, lambda i: i["membership"].get("recovery") is not None, timeout=20, what="the ring back")
        assert info["membership"]["recovery"]["from"] == "re-announcements"
        assert set(info["ring"]["nodes"]) == nodes  # a1 back as an owner, with its old values
        info = await wait_ring(m1.addr, _reconciled, timeout=30, what="the rebuilt ring reconciled")
        assert "each owner's copies sent to the other owners" in _format_ring(info)
        async with Client(m1.addr) as c:
            got = await _read_all(c, n_keys)
        stale = [key_of(i) for i, v in enumerate(got) if v != want[i]]
        assert stale == [], (len(stale), stale[:10])
        for n in sorted(nodes):  # each owner itself, not only the one a read goes to first
            async with Client(cluster.aux[n].addr) as direct:
                got = await _read_all(direct, n_keys)
            stale = [key_of(i) for i, v in enumerate(got) if v != want[i]]
            assert stale == [], (n, len(stale), stale[:10])
    finally:
        cluster.stop()
        print(cluster.logs()[-20000:])  # shown by pytest only when the test fails


async def test_reads_during_the_rebuilt_rings_reconciliation_answer_the_newest_version(tmp_path):
    """As above, with the reconciliation pass paced to last several seconds: reads made while it runs (MGET, GET,
    EXISTS, and GET over RESP) ask every owner and answer the newest version, so a1, which missed the overwrites and deletes, never
    answers its older value, before or after the pass reaches the key."""
    n_keys = 2000
    cluster = Cluster(tmp_path, replicas=2)
    try:
        # 50 keys a page at 200 a second per stream: each node's scan of its 2,000 keys takes about 10 s.
        m1, want = await _kill_while_a1_missed_writes(
            cluster, n_keys, "--migration-rate", "200", "--migration-batch", "50", "--resp-port", "0"
        )
        info = await wait_ring(m1.addr, lambda i: "reconciled" in (i["membership"].get("recovery") or {}), timeout=20, what="the pass")
        assert info["membership"]["recovery"]["from"] == "re-announcements"
        assert "reads ask every owner of a key meanwhile" in _format_ring(info)  # what `dcache ring` shows
        rounds = stale = 0
        deadline = time.monotonic() + 60
        resp = redis.asyncio.Redis(host=m1.host, port=m1.resp_port, socket_timeout=5)
        try:
            async with Client(m1.addr) as c:
                while not _reconciled(info):
                    assert time.monotonic() < deadline, "the rebuilt ring was not reconciled within 60 s"
                    got = await _read_all(c, n_keys)
                    sample = range(rounds % 10, n_keys, 97)  # single reads too: GET and EXISTS, and GET over RESP
                    singles: list[Any] = [await c.get(key_of(i)) for i in sample]
                    exist = [await c.exists(key_of(i)) for i in sample]
                    singles += [await resp.get(key_of(i)) for i in sample]
                    info = await wait_ring(m1.addr, lambda i: True, timeout=5)
                    if _reconciled(info):
                        break  # this round may have ended after the pass: not counted
                    stale += sum(v != want[i] for i, v in enumerate(got))
                    stale += sum(v != want[i] for i, v in zip([*sample, *sample], singles, strict=True))
                    stale += sum(e != (want[i] is not None) for i, e in zip(sample, exist, strict=True))
                    rounds += 1
        finally:
            await resp.aclose()
        print(f"{rounds} read rounds during the pass, {stale} stale answers")
        assert rounds >= 1, "no read round ended while the pass ran"
        assert stale == 0, (stale, rounds)
        assert "reads ask every owner of a key until the rebuilt ring is reconciled" in m1.stderr()
        async with Client(m1.addr) as c:  # and after it, as before
            got = await _read_all(c, n_keys)
        assert [key_of(i) for i, v in enumerate(got) if v != want[i]] == []
    finally:
        cluster.stop()
        print(cluster.logs()[-20000:])  # shown by pytest only when the test fails


async def test_increments_and_a_followers_reads_during_the_rebuilt_rings_reconciliation_see_the_newest_version(tmp_path):
    """Counters at 5 on a1 and a2; a1 stops answering and is marked down, they go to 10 on a2 only, the lone coordinator
    is killed and restarts with the pass paced to last several seconds. While it runs, a follower started meanwhile
    reads half the counters (it learns from the view that reads ask every owner: 10, never a1's 5), and every counter is
    incremented once through the coordinator (native or RESP) or the follower: INCR on a1's 5 would give 6 and overwrite 10 everywhere,
    so each op one owner decides first brings the key's owners up to its newest version. Every counter ends at 11."""
    n_keys = 2000
    counters = [b"ctr:%d" % i for i in range(n_keys)]
    cluster = Cluster(tmp_path, replicas=2)
    try:
        m1 = cluster.start_master("m1")
        for n in ("a1", "a2"):
            cluster.start_aux(n)
        await wait_ring(m1.addr, settled({"a1", "a2"}))
        async with Client(m1.addr) as c:
            assert await c.mset(dict.fromkeys(counters, b"5")) == n_keys
        cluster.aux["a1"].signal(signal.SIGSTOP)
        try:
            await wait_ring(m1.addr, lambda i: up_nodes(i) == {"a2"}, timeout=15, what="a1 marked down")
            async with Client(m1.addr) as c:
                assert await c.mset(dict.fromkeys(counters, b"10")) == n_keys
            port = m1.port
            m1.kill()
        finally:
            cluster.aux["a1"].signal(signal.SIGCONT)
        # 50 keys a page at 200 a second per stream: each node's scan of its 2,000 keys takes about 10 s.
        m1 = cluster.start_master("m1", "--migration-rate", "200", "--migration-batch", "50", "--resp-port", "0", port=port)
        await wait_ring(m1.addr, lambda i: "reconciled" in (i["membership"].get("recovery") or {}), timeout=20, what="the pass")
        m2 = cluster.start_master("m2", follow=m1)
        info2 = await wait_ring(m2.addr, lambda i: set(i["ring"]["nodes"]) == {"a1", "a2"}, timeout=10, what="the follower's ring")
        resp = redis.asyncio.Redis(host=m1.host, port=m1.resp_port, socket_timeout=5)
        async with Client(m1.addr) as c1, Client(m2.addr) as c2:
            got = await c2.mget(counters[: n_keys // 2])  # the other half is first touched by its INCR (no read repaired it)
            during = not _reconciled(await wait_ring(m1.addr, lambda i: True, timeout=5))
            stale = sum(v != b"10" for v in got)
            results: list[int] = []
            for at in range(0, n_keys, 100):
                batch = counters[at : at + 100]
                # Through the coordinator, the follower, and the coordinator's RESP port.
                incrs = [(c1.incr, c2.incr, resp.incr)[i % 3](k) for i, k in enumerate(batch)]
                results += await asyncio.gather(*incrs)
            during_incr = not _reconciled(await wait_ring(m1.addr, lambda i: True, timeout=5))
        await resp.aclose()
        wrong_answers = sum(r != 11 for r in results)
        await wait_ring(m1.addr, _reconciled, timeout=60, what="the rebuilt ring reconciled")
        await wait_ring(m2.addr, lambda i: i["reads_every_owner"] is False, timeout=10, what="the follower reading one owner")
        async with Client(m1.addr) as c:
            final = await c.mget(counters)
        lost = sum(v != b"11" for v in final)
        print(
            f"follower reads during the pass: {stale} stale of {len(got)} (during: {during}); increments during the pass: "
            f"{wrong_answers} answered wrong, {lost} lost of {n_keys} (during: {during_incr})"
        )
        assert during and during_incr, "the pass ended before the reads and increments: nothing was measured"
        assert info2["reads_every_owner"] is True
        assert "reads ask every owner of a key until the coordinator's rebuilt ring is reconciled" in _format_ring(info2)
        assert (stale, wrong_answers, lost) == (0, 0, 0)
        for n in ("a1", "a2"):  # each owner itself
            async with Client(cluster.aux[n].addr) as direct:
                assert await direct.mget(counters) == [b"11"] * n_keys, n
    finally:
        cluster.stop()
        print(cluster.logs()[-20000:])  # shown by pytest only when the test fails
