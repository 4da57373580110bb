"""The master's batched first-owner GETs, with fake upstream connections (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

from dcache.config import MasterConfig
from dcache.master.links import UpstreamProtocol
from dcache.master.membership import Membership
from dcache.master.node import MasterNode
from dcache.protocol import FrameDecoder, Op, encode_request
from tests.fakes import FakeTransport


def _requests(transport: FakeTransport) -> list[list[Any]]:
    return FrameDecoder().feed(b"".join(transport.written))


async def _master() -> tuple[MasterNode, dict[str, FakeTransport]]:
    node = MasterNode(MasterConfig(port=0, replicas=2, shutdown_grace=0, aux=(("a1", "127.0.0.1", 1), ("a2", "127.0.0.1", 2))))
    node._on_view(node.membership.view)
    upstream: dict[str, FakeTransport] = {}
    for node_id, link in node.links.items():
        link.start()  # the connector fails in the background (nothing listens): the fake below is used
        proto = UpstreamProtocol(node_id, node.flush_all)
        upstream[node_id] = FakeTransport()
        proto.connection_made(upstream[node_id])  # type: ignore[arg-type]
        link._conns = [proto]
    return node, upstream


def _key_first_owned_by(node: MasterNode, owner: str) -> bytes:
    return next(k for k in (b"k%d" % i for i in range(1000)) if node.router.view.read_candidates(k)[0] == owner)


async def test_a_get_routed_before_a_fence_is_routed_again() -> None:
    """A GET batched for a node that is fenced before the batch leaves must not be read from it."""
    node, upstream = await _master()
    try:
        client = node.protocol_factory()
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        key = _key_first_owned_by(node, "a2")
        client.data_received(encode_request(Op.GET, 7, key))  # batched for a2, sent at the end of the iteration
        Membership.on_aux_restart(node.membership, "a2")  # a2 found restarted in the same iteration: fenced
        assert node.router.view.read_candidates(key)[0] == "a1"
        for _ in range(3):
            await asyncio.sleep(0)
        assert [m for m in _requests(upstream["a2"]) if m[0] in (Op.GET, Op.MGET)] == []
        sent = [m for m in _requests(upstream["a1"]) if m[0] in (Op.GET, Op.MGET)]
        assert len(sent) == 1 and sent[0][2] in (key, [key])
    finally:
        await node.close()


async def test_gets_of_one_iteration_go_as_one_mget_per_node() -> None:
    node, upstream = await _master()
    try:
        client = node.protocol_factory()
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        keys = [k for k in (b"k%d" % i for i in range(200)) if node.router.view.read_candidates(k)[0] == "a1"][:5]
        for rid, key in enumerate(keys, 1):
            client.data_received(encode_request(Op.GET, rid, key))
        await asyncio.sleep(0)
        sent = [m for m in _requests(upstream["a1"]) if m[0] in (Op.GET, Op.MGET)]
        assert [(m[0], m[2]) for m in sent] == [(Op.MGET, keys)]
    finally:
        await node.close()
