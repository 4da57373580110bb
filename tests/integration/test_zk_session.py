"""dcache.zookeeper.ZkSession against a real ZooKeeper behind a fault proxy.

The waits the leader and the aux agents make on ZooKeeper keep their bounds
when ZooKeeper stops answering, and say who did not confirm.
"""

from __future__ import annotations

import time

import pytest

from dcache.zookeeper import ZkSession, dumps
from tests.faults.proxy import FaultProxy
from tests.zookeeper import ZooKeeperServer

pytestmark = pytest.mark.slow

#: The session timeout of the client under test: kazoo finds a silent server dead after about 2/3 of it.
SESSION_S = 12.0


@pytest.fixture(scope="module")
def zookeeper(tmp_path_factory):
    server = ZooKeeperServer(tmp_path_factory.mktemp("zk")).start()
    yield server
    server.stop()


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
