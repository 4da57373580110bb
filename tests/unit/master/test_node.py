"""The master node's own rules, over a master that is not started (no sockets)."""

from __future__ import annotations

from dataclasses import replace

from dcache.cli import _format_ring
from dcache.config import MasterConfig
from dcache.master.membership import Coordinator, Follower
from dcache.master.node import MasterNode
from dcache.master.view import DOWN, ClusterView, Member

AUX = (("a1", "127.0.0.1", 1), ("a2", "127.0.0.1", 2), ("a3", "127.0.0.1", 3))


async def test_an_embedded_coordinator_drops_a_nodes_hints_with_the_view_that_fences_it_or_marks_it_down() -> None:
    """Embedded mode: every view the coordinator publishes is written (its followers poll it), so hints go at once.

    A fenced node is reconciled, a down one refilled by a migration, before
    it serves reads: its hints are not needed. (In ZooKeeper mode the leader
    drops them only once the view is in ZooKeeper:
    tests/integration/test_zookeeper.py.)
    """
    node = MasterNode(MasterConfig(node_id="t-master", replicas=2, aux=AUX))
    coord = node.membership
    assert isinstance(coord, Coordinator)
    hints = node.router.hints
    try:
        hints.add_set("a1", b"k1", b"v", 0, 1)
        hints.add_delete("a2", b"k2", 2)
        coord.fence("a1", "a test")
        assert "a1" not in hints and "a2" in hints
        coord.mark("a2", DOWN, "a test")
        assert "a2" not in hints
    finally:
        await coord.close()


async def test_a_follower_master_reads_every_owner_while_the_view_it_adopts_says_so() -> None:
    """A follower learns that the coordinator's rebuilt ring is being reconciled from the view (``reconciling``)."""
    node = MasterNode(MasterConfig(node_id="t-follower", replicas=2, coordinator="127.0.0.1:1"))
    follower = node.membership
    try:
        assert isinstance(follower, Follower) and node.router.read_every_owner is False
        view = ClusterView.initial([Member(n, h, p) for n, h, p in AUX], 2, epoch=5)
        follower.publish(replace(view, reconciling=True))
        assert node.router.read_every_owner is True and node.router.view.reconciling is True
        assert (await node.ring_info())["reads_every_owner"] is True
        follower.publish(node.router.view.bumped(reconciling=False))
        assert node.router.read_every_owner is False
    finally:
        await follower.close()


async def test_a_zookeeper_master_reads_every_owner_while_out_of_touch_with_zookeeper() -> None:
    """While its ZooKeeper session is suspended or lost no master can fence a node, and a write that missed one is
    acknowledged with hints only: this master's reads then ask every owner and answer the newest, and its near-cache
    copies go (their owner may be the node that missed the write). Back in touch, reads ask one owner again."""
    from kazoo.client import KazooState

    node = MasterNode(MasterConfig(node_id="t-zk", replicas=2, zookeeper="127.0.0.1:1", near_cache_size=1 << 20))
    zk = node.membership.zk  # type: ignore[attr-defined]
    near = node.router.near
    assert near is not None
    try:
        fill = near.start_fill(b"hot")
        assert fill is not None
        near.end_fill(b"hot", fill, [b"v", 0, 7], object())
        assert b"hot" in near.entries and node.router.read_every_owner is False
        zk._on_state(KazooState.SUSPENDED)
        assert node.router.read_every_owner is True and not near.entries
        info = await node.ring_info()
        assert info["reads_every_owner"] is True
        assert "reads ask every owner of a key while this master is out of touch with ZooKeeper" in _format_ring(info)  # `dcache ring`
        zk._on_state(KazooState.CONNECTED)
        assert node.router.read_every_owner is False
        zk._on_state(KazooState.LOST)
        assert node.router.read_every_owner is True
        node._on_view(replace(node.router.view, seq=node.router.view.seq + 1))  # a view that does not say reconciling
        assert node.router.read_every_owner is True, "still out of touch"
    finally:
        await node.membership.close()
