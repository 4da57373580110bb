"""An aux node serves a large MGET ``KEYS_PER_TURN`` keys per loop iteration, and a RESP DEL of many keys
``KEYS_PER_STEP`` keys per iteration, on a real (never started) node and fake transports.

Loop iterations are counted, not timed: the node's cache counts a hit per
key looked up, and a callback scheduled behind the request's first slice
sees how many keys the MGET had looked up when the loop came to it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis

from dcache.auxnode.node import AuxNode
from dcache.auxnode.tracking import GONE
from dcache.config import AuxConfig
from dcache.errors import Status
from dcache.hlc import wall_ms
from dcache.lru import LRUCache
from dcache.protocol import Op
from dcache.protocol.limits import KEYS_PER_TURN
from dcache.respserver import KEYS_PER_STEP, RespProtocol
from tests.fakes import FakeTransport
from tests.unit.auxnode.test_tracking import Wire, settle, until
from tests.unit.test_respserver import cmd as resp
from tests.unit.test_respserver import connect

OK = int(Status.OK)
N = 2 * KEYS_PER_TURN + 10


def node_with_keys(n: int = N) -> tuple[AuxNode, list[bytes]]:
    node = AuxNode(AuxConfig(node_id="t-aux"))
    keys = [b"key:%05d" % i for i in range(n)]
    for i, k in enumerate(keys):
        node.cache.set(k, b"v%d" % i, version=i + 1)
    return node, keys


def answers_in_order(wire: Wire) -> list[list[Any]]:
    """Every answer frame ``[rid, status, result]`` in the order it was written."""
    return list(wire.transport.frames())


async def test_a_large_mget_is_looked_up_a_slice_per_loop_iteration_and_other_connections_run_between() -> None:
    node, keys = node_with_keys()
    client, other = Wire(node), Wire(node)
    seen: list[int] = []

    def ping_between() -> None:
        rid = other.call(Op.PING)
        assert other.answer(rid) == "PONG"
        seen.append(node.cache.hits)

    rid = client.call(Op.MGET, keys)
    assert node.cache.hits == KEYS_PER_TURN  # one slice in the call that read the request
    assert client.transport.frames() == [] and not client.transport.reading
    asyncio.get_running_loop().call_soon(ping_between)  # queued behind the second slice
    await until(lambda: client.answers().get(rid), "the MGET's answer")
    assert seen == [2 * KEYS_PER_TURN]  # the other connection ran before the MGET's last slice
    assert client.answer(rid) == [b"v%d" % i for i in range(N)]  # one answer, every value in order
    await settle()
    assert client.transport.reading


async def test_the_requests_pipelined_after_a_large_mget_run_after_its_last_slice() -> None:
    node, keys = node_with_keys()
    client = Wire(node)
    last = keys[-1]
    rids = client.send([Op.MGET, keys], [Op.SET, last, b"new"], [Op.GET, last])
    assert client.transport.frames() == []  # the SET waits behind the MGET
    await until(lambda: len(client.transport.frames()) == 3, "three answers")
    frames = answers_in_order(client)
    assert [f[0] for f in frames] == rids
    assert frames[0][1:] == [OK, [b"v%d" % i for i in range(N)]]  # the MGET read the value before the SET
    assert frames[1][1:] == [OK, True] and frames[2][1:] == [OK, b"new"]


async def test_an_mget_of_at_most_one_slice_is_answered_in_the_call() -> None:
    node, keys = node_with_keys(KEYS_PER_TURN)
    client = Wire(node)
    rid = client.call(Op.MGET, keys)
    assert client.answer(rid) == [b"v%d" % i for i in range(KEYS_PER_TURN)] and client.transport.reading


async def test_a_large_mget_run_in_process_without_a_connection_is_answered_whole() -> None:
    """``Service.execute`` (tools, tests) has no connection to hold: the MGET runs in one go."""
    node, keys = node_with_keys()
    assert node.execute([Op.MGET, 1, keys]) == [b"v%d" % i for i in range(N)]


async def test_a_large_mget_whose_client_left_looks_up_no_more_keys() -> None:
    node, keys = node_with_keys(3 * KEYS_PER_TURN)
    client, other = Wire(node), Wire(node)
    client.call(Op.MGET, keys)
    client.transport.close()
    await settle()
    assert node.cache.hits == KEYS_PER_TURN
    assert other.answer(other.call(Op.GET, keys[0])) == b"v0"  # the node serves on


class _FailingCache(LRUCache):
    """A cache whose read of one key raises (a bug in a later slice)."""

    def __init__(self, bad: bytes) -> None:
        super().__init__(1 << 30, 1 << 20)
        self.bad = bad

    def get(self, key: bytes) -> bytes | None:
        if key == self.bad:
            raise RuntimeError("boom")
        return super().get(key)


async def test_a_slice_that_raises_answers_an_error_and_the_connection_goes_on() -> None:
    node, keys = node_with_keys(0)
    keys = [b"key:%05d" % i for i in range(N)]
    node.cache = _FailingCache(keys[KEYS_PER_TURN + 1])
    node.cache.set(keys[0], b"v0", version=1)
    client = Wire(node)
    rids = client.send([Op.MGET, keys], [Op.GET, keys[0]])
    await until(lambda: len(client.transport.frames()) == 2, "two answers")
    frames = answers_in_order(client)
    assert [f[0] for f in frames] == rids
    assert frames[0][1] == int(Status.INTERNAL) and "RuntimeError" in frames[0][2]
    assert frames[1][1:] == [OK, b"v0"]
    await settle()
    assert client.transport.reading


async def test_a_large_mget_whose_values_pass_the_frame_limit_is_refused_by_the_slice_that_passes_it() -> None:
    node = AuxNode(AuxConfig(node_id="t-aux", max_value_bytes=1 << 16, max_frame_bytes=1 << 20))
    keys = [b"key:%05d" % i for i in range(N)]
    for i, k in enumerate(keys):
        node.cache.set(k, b"x" * 1100, version=i + 1)
    client = Wire(node)
    rid = client.call(Op.MGET, keys)
    await until(lambda: client.answers().get(rid), "the MGET's answer")
    status, message = client.answers()[rid][1:]
    assert status == int(Status.FRAME_TOO_LARGE) and f"these {N} keys" in message
    assert node.cache.hits == 2 * KEYS_PER_TURN  # the second slice passed 1 MiB: no third one


async def test_a_large_mget_that_expires_a_tracked_key_in_a_later_slice_is_answered_after_the_invalidation_is_acknowledged() -> None:
    """As the dispatch holds a handler's answer when it changed a key a master holds a copy of (``Service.hold``)."""
    node, keys = node_with_keys()
    master, client = Wire(node), Wire(node)
    late = keys[KEYS_PER_TURN + 3]  # looked up by the second slice
    expires_at = wall_ms() + 30
    node.cache.set(late, b"soon gone", expires_at=expires_at, version=N + 1)
    assert master.answer(master.call(Op.GETV, late, True))[0] == b"soon gone"  # a master's near cache holds it
    await until(lambda: wall_ms() > expires_at, "the key's expiry")
    rid = client.call(Op.MGET, keys)
    [push] = await until(master.pushes, "the INVALIDATE push")
    assert push[1] == [[late, GONE]]
    await settle()
    assert rid not in client.answers()  # every key looked up, the answer held for the master's acknowledgement
    master.call(Op.INVACK, push[0])
    values = client.answer(rid)
    assert values[KEYS_PER_TURN + 3] is None and values[0] == b"v0" and len(values) == N


def resp_wire(node: AuxNode) -> tuple[RespProtocol, FakeTransport]:
    return connect(node)


def resp_replies(transport: FakeTransport) -> list[Any]:
    reader = hiredis.Reader()
    reader.feed(b"".join(transport.written))
    out = []
    while (reply := reader.gets()) is not False:
        out.append(reply)
    return out


async def test_a_large_resp_mget_is_looked_up_a_slice_per_loop_iteration() -> None:
    node, keys = node_with_keys()
    conn, transport = resp_wire(node)
    conn.data_received(resp(b"MGET", *keys) + resp(b"SET", keys[-1], b"new") + resp(b"GET", keys[-1]))
    assert node.cache.hits == KEYS_PER_TURN and transport.written == []
    await until(lambda: len(resp_replies(transport)) == 3, "three replies")
    assert resp_replies(transport) == [[b"v%d" % i for i in range(N)], b"OK", b"new"]


async def test_a_large_mget_in_a_transaction_on_an_aux_node_runs_whole_in_one_step() -> None:
    """EXEC on an aux node's port is atomic (docs/RESP.md): its steps are never sliced."""
    node, keys = node_with_keys()
    conn, transport = resp_wire(node)
    conn.data_received(resp(b"MULTI") + resp(b"MGET", *keys) + resp(b"SET", keys[-1], b"new") + resp(b"EXEC"))
    assert node.cache.hits == N  # in the call that read EXEC
    assert resp_replies(transport) == [b"OK", b"QUEUED", b"QUEUED", [[b"v%d" % i for i in range(N)], b"OK"]]


async def test_a_resp_del_of_many_keys_on_an_aux_node_deletes_a_chunk_per_loop_iteration() -> None:
    n = 2 * KEYS_PER_STEP + 10
    node, keys = node_with_keys(n)
    conn, transport = resp_wire(node)
    seen: list[int] = []
    conn.data_received(resp(b"DEL", *keys) + resp(b"GET", keys[-1]) + resp(b"EXISTS", *keys[:3]))
    assert len(node.cache) == n - KEYS_PER_STEP and transport.written == []  # one chunk in the call that read it
    asyncio.get_running_loop().call_soon(lambda: seen.append(len(node.cache)))  # queued behind the second chunk
    await until(lambda: len(resp_replies(transport)) == 3, "three replies")
    assert seen == [n - 2 * KEYS_PER_STEP]
    assert resp_replies(transport) == [n, None, 0]
    await settle()
    assert transport.reading


async def test_a_resp_del_of_many_keys_in_a_transaction_on_an_aux_node_runs_whole_in_one_step() -> None:
    n = 2 * KEYS_PER_STEP + 10
    node, keys = node_with_keys(n)
    conn, transport = resp_wire(node)
    conn.data_received(resp(b"MULTI") + resp(b"DEL", *keys) + resp(b"EXEC"))
    assert len(node.cache) == 0
    assert resp_replies(transport) == [b"OK", b"QUEUED", [n]]


async def test_a_resp_del_whose_client_left_deletes_no_more_chunks() -> None:
    n = 3 * KEYS_PER_STEP
    node, keys = node_with_keys(n)
    conn, transport = resp_wire(node)
    conn.data_received(resp(b"DEL", *keys))
    transport.close()
    await settle()
    assert len(node.cache) == n - KEYS_PER_STEP
