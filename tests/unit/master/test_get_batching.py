"""The master's batched first-owner GETs, over fake aux connections (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dcache.config import MasterConfig
from dcache.master.membership import Membership
from dcache.master.node import MasterNode
from dcache.protocol import Op, encode_request
from tests.fakes import FakeAux, FakeTransport


async def _master(aux: FakeAux) -> MasterNode:
    node = MasterNode(
        MasterConfig(port=0, replicas=2, shutdown_grace=0, aux=(("a1", "127.0.0.1", 1), ("a2", "127.0.0.1", 2))),
        connect=aux.connect,
    )
    node._on_view(node.membership.view)
    for link in node.links.values():
        link.start()
    await _until(lambda: all(link.connected for link in node.links.values()))
    return node


async def _until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def _reads(aux: FakeAux, node_id: str) -> list[list[Any]]:
    return [m for m in aux.requests.get(node_id, []) if m[0] in (Op.GET, Op.MGET)]


def _key_first_owned_by(node: MasterNode, owner: str) -> bytes:
    return next(k for k in (b"k%d" % i for i in range(1000)) if node.router.view.read_candidates(k)[0] == owner)


async def test_a_get_routed_before_a_fence_is_routed_again() -> None:
    """A GET batched for a node that is fenced before the batch leaves must not be read from it."""
    aux = FakeAux()
    node = await _master(aux)
    try:
        client = node.protocol_factory()
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        key = _key_first_owned_by(node, "a2")
        client.data_received(encode_request(Op.GET, 7, key))  # batched for a2, sent at the end of the iteration
        Membership.on_aux_restart(node.membership, "a2")  # a2 found restarted in the same iteration: fenced
        assert node.router.view.read_candidates(key)[0] == "a1"
        for _ in range(3):
            await asyncio.sleep(0)
        assert _reads(aux, "a2") == []
        sent = _reads(aux, "a1")
        assert len(sent) == 1 and sent[0][2] in (key, [key])
    finally:
        await node.close()


async def test_gets_of_one_iteration_go_as_one_mget_per_node() -> None:
    aux = FakeAux()
    node = await _master(aux)
    try:
        client = node.protocol_factory()
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        keys = [k for k in (b"k%d" % i for i in range(200)) if node.router.view.read_candidates(k)[0] == "a1"][:5]
        for rid, key in enumerate(keys, 1):
            client.data_received(encode_request(Op.GET, rid, key))
        await asyncio.sleep(0)
        assert [(m[0], m[2]) for m in _reads(aux, "a1")] == [(Op.MGET, keys)]
    finally:
        await node.close()
