"""ZooKeeper membership with a real ZooKeeper server, real dcache processes and real signals.

Every test watches the ring znode from the outside and checks at the end that
the views it saw only moved forward (no split brain over the ring).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import pytest
from kazoo.client import KazooClient

from dcache import Client
from dcache.errors import StaleRingError, UnavailableError
from dcache.protocol import Op
from dcache.ring import HashRing
from dcache.zookeeper import ZkSession, dumps
from tests.cluster import (
    Cluster,
    Reader,
    Tally,
    assert_served_while_ringless,
    key_owned_by,
    native_load,
    outlive,
    populate,
    ring,
    settled,
    stop_loads,
    up_nodes,
    wait_ring,
)
from tests.faults.proxy import FaultProxy
from tests.harness import DaemonProcess, reap, start_cluster_cmd, wait_for
from tests.zookeeper import ZooKeeperServer

pytestmark = pytest.mark.slow

N_KEYS = 20_000
#: Restarts of a down node in test_a_node_restarted_while_down_is_read_again_by_every_master.
CYCLES = 6


@pytest.fixture(scope="module")
def zookeeper(tmp_path_factory):
    server = ZooKeeperServer(tmp_path_factory.mktemp("zk")).start()
    yield server
    server.stop()


class RingMonitor:
    """Records every version of a cluster's ring znode it is told about."""

    def __init__(self, hosts: str, name: str) -> None:
        self.path = f"/dcache/{name}/ring"
        self.client = KazooClient(hosts=hosts, timeout=10.0)
        self.client.start(10)
        self.seen: list[tuple[int, int, str]] = []
        self._lock = threading.Lock()
        self.client.DataWatch(self.path, self._on)

    def _on(self, data: bytes | None, stat: Any) -> None:
        if data:
            v = msgpack.unpackb(data, raw=False, strict_map_key=False)
            with self._lock:
                self.seen.append((v["epoch"], v["seq"], v["coordinator"]))

    def assert_forward_only(self) -> None:
        with self._lock:
            order = [(e, s) for e, s, _ in self.seen]
        assert order, "no ring was ever written"
        assert all(a < b for a, b in itertools.pairwise(order)), order

    def write(self, view: dict[str, Any]) -> None:
        """Overwrite the ring as another master would (no compare-and-set)."""
        self.client.set(self.path, msgpack.packb(view, use_bin_type=True))

    def read(self) -> dict[str, Any]:
        data, _ = self.client.get(self.path)
        out: dict[str, Any] = msgpack.unpackb(data, raw=False, strict_map_key=False)
        return out

    def close(self) -> None:
        self.client.stop()
        self.client.close()


@pytest.fixture
def make_cluster(zookeeper, tmp_path, request):
    made: list[tuple[Cluster, RingMonitor]] = []
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60]

    def make(replicas: int = 1, server: ZooKeeperServer | None = None) -> tuple[Cluster, RingMonitor]:
        zk = server or zookeeper
        cl = Cluster(tmp_path, replicas=replicas, zookeeper=zk.hosts, name=name)
        mon = RingMonitor(zk.hosts, name)
        made.append((cl, mon))
        return cl, mon

    yield make
    for cl, mon in made:
        cl.stop()
        mon.close()
        print(cl.logs()[-30000:])  # shown by pytest only when the test fails


async def _leader(cl: Cluster, timeout: float = 20.0) -> str:
    """The address of the master that leads (bounded wait)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for m in cl.masters:
            if not m.alive:
                continue
            try:
                info = await ring(m.addr)
            except Exception:
                continue
            if info["membership"]["role"] == "zk-leader":
                return m.addr
        await asyncio.sleep(0.05)
    raise AssertionError(f"no master leads after {timeout} s")


async def _settled_everywhere(cl: Cluster, nodes: set[str], timeout: float = 30.0) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for m in cl.masters:
        if m.alive:
            info = await wait_ring(m.addr, settled(nodes), timeout=timeout, what=f"{sorted(nodes)} settled on {m.addr}")
    return info


async def test_join_and_leave_through_zookeeper_zero_misses(make_cluster):
    cl, mon = make_cluster()
    cl.start_master("m1")
    m2 = cl.start_master("m2")
    for n in ("a1", "a2", "a3"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    leader = await _leader(cl)
    async with Client(m2.addr, timeout=10) as c:
        await populate(c, N_KEYS)
    reader = Reader(m2.addr, N_KEYS)  # through the master that follows (unless m2 leads)
    reader.start()
    await reader.full_passes(1)

    cl.start_aux("a4")
    await _settled_everywhere(cl, {"a1", "a2", "a3", "a4"}, timeout=60)
    info = await ring(leader)
    moved = info["membership"]["migration"]["keys_moved"]
    assert 0 < moved <= 1.2 * N_KEYS / 4, moved
    await reader.full_passes(1)

    leaving = cl.aux["a2"]
    leaving.signal(signal.SIGTERM)
    assert await asyncio.to_thread(leaving.wait, 60) == 0
    info = await _settled_everywhere(cl, {"a1", "a3", "a4"})
    assert "a2" not in {n["node_id"] for n in info["nodes"]}
    await reader.full_passes(1)
    await reader.stop()
    assert reader.errors == [] and reader.misses == 0 and reader.wrong == 0, (reader.errors[:5], reader.misses, reader.wrong)
    assert "leaving/a2" not in cl.logs() or "asks to leave (through ZooKeeper)" in cl.logs()
    mon.assert_forward_only()


async def test_a_node_that_left_through_zookeeper_rejoins_empty(make_cluster):
    """As in embedded mode (tests/integration/test_join_trust.py): the leader empties a node that left before it joins again.

    The ring in ZooKeeper names the nodes that left, so whichever master
    leads when the node comes back knows it.
    """
    cl, mon = make_cluster()
    m = cl.start_master("m1")
    for n in ("a1", "a2"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2"})
    k = key_owned_by("a2", ["a1", "a2"], "k")
    async with Client(m.addr, timeout=10) as c:
        assert await c.set(k, b"v1") is True
        a2 = cl.aux["a2"]
        a2.signal(signal.SIGTERM)
        assert await asyncio.to_thread(a2.wait, 60) == 0
        await _settled_everywhere(cl, {"a1"})
        assert mon.read()["departed"] == ["a2"]
        await outlive(c, k)  # no copy of k, and no tombstone, is left in the cluster
        cl.start_aux("a2")  # the same --data-dir
        await _settled_everywhere(cl, {"a1", "a2"})
        assert await c.get(k) is None
    assert mon.read()["departed"] == []
    mon.assert_forward_only()


async def test_leader_killed_mid_migration_another_takes_over(make_cluster):
    cl, mon = make_cluster(replicas=2)
    slow = ("--migration-rate", "2000")  # a migration lasts long enough to kill its leader during it
    cl.start_master("m1", *slow)
    cl.start_master("m2", *slow)
    for n in ("a1", "a2", "a3"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    leader_addr = await _leader(cl)
    leader = next(m for m in cl.masters if m.addr == leader_addr)
    other = next(m for m in cl.masters if m is not leader)
    async with Client(other.addr, timeout=10) as c:
        await populate(c, N_KEYS)
    reader = Reader(other.addr, N_KEYS)
    reader.start()
    await reader.full_passes(1)

    cl.start_aux("a4")
    await wait_ring(other.addr, lambda i: "a4" in up_nodes(i) and i["migrating"], timeout=20, what="migration to a4 running")
    leader.kill()  # SIGKILL: its ZooKeeper session ends after the session timeout
    new_leader = await _leader(cl, timeout=20)
    assert new_leader == other.addr
    await asyncio.to_thread(wait_for, lambda: "resuming the migration" in other.stderr(), 10, message="migration resumed")
    info = await wait_ring(other.addr, settled({"a1", "a2", "a3", "a4"}), timeout=60, what="migration resumed and done")
    a4 = next(n for n in info["nodes"] if n["node_id"] == "a4")
    assert a4["items"] > 0.3 * N_KEYS * 2 / 4, a4  # the new leader moved a4's share
    await reader.full_passes(1)

    cl.start_aux("a5")  # a later join still rebalances
    info = await wait_ring(other.addr, settled({"a1", "a2", "a3", "a4", "a5"}), timeout=60, what="a5 joined")
    a5 = next(n for n in info["nodes"] if n["node_id"] == "a5")
    assert a5["items"] > 0
    await reader.full_passes(1)
    await reader.stop()
    assert reader.errors == [] and reader.misses == 0 and reader.wrong == 0, (reader.errors[:5], reader.misses, reader.wrong)
    mon.assert_forward_only()
    coordinators = {c for _, _, c in mon.seen}
    assert {"m1", "m2"} <= coordinators or len(coordinators) == 2, coordinators


async def test_killed_aux_leaves_the_ring(make_cluster):
    cl, mon = make_cluster(replicas=2)
    m1 = cl.start_master("m1")
    for n in ("a1", "a2", "a3"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    async with Client(m1.addr, timeout=10) as c:
        await populate(c, 2000)
    cl.aux["a3"].kill()
    await wait_ring(m1.addr, lambda i: up_nodes(i) == {"a1", "a2"} and not i["migrating"], timeout=20, what="a3 out of the ring")
    async with Client(m1.addr, timeout=10) as c:
        values = await c.mget([f"key:{i}" for i in range(2000)])
    assert all(v is not None for v in values)
    mon.assert_forward_only()


async def test_rogue_ring_write_makes_the_leader_step_down_and_epochs_move_forward(make_cluster):
    cl, mon = make_cluster()
    cl.start_master("m1")
    cl.start_master("m2")
    cl.start_aux("a1")
    cl.start_aux("a2")
    await _settled_everywhere(cl, {"a1", "a2"})
    leader = await _leader(cl)
    before = await ring(leader)
    # Another writer (no compare-and-set) puts a newer view of the same ring.
    view = await asyncio.to_thread(mon.read)
    view["seq"] += 1000
    view["coordinator"] = "rogue"
    await asyncio.to_thread(mon.write, view)
    for m in cl.masters:
        await wait_ring(m.addr, lambda i: i["seq"] >= view["seq"] or i["epoch"] > view["epoch"], timeout=10, what="rogue view adopted")
    # The old leader stepped down; whoever leads now moves the epoch forward from there.
    old = next(m for m in cl.masters if m.addr == leader)
    await asyncio.to_thread(wait_for, lambda: "stepping down" in old.stderr(), 10, message="old leader steps down")
    cl.start_aux("a3")
    info = await _settled_everywhere(cl, {"a1", "a2", "a3"})
    assert info["epoch"] > before["epoch"]
    mon.assert_forward_only()


async def test_zookeeper_restart_cluster_recovers(make_cluster, tmp_path):
    server = ZooKeeperServer(tmp_path / "own-zk").start()
    try:
        cl, mon = make_cluster(server=server)
        m1 = cl.start_master("m1")
        m2 = cl.start_master("m2")
        cl.start_aux("a1")
        cl.start_aux("a2")
        await _settled_everywhere(cl, {"a1", "a2"})
        async with Client([m1.addr, m2.addr], timeout=10) as c:
            await populate(c, 2000)

        server.stop()  # SIGKILL ZooKeeper
        for m in (m1, m2):
            await wait_ring(m.addr, lambda i: not i["membership"]["zookeeper_connected"], timeout=20, what="ZooKeeper loss reported")
        # Masters keep serving with the last ring they saw.
        for addr in (m1.addr, m2.addr):
            async with Client(addr, timeout=10) as c:
                assert await c.set("during-outage", b"yes")
                values = await c.mget([f"key:{i}" for i in range(2000)])
                assert all(v is not None for v in values)
                assert await c.get("during-outage") == b"yes"

        server.start()  # same port, same data
        for m in (m1, m2):
            await wait_ring(m.addr, lambda i: i["membership"]["zookeeper_connected"], timeout=30, what="ZooKeeper back")
        cl.start_aux("a3")  # membership works again
        await _settled_everywhere(cl, {"a1", "a2", "a3"}, timeout=60)
        async with Client([m1.addr, m2.addr], timeout=10) as c:
            values = await c.mget([f"key:{i}" for i in range(2000)])
            assert all(v is not None for v in values)
            assert await c.get("during-outage") == b"yes"
        mon.assert_forward_only()
    finally:
        server.stop()


async def test_dcache_cluster_in_zookeeper_mode(zookeeper, tmp_path):
    proc, lines = start_cluster_cmd(
        "--zookeeper", zookeeper.hosts, "--cluster", "local-cmd",
        "--port", "0", "--http-port", "-1", "--masters", "2", "--aux", "3", "--replicas", "2",
        "--data-dir", str(tmp_path / "data"), "--log-level", "warning",
    )  # fmt: skip
    try:
        masters = [line.split()[2] for line in lines if line.startswith("master ")]
        assert len(masters) == 2 and all("ZooKeeper" in line for line in lines if line.startswith("master "))
        async with Client(masters) as c:
            assert await c.mset({f"z:{i}": b"%d" % i for i in range(500)}) == 500
        roles = set()
        for addr in masters:
            info = await wait_ring(addr, settled({"a1", "a2", "a3"}), timeout=20)
            roles.add(info["membership"]["role"])
            assert sum(n["items"] for n in info["nodes"]) == 1000  # two copies of each key
        assert roles == {"zk-leader", "zk-follower"}
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        reap(proc)


async def test_paused_leader_loses_its_session_and_rejoins_as_follower(make_cluster):
    cl, mon = make_cluster(replicas=2)
    cl.start_master("m1")
    cl.start_master("m2")
    for n in ("a1", "a2", "a3"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    leader_addr = await _leader(cl)
    leader = next(m for m in cl.masters if m.addr == leader_addr)
    other = next(m for m in cl.masters if m is not leader)
    async with Client(other.addr, timeout=10) as c:
        await populate(c, 2000)

    leader.signal(signal.SIGSTOP)  # longer than the session timeout: ZooKeeper expires its session
    try:
        assert await _leader(cl, timeout=20) == other.addr
    finally:
        leader.signal(signal.SIGCONT)
    # The old leader finds its session expired, stops leading, starts a new session and follows.
    await wait_ring(leader.addr, lambda i: i["membership"]["role"] == "zk-follower" and i["membership"]["zookeeper_connected"], timeout=20)
    await asyncio.to_thread(wait_for, lambda: "no longer leading" in leader.stderr(), 10, message="old leader stepped down")
    cl.start_aux("a4")
    info = await _settled_everywhere(cl, {"a1", "a2", "a3", "a4"}, timeout=60)
    assert info["epoch"] == (await ring(other.addr))["epoch"]
    async with Client(leader.addr, timeout=10) as c:
        values = await c.mget([f"key:{i}" for i in range(2000)])
    assert all(v is not None for v in values)
    mon.assert_forward_only()


async def test_a_master_paused_past_its_session_while_a_node_joined_cannot_delete_by_its_old_ring(make_cluster):
    """The ZooKeeper case of the embedded follower's: ``m2``, stopped past its session, resumes with DELETEs in its socket.

    The leader waited (bounded) for ``m2`` to confirm the join's ring, then
    copied anyway, having raised the aux nodes' ring floor. ``m2`` routes
    the DELETEs by its old ring, and the old owners refuse them
    (``STALE_RING``) rather than acknowledge deletes the new owner ``a3``
    never gets (the fault campaign's ``aux-kill-fast,a2,0.00,0.53;
    master-stop,m1,1.14,3.49``: 14 resurrected deletes). ``m2`` then reads
    the ring in ZooKeeper again, and the DELETEs sent again reach ``a3``.
    """
    cl, mon = make_cluster()
    m1 = cl.start_master("m1")
    assert await _leader(cl) == m1.addr
    m2 = cl.start_master("m2")
    for n in ("a1", "a2"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2"})
    members = ["a1", "a2", "a3"]
    keys = [key_owned_by("a3", members, f"paused{i}:") for i in range(10)]
    async with Client(m1.addr, timeout=10) as c1, Client(m2.addr, timeout=20) as c2:
        assert await c1.mset(dict.fromkeys(keys, b"old")) == len(keys)
        assert await c2.mget(keys) == [b"old"] * len(keys)  # c2's connection is open: its DELETEs leave at once below
        m2.signal(signal.SIGSTOP)
        try:
            await asyncio.to_thread(wait_for, lambda: "m2" not in _masters_registered(mon), 20, message="m2's session expired")
            cl.start_aux("a3")
            await wait_ring(m1.addr, settled(set(members)), timeout=40, what="a3 joined without the stopped master")
            deletes = [asyncio.ensure_future(c2.delete(k)) for k in keys]  # into m2's socket, read when it resumes
            for _ in range(5):
                await asyncio.sleep(0)
        finally:
            m2.signal(signal.SIGCONT)
        results = await asyncio.wait_for(asyncio.gather(*deletes, return_exceptions=True), 30)
        assert all(r is True or isinstance(r, StaleRingError) for r in results), results
        acknowledged = [k for k, r in zip(keys, results, strict=True) if r is True]
        assert await c1.mget(acknowledged) == [None] * len(acknowledged), "an acknowledged delete missed the new owner"
        await _settled_everywhere(cl, set(members))
        for k, r in zip(keys, results, strict=True):
            if r is not True:
                assert await c2.delete(k) is True
        assert await c1.mget(keys) == [None] * len(keys)
    mon.assert_forward_only()


async def test_aux_restarted_within_its_session_timeout_registers_again(make_cluster):
    cl, mon = make_cluster(replicas=2)
    m1 = cl.start_master("m1")
    for n in ("a1", "a2", "a3"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    async with Client(m1.addr, timeout=10) as c:
        await populate(c, 2000)
    a1 = cl.aux["a1"]
    port = int(a1.addr.rsplit(":", 1)[1])
    a1.kill()
    a1 = cl.start_aux("a1", port=port)  # its old session (and znode) lingers for up to 2 s
    await asyncio.to_thread(wait_for, lambda: "held by another ZooKeeper session" in a1.stderr(), 10, message="old znode seen")
    await asyncio.to_thread(wait_for, lambda: "registered /dcache/" in a1.stderr(), 20, message="registered again")
    info = await wait_ring(m1.addr, lambda i: settled({"a1", "a2", "a3"})(i) and "a1" in i["membership"]["registered_aux"], timeout=30)
    assert {n["node_id"] for n in info["nodes"]} == {"a1", "a2", "a3"}
    async with Client(m1.addr, timeout=10) as c:
        values = await c.mget([f"key:{i}" for i in range(2000)])
    assert all(v is not None for v in values)
    mon.assert_forward_only()


async def test_a_second_master_with_a_node_id_in_use_refuses_to_start(make_cluster):
    """One id would stamp two masters' writes with one version tag, and the duplicate contended for leader with it."""
    cl, mon = make_cluster()
    m1 = cl.start_master("twin")
    cl.start_aux("a1")
    await _settled_everywhere(cl, {"a1"})
    assert await _leader(cl) == m1.addr
    cmd = [sys.executable, "-m", "dcache", "master", "--host", "127.0.0.1", "--port", "0", "--node-id", "twin", *cl.zk]
    r = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "READY" not in r.stdout, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and "node_id" in lines[-1] and "'twin'" in lines[-1] and m1.addr in lines[-1], lines
    info = await ring(m1.addr)
    assert info["membership"]["role"] == "zk-leader" and up_nodes(info) == {"a1"}
    mon.assert_forward_only()


async def test_a_master_restarted_on_its_own_address_routes_again_at_once(make_cluster):
    """Its previous process's registration names the address it is bound to now: taken over, not waited out."""
    cl, mon = make_cluster()
    long_session = ("--zk-session-timeout", "30")  # the old registration would linger 30 s
    m1 = cl.start_master("m1", *long_session)
    cl.start_aux("a1")
    await _settled_everywhere(cl, {"a1"})
    async with Client(m1.addr, timeout=10) as c:
        await c.set("before", b"1")
    port = int(m1.addr.rsplit(":", 1)[1])
    m1.kill()  # SIGKILL: its session, and masters/m1, outlive it
    m1 = cl.start_master("m1", *long_session, port=port)
    await asyncio.to_thread(wait_for, lambda: "taken over" in m1.stderr(), 15, message="old registration taken over")
    await wait_ring(m1.addr, lambda i: up_nodes(i) == {"a1"}, timeout=15, what="m1 routes again")
    async with Client(m1.addr, timeout=10) as c:
        assert await c.get("before") == b"1"
        await c.set("after", b"2")
    assert "not routing until it goes" not in m1.stderr()
    mon.assert_forward_only()


async def test_a_new_leader_keeps_the_rings_replicas_and_says_so(make_cluster):
    """A leader started with another ``--replicas`` than the ring in ZooKeeper keeps the ring's and logs why."""
    cl, mon = make_cluster(replicas=2)
    m1 = cl.start_master("m1")
    for n in ("a1", "a2", "a3"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    await asyncio.to_thread(m1.terminate)  # its ZooKeeper session closes: the next master leads at once
    m2 = cl.start_master("m2", "--replicas", "3")
    assert await _leader(cl) == m2.addr
    info = await wait_ring(m2.addr, settled({"a1", "a2", "a3"}), timeout=20, what="the ring on the new leader")
    assert info["replicas"] == 2
    await asyncio.to_thread(
        wait_for, lambda: "--replicas 3 ignored: the cluster keeps 2 copies per key" in m2.stderr(), 10, message="warning"
    )
    mon.assert_forward_only()


async def test_a_dead_aux_node_is_forgotten_through_a_master_that_does_not_lead(make_cluster):
    """FORGET on a master that does not lead goes through ``forget/<id>``; the leader removes the node; no key is lost."""
    cl, mon = make_cluster(replicas=2)
    cl.start_master("m1")
    cl.start_master("m2")
    cl.start_aux("a1")
    cl.start_aux("a2")
    cl.start_aux("a3", "--zk-session-timeout", "6")  # a long session: it stays registered for a while after its death
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    leader = await _leader(cl)
    other = next(m.addr for m in cl.masters if m.addr != leader)
    async with Client(other, timeout=10) as c:
        await populate(c, 2000)

    def forget(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "dcache", "forget", "--addr", other, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    r = await asyncio.to_thread(forget, "a1")
    assert r.returncode == 4 and "aux node a1 is up: only a down node can be forgotten" in r.stderr, r
    cl.aux["a3"].kill()
    for addr in (leader, other):  # down, not only fenced (a fenced node is marked down, and migrated from, later)
        await wait_ring(
            addr,
            lambda i: (
                {n["node_id"]: n["state"] for n in i["nodes"]}.get("a3") == "down"
                and "a3" in i["membership"]["registered_aux"]
                and not i["migrating"]
            ),
            what=f"a3 down, its ranges copied, its registration still there, on {addr}",
        )
    r = await asyncio.to_thread(forget, "a3")
    assert r.returncode == 4 and "aux node a3 is still registered in ZooKeeper (aux/a3)" in r.stderr, r
    for addr in (leader, other):
        await wait_ring(
            addr,
            lambda i: "a3" not in i["membership"]["registered_aux"] and not i["migrating"],
            timeout=30,
            what=f"a3's session expired, its ranges copied, on {addr}",
        )

    r = await asyncio.to_thread(forget, "a3")
    assert r.returncode == 0 and r.stdout.startswith("forgot aux node a3: ring epoch "), r
    for addr in (leader, other):
        info = await wait_ring(addr, lambda i: "a3" not in {n["node_id"] for n in i["nodes"]}, what=f"a3 gone on {addr}")
        assert set(info["ring"]["nodes"]) == {"a1", "a2"}
        async with Client(addr, timeout=10) as c:
            stats = await c.stats()
            assert (stats["members"], stats["members_up"]) == (2, 2)
            values = await c.mget([f"key:{i}" for i in range(2000)])
        assert all(v is not None for v in values)
    assert "a3" not in {m["node_id"] for m in mon.read()["members"]}
    assert mon.client.get_children(mon.path.rsplit("/", 1)[0] + "/forget") == []  # the request was served and removed

    cl.start_aux("a4")  # the replacement, under a new id
    await _settled_everywhere(cl, {"a1", "a2", "a4"}, timeout=60)
    async with Client(other, timeout=10) as c:
        values = await c.mget([f"key:{i}" for i in range(2000)])
    assert all(v is not None for v in values)
    mon.assert_forward_only()


async def test_a_master_restarted_fails_no_call_while_it_reads_the_ring(make_cluster):
    """Calls that reach a restarted master before it read the ring from ZooKeeper wait for it: none fails, none is lost."""
    cl, mon = make_cluster(replicas=2)
    m1 = cl.start_master("m1")
    m2 = cl.start_master("m2")
    for n in ("a1", "a2"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2"})
    stop = asyncio.Event()
    tally = Tally()
    loads = [asyncio.create_task(native_load("both", [m1.addr, m2.addr], stop, tally))]
    try:
        await tally.reach(50)
        port = m1.port
        # Clients reach the restarted master before its ring only in a short window (until it has read the
        # ring and opened its links): restart it until its own count says calls waited there, at most 5 times.
        for _ in range(5):
            await asyncio.to_thread(m1.terminate)
            m1 = await asyncio.to_thread(cl.start_master, "m1", port=port)
            # Clients whose first calls reach the restarted master: one listing only it, one listing it first.
            fresh_stop = asyncio.Event()
            fresh = [
                asyncio.create_task(native_load("only", m1.addr, fresh_stop, tally)),
                asyncio.create_task(native_load("fresh", [m1.addr, m2.addr], fresh_stop, tally)),
            ]
            loads += fresh
            await wait_ring(m1.addr, lambda i: up_nodes(i) == {"a1", "a2"}, timeout=15, what="m1 routes again")
            await tally.reach(tally.ok + 300)
            fresh_stop.set()  # before the next restart: "only" has no other master to go to
            await asyncio.wait_for(asyncio.gather(*fresh), 15)
            async with Client(m1.addr) as c:
                if (await c.stats())["ring_waits"] > 0:
                    break
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loads), 15)
        await assert_served_while_ringless(tally, [m1.addr, m2.addr], m1.addr, {"a1", "a2"})
    finally:
        await stop_loads(stop, loads)
    mon.assert_forward_only()


def _masters_registered(mon: RingMonitor) -> set[str]:
    return set(mon.client.get_children(mon.path.rsplit("/", 1)[0] + "/masters"))


async def test_a_master_whose_session_expired_is_waited_for_before_a_move_ends(make_cluster, zookeeper):
    """Its registration gone, a master may still route by its old ring: the leader waits for it (bounded) before writes leave the old owners."""
    cl, mon = make_cluster(replicas=2)
    slow_settle = ("--follow-interval", "1")  # the leader waits up to 6 s for a master behind
    m1 = cl.start_master("m1", *slow_settle)
    assert await _leader(cl) == m1.addr
    with FaultProxy(zookeeper.hosts, name="zk-m2") as link:
        m2 = cl.start_master("m2", *slow_settle, "--zookeeper", link.addr)
        for n in ("a1", "a2", "a3"):
            cl.start_aux(n)
        await _settled_everywhere(cl, {"a1", "a2", "a3"})
        async with Client(m1.addr, timeout=10) as c:
            await populate(c, 2000)
        link.cut()  # m2 keeps routing by its ring; ZooKeeper expires its session
        await asyncio.to_thread(wait_for, lambda: "m2" not in _masters_registered(mon), 20, message="m2's session expired")
        cl.start_aux("a4")
        await wait_ring(m1.addr, lambda i: "a4" in i["ring"]["nodes"], timeout=20, what="a4 joined on m1")

        seen: list[str] = []

        async def look() -> bool:
            """Whether both settled with a4; records m1 done with the move while m2 still routed without a4 (m1 read first)."""
            one, two = await ring(m1.addr), await ring(m2.addr)
            if "a4" in one["ring"]["nodes"] and not one["migrating"] and "a4" not in two["ring"]["nodes"]:
                seen.append(f"m1 at {one['epoch']}.{one['seq']} done, m2 at {two['epoch']}.{two['seq']} without a4")
            return all(settled({"a1", "a2", "a3", "a4"})(i) for i in (one, two))

        loop = asyncio.get_running_loop()
        cut_until = loop.time() + 1.5  # m2 stays cut off that long after the join (without the wait, m1 is done by then)
        while loop.time() < cut_until and not seen:
            await look()
            await asyncio.sleep(0.02)
        link.heal()
        deadline = loop.time() + 30
        while not await look():
            assert loop.time() < deadline, "the cluster did not settle with a4"
            await asyncio.sleep(0.05)
    assert seen == [], seen[:3]
    assert "masters ['m2'] did not confirm" not in m1.stderr()  # it caught up within the wait
    mon.assert_forward_only()


async def test_a_leader_cut_off_from_zookeeper_drops_the_views_it_could_not_write(make_cluster, zookeeper):
    """Views a leader made after ZooKeeper became unreachable reached no other master: once another leads, it routes by the ring there.

    A held connection (no reset) is taken for lost only after kazoo's read
    timeout (2/3 of the session): until then the leader still coordinates.
    """
    cl, mon = make_cluster(replicas=2)
    with FaultProxy(zookeeper.hosts, name="zk-m1") as link:
        m1 = cl.start_master("m1", "--zookeeper", link.addr, "--zk-session-timeout", "6")
        for n in ("a1", "a2", "a3"):
            cl.start_aux(n)
        await _settled_everywhere(cl, {"a1", "a2", "a3"})
        assert await _leader(cl) == m1.addr
        before = await ring(m1.addr)
        # m1 routes by a view before it writes it: the cut must come after the write, or the next leader starts behind `before`
        written = (before["epoch"], before["seq"])
        await asyncio.to_thread(wait_for, lambda: (mon.read()["epoch"], mon.read()["seq"]) >= written, 10, message="m1's view in ZooKeeper")
        link.blackhole()  # m1 leads on, and for 4 s it does not even know it is cut off
        a3 = cl.aux["a3"]
        a3.signal(signal.SIGSTOP)
        try:
            # m1 fences a3: a view no other master gets (then it knows it is cut off, and changes nothing more)
            await wait_ring(
                m1.addr, lambda i: {n["node_id"]: n["state"] for n in i["nodes"]}["a3"] == "fenced", timeout=20, what="a3 fenced on m1"
            )
        finally:
            a3.signal(signal.SIGCONT)
        await asyncio.to_thread(wait_for, lambda: "m1" not in _masters_registered(mon), 30, message="m1's session expired")
        m2 = cl.start_master("m2")  # leads from the ring in ZooKeeper, where a3 was never fenced
        info = await wait_ring(
            m2.addr, lambda i: i["membership"]["role"] == "zk-leader" and settled({"a1", "a2", "a3"})(i), timeout=20, what="m2 leads"
        )
        assert (info["epoch"], info["seq"]) > (before["epoch"], before["seq"])
        mine = await ring(m1.addr)
        assert mine["epoch"] > info["epoch"], (mine["epoch"], info["epoch"])  # m1's own, unwritten, views are newer
        link.heal()
        await wait_ring(m1.addr, lambda i: i["membership"]["role"] == "zk-follower" and i["membership"]["zookeeper_connected"], timeout=20)
        await _settled_everywhere(cl, {"a1", "a2", "a3"}, timeout=20)
        one, two = await ring(m1.addr), await ring(m2.addr)
        assert (one["epoch"], one["seq"]) == (two["epoch"], two["seq"])
    assert "never reached ZooKeeper: routing by the ring there" in m1.stderr()
    mon.assert_forward_only()


async def test_a_leader_out_of_touch_with_zookeeper_changes_no_membership_and_loses_no_write(make_cluster, zookeeper):
    """Cut off from ZooKeeper, the leader neither fences nor marks down a silent node (no other master could follow): its hints bring the node up to date."""
    cl, mon = make_cluster(replicas=2)
    with FaultProxy(zookeeper.hosts, name="zk-m1") as link:
        m1 = cl.start_master("m1", "--zookeeper", link.addr)
        assert await _leader(cl) == m1.addr
        m2 = cl.start_master("m2")
        for n in ("a1", "a2", "a3"):
            cl.start_aux(n)
        await _settled_everywhere(cl, {"a1", "a2", "a3"})
        before = await ring(m1.addr)
        link.cut()
        await wait_ring(m1.addr, lambda i: not i["membership"]["zookeeper_connected"], timeout=10, what="m1 out of touch")
        a3 = cl.aux["a3"]
        states: set[str] = set()
        async with Client(m1.addr, timeout=10) as c:
            a3.signal(signal.SIGSTOP)  # silent for longer than the health checks take to mark it down
            try:
                loop = asyncio.get_running_loop()
                until = loop.time() + 3.0
                i = 0
                while loop.time() < until:
                    await c.set(f"cut:{i}", b"%d" % i)  # a3's share misses it: hints on m1
                    i += 1
                    info = await ring(m1.addr)
                    states.add({n["node_id"]: n["state"] for n in info["nodes"]}["a3"])
            finally:
                a3.signal(signal.SIGCONT)
        mine = await ring(m1.addr)
        assert states == {"up"} and (mine["epoch"], mine["seq"]) == (before["epoch"], before["seq"]), (states, mine["epoch"])
        link.heal()
        await _settled_everywhere(cl, {"a1", "a2", "a3"}, timeout=30)
    async with Client(m2.addr, timeout=10) as c:  # each key from one owner: a3's copies must be there
        values = await c.mget([f"cut:{k}" for k in range(i)])
    missing = [k for k, v in enumerate(values) if v != b"%d" % k]
    assert missing == [], (len(missing), i)
    mon.assert_forward_only()


async def test_a_node_restarted_while_down_is_read_again_by_every_master(make_cluster):
    """A master that does not lead and sees the new process only after the leader let it back asks, through its registration, to have it reconciled.

    Which comes first, that master's link reconnecting to the new process or
    the leader's view, is a race (both back off up to 1 s): the test restarts
    a node while it is down several times, and each time every master must
    read it again.
    """
    cl, mon = make_cluster(replicas=2)
    m1 = cl.start_master("m1")
    assert await _leader(cl) == m1.addr
    cl.start_master("m2")
    for n in ("a1", "a2", "a3"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    port = cl.aux["a1"].port
    for _ in range(CYCLES):
        cl.aux["a1"].kill()
        await wait_ring(m1.addr, lambda i: {n["node_id"]: n["state"] for n in i["nodes"]}["a1"] == "down", timeout=20, what="a1 down")
        await asyncio.to_thread(cl.start_aux, "a1", port=port)  # same address: the same links see a new process
        await _settled_everywhere(cl, {"a1", "a2", "a3"}, timeout=20)
    mon.assert_forward_only()


def _keys_owned_first_by(node: str, members: list[str], n: int) -> list[str]:
    """``n`` keys that ``node`` owns first in the ring of ``members`` (the owner a master reads first)."""
    r = HashRing(dict.fromkeys(members, 1.0))
    keys = [k for k in (f"fence:{i}" for i in range(20 * n)) if r.owner(k.encode()) == node]
    assert len(keys) >= n, f"only {len(keys)} keys owned by {node}"
    return keys[:n]


async def _a2_behind_proxy_spared_for_m2(cl: Cluster, proxy: FaultProxy, *m1_args: str) -> DaemonProcess:
    """Start a2 behind ``proxy`` (a1 and a3 direct) with the leader m2 running, spare m2's links to a2 from later
    cuts, then start m1 (with ``m1_args``) and return it once its links to a2 are open: a cut then reaches m1's links only."""
    a2 = cl.start_aux("a2", "--advertise", proxy.addr)
    proxy.set_upstream(a2.addr)
    for n in ("a1", "a3"):
        cl.start_aux(n)
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    pool = 2  # --aux-connections
    await asyncio.to_thread(wait_for, lambda: proxy.counters()["active"] == pool, 10, message="m2's links to a2 open")
    assert proxy.spare() == pool
    m1 = cl.start_master("m1", *m1_args)
    await _settled_everywhere(cl, {"a1", "a2", "a3"})
    await asyncio.to_thread(wait_for, lambda: proxy.counters()["active"] == 2 * pool, 10, message="m1's links to a2 open")
    return m1


async def test_a_write_missed_through_a_master_that_does_not_lead_is_fenced_by_the_leader(make_cluster):
    """A write through a master that does not lead, missed by an owner, is acknowledged once the leader fenced that owner.

    Only ``m1``'s links to ``a2`` are cut (the proxy spares ``m2``'s, open
    before ``m1`` started): the leader ``m2`` still reads ``a2`` first for
    these keys, so without the fence it would answer ``a2``'s older copy.
    """
    cl, mon = make_cluster(replicas=2)
    m2 = cl.start_master("m2")
    assert await _leader(cl) == m2.addr
    with FaultProxy(name="a2") as proxy:
        m1 = await _a2_behind_proxy_spared_for_m2(cl, proxy)
        keys = _keys_owned_first_by("a2", ["a1", "a2", "a3"], 20)
        async with Client(m1.addr, timeout=10) as writer, Client(m2.addr, timeout=10) as reader:
            for k in keys:
                assert await writer.set(k, b"old") is True
            assert await reader.mget(keys) == [b"old"] * len(keys)
            proxy.cut()  # m1 no longer reaches a2; m2 does
            stale = []
            for k in keys:
                assert await writer.set(k, b"new") is True  # a1 or a3 applied it; a2 missed it
                got = await reader.get(k)
                if got != b"new":
                    stale.append((k, got))
            assert stale == [], stale
            proxy.heal()
            await _settled_everywhere(cl, {"a1", "a2", "a3"})
            assert await reader.mget(keys) == [b"new"] * len(keys)
            with pytest.raises(UnavailableError, match="does not lead"):  # never forwarded: FENCE goes to the leader only
                await writer.execute(Op.FENCE, "a2", 0, "a test")
    assert "could not fence" not in m1.stderr()  # every miss was fenced by the leader
    mon.assert_forward_only()


async def test_a_leader_out_of_touch_with_zookeeper_refuses_to_fence_and_the_write_keeps_its_hints(make_cluster, zookeeper):
    """Cut off from ZooKeeper, the leader fences no node for another master: that master acknowledges the write with its hints only.

    As an embedded follower whose coordinator cannot be reached; the hints
    bring the node up to date once the links heal. Meanwhile the leader,
    out of touch, reads every owner and answers the newest: it read the
    node's older value before (5 of 5 keys).
    """
    cl, mon = make_cluster(replicas=2)
    with FaultProxy(zookeeper.hosts, name="zk-m2") as zk_link, FaultProxy(name="a2") as proxy:
        m2 = cl.start_master("m2", "--zookeeper", zk_link.addr, "--zk-session-timeout", "8")  # m1 cannot lead for 8 s
        assert await _leader(cl) == m2.addr
        m1 = await _a2_behind_proxy_spared_for_m2(cl, proxy)
        before = await ring(m2.addr)
        keys = _keys_owned_first_by("a2", ["a1", "a2", "a3"], 5)
        async with Client(m1.addr, timeout=10) as writer:
            assert await writer.mset(dict.fromkeys(keys, b"old")) == len(keys)  # on every owner
        zk_link.cut()
        await wait_ring(m2.addr, lambda i: not i["membership"]["zookeeper_connected"], timeout=10, what="m2 out of touch")
        proxy.cut()
        async with Client(m1.addr, timeout=10) as writer:
            for k in keys:
                assert await writer.set(k, b"new") is True  # acknowledged: hints on m1, no fence
        after = await ring(m2.addr)
        assert (after["epoch"], after["seq"]) == (before["epoch"], before["seq"])
        assert {n["node_id"]: n["state"] for n in after["nodes"]}["a2"] == "up"
        # a2, first owner of these keys, still has "old": m2, out of touch too, reads every owner and answers the newest
        async with Client(m2.addr, timeout=10) as reader:
            assert await reader.mget(keys) == [b"new"] * len(keys)
            assert [await reader.get(k) for k in keys] == [b"new"] * len(keys)
        assert after["reads_every_owner"] is True
        refused = "could not fence aux node a2, which missed a write (master m2 leads but is out of touch with ZooKeeper"
        await asyncio.to_thread(wait_for, lambda: refused in m1.stderr(), 10, message="m1 logged the refused fence")
        async with Client(m1.addr, timeout=10) as c:
            assert (await c.stats())["fences_failed"] == len(keys)
        assert m1.stderr().count("could not fence aux node a2") == 1  # one line, not one per write
        proxy.heal()
        zk_link.heal()
        await _settled_everywhere(cl, {"a1", "a2", "a3"})
        await asyncio.to_thread(wait_for, lambda: "aux node a2 is up to date" in m1.stderr(), 10, message="m1's hints replayed")
        async with Client(m2.addr, timeout=10) as reader:
            assert await reader.mget(keys) == [b"new"] * len(keys)
    mon.assert_forward_only()


async def test_a_fence_a_leader_could_not_write_to_zookeeper_keeps_the_nodes_hints(make_cluster, zookeeper):
    """A leader that does not know yet that ZooKeeper is out of reach fences a node for its own missed write: the node keeps its hints.

    The fence's view never reaches ZooKeeper and is dropped when the leader
    steps down, so nothing reconciles the node: only the hints bring it the
    writes. ``m1`` leads (``m2``, which led first, lost its session) and
    alone has its links to ``a2`` cut, so its reconciliation cannot reach
    ``a2`` before it steps down, and ``m2``, leading next, finds ``a2``
    answering (not down, not fenced) and reads it first for these keys.
    """
    cl, mon = make_cluster(replicas=2)
    with (
        FaultProxy(zookeeper.hosts, name="zk-m1") as zk_m1,
        FaultProxy(zookeeper.hosts, name="zk-m2") as zk_m2,
        FaultProxy(name="a2") as proxy,
    ):
        m2 = cl.start_master("m2", "--zookeeper", zk_m2.addr)
        assert await _leader(cl) == m2.addr
        m1 = await _a2_behind_proxy_spared_for_m2(cl, proxy, "--zookeeper", zk_m1.addr, "--zk-session-timeout", "6")
        zk_m2.cut()  # m2's session expires: m1 leads; m2 keeps its links to a2
        await wait_ring(m1.addr, lambda i: i["membership"]["role"] == "zk-leader", timeout=20, what="m1 leads")
        zk_m2.heal()
        await wait_ring(m2.addr, lambda i: i["membership"]["role"] == "zk-follower" and i["membership"]["zookeeper_connected"], timeout=20)
        await _settled_everywhere(cl, {"a1", "a2", "a3"})
        keys = _keys_owned_first_by("a2", ["a1", "a2", "a3"], 20)
        async with Client(m1.addr, timeout=15) as writer:
            await asyncio.gather(*(writer.set(k, b"old") for k in keys))
            zk_m1.blackhole()  # m1 leads on, and for 4 s it does not even know it is cut off
            proxy.cut()  # m1 no longer reaches a2; m2 does
            assert all(await asyncio.gather(*(writer.set(k, b"new") for k in keys)))  # a2 missed them: hints on m1
        fenced = await ring(m1.addr)
        # In a view only m1 has; not down: a down mark waits until the views before it are in ZooKeeper.
        assert {n["node_id"]: n["state"] for n in fenced["nodes"]}["a2"] == "fenced"
        await asyncio.to_thread(wait_for, lambda: "m1" not in _masters_registered(mon), 30, message="m1's session expired")
        await wait_ring(
            m2.addr, lambda i: i["membership"]["role"] == "zk-leader" and settled({"a1", "a2", "a3"})(i), timeout=20, what="m2 leads"
        )
        zk_m1.heal()  # m1 steps down and drops the view that fenced a2
        await wait_ring(m1.addr, lambda i: i["membership"]["role"] == "zk-follower" and i["membership"]["zookeeper_connected"], timeout=20)
        proxy.heal()
        await _settled_everywhere(cl, {"a1", "a2", "a3"}, timeout=20)
        await asyncio.to_thread(wait_for, lambda: "aux node a2 is up to date" in m1.stderr(), 15, message="m1's hints replayed")
        for m in (m1, m2):
            async with Client(m.addr, timeout=10) as reader:
                assert await reader.mget(keys) == [b"new"] * len(keys), m.addr
    assert "never reached ZooKeeper: routing by the ring there" in m1.stderr()
    assert "aux node a2 not marked down" in m1.stderr()  # held back: the fence was not in ZooKeeper
    mon.assert_forward_only()


#: The session timeout of the ZkSession under test below: kazoo finds a silent server dead after about 2/3 of it.
SESSION_S = 12.0


async def test_waiting_for_masters_keeps_its_bound_and_names_them_while_zookeeper_is_silent(zookeeper) -> None:
    """A stopped ZooKeeper (connections open, nothing answered) must neither stretch the wait past its
    bound nor end it as if every master had confirmed: the masters last seen are named as behind."""
    path = "/dcache-test-session/masters"
    with FaultProxy(zookeeper.hosts, name="zk") as link:
        zk = ZkSession(link.addr, SESSION_S, "test")
        await zk.start()
        try:
            assert await zk.wait_connected(15)
            await zk.run(zk.client.ensure_path, path)
            await zk.run(zk.client.create, f"{path}/m1", dumps({"epoch": 3, "seq": 0}), ephemeral=True)
            await zk.run(zk.client.create, f"{path}/m2", dumps({"epoch": 2, "seq": 5}), ephemeral=True)
            assert await zk.wait_masters_at(path, (2, 5), 5.0) == []
            assert await zk.wait_masters_at(path, (3, 0), 0.2) == ["m2"]
            assert await zk.wait_masters_at(path, (3, 0), 0.2, skip="m2") == []

            link.blackhole()  # as a SIGSTOPped ZooKeeper: reads hang until kazoo finds the connection dead
            started = time.monotonic()
            lagging = await zk.wait_masters_at(path, (3, 0), 1.0, skip="m1")
            took = time.monotonic() - started
            assert lagging == ["m2"]  # unconfirmed, not "all caught up"
            assert took < SESSION_S / 3, f"a 1 s wait took {took:.1f} s"  # not held until kazoo gives up
            lagging = await zk.wait_masters_at(path, (3, 0), 0.5, absent=lambda: ["m3"])
            assert lagging == ["m1", "m2", "m3"]
        finally:
            link.heal()
            await zk.close()
